"""Errors a user can cause. Each message is one line: what is wrong, then what to do.

The CLI prints them without a traceback and exits with the error's ``exit_code``: 2 for a user
error, 3 for a paid teacher's budget or quota run out, 4 for a remote service's answer that cannot be
kept (``teachers.remote.errors.BadAnswer``), 75 (EX_TEMPFAIL: try again later) for a full disk, an
unreachable remote teacher, or a store or run held by another live process, where rerunning the same command
resumes (README, Exit codes). Running out of
memory is said by the CLI, exit 2.
"""


class EmbedcacheError(Exception):
    """Base class; the CLI prints these as one line and exits with ``exit_code``."""
    exit_code = 2


class DatasetError(EmbedcacheError):
    pass


class TeacherLoadError(EmbedcacheError):
    pass


class TeacherOutputError(EmbedcacheError):
    """A teacher answered with NaN or inf (damaged weights, a precision that overflows): never stored."""


class StoreError(EmbedcacheError):
    pass


class StoreMismatchError(StoreError):
    pass


class StoreDamagedError(StoreError):
    """A block or file does not match the checksum written with it (a lost chunk, a truncated file)."""


class ConfigError(EmbedcacheError, ValueError):
    pass


class EvaluationError(EmbedcacheError, ValueError):
    """An evaluation that cannot be done as asked (empty label set, no unseen class, too few shots)."""


class TrainingError(EmbedcacheError):
    """A run that cannot go on (a NaN loss, a run directory made for another store)."""


class DiskFullError(EmbedcacheError, OSError):
    exit_code = 75


class BusyError(EmbedcacheError):
    """What the call needs is held by another live process (an extraction writing the store, a run training):
    exit 75, so a scheduler that retries on it retries once that process is done, not never."""
    exit_code = 75


class StoreBusyError(StoreError, BusyError):
    pass


class RunBusyError(TrainingError, BusyError):
    pass


class BudgetError(EmbedcacheError):
    """A paid teacher's query budget or a server's quota ran out: the store is left resumable."""
    exit_code = 3


class WaitTooLong(BudgetError):
    """A paid teacher's service asks to wait longer than ``teacher.max_retry_wait`` (a rate limit): the run
    stops as a spent budget does, resumable, but exits 75 (try again later), not 3."""
    exit_code = 75


def first_line(exc: BaseException) -> str:
    """An exception's first line (at most 200 characters), or its type's name when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


OUT_OF_MEMORY = ("DefaultCPUAllocator", "you tried to allocate", "out of memory")  # torch's CPU allocator; CUDA's


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: torch's (CPU allocator, CUDA) or numpy's MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in OUT_OF_MEMORY)


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning as the user reads it: one ``warning:`` line, not a file, line and source
    (``warnings.showwarning`` of the CLI and of the processes it starts), on a line of its own above any
    progress bar of this process (printed plainly, it ran on at the end of the bar's line)."""
    import sys

    from tqdm import tqdm

    out = file or sys.stderr
    tqdm.write(f"warning: {message}", file=out)
    out.flush()  # said where it happens, between the lines around it (tqdm.write does not flush)
