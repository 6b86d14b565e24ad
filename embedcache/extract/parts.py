"""The parts of an extraction, each replaceable on its own (clip-retrieval's reader / mapper /
writer / runner split):

- a **reader** yields ``Batch``es: decoded canvases, their view parameters and decode errors
  (``LoaderReader``: PIL in DataLoader workers; a GPU decoder or a synthesiser is another reader);
- an **embedder** turns a batch's views into teacher embeddings (rendering them on the teacher's
  device when the reader did not);
- an **assembler** collects batches into whole row ``Block``s;
- a **writer** thread stores finished blocks through ``Store.write_block`` off the main thread.

Batches never straddle a row block, so a block is encoded identically in a fresh, resumed or
sharded run: this is what makes a resumed store byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import os
import queue
import signal
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import interrupt
from ..config import ViewsConfig
from ..device import upload
from ..datasets import ImageDataset
from ..errors import DiskFullError, TeacherOutputError, one_line_warning
from ..fileio import disk_full_error, is_disk_full
from ..store import STATUS_FAILED, STATUS_OK, Store, checksum
from ..store.layout import block_range
from ..views import make_canvas, render_views, render_views_batched, to_uint8, view_params


@dataclass
class ViewPolicy:
    """Where and how views are drawn: the canvas side and the views settings."""
    canvas: int
    views: ViewsConfig

    def params(self, index: int) -> np.ndarray:
        v = self.views
        return view_params(v.seed, index, v.count, self.canvas, v.scale, v.ratio, v.flip, v.color_jitter, v.grayscale)


@dataclass
class Batch:
    """rows (B,) store rows; canvas (B, S, S, 3) uint8; params (B, V, k) int32 (views.param_fields); errors: '' or why a
    row could not be read; views: (B_ok, V, 3, H, W) uint8 teacher input when the reader rendered
    it (CPU teachers), else None and the embedder renders on the teacher's device."""
    rows: np.ndarray
    canvas: torch.Tensor
    params: torch.Tensor
    errors: List[str]
    views: Optional[torch.Tensor] = None

    @property
    def ok(self) -> np.ndarray:
        return np.array([not e for e in self.errors], dtype=bool)


@dataclass
class Block:
    """One finished row block, ready to write: arrays keyed by store array name."""
    index: int
    arrays: Dict[str, np.ndarray]
    failures: Dict[int, str] = field(default_factory=dict)


class Reader(Protocol):
    def batches(self, batches: List[List[int]]) -> Iterator[Batch]: ...


def render_teacher_views(canvas: torch.Tensor, params: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """(B, V, 3, size, size) uint8: the teacher's 8-bit input for each view (see views.to_uint8)."""
    return to_uint8(render_views(canvas, params, size, interpolation), inplace=True)


# --- the PIL reader (DataLoader workers) ------------------------------------------------------------
class _Items(torch.utils.data.Dataset):
    """Item i -> (i, canvas, view params, error or '')."""

    def __init__(self, dataset: ImageDataset, policy: ViewPolicy):
        self.dataset, self.policy = dataset, policy

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        params = self.policy.params(i)
        try:
            canvas, err = make_canvas(self.dataset.load(i), self.policy.canvas), ""
        except Exception as exc:  # a corrupt, missing or refused file is recorded, not fatal
            canvas = np.zeros((self.policy.canvas, self.policy.canvas, 3), np.uint8)
            err = self.dataset.failure(i, exc)
        return i, canvas, params, err


@dataclass
class _Collate:
    size: int
    interpolation: str
    render: bool

    def __call__(self, items) -> Batch:
        batch = Batch(rows=np.array([it[0] for it in items], dtype=np.int64),
                      canvas=torch.from_numpy(np.stack([it[1] for it in items])),
                      params=torch.from_numpy(np.stack([it[2] for it in items])),
                      errors=[it[3] for it in items])
        if self.render:
            ok = torch.from_numpy(batch.ok)
            batch.views = render_teacher_views(batch.canvas[ok], batch.params[ok], self.size, self.interpolation)
        return batch


def _init_worker(_worker_id: int) -> None:
    """A DataLoader worker: one thread (workers decode and crop; the teacher keeps the other cores), and
    SIGINT and SIGTERM ignored: the command takes the stop and, unwinding, shuts its workers down. Torch's
    own SIGTERM handler died by a SIGTERM sent to the whole process group (by `timeout` or a scheduler),
    and the unwinding command then failed on the dead worker; a KeyboardInterrupt raised in the worker
    could land while it held the lock of the DataLoader's shared done event (taken at every step), which
    it then waited on itself, as did the command shutting it down: a hang (once in a full suite). A stop
    the worker took as it was forked (the command's handler, inherited inside ``interrupt.deferred``,
    only notes it there) ends it now, synchronously."""
    torch.set_num_threads(1)
    warnings.showwarning = one_line_warning  # a spawned worker's warnings as the command's (not two-line Python ones)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    interrupt.let_go()  # a stop held since the fork is dropped now (ignored)
    interrupt.check_signalled("starting a DataLoader worker")


def loaded(loader: Iterator) -> Iterator:
    """A DataLoader's batches. A worker that died while the CLI took a stop signal is the stop: a SIGTERM
    sent to the whole process group reaches a worker still starting (before ``_init_worker``) through
    torch's handler, which dies by it, while the command's own KeyboardInterrupt may have been dropped
    in an at-fork hook; the DataLoader then says the worker "exited unexpectedly". A stop taken while the
    workers fork is raised once they have (``interrupt.deferred``)."""
    try:
        with interrupt.deferred("starting the DataLoader's workers"):
            batches = iter(loader)  # the workers fork here
        yield from batches
    except RuntimeError:
        interrupt.check_signalled("extracting")
        raise


class LoaderReader:
    """PIL decode -> canvas (-> views, for CPU teachers) in DataLoader worker processes.

    On a GPU, cropping and resizing views in CPU workers caps the pipeline (measured on an H100
    host: ~440 images/s with 4 views and 15 workers, against 2,200 images/s for decoding alone),
    so there the workers ship uint8 canvases and the embedder renders views on the device."""

    def __init__(self, dataset: ImageDataset, policy: ViewPolicy, input_size: int, interpolation: str,
                 render: bool, num_workers: int = 1, pin_memory: bool = False):
        self.items = _Items(dataset, policy)
        self.collate = _Collate(input_size, interpolation, render)
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def batches(self, batches: List[List[int]]) -> Iterator[Batch]:
        if self.num_workers == 0:
            yield from self._in_process(batches)
            return
        loader = DataLoader(self.items, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers,
                            prefetch_factor=4 if self.num_workers > 0 else None, persistent_workers=False,
                            worker_init_fn=_init_worker)
        for batch in loaded(loader):
            if self.pin_memory:
                batch.canvas = batch.canvas.pin_memory()
            yield batch

    def _in_process(self, batches: List[List[int]]) -> Iterator[Batch]:
        """No worker process: each batch read between the teacher's forwards, its files decoded by one
        thread per core of torch's (PIL lets go of the GIL as it decodes and resizes), its views
        rendered by torch's own threads. For a CPU teacher on few cores, where a worker process only
        takes cores from the forward (and stalls its threads as they wait on each other)."""
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            for idx in batches:
                batch = self.collate(list(pool.map(self.items.__getitem__, idx)))
                if self.pin_memory:
                    batch.canvas = batch.canvas.pin_memory()
                yield batch


# --- the embedder ------------------------------------------------------------------------------------
class Pending:
    """A batch's embeddings and canvases on their way to the host: from a GPU the copies are
    asynchronous (pinned buffers + an event) and only waited for when the batch's block is assembled,
    so batches never sync (a blocking copy of the canvases waited for every batch queued since)."""

    def __init__(self, rows: int, views: int, dim: int, ok: np.ndarray, out: Optional[torch.Tensor] = None,
                 canvas: Optional[torch.Tensor] = None):
        self.shape, self.ok, self.event = (rows, views, dim), ok, None
        self.host = None if out is None else self._to_host(out.view(int(ok.sum()), views, dim).to(torch.float16))
        self.canvas = None if canvas is None else self._to_host(canvas)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_cuda:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        self.event = torch.cuda.Event()  # recorded after this batch's copies: the last one covers both
        self.event.record(torch.cuda.current_stream(t.device))  # the copy's stream, not cuda:0's
        return host

    def _wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def numpy(self) -> np.ndarray:
        emb = np.zeros(self.shape, np.float16)
        if self.host is not None:
            self._wait()
            emb[self.ok] = self.host.numpy()
        return emb

    def canvas_numpy(self) -> np.ndarray:
        """(B, S, S, 3) uint8: the batch's canvases on the host."""
        self._wait()
        return self.canvas.numpy()


class Embedder:
    """A batch's views -> their (B, V, D) float16 teacher embeddings (zeros for unreadable rows).
    Views the reader did not render are rendered here on the teacher's device: crop by crop
    (``render_views``), or with ``batched`` by the device pipeline's batched renderer."""

    def __init__(self, teacher, views: int, batched: bool = False):
        self.teacher, self.views, self.batched = teacher, views, batched

    def render(self, batch: Batch) -> torch.Tensor:
        """(B_ok * V, 3, H, W) uint8 teacher input of the readable rows."""
        t = self.teacher
        if batch.views is not None:
            return batch.views.flatten(0, 1)
        canvas, params = batch.canvas, batch.params
        if not batch.ok.all():  # by index, not a mask: a mask on a device tensor waits for the device
            keep = torch.from_numpy(np.flatnonzero(batch.ok))
            canvas, params = canvas.index_select(0, upload(keep, canvas.device)), params[keep]
        canvas = upload(canvas, t.device)  # a subset of a pinned batch is in ordinary memory again
        if self.batched:
            x = to_uint8(render_views_batched(canvas, params, t.input_size, t.interpolation))
        else:
            x = render_teacher_views(canvas, params, t.input_size, t.interpolation)
        return x.flatten(0, 1)

    def __call__(self, batch: Batch) -> Pending:
        t = self.teacher
        ok = batch.ok
        if not ok.any():
            return Pending(len(batch.rows), self.views, t.embed_dim, ok, canvas=batch.canvas)
        encode = getattr(t, "embed_views", t.encode_pixels)  # embed_views may leave the result on the device
        return Pending(len(batch.rows), self.views, t.embed_dim, ok, encode(self.render(batch)), batch.canvas)


def refuse_nonfinite(emb: np.ndarray, what: str) -> np.ndarray:
    """Teacher outputs with NaN or inf would be stored as every student's targets (and score the
    teacher at chance): refused in one line before they reach the store."""
    bad = ~np.isfinite(emb)
    if bad.any():
        rows = int(bad.reshape(len(emb), -1).any(axis=1).sum())
        raise TeacherOutputError(f"the teacher gave NaN or inf for {rows} of {len(emb)} {what}: its weights are damaged "
                                 "or its precision overflows; check the checkpoint or set teacher.precision=fp32, then "
                                 "rerun (finished blocks are kept)")
    return emb


# --- the assembler -----------------------------------------------------------------------------------
class BlockAssembler:
    """Collects batches of one block; ``add`` returns the ``Block`` once its last row arrived."""

    def __init__(self, store: Store, store_pixels: bool):
        self.store, self.store_pixels = store, store_pixels
        self.canvas_sums = "image/canvas_crc32c" in store.layout["block_arrays"]
        self.block_rows = int(store.layout["block_rows"])
        self.pending: Dict[int, List] = {}

    def add(self, batch: Batch, emb: "Pending") -> Optional[Block]:
        blk = int(batch.rows[0]) // self.block_rows
        parts = self.pending.setdefault(blk, [])
        parts.append((batch, emb))
        start, stop = self.store.block_range(blk)
        if sum(len(b.rows) for b, _ in parts) < stop - start:
            return None
        parts = self.pending.pop(blk)
        ok = np.concatenate([b.ok for b, _ in parts])
        arrays = {"image/emb": refuse_nonfinite(np.concatenate([e.numpy() for _, e in parts]), "images' embeddings"),
                  "image/view_params": np.concatenate([b.params.numpy() for b, _ in parts]),
                  "image/status": np.where(ok, STATUS_OK, STATUS_FAILED).astype(np.uint8)}
        canvases = [e.canvas_numpy() for _, e in parts] if self.store_pixels or self.canvas_sums else []
        if self.store_pixels:
            arrays["image/pixels"] = np.concatenate(canvases)
        if self.canvas_sums:  # stores made since it exists (with pixels: since 2026-12-06)
            arrays["image/canvas_crc32c"] = np.array([checksum(c) for cs in canvases for c in cs], np.uint32)
        failures = {int(r): e for b, _ in parts for r, e in zip(b.rows, b.errors) if e}
        return Block(blk, arrays, failures)


# --- the writer ------------------------------------------------------------------------------------
class BlockWriter(threading.Thread):
    """Writes finished blocks off the main thread. After the first error it writes nothing more;
    the main thread re-raises it (a full disk as one line) at its next ``check``."""

    def __init__(self, store: Store, on_block_done: Optional[Callable[[int], None]] = None):
        super().__init__(daemon=True)
        self.store, self.on_block_done = store, on_block_done
        self.todo: "queue.Queue[Optional[Block]]" = queue.Queue(maxsize=2)
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        while True:
            block = self.todo.get()
            if block is None:
                return
            if self.error is not None:
                continue  # drain without writing after a failure
            try:
                self.store.write_block(block.index, block.arrays, block.failures)
                if self.on_block_done is not None:
                    self.on_block_done(block.index)  # an exception here stops the run like a crash would
            except BaseException as exc:
                self.error = exc

    def put(self, block: Block) -> None:
        self.check()
        self.todo.put(block)

    def close(self) -> None:
        self.todo.put(None)
        self.join()

    def check(self) -> None:
        if self.error is not None:
            if is_disk_full(self.error) and not isinstance(self.error, DiskFullError):  # one said already is kept
                raise disk_full_error(self.store.path, cause=self.error) from self.error
            raise self.error


def block_batches(blocks: List[int], layout: Dict, batch_size: int) -> List[List[int]]:
    """Row batches of the given blocks of a store's ``layout``; batches never straddle a block."""
    out = []
    for blk in blocks:
        rows = list(range(*block_range(layout, blk)))
        out += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return out


def shard_blocks(num_blocks: int, shard: int, num_shards: int) -> range:
    """Contiguous, disjoint block ranges covering every block exactly once (no padding)."""
    return range(shard * num_blocks // num_shards, (shard + 1) * num_blocks // num_shards)


def resolve_shard(shard: Optional[int], num_shards: Optional[int]):
    """--shard/--num-shards win; else torchrun's RANK/WORLD_SIZE; else one worker."""
    from ..errors import ConfigError

    if num_shards is None and shard is None and "WORLD_SIZE" in os.environ:
        rank, world = os.environ.get("RANK", "0"), os.environ["WORLD_SIZE"]
        if not (rank.isdigit() and world.isdigit()):
            raise ConfigError(f"RANK={rank!r} and WORLD_SIZE={world!r} (torchrun's) must be whole numbers; unset them, "
                              "or give --shard and --num-shards")
        shard, num_shards = int(rank), int(world)
    shard, num_shards = shard or 0, num_shards or 1
    if num_shards < 1 or not 0 <= shard < num_shards:
        if num_shards == 1:
            raise ConfigError(f"shard index {shard} is out of range for one shard (--num-shards 1); use --shard 0, or "
                              "give --num-shards")
        raise ConfigError(f"shard index {shard} is out of range for {num_shards} shards; use --shard 0 to {num_shards - 1}")
    return shard, num_shards
