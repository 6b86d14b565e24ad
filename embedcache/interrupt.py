"""Stopping long work on request: the first Ctrl-C (SIGINT) or SIGTERM asks work to stop at its next
step boundary (a training step, a run of a sweep); a second one, half a second or more later, stops at
once (one sent twice together, as `timeout` sends it to the child and its process group, is one request).

``with graceful():`` installs the handlers (main thread only) and restores the old ones on exit;
``requested()`` is what loops poll. Work that stops on request raises a ``KeyboardInterrupt``
subclass, so the CLI prints one line and exits 128 + the signal: 130 after Ctrl-C, 143 after SIGTERM.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

_stop = threading.Event()
_signalled = threading.Event()  # the CLI's handler took a signal (``one_request_per_signal``)
_depth = [0]  # graceful() contexts open: only the outermost clears the request on exit
_last = []  # when the last request began (every handler's, so a repeat is one whichever handler gets it)
_by = [signal.SIGINT]  # the signal of the last request: the CLI exits 128 + it (130 Ctrl-C, 143 SIGTERM)
_deferred = [0]  # deferred() contexts open: the CLI's handler notes a signal there, raised at their end


def _repeat() -> bool:
    """Whether this signal repeats a request made less than ONE_REQUEST_S ago; else it starts one."""
    now = _clock()
    if _last and now - _last[0] < ONE_REQUEST_S:
        return True
    _last[:] = [now]
    return False
SIGNALS = (signal.SIGINT, signal.SIGTERM)
ONE_REQUEST_S = 0.5  # signals this close together are one request (a person's second Ctrl-C comes later)
_clock = time.monotonic  # when a handler runs (tests set it)


def _ignored_from_start(signum: int) -> bool:
    """A SIGINT the process was started ignoring (a job a script starts with `&`: the shell's rule): kept so."""
    return signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN


def requested() -> bool:
    return _stop.is_set()


def check(what: str) -> None:
    """For long loops with no step to checkpoint (scoring, validation): stop at once when a stop was
    requested, by raising KeyboardInterrupt, which callers already treat as "interrupted, resumable"."""
    if requested():
        raise KeyboardInterrupt(f"stopped while {what}; rerun the same command to resume")


def stopped_by() -> int:
    """The signal of the last stop request (SIGINT when none came by signal)."""
    return _by[0]


def stop_notice(signum: int, what: str) -> str:
    """The line a stop request prints: ``what`` happens now, and, to a person at a terminal, how to
    stop at once (a scheduler's SIGTERM is followed by its own SIGKILL, not by a second Ctrl-C)."""
    if signum == signal.SIGTERM:
        return f"terminated (SIGTERM): {what}"
    return f"{what} (Ctrl-C again to stop at once)"


def request() -> None:
    _stop.set()


def reset() -> None:
    """No request made or pending, as in a new process (tests run many commands in one)."""
    _stop.clear()
    _signalled.clear()
    _last.clear()


@contextmanager
def graceful(on_request: Optional[Callable[[int], None]] = None) -> Iterator[None]:
    """First signal: set the stop flag (and call ``on_request(signum)``); second: KeyboardInterrupt now."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if _repeat():
            return  # the same request delivered twice (`timeout` signals the child and then its group)
        if _stop.is_set():
            raise KeyboardInterrupt("stopped at once (second interrupt)")
        _by[0] = signum
        _stop.set()
        if on_request is not None:
            on_request(signum)

    # a SIGINT ignored from the start (a job started with `&` by a script: the shell's rule) stays ignored, as
    # extraction leaves it (``one_request_per_signal``): train, sweep and synthesize took it (a trial)
    old = {s: signal.getsignal(s) for s in SIGNALS if not _ignored_from_start(s)}
    for s in old:
        signal.signal(s, handler)
    if not _depth[0]:
        _by[0] = signal.SIGINT  # an earlier command's SIGTERM (in a long-lived process) is not this one's
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for s, h in old.items():
            signal.signal(s, h)
        if not _depth[0]:  # a request made inside a nested context still stops the loops around it
            _stop.clear()


def one_request_per_signal() -> None:
    """For the CLI's process: Ctrl-C raises KeyboardInterrupt at once, as Python's own handler does, and
    so does SIGTERM (a scheduler's stop, `kill PID`), so either unwinds the same way (a paid call's books
    and its history entry written, its locks let go; the CLI then exits 130 or 143); the same request
    delivered twice (within ONE_REQUEST_S: a terminal and `timeout` both signal the process group) raises
    once, so the unwinding (DataLoader workers shut down, the exit) is not cut into a traceback. Left
    installed: it only ever replaces Python's defaults (Ctrl-C's KeyboardInterrupt, SIGTERM's death by
    the signal, which wrote no books), and a ``graceful()`` context puts it back on exit. It also notes
    the signal, which extraction's loop polls (``check_signalled``): a KeyboardInterrupt raised while an
    at-fork hook runs (a DataLoader worker starting) is printed and dropped by Python. ``end_of_command()``
    clears the note.
    DataLoader workers take SIGTERM as SIGINT (``extract.parts._init_worker``): torch's worker loop
    ends quietly on KeyboardInterrupt, where its own SIGTERM handler died by the signal."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, _frame):
        if not _repeat():
            _by[0] = signum
            _signalled.set()  # for extraction's loop: an exception raised in an at-fork hook or a __del__ is lost
            if not _deferred[0]:  # while worker processes fork: raised once they have (``deferred``)
                raise KeyboardInterrupt

    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is default:  # not ignored, nor someone's own
            signal.signal(signum, handler)


def check_signalled(what: str) -> None:
    """Raise KeyboardInterrupt when the CLI's handler took a signal whose KeyboardInterrupt Python dropped
    (raised in an at-fork hook); a stop requested otherwise (``request()``) is for loops that poll it."""
    if _signalled.is_set():
        raise KeyboardInterrupt(f"stopped while {what}; rerun the same command to resume")


@contextmanager
def held() -> Iterator[None]:
    """SIGINT and SIGTERM held (blocked, not lost) by this thread while worker processes start: a worker
    inherits the mask and takes them only once it lets them go (``let_go``), its own handlers set. The
    process's other threads still take a signal for its handler. (POSIX; elsewhere nothing is held.)"""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # a signal held meanwhile arrives now


def let_go() -> None:
    """A worker started inside ``held``: the stop signals it started with held, let go."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextmanager
def deferred(what: str) -> Iterator[None]:
    """Forking worker processes (a DataLoader's): a stop the CLI's handler takes inside is raised as
    KeyboardInterrupt at the end, not inside, where it lands in an at-fork hook (logging's lock, in the
    parent and in each child) and Python prints it as "Exception ignored" with a traceback, then drops
    it. The signals are ``held`` meanwhile, so a child forked inside meets a stop only once its own start
    lets them go with its own handlers set (``extract.parts._init_worker``: ignored), not in torch's worker
    handler, which died by a SIGTERM; the deferral it inherits ends it there (``check_signalled``)."""
    _deferred[0] += 1
    try:
        with held():
            yield
    finally:
        _deferred[0] -= 1
    check_signalled(what)


def end_of_command() -> None:
    """A CLI command has ended: a signal it took is not the next in-process command's (tests)."""
    _signalled.clear()


def stop_on_signal() -> None:
    """For worker processes: every SIGINT/SIGTERM only sets the stop flag; the worker's own loop
    decides when to leave (after saving its state). A SIGINT the worker inherited ignored (a sweep a script
    started with `&`) stays ignored, as its sweep ignores it."""
    for s in SIGNALS:
        if not _ignored_from_start(s):
            signal.signal(s, lambda *_: _stop.set())
