"""Extraction: one pass of the teacher over a dataset into a store.

Reader and view mapper run in DataLoader workers (decode -> canvas -> views -> teacher input),
the teacher runs in the main thread, and a writer thread stores finished row blocks, so decoding
and writing overlap encoding. Work is done in row blocks: a block's rows are written, then the
block is marked done; the manifest's ``complete`` is set last. A killed run resumes at the first
unfinished block and ends with the same arrays as an uninterrupted one, because every block is
encoded in the same batches whatever happened before it.
"""
from __future__ import annotations

import errno
import io
import json
import os
import platform
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .config import ExtractConfig, to_dict
from .datasets import ImageDataset, build_dataset
from .errors import ConfigError, StoreError
from .store import SCHEMA_VERSION, STATUS_FAILED, STATUS_OK, Store, cache_key, plan_layout
from .store._backend import BACKENDS, backend_name_for
from .teachers import Teacher, build_teacher
from .text import TextTable, build_prompts, encode_sources, prompts_digest
from .views import make_canvas, normalize, render_views, view_params


# --- reader + view mapper (run in DataLoader workers) -------------------------------------------
class ViewReader(torch.utils.data.Dataset):
    """Item i -> (index, canvas (S, S, 3) uint8, view params (V, 5) int32, error or '')."""

    def __init__(self, dataset: ImageDataset, cfg: ExtractConfig):
        self.dataset, self.canvas, self.views = dataset, cfg.canvas.size, cfg.views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        v = self.views
        params = view_params(v.seed, i, v.count, self.canvas, v.scale, v.ratio, v.flip)
        try:
            canvas, err = make_canvas(self.dataset.load(i), self.canvas), ""
        except Exception as exc:  # a corrupt or missing file is recorded, not fatal
            canvas = np.zeros((self.canvas, self.canvas, 3), np.uint8)
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return i, canvas, params, err


@dataclass
class ViewCollate:
    """Batches items. With ``render`` it also renders the teacher's input for each view of each
    readable image (CPU teachers); without, the main process renders them on the GPU."""
    input_size: int
    interpolation: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    render: bool = True

    def __call__(self, items):
        idx = torch.tensor([it[0] for it in items], dtype=torch.int64)
        canvas = torch.from_numpy(np.stack([it[1] for it in items]))
        params = torch.from_numpy(np.stack([it[2] for it in items]))
        errors = [it[3] for it in items]
        x = self.views(canvas, params, errors) if self.render else None
        return idx, canvas, params, errors, x

    def views(self, canvas: torch.Tensor, params: torch.Tensor, errors: List[str]) -> torch.Tensor:
        """(B_ok, V, 3, H, W) normalised teacher input for the rows without an error."""
        ok = torch.tensor([not e for e in errors])
        x = render_views(canvas[ok], params[ok], self.input_size, self.interpolation)
        return normalize(x, self.mean, self.std)


# --- sharding -----------------------------------------------------------------------------------
def resolve_shard(shard: Optional[int], num_shards: Optional[int]) -> Tuple[int, int]:
    """--shard/--num-shards win; else torchrun's RANK/WORLD_SIZE; else one worker."""
    if num_shards is None and shard is None and "WORLD_SIZE" in os.environ:
        shard, num_shards = int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    shard, num_shards = shard or 0, num_shards or 1
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ConfigError(f"shard index {shard} is out of range for {num_shards} shards; use 0..{num_shards - 1}")
    return shard, num_shards


def shard_blocks(num_blocks: int, shard: int, num_shards: int) -> range:
    """Contiguous, disjoint block ranges covering every block exactly once (no padding)."""
    return range(shard * num_blocks // num_shards, (shard + 1) * num_blocks // num_shards)


# --- manifest -----------------------------------------------------------------------------------
def _versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("embedcache", "torch", "open_clip_torch", "timm", "zarr", "h5py", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def build_manifest(cfg: ExtractConfig, dataset: ImageDataset, teacher: Teacher, prompts) -> Dict:
    teacher_desc = teacher.describe()
    key_parts = {
        "teacher": teacher.identity(), "preprocessing": teacher.preprocessing(),
        "dataset": dataset.fingerprint(), "views": to_dict(cfg.views), "canvas": to_dict(cfg.canvas),
        "text": {"sources": list(cfg.text.sources), "prompts": prompts_digest(prompts)},
    }
    return {
        "schema": SCHEMA_VERSION, "key": cache_key(key_parts), "complete": False,
        "teacher": teacher_desc,
        "dataset": {"name": dataset.name, "root": str(dataset.root) if dataset.root else None,
                    "fingerprint": dataset.fingerprint(), "n": len(dataset), "classes": dataset.classes,
                    "domains": dataset.domains},
        "views": {**to_dict(cfg.views), "params": ["top", "left", "height", "width", "flip"], "view0": "whole canvas"},
        "canvas": to_dict(cfg.canvas),
        "text": {"sources": list(cfg.text.sources), "templates": cfg.text.templates, "attributes": cfg.text.attributes},
        "config": to_dict(cfg), "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --- writer -------------------------------------------------------------------------------------
class BlockWriter(threading.Thread):
    """Writes finished row blocks off the main thread. After the first error it writes nothing
    more; the main thread re-raises the error at its next ``check``."""

    def __init__(self, store: Store, store_pixels: bool, on_block_done: Optional[Callable[[int], None]] = None):
        super().__init__(daemon=True)
        self.store, self.store_pixels, self.on_block_done = store, store_pixels, on_block_done
        self.todo: "queue.Queue" = queue.Queue(maxsize=2)
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain without writing after a failure
            try:
                self._write(*item)
                if self.on_block_done is not None:
                    self.on_block_done(item[0])  # an exception here stops the run like a crash would
            except BaseException as exc:
                self.error = exc

    def _write(self, block: int, start: int, emb, params, status, pixels, failures) -> None:
        b = self.store.b
        b.write("image/emb", start, emb)
        b.write("image/view_params", start, params)
        if self.store_pixels:
            b.write("image/pixels", start, pixels)
        b.write("image/status", start, status)
        if failures:
            b.put_blob(f"failures/block_{block:06d}.json", json.dumps(failures, sort_keys=True).encode())
        b.flush()
        b.write("blocks/done", block, np.ones(1, np.uint8))  # last: the block is now durable
        b.flush()

    def check(self) -> None:
        if self.error is not None:
            raise _storage_error(self.error, self.store.path)


def _storage_error(exc: BaseException, path: str) -> BaseException:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return StoreError(f"disk full while writing {path}; free space or choose --out on a larger disk, "
                          "then rerun the same command to resume")
    return exc


# --- the run ------------------------------------------------------------------------------------
@dataclass
class ExtractResult:
    path: str
    key: str
    complete: bool
    images: int           # rows encoded by this call
    failed: int           # unreadable images in the whole store (when complete) or this call
    seconds: float
    skipped: bool = False  # the store was already complete


def open_or_create(cfg: ExtractConfig, manifest: Dict, layout: Dict) -> Store:
    backend = backend_name_for(cfg.out, cfg.backend)
    if Store.exists(cfg.out, backend):
        return Store(cfg.out, "a", backend).require(manifest["key"], complete=False)
    return Store.create(cfg.out, manifest, layout, backend).require(manifest["key"], complete=False)


def _batches(blocks: List[int], block_rows: int, n: int, batch_size: int) -> List[List[int]]:
    """Batches never straddle a block, so a block is encoded identically on every run."""
    out = []
    for blk in blocks:
        rows = list(range(blk * block_rows, min(n, (blk + 1) * block_rows)))
        out += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return out


def extract(cfg: ExtractConfig, teacher: Optional[Teacher] = None,
            on_block_done: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = print) -> ExtractResult:
    """Run (or resume, or skip) one extraction. ``teacher`` may be passed to reuse a loaded one."""
    t0 = time.time()
    if not cfg.out:
        raise ConfigError("no output store given; pass --out PATH (e.g. stores/demo.zarr)")
    if cfg.views.count < 1:
        raise ConfigError(f"views.count must be at least 1, got {cfg.views.count}")
    shard, num_shards = resolve_shard(cfg.shard, cfg.num_shards)
    backend = backend_name_for(cfg.out, cfg.backend)
    if num_shards > 1 and not BACKENDS.get(backend).multi_writer:
        raise ConfigError(f"{backend} stores take one writer; use a .zarr store for --num-shards {num_shards}")
    dataset = build_dataset(cfg.dataset)
    teacher = teacher or build_teacher(cfg.teacher)
    prompts = build_prompts(dataset.classes, cfg.text)
    manifest = build_manifest(cfg, dataset, teacher, prompts)
    layout = plan_layout(len(dataset), cfg.views.count, teacher.embed_dim, cfg.canvas.size, cfg.canvas.store, cfg.block_rows)
    for src, per_class in prompts.items():  # created with the store, so finishing shards never race to make them
        n_prompts = sum(len(p) for p in per_class)
        for name, shape in (("emb", [n_prompts, teacher.embed_dim]), ("class_emb", [len(per_class), teacher.embed_dim])):
            layout["arrays"][f"text/{src}/{name}"] = {"shape": shape, "dtype": "float32", "chunks": shape}
    store = open_or_create(cfg, manifest, layout)
    try:
        if store.complete:
            log(f"{cfg.out} is already complete (key {store.key}); nothing to do")
            return ExtractResult(cfg.out, store.key, True, 0, int(store.manifest.get("failed", 0)), time.time() - t0, True)
        layout = store.layout  # the store's own block size wins over this call's setting
        done = store.blocks_done()
        mine = [b for b in shard_blocks(layout["num_blocks"], shard, num_shards) if not done[b]]
        encoded, failed = _run_blocks(cfg, dataset, teacher, store, layout, mine, on_block_done, log)
        if store.blocks_done().all():
            try:
                failed = finalize(store, dataset, teacher, prompts)
            except OSError as exc:
                raise _storage_error(exc, store.path) from exc
            log(f"wrote {cfg.out}: {len(dataset)} images x {layout['views']} views, "
                f"{failed} unreadable image(s) skipped (listed in meta.parquet)")
        else:
            log(f"shard {shard}/{num_shards} done; the store completes when every shard has finished")
        return ExtractResult(cfg.out, store.key, store.complete, encoded, failed, time.time() - t0)
    finally:
        store.close()


def _run_blocks(cfg, dataset, teacher, store, layout, blocks, on_block_done, log) -> Tuple[int, int]:
    from tqdm.auto import tqdm

    n, br, v = layout["n"], layout["block_rows"], layout["views"]
    batches = _batches(blocks, br, n, cfg.batch_size)
    if not batches:
        return 0, 0
    # On a GPU, cropping and resizing views in CPU workers caps the pipeline (measured on an H100
    # host: ~440 images/s with 4 views and 15 workers, against 2,200 images/s for decoding alone),
    # so workers ship uint8 canvases and the views are rendered on the device.
    on_gpu = teacher.device.type == "cuda"
    collate = ViewCollate(teacher.input_size, teacher.interpolation, teacher.mean, teacher.std, render=not on_gpu)
    loader = DataLoader(ViewReader(dataset, cfg), batch_sampler=batches, collate_fn=collate,
                        num_workers=cfg.num_workers, prefetch_factor=4 if cfg.num_workers > 0 else None,
                        persistent_workers=False, worker_init_fn=_one_thread, pin_memory=on_gpu)
    writer = BlockWriter(store, layout["store_pixels"], on_block_done)
    writer.start()
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", desc=f"extract {os.path.basename(str(cfg.out))}", disable=not cfg.progress,
               dynamic_ncols=True)
    pending: Dict[int, Dict] = {}
    encoded = failed = 0
    try:
        for idx, canvas, params, errors, x in loader:
            writer.check()
            ok = np.array([not e for e in errors])
            emb = np.zeros((len(idx), v, teacher.embed_dim), np.float16)
            if ok.any():
                if x is None:
                    x = collate.views(canvas.to(teacher.device, non_blocking=True), params, errors)
                out = teacher.encode_image(x.flatten(0, 1))  # (B_ok * V, D)
                emb[ok] = out.view(int(ok.sum()), v, -1).numpy().astype(np.float16)
            blk = int(idx[0]) // br
            acc = pending.setdefault(blk, {"rows": [], "emb": [], "params": [], "status": [], "pixels": [], "failures": {}})
            acc["rows"].append(idx.numpy()); acc["emb"].append(emb); acc["params"].append(params.numpy())
            acc["status"].append(np.where(ok, STATUS_OK, STATUS_FAILED).astype(np.uint8))
            if layout["store_pixels"]:
                acc["pixels"].append(canvas.numpy())
            for i, e in zip(idx.tolist(), errors):
                if e:
                    acc["failures"][str(i)] = e
            failed += int((~ok).sum())
            encoded += len(idx)
            bar.update(len(idx))
            block_len = min(n, (blk + 1) * br) - blk * br
            if sum(len(r) for r in acc["rows"]) == block_len:
                acc = pending.pop(blk)
                writer.todo.put((blk, blk * br, np.concatenate(acc["emb"]), np.concatenate(acc["params"]),
                                 np.concatenate(acc["status"]),
                                 np.concatenate(acc["pixels"]) if acc["pixels"] else None, acc["failures"]))
    finally:
        bar.close()
        writer.todo.put(None)
        writer.join()
    try:
        writer.check()
    except KeyboardInterrupt:
        log("interrupted: finished blocks are kept; rerun the same command to resume")
        raise
    return encoded, failed


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode and crop; the teacher keeps the other cores


def finalize(store: Store, dataset: ImageDataset, teacher: Teacher, prompts) -> int:
    """Text embeddings, meta.parquet, text.parquet, then the manifest with complete=True."""
    b = store.b
    tables: Dict[str, TextTable] = encode_sources(
        lambda t: teacher.encode_text(t).numpy(), teacher.count_tokens, teacher.context_length, dataset.classes, prompts)
    for src, tab in tables.items():
        b.write(f"text/{src}/emb", 0, tab.emb)
        b.write(f"text/{src}/class_emb", 0, tab.class_emb)
    b.put_blob("text.parquet", _parquet(pd.concat([t.frame for t in tables.values()], ignore_index=True)))
    meta = dataset.frame()
    status = b.read("image/status")
    reasons: Dict[str, str] = {}
    for name in b.list_blobs("failures"):
        reasons.update(json.loads(b.get_blob(name)))
    meta["status"] = np.where(status == STATUS_OK, "ok", "failed")
    meta["reason"] = [reasons.get(str(i), "") for i in range(len(meta))]
    b.put_blob("meta.parquet", _parquet(meta))
    failed = int((status != STATUS_OK).sum())
    b.flush()
    store.write_manifest({**store.manifest, "complete": True, "failed": failed,
                          "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    b.flush()
    return failed


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()
