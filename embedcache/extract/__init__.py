"""Extraction: one pass of the teacher over a dataset into a store (resumable, shardable, repairable).

``extract(cfg)`` builds the parts (``parts.py``): a reader decodes images into canvases in
DataLoader workers, the embedder runs the teacher in the main thread, and a writer thread stores
finished row blocks, so decoding and writing overlap encoding. A block's rows are written with
their checksums, then the block is marked done; the manifest's ``complete`` is set last. A killed
run resumes at the first unfinished block; a damaged store (a lost chunk, a missing table) is
repaired by the same command, which re-does exactly the damaged blocks and files. What a store made or
begun before says to a call is ``resume.py``; a paid teacher's books, ``books.py``.
"""
from __future__ import annotations

import errno
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..config import TEACHER_CALL_SETTINGS, ExtractConfig, build_config, replace, to_dict
from ..datasets import ImageDataset, build_dataset
from ..errors import BudgetError, ConfigError, DatasetError, EmbedcacheError, StoreBusyError
from .. import interrupt
from ..fileio import exclusive_lock, one_line_when_full, require_outside_store, require_writable, try_exclusive_lock
from ..store import BACKENDS, STATUS_OK, Store, add_text_arrays, backend_name_for, plan_layout
from ..store.backends import a_store_of
from ..store.store import WRITERS_GATE, live_writers
from ..teachers import TEACHERS, Teacher, build_teacher, check_new
from ..text import build_prompts, encode_sources, id_names, text_calls
from ..views import drawn_share, param_fields
from .books import Books, budget_in_store, lost_in_store, models_in_store, one_model_in_books
from .budget import StoreBudget
from .device import DeviceDecodeReader
from .history import CallRecord, calls_of
from .manifest import PIPELINE, absolute_paths, build_manifest
from .parts import (Batch, Block, BlockAssembler, BlockWriter, Embedder, LoaderReader, ViewPolicy, block_batches,
                    refuse_nonfinite, resolve_shard, shard_blocks)
from .resume import made_so, recorded_dim, say_resumed_otherwise, say_resuming

__all__ = ["extract", "ExtractResult", "DryRun", "Batch", "Block", "ViewPolicy", "shard_blocks", "resolve_shard",
           "finalize", "run_blocks", "policy_of"]


@dataclass
class ExtractResult:
    path: str
    key: str
    complete: bool
    images: int           # rows encoded by this call
    failed: int           # unreadable images in the whole store (when complete) or this call
    seconds: float
    skipped: bool = False  # the store was already complete and intact
    repaired: int = 0      # damaged blocks re-done by this call
    image_seconds: float = 0.0  # of ``seconds``, the image pass (read, encode, write the blocks); the rest is
    # the call's own work once per store (the dataset scanned, the store opened, the prompts encoded, the tables)


def policy_of(cfg: ExtractConfig) -> ViewPolicy:
    return ViewPolicy(cfg.canvas.size, cfg.views)


def require_out(out: str, backend: str, writing: bool = True) -> None:
    """A store's path, before any teacher loads: not inside another store, and, for a new store, somewhere
    it can be written (a dry run's, which writes nothing, by its permissions alone)."""
    require_outside_store(out)
    if not Store.exists(out, backend):
        require_free(out, backend)  # a dry run's too: it said what it would write over /etc/hosts (a fuzz)
        require_writable(out, probe=writing)


def require_free(out: str, backend: str) -> None:
    """Nothing but a store of ``backend`` is at ``out`` where none is (an empty folder made for a Zarr store is)."""
    made_for_it = backend == "zarr" and os.path.isdir(out) and not os.listdir(out)  # `mkdir` first: fine
    if os.path.exists(out) and not made_for_it:
        raise ConfigError(f"--out {out} exists and is not {a_store_of(backend)}; choose another path")


def open_or_create(cfg: ExtractConfig, manifest: Dict, layout: Dict) -> Store:
    backend = backend_name_for(cfg.out, cfg.backend)
    if Store.exists(cfg.out, backend):
        store = Store(cfg.out, "a", backend, rebuild_text=True)
        try:
            made_so(store, manifest)
            store.rebuild_lost()  # the store wanted: its prompts are encoded again at the finish
            return store
        except Exception:
            store.close()
            raise
    require_free(cfg.out, backend)
    store = Store.create(cfg.out, manifest, layout, backend)
    try:
        return made_so(store, manifest)
    except Exception:
        store.close()
        raise


@dataclass
class DryRun:
    """What an extraction would do, before it pays anything: rows and views left to encode, and the
    teacher's own estimate of its cost (a remote teacher: requests, bytes, views its ledger holds)."""
    path: str
    rows: int
    views: int
    cost: Dict[str, int]
    budget: Optional[Tuple[int, int]] = None  # (teacher.max_queries, queries the store has sent) when a limit is set
    shards: int = 1  # the workers filling the store: the rows and cost are this one's share
    views_per_image: int = 0
    complete: bool = False  # the store is complete already: nothing to encode
    writing: bool = False  # another extraction writes the store now: the figures are what it has not finished
    quota: Optional[Tuple[int, int]] = None  # (used, quota) of the key, where a paid service says them


def extract(cfg: ExtractConfig, teacher: Optional[Teacher] = None, on_block_done: Optional[Callable[[int], None]] = None,
            log: Callable[[str], None] = print, reader=None, dataset: Optional[ImageDataset] = None,
            manifest_extra: Optional[Dict] = None, dry_run: bool = False,
            on_open: Optional[Callable[[Store], None]] = None):
    """Run, resume, repair or skip one extraction (``ExtractResult``), or with ``dry_run`` say what
    it would cost (``DryRun``) without writing anything. ``teacher`` may be passed to reuse a loaded
    one; ``reader`` replaces the PIL reader (a GPU decoder, a synthesiser) and ``dataset`` the
    configured dataset; ``manifest_extra`` adds manifest sections that are part of the cache key.
    ``on_open(store)`` runs once the store is open for this call's blocks, before the first (behind the
    writers' gate, so of shards starting together one runs it at a time): what the blocks are made
    from that must not change between calls (a synthesis's style plan) is kept there."""
    t0 = time.time()
    build_config(ExtractConfig, to_dict(cfg))  # every rule, nested ones too, for configs built in code
    if not cfg.out:
        raise ConfigError("no output store given; pass --out PATH (e.g. stores/demo.zarr)")
    backend = backend_name_for(cfg.out, cfg.backend, new=True)
    shard, num_shards = resolve_shard(cfg.shard, cfg.num_shards)
    if num_shards > 1 and not BACKENDS.get(backend).multi_writer:
        raise ConfigError(f"{backend} stores take one writer; use a .zarr store for --num-shards {num_shards}")
    cfg = _kept_blocks(cfg, backend, log)
    _say_unread_views(cfg, backend, log)
    _require_crops(cfg, backend, log)
    dataset = dataset or build_dataset(cfg.dataset)
    dataset.require_files()
    _require_classes(cfg, dataset, backend)  # before the teacher: a bad class list costs nothing
    require_out(cfg.out, backend, writing=not dry_run)  # before the teacher too
    prompts = build_prompts(dataset.classes, cfg.text)
    books_from = teacher  # a teacher passed in may have spent before this call; one built here has not
    if teacher is None and not Store.exists(cfg.out, backend):
        check_new(cfg.teacher)  # a store made before a rule on teacher settings came resumes as it was made
    try:
        teacher = teacher or build_teacher(cfg.teacher, embed_dim=recorded_dim(cfg.out, backend) if getattr(
            TEACHERS.get(cfg.teacher.name), "asks_dim", False) else None)  # the store opened for it only where asked
    except EmbedcacheError as exc:
        done = _complete_as_configured(exc, cfg, dataset, log, t0)
        if done is None:
            raise
        return DryRun(cfg.out, 0, 0, {}, views_per_image=cfg.views.count, complete=True) if dry_run else done
    _say_small_canvas(cfg, teacher)
    # a batch assembled once the next is queued, where that overlaps a GPU's work with the host's wait: not
    # for a synthesis (its reader makes each next batch for minutes) nor a remote teacher (nothing to overlap)
    overlap = (reader is None and teacher.device.type == "cuda" and teacher.computes_here
               and hasattr(teacher, "embed_views"))  # (conse brings its embeddings to the host itself)
    reader = reader or make_reader(cfg, dataset, teacher)
    pipeline = getattr(reader, "pipeline", PIPELINE)
    embedder = Embedder(teacher, cfg.views.count, batched=pipeline["views"] == "batched-resample-uint8")
    manifest = build_manifest(cfg, dataset, teacher, prompts, pipeline=pipeline, extra=manifest_extra)
    layout = plan_layout(len(dataset), cfg.views.count, teacher.embed_dim, cfg.canvas.size, cfg.canvas.store, cfg.block_rows,
                         param_width=len(param_fields(cfg.views.color)))
    add_text_arrays(layout, {s: sum(len(p) for p in pc) for s, pc in prompts.items()}, len(dataset.classes), teacher.embed_dim)
    books = Books(teacher, since_built=books_from is None)
    record = CallRecord(books.call, manifest)
    if dry_run:  # building the teacher may have paid (one text to learn a service's dimension)
        return _dry_run(cfg, manifest, layout, reader, embedder, prompts, shard, num_shards, log,
                        probe_paid=books.queries())
    with one_line_when_full(cfg.out):
        store = open_or_create(cfg, manifest, layout)
    lock = None
    try:
        lock = _writer_lock(store, shard, num_shards)
        budget_in_store(store, teacher, cfg.teacher)
        lost_in_store(store, teacher)
        models_in_store(store, teacher, prompts)
        repaired, finished, reopened = 0, store.complete, []
        if store.blocks_done().any():  # finished blocks are checked before anything builds on them
            report = store.verify(progress=cfg.progress)
            if report.derived:  # computed from the store later, not by this command: said, left to their own
                log(f"note: derived array(s) {', '.join(sorted(report.derived))} of {cfg.out} are damaged; `embedcache "
                    f"verify --repair {cfg.out}` marks them to be recomputed, then the command that made them remakes them")
            if store.complete and report.ok:
                log(f"{cfg.out} is already complete and intact (key {store.key}); nothing to do" if not report.derived
                    else f"{cfg.out} is already complete, its blocks and files intact (key {store.key}); nothing to do "
                         "here (its derived arrays: the note above)")
                return ExtractResult(cfg.out, store.key, True, 0, int(store.manifest.get("failed", 0)), time.time() - t0, True)
            if not report.ok:
                reopened = _reopen(store, report, cfg, log)
                repaired = len(reopened)
                if store.complete and not report.files:  # the blocks checked out on a second look: another
                    # process was packing the store while this one verified it
                    log(f"{cfg.out} is complete and intact (another process was finishing it); nothing to do")
                    return ExtractResult(cfg.out, store.key, True, 0, int(store.manifest.get("failed", 0)), time.time() - t0, True)
        done = store.blocks_done()
        # a finished store has no writer but this call: the blocks it re-opened are its own, whichever shard's
        ours = set(shard_blocks(store.num_blocks, shard, num_shards)) | set(reopened if finished else ())
        mine = [b for b in sorted(ours) if not done[b]]
        if mine and done.any():
            say_resuming(store, done, len(mine), shard, num_shards, log)
            say_resumed_otherwise(store, cfg, manifest, log)
        if mine and on_open is not None:
            _on_open(store, on_open, cfg.out)
        _opening_marks(store, books, record if mine or done.all() else None, cfg.out)
        try:
            def block_done(block: int) -> None:
                books.record(store)  # what was paid so far is in the store, even if the call is killed later
                record.block_done()
                if on_block_done is not None:
                    on_block_done(block)

            began_images = time.time()
            encoded, failed = run_blocks(store, mine, reader, embedder, cfg.batch_size,
                                         progress=cfg.progress, on_block_done=block_done, overlap=overlap)
            image_seconds = time.time() - began_images
            _say_decoded_by_pil(reader, dataset, record, log)
            if store.blocks_done().all():
                _refuse_all_failed(store, dataset, cfg.out)
                n_prompts = sum(len(p) for per_class in prompts.values() for p in per_class)
                log(f"images done; encoding {n_prompts:,} prompts ({', '.join(prompts)}) and writing the tables")
                failed = _finished_or_stopped(store, dataset, teacher, prompts, books, record)
                files = dataset.root is not None or dataset.name != "synthesis"  # made images are never unreadable
                log(f"wrote {cfg.out}: {len(dataset)} images x {cfg.views.count} views"
                    + (f", {failed} unreadable image(s) skipped (listed in meta.parquet)" if files or failed else ""))
            else:
                log(f"shard {shard}/{num_shards} done; the store completes when every shard has finished")
        except BudgetError as exc:  # a paid teacher stopped (images or prompts): say what finishing would cost
            books.record(store)
            books.close(store)
            record.close()
            store.close()  # closed here: the cost of finishing is counted by a dry run (which opens none)
            raise _budget_stop(exc, cfg, manifest, layout, reader, embedder, prompts, shard, num_shards, log) from None
        return ExtractResult(cfg.out, store.key, store.complete, encoded, failed, time.time() - t0, repaired=repaired,
                             image_seconds=image_seconds)
    finally:
        try:
            books.record(store, quietly=True)  # a stop or an error: what this call paid is still counted
            books.close(store)
            record.close(finished=record.finishing_store and store.complete)  # a stop just as it finished: it did
            store.close()
        finally:
            if lock is not None:
                os.close(lock)


def _say_small_canvas(cfg: ExtractConfig, teacher: Teacher) -> None:
    """A canvas smaller than the teacher's input, said for files (generated shapes are drawn small)."""
    size = getattr(teacher, "input_size", None)
    if size and cfg.canvas.size < size and cfg.dataset.name != "synthetic":
        warnings.warn(f"canvas.size={cfg.canvas.size} is smaller than the teacher's {size} px input: every view is "
                      f"upscaled from at most {cfg.canvas.size} px, and the teacher sees blurred images; "
                      f"canvas.size={size} or more keeps the detail it can see")


def _reopen(store: Store, report, cfg: ExtractConfig, log) -> List[int]:
    """The damaged blocks marked to be redone (those that still check out as damaged under the store's
    lock), and the store to be finished again; returns those blocks."""
    with one_line_when_full(cfg.out):  # packed arrays are unpacked first: a copy of the embeddings
        redo = store.reopen_blocks(report.damaged_blocks, recheck=True)
    if redo or report.files:
        lines = report.lines()
        log(f"{cfg.out} is damaged ({'; '.join(lines[:3])}{' ...' if len(lines) > 3 else ''}); "
            f"re-doing {len(redo)} block(s) and rewriting its tables")
    return redo


def _opening_marks(store: Store, books: "Books", record: Optional[CallRecord], out: str) -> None:
    """A paid call's open mark and this call's history entry, written before any block (a full disk
    here is the same one line as in the blocks)."""
    with one_line_when_full(out):
        books.open(store)
        if record is not None:  # this call writes: its settings, device and blocks go in the store's history
            record.open(store)


def _on_open(store: Store, on_open: Callable[[Store], None], out: str) -> None:
    with one_line_when_full(out), _writers_gate(store):
        store.refresh()  # what another shard wrote behind the gate before this one took it
        on_open(store)


def _writer_lock(store: Store, shard: int, num_shards: int):
    """One writer per shard of a Zarr store (HDF5 locks its file itself): a second extraction of the
    same blocks would encode them again beside the first (and pay for them twice with a paid teacher).
    Writers with another shard count are refused while they write (their ranges overlap this one's);
    the gate makes looking for them and taking this shard's lock one step."""
    if store.backend_name != "zarr":
        return None
    try:
        with _writers_gate(store):
            _refuse_other_shard_counts(store, num_shards)
            fd = try_exclusive_lock(os.path.join(store.path, f".writer-{shard}-of-{num_shards}.lock"))
    except OSError as exc:  # a store on read-only storage: nothing can be written to it, twice or once
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return None
        raise
    if fd is None:
        work = "synthesis" if store.producer == "synthesize" else "extraction"
        raise StoreBusyError(f"another {work} is writing {store.path} now (shard {shard} of {num_shards}); wait for "
                             "it to finish (rerunning then resumes or finds it complete), or give another --out")
    return fd


@contextmanager
def _writers_gate(store: Store):
    """The writers' gate of a Zarr store held (HDF5 has one writer: nothing to hold)."""
    if store.backend_name != "zarr":
        yield
        return
    with exclusive_lock(os.path.join(store.path, WRITERS_GATE)):
        yield


def _refuse_other_shard_counts(store: Store, num_shards: int) -> None:
    """Refuses while a writer holds the lock of a shard of another count (called behind the gate)."""
    for count in live_writers(store.path):
        if count != num_shards:
            raise StoreBusyError(f"another extraction is writing {store.path} with --num-shards {count} now; give "
                                 f"--num-shards {count} to join it, or wait for it to finish (rerunning then resumes)")


def _say_decoded_by_pil(reader, dataset: ImageDataset, record: CallRecord, log: Callable[[str], None]) -> None:
    """Under decoder=device, the JPEGs the device decoder rejected and PIL read hold PIL's pixels: said, and
    kept in this call's history entry (``decoded_by_pil``; a repair elsewhere may decode them otherwise)."""
    rows = sorted(set(getattr(reader, "decoded_by_pil", ())))
    if not rows:
        return
    paths = [dataset.samples[r].path for r in rows]
    record.entry["decoded_by_pil"] = paths
    n = len(paths)
    log(f"note: {n} JPEG{'s' if n > 1 else ''} the device decoder rejected {'were' if n > 1 else 'was'} decoded by PIL "
        f"(PIL's pixels; the call's history lists {'them' if n > 1 else 'it'}, decoded_by_pil): "
        + ", ".join(paths[:5]) + (f" and {n - 5} more" if n > 5 else ""))


def _say_unread_views(cfg: ExtractConfig, backend: str, log: Callable[[str], None]) -> None:
    """A crop or colour setting with views.count=1 (``ViewsConfig.unread``) was taken without a word, its one view
    the whole canvas. Said, for a new store, not refused: a config of several views narrowed to one with
    `--set views.count=1` (a zero-shot store) brings them; they are in the key, as they always were."""
    unread = cfg.views.unread()
    if unread and not Store.exists(cfg.out, backend):
        shown = ", ".join(f"views.{k}={_as_given(getattr(cfg.views, k))}" for k in unread)
        log(f"note: {shown} {'is' if len(unread) == 1 else 'are'} not read with views.count=1 (its one view is the whole "
            "canvas), though part of the store's key")


def _require_crops(cfg: ExtractConfig, backend: str, log: Callable[[str], None]) -> None:
    """Crop settings of which no crop fits the canvas (every augmented view the same centre crop, torchvision's
    fallback: views.ratio=[5,10] took the whole canvas, exit 0, a fuzz) are refused for a new store; most views
    falling back is said."""
    if cfg.views.count < 2 or Store.exists(cfg.out, backend):
        return
    share = drawn_share(cfg.canvas.size, cfg.views.scale, cfg.views.ratio)
    shown = f"views.scale={_as_given(cfg.views.scale)} with views.ratio={_as_given(cfg.views.ratio)}"
    if share == 0:
        raise ConfigError(f"{shown} fits no crop in a {cfg.canvas.size} px canvas (none in 256 draws): every augmented "
                          "view would be the same centre crop (torchvision's fallback); widen views.scale or bring "
                          "views.ratio nearer 1")
    if share < 0.5:
        log(f"note: {shown}: {100 * (1 - share):.0f}% of the augmented views fit no crop in torchvision's 10 tries and "
            f"take the same centre crop")


def _as_given(v: Any) -> str:
    return str(list(v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)


def _kept_blocks(cfg: ExtractConfig, backend: str, log: Callable[[str], None]) -> ExtractConfig:
    """``cfg`` with the block_rows of the store it resumes: a store keeps the row blocks it was made with.
    Another value was ignored without a word, and the call's record said it was used (a trial): said,
    and set back."""
    if not Store.exists(cfg.out, backend):
        return cfg
    try:
        with Store(cfg.out, "r", backend) as st:
            kept, n = int(st.layout["block_rows"]), int(st.layout["n"])
    except Exception:  # the store's own open, below, says what is wrong with it
        return cfg
    if kept != min(cfg.block_rows, n):  # a block never holds more rows than the store (plan_layout)
        log(f"note: {cfg.out} keeps the blocks of {kept} rows it was made with; block_rows={cfg.block_rows} applies to "
            "a new store")
        cfg = replace(cfg, block_rows=kept)
    return cfg


def _refuse_all_failed(store: Store, dataset: ImageDataset, out: str) -> None:
    """A store of nothing but failed images is never finished as if it held a dataset."""
    failures = store.failures()
    if len(failures) >= len(dataset):
        first = min(failures)
        raise DatasetError(f"all {len(dataset)} images failed to read ({dataset.samples[first].path}: "
                           f"{failures[first]}); fix the images or dataset.path, then delete {out} and rerun")


ONE_CLASS_FIX = {"synthetic": "set dataset.num_classes to 2 or more",
                 "csv": "give the CSV rows of two or more labels"}


def _require_classes(cfg: ExtractConfig, dataset: ImageDataset, backend: str) -> None:
    """Refuse, for a new store, one class (every nearest-label score would be 100%) and class names that
    are ids; a store already made with ids (before they were refused) is resumed, repaired or found
    complete as before, with a warning."""
    if len(dataset.classes) == 1 and not Store.exists(cfg.out, backend):
        where = f" at {dataset.root}" if dataset.root is not None else ""
        fix = ONE_CLASS_FIX.get(dataset.name, "point dataset.path at a folder of two or more class folders")
        raise ConfigError(f"dataset {dataset.name!r}{where} holds one class ({dataset.classes[0]!r}): every nearest-label "
                          f"score over it would be 100% by construction; {fix}")
    wrong = id_names(dataset.classes)
    if not wrong:
        return
    if cfg.dataset.class_names:
        fix = f"dataset.class_names={cfg.dataset.class_names} names the labels with ids: give each label a name"
    else:
        fix = "name them with dataset.class_names=FILE (a CSV with columns label,name, or a JSON {label: name})"
    if not Store.exists(cfg.out, backend):
        raise ConfigError(f"{wrong}; {fix}")
    warnings.warn(f"{cfg.out}: {wrong}, and its text embeddings are of the ids (it was made before they were "
                  f"refused); for a new store, {fix}")


def _complete_as_configured(exc, cfg: ExtractConfig, dataset: ImageDataset, log, t0: float) -> Optional[ExtractResult]:
    """A rerun whose remote teacher cannot be reached (``exc``): a complete, intact store made with
    these very settings and images has nothing to do, as it would with the teacher there (whose
    identity cannot be confirmed, so the store's recorded settings are compared instead); else None."""
    from ..teachers.remote.errors import RemoteUnavailableError

    backend = backend_name_for(cfg.out, cfg.backend)
    if not isinstance(exc, RemoteUnavailableError) or not Store.exists(cfg.out, backend):
        return None
    with Store(cfg.out, "r", backend) as st:
        made, want = dict(st.manifest.get("config", {})), absolute_paths(to_dict(cfg))  # as the manifest records
        for c in (made, want):  # how the service is called and paid for (a raised budget) changes no answer
            c["teacher"] = {k: v for k, v in (c.get("teacher") or {}).items() if k not in TEACHER_CALL_SETTINGS}
        same = (st.complete and st.manifest.get("dataset", {}).get("fingerprint") == dataset.fingerprint()
                and all(made.get(k) == want[k] for k in ("teacher", "views", "canvas", "text", "decoder")))
        if not same or not st.verify(progress=cfg.progress).ok:
            return None
        log(f"{cfg.out} is already complete and intact (key {st.key}); nothing to do (the teacher could not be "
            "reached to confirm its identity: the store's recorded settings and images were compared instead)")
        return ExtractResult(cfg.out, st.key, True, 0, int(st.manifest.get("failed", 0)), time.time() - t0, True)


def _dry_run(cfg, manifest, layout, reader, embedder, prompts, shard, num_shards, log, probe_paid: int = 0) -> DryRun:
    """Render every view still to encode, as the real run would, and ask the teacher what encoding
    them would cost (``teacher.cost(views) -> {name: count}``; local teachers cost nothing).
    ``probe_paid``: queries building the teacher paid (a service's dimension learnt by one text)."""
    from tqdm.auto import tqdm

    teacher = embedder.teacher
    backend = backend_name_for(cfg.out, cfg.backend)
    done = np.zeros(layout["num_blocks"], bool)
    limit = getattr(cfg.teacher, "max_queries", None)
    budget = (int(limit), 0) if limit is not None and hasattr(teacher, "cost") else None
    writing = False
    if Store.exists(cfg.out, backend):
        with Store(cfg.out, "r", backend) as st:  # refused as the real run refuses it
            made_so(st, manifest)
            models_in_store(st, teacher, prompts)
            if st.blocks_done().any():  # what the resume will say
                say_resumed_otherwise(st, cfg, manifest, log)
            if budget:
                budget = (budget[0], StoreBudget(st, budget[0]).claimed())
            if st.complete:  # prompts included
                return DryRun(cfg.out, 0, 0, {}, budget, num_shards, layout["views"], complete=True)
            done = st.blocks_done()
            writing = st.writing_now()
    blocks = [b for b in shard_blocks(layout["num_blocks"], shard, num_shards) if not done[b]]
    batches = block_batches(blocks, layout, cfg.batch_size)
    cost: Dict[str, int] = {}
    estimate = getattr(teacher, "cost", None)
    if hasattr(teacher, "begin_plan"):  # a teacher reused for several dry runs (a budget stop's estimate too)
        teacher.begin_plan()
    if estimate is None:  # a local teacher costs nothing: counting the rows needs no image decoded
        rows = sum(len(b) for b in batches)
        return DryRun(cfg.out, rows, rows * layout["views"], cost, budget, num_shards, layout["views"], writing=writing)
    rows = 0
    for batch in tqdm(reader.batches(batches), total=len(batches), desc="dry run", unit="batch",
                      disable=not cfg.progress, dynamic_ncols=True):
        rows += len(batch.rows)
        if not batch.ok.any():
            continue
        for k, v in estimate(embedder.render(batch)).items():
            cost[k] = cost.get(k, 0) + int(v)
    if hasattr(teacher, "text_cost"):  # in the calls extraction makes: per source, in chunks
        for per_class in prompts.values():
            for call in text_calls([p for ps in per_class for p in ps]):
                for k, v in teacher.text_cost(call).items():
                    cost[f"text_{k}"] = cost.get(f"text_{k}", 0) + int(v)
    if probe_paid:
        cost["probe_queries"] = probe_paid
    quota = getattr(teacher, "service_quota", None)
    return DryRun(cfg.out, rows, rows * layout["views"], cost, budget, num_shards, layout["views"], writing=writing,
                  quota=quota() if quota is not None else None)


def _budget_stop(exc, cfg, manifest, layout, reader, embedder, prompts, shard, num_shards, log) -> BudgetError:
    """The budget error, with the cost of finishing (a dry run over what is left, ledger hits free):
    of this shard's blocks, said so when the store has others (shards stop together on a shared
    budget: each pricing the whole store would render it that many times)."""
    finish = getattr(embedder.teacher, "budget_message", None)
    if not callable(finish):
        return exc
    log(f"the paid teacher stopped; counting what finishing {cfg.out} would cost ...")  # the error line says why
    left = _dry_run(replace(cfg, progress=False), manifest, layout, reader, embedder, prompts, shard, num_shards, log)
    return type(exc)(f"{exc}; {finish(left.cost, num_shards)}")  # its kind kept: a wait is not a spent budget


def make_reader(cfg: ExtractConfig, dataset: ImageDataset, teacher):
    """The configured reader: PIL in DataLoader workers, or JPEGs decoded on the teacher's device
    (``decoder: device``, or ``auto`` with a GPU teacher, image files to decode and the canvases kept in
    the store: without them students rebuild canvases with PIL, so the teacher must have seen PIL's)."""
    on_gpu, workers = teacher.device.type == "cuda", reader_workers(cfg.num_workers, teacher)
    if cfg.decoder == "device" or (cfg.decoder == "auto" and on_gpu and cfg.canvas.store and dataset.has_files):
        return DeviceDecodeReader(dataset, policy_of(cfg), teacher.device, workers)
    return LoaderReader(dataset, policy_of(cfg), teacher.input_size, teacher.interpolation, render=not on_gpu,
                        num_workers=workers, pin_memory=on_gpu)


def reader_workers(num_workers: Optional[int], teacher) -> int:
    """``num_workers`` as set, else: none for a teacher computing on this machine's CPU with 2 threads
    or fewer (a worker process there only takes a core from the forward, whose threads then wait on each
    other: 0.69 to 0.85 of the bare forward against 0.79 to 0.90 read in process on 2 cores, README);
    one for one with more threads, and for a remote teacher (reading overlaps its network waits); up
    to 8 beside a GPU teacher, one core left to feed it."""
    if num_workers is not None:
        return num_workers
    if teacher.device.type == "cuda":
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    return 0 if teacher.computes_here and torch.get_num_threads() <= 2 else 1


def run_blocks(store: Store, blocks: List[int], reader, embedder, batch_size: int, progress: bool = True,
               on_block_done: Optional[Callable[[int], None]] = None, overlap: bool = False) -> tuple:
    """Read, embed, assemble and write the given blocks. Returns (rows encoded, rows unreadable).
    ``overlap``: each batch is assembled once the next is queued (its block's wait for the device then
    overlaps the next batch's work there); else as soon as it is embedded."""
    from tqdm.auto import tqdm

    batches = block_batches(blocks, store.layout, batch_size)
    if not batches:
        return 0, 0
    assembler = BlockAssembler(store, bool(store.layout["store_pixels"]))
    writer = BlockWriter(store, on_block_done)
    writer.start()
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc=f"extract {os.path.basename(store.path)}",
               disable=not progress, dynamic_ncols=True)
    encoded = failed = 0
    held = None  # the batch queued last, assembled once the next is queued: a block's wait for its last
    # batch's embeddings then overlaps the next batch's work on a GPU, which idled through it
    try:
        for batch in reader.batches(batches):
            interrupt.check_signalled("extracting")  # a CLI stop whose KeyboardInterrupt Python dropped
            writer.check()
            held, done = (batch, embedder(batch)), held
            if not overlap:
                held, done = None, held
            if done is not None:
                _assemble(assembler, writer, *done)
            failed += int((~batch.ok).sum())
            encoded += len(batch.rows)
            bar.update(len(batch.rows))
        held, done = None, held
        if done is not None:
            _assemble(assembler, writer, *done)
    finally:
        try:
            if held is not None:  # stopped while the next batch was read: the one embedded is kept
                _salvage(assembler, writer, *held)
        finally:  # a second Ctrl-C during the salvage still ends the bar and the writer
            bar.close()
            writer.close()
    writer.check()
    return encoded, failed


def _assemble(assembler: BlockAssembler, writer: BlockWriter, batch: Batch, pending) -> None:
    block = assembler.add(batch, pending)
    if block is not None:
        writer.put(block)


def _salvage(assembler: BlockAssembler, writer: BlockWriter, batch: Batch, pending) -> None:
    """On the way out of a stop or failure: the last embedded batch assembled (and its block written,
    where it finishes one) rather than lost; an error doing so gives way to the one being raised."""
    try:
        _assemble(assembler, writer, batch, pending)
    except Exception:
        pass


def _finished_or_stopped(store: Store, dataset: ImageDataset, teacher, prompts, books: Books,
                         record: CallRecord) -> int:
    """``finalize``, where a stop that lands once the store is complete says so (not "rerun to resume")."""
    record.finishing_store = True
    try:
        return _finalize_or_disk_full(store, dataset, teacher, prompts, books, record)
    except KeyboardInterrupt:
        if store.complete:
            raise KeyboardInterrupt(f"stopped as it finished: {store.path} is complete (`embedcache inspect "
                                    f"{store.path}` shows it)") from None
        raise


def _finalize_or_disk_full(store: Store, dataset: ImageDataset, teacher, prompts, books: Optional[Books] = None,
                           record: Optional[CallRecord] = None) -> int:
    with one_line_when_full(store.path):
        return finalize(store, dataset, teacher, prompts, books, record)


def finalize(store: Store, dataset: ImageDataset, teacher, prompts, books: Optional[Books] = None,
             record: Optional[CallRecord] = None) -> int:
    """Text embeddings, meta.parquet, text.parquet, their checksums, the calls that wrote the store
    (``record``: this one's entry), then complete=True (last)."""
    import pandas as pd

    one_model_in_books(store)
    tables = encode_sources(lambda t: teacher.encode_text(t).numpy(), teacher.count_tokens, teacher.context_length,
                            dataset.classes, prompts)
    for src, tab in tables.items():
        store.write_array(f"text/{src}/emb", refuse_nonfinite(tab.emb, f"prompts' embeddings (text source {src})"))
        store.write_array(f"text/{src}/class_emb", refuse_nonfinite(tab.class_emb, f"class embeddings (text source {src})"))
    store.put_table("text.parquet", pd.concat([t.frame for t in tables.values()], ignore_index=True))
    meta = dataset.frame()
    status = store.read("image/status")
    reasons = store.failures()
    meta["status"] = np.where(status == STATUS_OK, "ok", "failed")
    meta["reason"] = [reasons.get(i, "") for i in range(len(meta))]
    store.put_table("meta.parquet", meta)
    failed = int((status != STATUS_OK).sum())
    if books is not None:
        books.record(store)  # this call's spending, the text included, before the totals are written
    usage = store.usage()  # a paid teacher's books over every call (queries, bytes, cache hits)
    cut = store.calls_cut_short(books.call) if usage and books is not None else 0
    if cut:
        usage["calls_cut_short"] = cut
        warnings.warn(f"{store.path}: {cut} earlier extract call(s) ended without closing their books (killed by kill -9 "
                      f"or the OOM killer, or the machine lost; Ctrl-C and SIGTERM close them): teacher_usage.queries "
                      f"({usage.get('queries', 0):,}) may leave out what they paid after their last finished block (not "
                      "what a later call replayed free); the service's own bill is the exact figure")
    history = store.call_history()
    if record is not None:  # this call as it will end: finishing the store (its own entry says so once it has)
        history = [record.finishing() if e.get("call") == record.entry["call"] else e for e in history]
    calls = calls_of(history, store.manifest)
    store.finish(failed=failed, **({"teacher_usage": usage} if usage else {}), **({"calls": calls} if calls else {}))
    if record is not None:
        record.close(finished=True)
    return failed
