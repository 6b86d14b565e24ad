"""Kernel locks: an exclusive claim on a run directory that two processes can never both hold, and
a sweep launch's hold on its folder (``Launch``).

``flock`` on a lock file: the kernel releases it when the holder exits or dies, so a dead worker's
claim needs no staleness check and no takeover race (the old check-pid-then-unlink takeover let
two processes win). After locking, the claimant checks that the path still names the file it
locked, so a lock file replaced in between is never trusted. Works across hosts on NFS (Linux
maps flock to POSIX locks there).
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Union


class Claim:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd = None

    def __enter__(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
                self.fd = fd
                return True
            os.close(fd)  # the file was replaced after we opened it: try the new one
        return False

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Launch:
    """A sweep launch's hold on its folder, so two launches never both decide its settings.

    Every launch takes ``.launch.lock`` exclusively while it compares its settings with the folder's
    and writes them (``settle()`` lets it go), and holds ``.live.lock`` shared until it ends, so
    launches of one spec run side by side. ``others_live`` says whether another launch held the live
    lock when this one came: its settings are then the folder's, whether or not a run has finished.
    Works with ``with``; the kernel drops both locks if the process dies.
    """

    def __init__(self, sweep_dir: Path):
        self.dir = Path(sweep_dir)
        self.gate = self.live = None
        self.others_live = False

    def __enter__(self) -> "Launch":
        try:
            self.gate = os.open(self.dir / ".launch.lock", os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self.gate, fcntl.LOCK_EX)  # launches wait here only while one compares and writes
            self.live = os.open(self.dir / ".live.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(self.live, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.others_live = True
            fcntl.flock(self.live, fcntl.LOCK_SH)  # an exclusive live lock is only ever held behind the gate
        except BaseException:
            self.__exit__()  # a lock file that cannot be made (a full disk) leaves no gate held
            raise
        return self

    def settle(self) -> None:
        """This launch's settings are written: the next launch may compare with them."""
        if self.gate is not None:
            fcntl.flock(self.gate, fcntl.LOCK_UN)
            os.close(self.gate)
            self.gate = None

    def __exit__(self, *exc) -> None:
        self.settle()
        if self.live is not None:
            fcntl.flock(self.live, fcntl.LOCK_UN)
            os.close(self.live)
            self.live = None


GATE_WAIT_S = 1.0  # a dry run's look waits this long for the gate: another look lets it go at once


def launch_running(sweep_dir: Path) -> bool:
    """Whether a launch is running into the folder, looked at without joining it (a dry run). Looked at behind
    the gate, so that a launch deciding its settings never finds this look's lock and takes it for a live launch;
    a gate held past GATE_WAIT_S is a launch deciding its settings now (it never waits on one: a launch stopped
    with Ctrl-Z held a dry run for good, a review)."""
    d = Path(sweep_dir)
    if not (d / ".live.lock").is_file():  # made by every launch: none has come (or the lock files were deleted)
        return False
    gate = _lock_within(d / ".launch.lock", GATE_WAIT_S)
    if gate is HELD:
        return True
    try:
        live = _lock_within(d / ".live.lock", 0.0)
        if isinstance(live, int):
            os.close(live)  # closing lets the lock go
        return live is HELD
    finally:
        if isinstance(gate, int):
            os.close(gate)


HELD = object()  # _lock_within: another holds the lock


def _lock_within(path: Path, seconds: float) -> Union[int, None, object]:
    """An fd holding ``path``'s exclusive lock (``try_exclusive_lock``'s probe), tried for ``seconds``; None when
    the file is gone, HELD when another holds it still."""
    from embedcache.fileio import try_exclusive_lock  # here: this module alone loads in milliseconds (its tests)

    end = time.monotonic() + seconds
    while True:
        try:
            fd = try_exclusive_lock(path, probe=True)
        except FileNotFoundError:
            return None
        if fd is not None:
            return fd
        if time.monotonic() >= end:
            return HELD
        time.sleep(0.05)
