"""Checksums of what a store holds, and the report of a verification.

Every row block records the CRC-32C of each block array's rows, written with the block and before
it is marked done; tables and text arrays get theirs in the manifest when the store is finished.
A chunk that is lost reads back as zeros, a truncated one fails to decode: both disagree with the
checksum, so a store can never be "complete" with rows that silently read as something else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np


def _fastcrc():
    from fastcrc import crc32

    return lambda crc, buf: crc32.iscsi(buf, crc)


def _google():
    from google_crc32c import cext

    # it takes read-only arrays without a copy, but no memoryviews
    return lambda crc, buf: cext.extend(crc, np.frombuffer(buf, np.uint8) if isinstance(buf, memoryview) else buf)


# Libraries that compute CRC-32C (the same numbers: a store checked by one reads under the other), each
# as a loader of its ``extend(crc, buffer)``; the first importable is used. fastcrc folds with carry-less
# multiplies (about 58 GB/s from the CPU's cache on the AMD EPYC, twice google_crc32c's crc32
# instruction) and lets other threads run meanwhile; google_crc32c comes with zarr, so it is always there.
CRC32C = {"fastcrc": _fastcrc, "google_crc32c": _google}


def _first_importable():
    for load in CRC32C.values():
        try:
            return load()
        except ImportError:
            continue
    raise ImportError("no CRC-32C library: pip install fastcrc (or google-crc32c)")


_extend = None  # chosen on first use


def checksum(data, crc: int = 0) -> int:
    """CRC-32C of an array's bytes in C order (bytes and C-contiguous memoryviews too), hardware-
    accelerated. ``crc``: the checksum of the bytes before these, so ``checksum(b, checksum(a)) ==
    checksum(a + b)`` (an array checked piece by piece)."""
    global _extend
    if _extend is None:
        _extend = _first_importable()
    if isinstance(data, memoryview):  # a read-only byte view of rows being read (no array made per block)
        return int(_extend(crc, data)) if data.nbytes else crc
    if isinstance(data, (bytes, bytearray)):
        return int(_extend(crc, bytes(data)))
    a = np.ascontiguousarray(data)
    if a.size == 0:
        return crc
    v = a.view()
    v.flags.writeable = False  # read without a copy, and never changed while it is read
    return int(_extend(crc, v))


@dataclass
class IntegrityReport:
    """What ``Store.verify`` found: damaged row blocks (block -> arrays) and damaged files of the store
    itself (``ok`` is about these: what extraction re-does), and damaged derived arrays apart (what
    was computed from the store later, recomputed by the command that made it)."""
    path: str
    blocks_checked: int = 0
    damaged: Dict[int, List[str]] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)  # name -> what is wrong with it
    derived: Dict[str, str] = field(default_factory=dict)  # derived array name -> what is wrong with it

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.files

    @property
    def damaged_blocks(self) -> List[int]:
        return sorted(self.damaged)

    def lines(self) -> List[str]:
        out = [f"block {b}: {', '.join(arrs)}" for b, arrs in sorted(self.damaged.items())]
        return out + [f"{name}: {why}" for name, why in sorted(self.files.items())]
