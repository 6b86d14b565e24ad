"""Re-chunking a Zarr array of a store in place, safe against a kill at any point.

A finished store's incompressible block arrays are packed into chunks of many blocks (a load-all
read then opens a few files, not one per block: issue 12), and unpacked to a chunk per block before a
repair rewrites blocks (separate processes may then write neighbouring blocks again).

The new array is built beside the store, in ``.rechunk/<name>.new``, each chunk read back and
compared as it is written; renamed ``.ready`` once whole; then swapped in by two renames (the old
array to ``.old`` first). ``recover`` puts back whichever copy is whole after a kill between them.
The caller holds the store's re-chunk lock (the file ``LOCK`` in the store) around both.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Tuple

import numpy as np

from ..errors import StoreDamagedError

WORK = ".rechunk"
LOCK = ".rechunk.lock"  # beside the work folder, which is removed when done


def _paths(root: Path, name: str) -> Tuple[Path, Path, Path]:
    base = root / WORK / name
    return tuple(base.with_name(base.name + s) for s in (".new", ".ready", ".old"))


def _read_back(staged, lo: int, hi: int) -> np.ndarray:
    return staged[lo:hi]


def rechunk(root: Path, name: str, arr, rows: int, source: Callable[[int, int], np.ndarray]) -> None:
    """Rewrite zarr array ``arr`` (``root/name``) in chunks of ``rows`` rows, with the rows
    ``source(lo, hi)`` gives (checked by the caller), every other property kept."""
    new, ready, old = _paths(root, name)
    try:
        _build(new, name, arr, rows, source)
        os.rename(new, ready)
    except BaseException:  # nothing was swapped yet: the work goes, the array stays as it was
        shutil.rmtree(new, ignore_errors=True)
        _tidy(root)
        raise
    target = root / name
    os.rename(target, old)
    os.rename(ready, target)
    shutil.rmtree(old)
    _tidy(root)


def _build(new: Path, name: str, arr, rows: int, source: Callable[[int, int], np.ndarray]) -> None:
    import zarr

    shutil.rmtree(new, ignore_errors=True)
    new.parent.mkdir(parents=True, exist_ok=True)
    staged = zarr.create_array(store=str(new), shape=arr.shape, dtype=arr.dtype, chunks=(rows, *arr.chunks[1:]),
                               serializer=arr.serializer, compressors=arr.compressors, filters=arr.filters,
                               fill_value=arr.fill_value, attributes=dict(arr.attrs),
                               config={"write_empty_chunks": True})
    n = int(arr.shape[0])
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        data = np.ascontiguousarray(source(lo, hi))
        staged[lo:hi] = data
        if _read_back(staged, lo, hi).tobytes() != data.tobytes():
            raise StoreDamagedError(f"rows {lo}-{hi - 1} of {name} read back differently from what was just written "
                                    f"while re-chunking them (in {new}); check the disk, then rerun the same command")


def recover(root: Path, name: str) -> None:
    """After a kill: the array back in place (the new copy if it was whole, else the old one), and
    the rest of the work removed."""
    if not (root / WORK).is_dir():
        return
    new, ready, old = _paths(root, name)
    target = root / name
    if not target.exists():
        os.rename(ready if ready.exists() else old, target)
    for p in (new, ready, old):
        shutil.rmtree(p, ignore_errors=True)
    _tidy(root)


def _tidy(root: Path) -> None:
    """The work folder removed once nothing is left in it (empty folders only)."""
    work = root / WORK
    for d in sorted((p for p in work.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        work.rmdir()
    except OSError:
        pass
