"""The ``embedcache`` command line: parse, call the library, print. No logic lives here, and no
library module imports this package (tests/test_architecture.py checks the layers).

``entry`` is the console script: the commands are imported inside it, so a Ctrl-C while they load
is one line too. ``main`` is the click group (``CliRunner().invoke(main, ...)``)."""
import signal
import sys

__all__ = ["main", "entry"]


def _group():
    from . import data, students, evaluation, serve, synthesize  # noqa: F401  (register the commands)
    from ._app import main

    return main


def entry() -> None:
    try:
        group = _group()
    except KeyboardInterrupt:  # before the commands' own handling is in place: nothing started yet
        sys.stderr.write("interrupted while starting; nothing was done\n")
        sys.exit(130)
    try:
        group()
    finally:  # its outcome is said: a Ctrl-C in the interpreter's teardown (a second or so) does not change its exit
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # code (a finished sweep died by the signal: a trial); SIGTERM does


def __getattr__(name: str):
    if name == "main":
        return _group()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
