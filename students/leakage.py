"""Which images of another store a run has already seen (``evaluate --transfer``).

A transfer store's images all count as unseen, so one that holds the run's own training or
validation images (the whole dataset, when the run trained on one domain's CSV; the same dataset
extracted again with other views) scored them as test images. Images are matched by content: the
CRC-32C of each image's canvas (the pixels the teacher saw, or the ``image/canvas_crc32c`` a store
without pixels keeps) joined with its class name's CRC-32, a 64-bit identity that paths, copies and
machines leave alone. Canvases of two sizes are never equal, so stores with other canvas sizes
cannot be compared: the caller is told so. Canvases of one size made otherwise (another decoder) do
not match either, and are not told apart from other images.
"""
from __future__ import annotations

import warnings
import zlib
from typing import Dict, Optional, Tuple

import numpy as np

from embedcache import interrupt
from embedcache.api import StoreReader
from embedcache.errors import StoreError
from embedcache.store import checksum

from .rundir import RunDir

_DIGESTS: Dict[Tuple[str, str], Optional[np.ndarray]] = {}  # (path, key) -> digests: a store read once per process


def canvas_digests(reader: StoreReader) -> Optional[np.ndarray]:
    """(N,) uint64: each image's canvas CRC-32C (high half) and class name CRC-32 (low half); 0 for
    unreadable rows. None for a store that keeps neither pixels nor canvas checksums (made before them)."""
    cached = (str(reader.path), reader.key)
    if cached not in _DIGESTS:
        _DIGESTS[cached] = _digests(reader)
    return _DIGESTS[cached]


def _digests(reader: StoreReader) -> Optional[np.ndarray]:
    ok = reader.ok
    if reader.store.has("image/canvas_crc32c"):
        crc = reader.store.read("image/canvas_crc32c").astype(np.uint64)
    elif reader.layout.get("store_pixels"):  # a store with pixels made before it kept their checksums
        crc = np.zeros(len(ok), np.uint64)
        for start, rows in reader.store.read_blocks("image/pixels"):  # a block at a time: pixels can be many GB
            interrupt.check("comparing the stores' images")
            crc[start:start + len(rows)] = [checksum(r) for r in rows]
    else:
        return None
    names = np.array([zlib.crc32(c.encode()) for c in reader.classes], np.uint64)[reader.meta["label"].to_numpy()]
    return np.where(ok, (crc << np.uint64(32)) | names, np.uint64(0))


def seen_rows(run: RunDir, reader: StoreReader) -> Optional[np.ndarray]:
    """(N,) bool over ``reader``'s rows: images the run trained or validated on
    (split.json's train_idx and val_idx on its own store). None when no image can be shared (one store
    synthesised, the other extracted), and, with a warning saying why, when the two cannot be compared."""
    made_by = (run.split.get("trained_on") or {}).get("producer")  # kept with the run: no store needed to know it
    if made_by is not None and made_by != reader.store.producer:
        return None
    try:
        own_path = run.store_path()
    except StoreError:
        return _cannot(run, reader, f"its store is not at {run.config.get('store_path') or run.config.get('store')} "
                                    "(put it back there to have them compared)")
    with StoreReader(own_path) as own:
        if made_by is None and own.store.producer != reader.store.producer:  # a run from before trained_on kept it
            return None
        if int(own.layout["canvas"]) != int(reader.layout["canvas"]):
            return _cannot(run, reader, f"their canvases differ in size ({own.layout['canvas']} and "
                                        f"{reader.layout['canvas']} pixels)")
        own_digests, other = canvas_digests(own), canvas_digests(reader)
        if own_digests is None or other is None:
            return _cannot(run, reader, "one keeps neither pixels nor canvas checksums (a store made before them)")
        split = run.split
        if "train_idx" not in split:
            return _cannot(run, reader, "its split.json does not list the rows it trained on")
        used = np.asarray(list(split["train_idx"]) + list(split.get("val_idx") or []), np.int64)
        seen = own_digests[used]
    return np.isin(other, seen[seen != 0]) & reader.ok


def _cannot(run: RunDir, reader: StoreReader, why: str) -> None:
    warnings.warn(f"run {run.name}: whether {reader.path} holds images the run trained on cannot be checked: {why}; "
                  "its transfer scores count every image as unseen")
    return None
