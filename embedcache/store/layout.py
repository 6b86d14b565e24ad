"""Store layout: array shapes, chunks and codecs, the schema version and the cache key.

Chunks span whole rows and tile each row block exactly, so each chunk is written by one block (one
worker) and the embedding axis is never split. Embeddings are stored without compression: float16
unit vectors do not compress, and a codec would only slow the load-all reads training makes.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from ..fileio import json_digest

SCHEMA_VERSION = 2  # 2: per-block checksums (blocks/crc32c) and checksummed tables
STATUS_OK, STATUS_FAILED = 1, 2
# arrays with one row per image, written by row block and checksummed per block
# (image/canvas_crc32c: each canvas's CRC-32C, so canvases rebuilt from the source files are checked to be the
# ones the teacher saw, and two stores of one key are told apart by their images (``contents_digest``); stores
# with pixels made before 2026-12-06 keep none)
BLOCK_ARRAYS = ("image/emb", "image/view_params", "image/status", "image/pixels", "image/canvas_crc32c")


# A store's raw block arrays (the embeddings) are held in chunks of whole blocks of about this size once
# it is finished (Zarr packs them then) or from the start (HDF5, one writer, writes part of a chunk in
# place): a load-all read of 200,000 rows then reads 25 chunks, not 782.
PACK_BYTES = 8 << 20


def packable(layout: Dict[str, Any]) -> List[str]:
    """Block arrays stored raw in a chunk per block (the embeddings); compressed ones stay so, as
    verify decodes them block by block."""
    spec, br = layout["arrays"], int(layout["block_rows"])
    return [a for a in layout.get("block_arrays", ())
            if spec[a].get("codec", "zstd") == "none" and int(spec[a]["chunks"][0]) == br]


def row_bytes(layout: Dict[str, Any], name: str) -> int:
    spec = layout["arrays"][name]
    return int(np.prod(spec["shape"][1:])) * np.dtype(spec["dtype"]).itemsize


def packed_rows(layout: Dict[str, Any], name: str) -> int:
    """Rows per chunk of array ``name`` packed: whole blocks of about PACK_BYTES, at most the array."""
    br = int(layout["block_rows"])
    return min(int(layout["n"]), max(1, PACK_BYTES // max(1, br * row_bytes(layout, name))) * br)


def block_range(layout: Dict[str, Any], block: int) -> Tuple[int, int]:
    """The rows [start, stop) of row block ``block``: blocks of ``block_rows``, the last one short."""
    br, n = int(layout["block_rows"]), int(layout["n"])
    return block * br, min(n, (block + 1) * br)


def cache_key(parts: Dict[str, Any]) -> str:
    """sha256 of the sorted-key JSON of what changes the data (16 hex chars)."""
    return json_digest({"schema": SCHEMA_VERSION, **parts})


def _divisor_at_most(n: int, cap: int) -> int:
    """Largest divisor of n that is <= cap (chunks must tile a block exactly)."""
    cap = max(1, min(n, cap))
    return next(d for d in range(cap, 0, -1) if n % d == 0)


# the data type embedcache writes each array with, whatever a store's layout says (one made before layouts had a checksum)
WRITTEN_DTYPES = {"image/emb": "float16", "image/view_params": "int32", "image/status": "uint8", "image/pixels": "uint8",
                  "image/canvas_crc32c": "uint32", "blocks/done": "uint8", "blocks/crc32c": "uint32"}
TEXT_DTYPE = "float32"  # a text source's prompt and class embeddings


def plan_layout(n: int, views: int, dim: int, canvas: int, store_pixels: bool, block_rows: int,
                param_width: int = 5) -> Dict[str, Any]:
    """Array specs (shape, dtype, chunks, codec) and the row-block geometry of a store. ``param_width``:
    the fields of a view's parameters (5: crop and flip; 11 with colour, see views.param_fields)."""
    block_rows = max(1, min(block_rows, n))
    px_rows = _divisor_at_most(block_rows, max(1, (4 << 20) // (canvas * canvas * 3)))  # ~4 MB pixel chunks
    t = WRITTEN_DTYPES
    arrays = {
        "image/emb": ((n, views, dim), t["image/emb"], (block_rows, views, dim), "none"),
        "image/view_params": ((n, views, param_width), t["image/view_params"], (block_rows, views, param_width), "zstd"),
        "image/status": ((n,), t["image/status"], (block_rows,), "zstd"),
    }
    if store_pixels:
        arrays["image/pixels"] = ((n, canvas, canvas, 3), t["image/pixels"], (px_rows, canvas, canvas, 3), "zstd")
    arrays["image/canvas_crc32c"] = ((n,), t["image/canvas_crc32c"], (block_rows,), "none")
    block_arrays = [a for a in BLOCK_ARRAYS if a in arrays]
    num_blocks = -(-n // block_rows)
    arrays["blocks/done"] = ((num_blocks,), t["blocks/done"], (1,), "none")
    arrays["blocks/crc32c"] = ((num_blocks, len(block_arrays)), t["blocks/crc32c"], (1, len(block_arrays)), "none")
    return {"n": n, "views": views, "dim": dim, "canvas": canvas, "store_pixels": store_pixels,
            "block_rows": block_rows, "num_blocks": num_blocks, "block_arrays": block_arrays,
            "arrays": {k: {"shape": list(s), "dtype": d, "chunks": list(c), "codec": z}
                       for k, (s, d, c, z) in arrays.items()}}


def written_dtype(name: str, spec_dtype: str) -> str:
    """The data type of array ``name`` as embedcache writes it (a prompt array's: float32); an array of
    another kind (cached features, derived arrays) keeps the one its layout gives."""
    if name in WRITTEN_DTYPES:
        return WRITTEN_DTYPES[name]
    if name.startswith("text/") and name.rsplit("/", 1)[-1] in ("emb", "class_emb"):
        return TEXT_DTYPE
    return spec_dtype


def add_text_arrays(layout: Dict[str, Any], prompt_counts: Dict[str, int], num_classes: int, dim: int) -> None:
    """Text arrays are created with the store, so finishing shards never race to make them."""
    for src, n_prompts in prompt_counts.items():
        for name, shape in (("emb", [n_prompts, dim]), ("class_emb", [num_classes, dim])):
            layout["arrays"][f"text/{src}/{name}"] = {"shape": shape, "dtype": TEXT_DTYPE, "chunks": shape, "codec": "none"}
