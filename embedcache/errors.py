"""Errors a user can cause. Each message is one line: what is wrong, then what to do."""


class EmbedcacheError(Exception):
    """Base class; the CLI prints these as one line and exits with status 2."""


class DatasetError(EmbedcacheError):
    pass


class TeacherLoadError(EmbedcacheError):
    pass


class StoreError(EmbedcacheError):
    pass


class StoreMismatchError(StoreError):
    pass


class ConfigError(EmbedcacheError):
    pass


class EvaluationError(EmbedcacheError, ValueError):
    """An evaluation that cannot be done as asked (empty label set, no unseen class, too few shots)."""
