"""An exclusive claim on a run directory that two processes can never both hold.

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
from pathlib import Path


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
