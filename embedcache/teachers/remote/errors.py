"""Errors of the remote teacher. Messages are one line and never contain the API key."""
from __future__ import annotations

from ...errors import BudgetError, EmbedcacheError

__all__ = ["RemoteError", "BadAnswer", "UnreadableAnswer", "RemoteUnavailableError", "BudgetError"]


class RemoteError(EmbedcacheError):
    """A request the service refused or answered wrongly (a refused key, a wrong count or dimension)."""


class BadAnswer(RemoteError):
    """The service answered (and may have charged) with what cannot be kept: a wrong count or dimension,
    non-finite or all-zero vectors, another model. Nothing of it is written; the store resumes."""
    exit_code = 4  # not the user's settings (2): the service's answer


class UnreadableAnswer(BadAnswer):
    """The service answered (so charged) with something that cannot be read."""


class RemoteUnavailableError(EmbedcacheError):
    """The service could not be reached or kept failing after every retry: rerun later to resume."""
    exit_code = 75  # EX_TEMPFAIL, like a full disk: the same command resumes
