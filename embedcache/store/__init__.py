"""The store contract: layout, manifest, cache key, row blocks, and the checks readers make.

One store = one dataset x one teacher x one view policy. Layout (Zarr; HDF5 mirrors it):
  attrs ``manifest``       schema, key, teacher, dataset, views, canvas, text, versions, complete
  attrs ``layout``         N, V, D, canvas size, block_rows, number of blocks
  ``image/emb``            (N, V, D) float16, L2-normalised teacher view embeddings
  ``image/view_params``    (N, V, 5) int32 (top, left, height, width, flip) on the canvas
  ``image/pixels``         (N, S, S, 3) uint8 canvas (absent when canvas.store is false)
  ``image/status``         (N,) uint8: 1 ok, 2 failed (0: not written yet)
  ``text/<source>/emb``    (P, D) float32 prompt embeddings; ``text/<source>/class_emb`` (C, D)
  ``blocks/done``          (num_blocks,) uint8, one chunk per block, set after its rows are written
  ``meta.parquet``         one row per image (index, path, class_name, label, domain, split, status, reason)
  ``text.parquet``         one row per prompt (source, label, class_name, prompt, n_tokens, truncated)
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Optional

import numpy as np

from ..errors import StoreError, StoreMismatchError
from ._backend import BACKENDS, HDF5Backend, ZarrBackend, backend_name_for

SCHEMA_VERSION = 1
STATUS_OK, STATUS_FAILED = 1, 2


def cache_key(parts: Dict[str, Any]) -> str:
    """sha256 of the sorted-key JSON of what changes the data (16 hex chars)."""
    blob = json.dumps({"schema": SCHEMA_VERSION, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _divisor_at_most(n: int, cap: int) -> int:
    """Largest divisor of n that is <= cap (chunks must tile a block exactly)."""
    cap = max(1, min(n, cap))
    return next(d for d in range(cap, 0, -1) if n % d == 0)


def plan_layout(n: int, views: int, dim: int, canvas: int, store_pixels: bool, block_rows: int) -> Dict[str, Any]:
    """Array shapes and chunks. Chunks span whole rows and tile each row block exactly, so each
    chunk is written by one block (one worker) and the embedding axis is never split."""
    block_rows = max(1, min(block_rows, n))
    px_rows = _divisor_at_most(block_rows, max(1, (4 << 20) // (canvas * canvas * 3)))  # ~4 MB pixel chunks
    arrays = {
        "image/emb": ((n, views, dim), "float16", (block_rows, views, dim)),
        "image/view_params": ((n, views, 5), "int32", (block_rows, views, 5)),
        "image/status": ((n,), "uint8", (block_rows,)),
    }
    if store_pixels:
        arrays["image/pixels"] = ((n, canvas, canvas, 3), "uint8", (px_rows, canvas, canvas, 3))
    num_blocks = -(-n // block_rows)
    arrays["blocks/done"] = ((num_blocks,), "uint8", (1,))
    return {"n": n, "views": views, "dim": dim, "canvas": canvas, "store_pixels": store_pixels,
            "block_rows": block_rows, "num_blocks": num_blocks,
            "arrays": {k: {"shape": list(s), "dtype": d, "chunks": list(c)} for k, (s, d, c) in arrays.items()}}


class Store:
    """Low-level handle used by extraction and readers. Use ``embedcache.open_store`` to read."""

    def __init__(self, path: str, mode: str = "r", backend: Optional[str] = None):
        self.path = str(path)
        self.backend_name = backend_name_for(path, backend)
        cls = BACKENDS.get(self.backend_name)
        if not cls.exists(self.path):
            raise StoreError(f"no {self.backend_name} store at {self.path}; run `embedcache extract` to make one")
        self.b = cls(self.path, mode)
        self.manifest: Dict[str, Any] = self.b.get_attr("manifest") or {}
        self.layout: Dict[str, Any] = self.b.get_attr("layout") or {}
        if self.manifest.get("schema") != SCHEMA_VERSION:
            raise StoreMismatchError(f"store {self.path} has schema {self.manifest.get('schema')!r}, this embedcache reads "
                                     f"schema {SCHEMA_VERSION}; re-extract it with this version")

    @staticmethod
    def exists(path: str, backend: Optional[str] = None) -> bool:
        return BACKENDS.get(backend_name_for(path, backend)).exists(str(path))

    @classmethod
    def create(cls, path: str, manifest: Dict[str, Any], layout: Dict[str, Any], backend: Optional[str] = None) -> "Store":
        name = backend_name_for(path, backend)

        def init(b):
            for arr, spec in layout["arrays"].items():
                b.create_array(arr, spec["shape"], spec["dtype"], spec["chunks"])
            b.set_attr("layout", layout)
            b.set_attr("manifest", manifest)

        BACKENDS.get(name).create_atomic(str(path), init)
        return cls(path, "a", name)

    @property
    def key(self) -> str:
        return self.manifest.get("key", "")

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def require(self, key: Optional[str] = None, complete: bool = True) -> "Store":
        """Refuse a store made from other inputs, or one whose extraction has not finished."""
        if key is not None and key != self.key:
            t = self.manifest.get("teacher", {})
            raise StoreMismatchError(
                f"store {self.path} was made from other inputs (key {self.key}, teacher {t.get('name')}/{t.get('model')}); "
                f"expected key {key}: use another --out path or delete that store")
        if complete and not self.complete:
            done = int(self.blocks_done().sum())
            raise StoreError(f"store {self.path} is incomplete ({done} of {self.layout.get('num_blocks')} blocks written); "
                             "rerun the same `embedcache extract` command to finish it")
        return self

    def blocks_done(self) -> np.ndarray:
        return self.b.read("blocks/done").astype(bool)

    def write_manifest(self, manifest: Dict[str, Any]) -> None:
        self.b.set_attr("manifest", manifest)
        self.manifest = manifest

    def close(self) -> None:
        self.b.close()


__all__ = ["Store", "cache_key", "plan_layout", "SCHEMA_VERSION", "STATUS_OK", "STATUS_FAILED",
           "ZarrBackend", "HDF5Backend", "BACKENDS"]
