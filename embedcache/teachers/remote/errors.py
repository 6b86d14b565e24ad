"""Errors of the remote teacher. Messages are one line and never contain the API key."""
from __future__ import annotations

from ...errors import BudgetError, EmbedcacheError

__all__ = ["RemoteError", "UnreadableAnswer", "RemoteUnavailableError", "BudgetError"]


class RemoteError(EmbedcacheError):
    """A request the service refused or answered wrongly (a refused key, a wrong count or dimension)."""


class UnreadableAnswer(RemoteError):
    """The service answered (so charged) with something that cannot be read."""


class RemoteUnavailableError(EmbedcacheError):
    """The service could not be reached or kept failing after every retry: rerun later to resume."""
    exit_code = 75  # EX_TEMPFAIL, like a full disk: the same command resumes
