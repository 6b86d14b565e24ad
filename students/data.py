"""Training data read from a store, loaded into memory once, and the split a run trains on.

Splits come from the store's metadata, so one code path serves leave-one-domain-out (held-out
domains) and open-vocabulary (held-out classes) protocols. Each step draws images and, per image,
one of the first ``views_used`` views, as a function of (seed, step) alone; the providers in
``providers.py`` turn those into student inputs and teacher targets.
"""
from __future__ import annotations

import hashlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from embedcache import interrupt, open_store
from embedcache.api import StoreReader
from embedcache.datasets import SPLITS, source_file
from embedcache.images import read_rgb8
from embedcache.device import host_memory_available
from embedcache.errors import ConfigError, StoreError
from embedcache.store import checksum
from embedcache.views import make_canvas

from .config import SplitConfig


def name_seed(name: str) -> int:
    """A seed from a name, the same on every machine and Python (``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


__all__ = ["StoreData", "SplitConfig"]


def check_views_used(views_used: Optional[int], views: int, store: str, skip_plain: bool = False,
                     plain_targets: bool = False) -> None:
    """Drawing from more views than a store holds would be recorded as done while fewer were drawn; with
    ``skip_plain`` (no view 0) at least one augmented view must be left to draw; ``plain_targets`` where only
    view 0 is drawn changes nothing but the run's name and seed (a sweep showed it as a variant: a trial)."""
    if views_used is not None and views_used > views:
        raise ConfigError(f"views_used={views_used} but store {store} holds {views} views per image; use at most {views}")
    drawn = min(views_used or views, views)
    why = f"store {store} holds {views} view(s) per image" + (f" and views_used={views_used}" if views_used else "")
    fix = "a store made with views.count >= 2" if views < 2 else "views_used >= 2"
    if skip_plain and drawn < 2:
        raise ConfigError(f"skip_plain_view=true needs augmented views to draw, but {why}; use {fix}, or "
                          "skip_plain_view=false")
    if plain_targets and not skip_plain and drawn < 2:
        raise ConfigError(f"plain_targets=true changes nothing here: every view drawn is view 0 ({why}); use {fix}, "
                          "or leave plain_targets out")


def draw_views(rng: np.random.Generator, n: int, views: int, views_used: Optional[int] = None,
               skip_plain: bool = False) -> np.ndarray:
    """``n`` view indices, uniform over the first ``views_used`` of a store's ``views`` (view 0, the plain
    canvas, left out with ``skip_plain``): how training, and fine-tuning that goes on as a run trained, draw."""
    return rng.integers(int(skip_plain), min(views_used or views, views), size=n)


def target_views(views: np.ndarray, plain_targets: bool = False) -> np.ndarray:
    """The views whose teacher embeddings are the targets of the drawn ``views``: the same views, or with
    ``plain_targets`` view 0, the plain canvas, for each."""
    return np.zeros_like(views) if plain_targets else views


def store_interpolation(manifest: dict) -> str:
    """How a store's teacher views were resampled, from its manifest's preprocessing (bicubic for
    stores that did not record it): the student's views are resampled alike."""
    pre = manifest.get("teacher", {}).get("preprocessing", {})
    return "bilinear" if pre.get("interpolation") == "bilinear" else "bicubic"


def say_if_canvases_exceed_memory(reader, log) -> None:
    """A run on images holds every canvas of its store in host memory (a batch's rows are gathered from it): one
    past what the machine has available is swapped or killed minutes in (a trial: 19.7 GB for 100,000 images at
    256 px). Said before they are read; not refused, as the kernel's estimate of what it can give is one."""
    n, size = len(reader.meta), int(reader.layout["canvas"])
    need, free = n * size * size * 3, host_memory_available()
    if free is not None and need > free:
        log(f"warning: this run holds its store's canvases in memory ({n:,} of {size}x{size} px: {need / 2**30:.1f} "
            f"GiB), more than this machine has available ({free / 2**30:.1f} GiB): it may swap or be killed for "
            "memory; free memory (fewer sweep workers), train a head on cached features (features=true), or "
            "extract a store of a smaller canvas.size")


class StoreData:
    """One store's arrays plus a run's index sets.

    labels (N,) in the store's class order; targets (N,) index into the training classes (-1 for
    unseen ones); text (C_train, D) float32 class text of the training classes; emb (N, V, D) float16
    teacher view embeddings; params (N, V, 5 or 11: views.param_fields); pixels (N, S, S, 3) uint8 (loaded on first use).
    train_idx / val_idx / test_idx: usable rows the run trains on / selects with / never sees."""

    def __init__(self, store: Union[str, StoreReader], text_source: str, split: SplitConfig = SplitConfig(),
                 training: bool = True):
        """``training``: False for scoring and feature caching, which read a store whose rows may all be
        test rows (an evaluation-only store scored with --transfer)."""
        reader = store if isinstance(store, StoreReader) else open_store(store)
        self.reader, self.key = reader, reader.key
        if text_source not in reader.text_sources:
            raise StoreError(f"store {reader.path} has no text source {text_source!r} (it has "
                             f"{', '.join(reader.text_sources)}); {_remake(reader)} with --set "
                             f"text.sources=[...,{text_source}]")
        reader.require_table_names()  # before a run trains whose scores would be misread
        meta = reader.meta
        self.text_source = text_source
        self.dim, self.views = reader.dim, reader.views
        self.labels = meta["label"].to_numpy()
        self.classes = reader.classes
        self.ok = reader.ok
        unknown = set(split.holdout_domains) - set(reader.domains)
        if unknown:
            raise StoreError(f"holdout domain {sorted(unknown)[0]!r} is not in the store; domains: {', '.join(reader.domains)}")
        self.train_class_ids = reader.class_ids(split.train_classes or tuple(self.classes), "train class")
        self.text = np.ascontiguousarray(reader.class_emb(text_source)[self.train_class_ids])
        to_train = np.full(len(self.classes), -1)
        to_train[self.train_class_ids] = np.arange(len(self.train_class_ids))
        self.targets = to_train[self.labels]
        self._split(meta, split)
        if training:
            self._require_training_rows()

    def require_split_read(self, split: SplitConfig) -> None:
        """The dataset's own val rows are the validation rows: a val_fraction or val_by_domain set beside
        them would be read by nothing, while naming the run as another setting (a sweep over it trained
        the same run under several names). Checked for a fresh run (a run begun before resumes) and a sweep."""
        unread = [f"{k}={getattr(split, k)}" for k in ("val_fraction", "val_by_domain")
                  if getattr(split, k) != getattr(SplitConfig, k)]
        if self.own_val and unread:
            raise ConfigError(f"split.{unread[0]} is not read: the dataset of {self.reader.path} has its own val rows "
                              f"({self.own_val}), which are the validation rows; leave split.val_fraction and "
                              "split.val_by_domain at their defaults")

    def _require_training_rows(self) -> None:
        reader = self.reader
        if len(self.train_idx) == 0:
            raise StoreError(f"no training images left in {reader.path} after the split; check holdout_domains and train_classes")
        untrained = np.setdiff1d(self.train_class_ids, self.labels[self.train_idx])
        if len(untrained):
            names = ", ".join(self.classes[c] for c in untrained[:5]) + (" ..." if len(untrained) > 5 else "")
            warnings.warn(f"{len(untrained)} of {len(self.train_class_ids)} seen classes have no training image after the "
                          f"split ({names}): the student never trains on them; lower split.val_fraction or give them images")

    def _split(self, meta, split: SplitConfig) -> None:
        """Training, validation and test rows. The dataset's own split (a CSV's split column) is kept:
        its test rows are never trained on or selected with, and its val rows, where it has any, are
        the validation rows; else val_fraction of each training domain's rows is held out."""
        held = meta["domain"].isin(split.holdout_domains).to_numpy()
        seen = self.targets >= 0
        given = meta["split"].to_numpy() if "split" in meta else np.full(len(meta), "train")
        odd = sorted(set(given) - set(SPLITS))
        if odd:  # a store made before split names were checked
            raise StoreError(f"store {self.reader.path} has rows whose dataset split is {odd[0]!r}, not one of "
                             f"{', '.join(SPLITS)}; fix the split column and extract the store again")
        usable = self.ok & ~held & seen
        train_mask, val_mask = usable & (given == "train"), usable & (given == "val")
        pool = np.flatnonzero(train_mask)
        self.own_val = int(val_mask.sum())  # the dataset's own val rows (a CSV's split column), else 0
        if not self.own_val:
            rng = np.random.default_rng([split.seed, 17])
            domains = meta["domain"].to_numpy()
            for dom in sorted(set(domains[pool])):  # val_fraction of each training domain
                rows = pool[domains[pool] == dom]
                draw = np.random.default_rng([split.seed, 17, name_seed(dom)]) if split.val_by_domain else rng
                val_mask[draw.permutation(rows)[: int(round(len(rows) * split.val_fraction))]] = True
        self.train_idx = np.setdiff1d(pool, np.flatnonzero(val_mask))
        self.val_idx = np.flatnonzero(val_mask)
        self.test_idx = np.flatnonzero(self.ok & ~train_mask & ~val_mask)

    @property
    def emb(self) -> np.ndarray:
        return self.reader.image_emb()

    @property
    def params(self) -> np.ndarray:
        return self.reader.view_params()

    @cached_property
    def pixels(self) -> np.ndarray:
        r = self.reader
        return r.pixels() if r.layout.get("store_pixels") else self._decode_canvases(r)

    @staticmethod
    def _decode_canvases(reader) -> np.ndarray:
        """canvas.store was false: rebuild every canvas from the source files, once, the same way
        (the dataset's own path rule and decoder, the extraction's canvas), on as many threads as torch
        uses, DECODE_THREADS at most (Pillow lets go of the GIL while it decodes and resizes), a chunk at a
        time, so a stop request or a bad file ends it within a chunk."""
        root, size = reader.manifest["dataset"]["root"], int(reader.layout["canvas"])
        if not root:
            raise StoreError(f"the store keeps no pixels and its dataset has no files to re-decode; {_remake(reader)} "
                             "with canvas.store=true")
        crc = reader.store.read("image/canvas_crc32c") if reader.store.has("image/canvas_crc32c") else None
        paths = reader.meta["path"].tolist()
        rows = np.flatnonzero((reader.meta["status"] == "ok").to_numpy())
        out = np.zeros((len(paths), size, size, 3), np.uint8)

        def decode(i: int):
            try:
                return make_canvas(read_rgb8(source_file(root, paths[i])), size)
            except OSError as exc:
                return exc

        with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), DECODE_THREADS))) as pool:
            for at in range(0, len(rows), DECODE_CHUNK):
                interrupt.check("re-decoding the store's images (it keeps no pixels: canvas.store=false)")
                chunk = rows[at:at + DECODE_CHUNK]
                for i, canvas in zip(chunk, pool.map(decode, chunk)):
                    _require_canvas(reader, root, int(i), paths[i], canvas, crc)
                    out[i] = canvas
        return out

    def say_if_upscaled(self, input_size: int) -> None:
        """A student input larger than the store's canvas, said for stores of files (every view the
        student sees would be upscaled from the canvas; generated shapes are drawn small anyway)."""
        canvas = int(self.reader.layout["canvas"])
        if input_size > canvas and self.reader.manifest["dataset"].get("name") != "synthetic":
            warnings.warn(f"student input_size={input_size} is larger than the store's {canvas} px canvas: every view "
                          f"the student sees is upscaled from it; a smaller student.input_size, or a store extracted "
                          f"with canvas.size={input_size} or more, gives it the detail")

    @cached_property
    def interpolation(self) -> str:
        """How the teacher's views were resampled (the student's views are resampled alike): its
        manifest's preprocessing, bicubic for stores that did not record it."""
        return store_interpolation(self.reader.manifest)

    @cached_property
    def train_by_domain(self) -> List[np.ndarray]:
        """The training rows of each training domain, domains in sorted order."""
        dom = self.reader.meta["domain"].to_numpy()[self.train_idx]
        return [self.train_idx[dom == d] for d in sorted(set(dom))]

    @cached_property
    def val_by_domain(self) -> List[np.ndarray]:
        """The validation rows of each domain, domains in sorted order: DomainBed's training-domain
        validation (and SWAD's loss) is the mean over domains, each domain weighing the same."""
        dom = self.reader.meta["domain"].to_numpy()[self.val_idx]
        return [self.val_idx[dom == d] for d in self.val_domains]

    @cached_property
    def val_domains(self) -> List[str]:
        """The domains of the validation rows, in ``val_by_domain``'s order."""
        return sorted(set(self.reader.meta["domain"].to_numpy()[self.val_idx]))

    def pools(self, per_domain: bool) -> List[np.ndarray]:
        """The row pools a step draws batch_size rows from each of: every training domain, or all rows."""
        return self.train_by_domain if per_domain else [self.train_idx]

    def sample(self, step: int, seed: int, batch_size: int, views_used: Optional[int] = None,
               per_domain: bool = False, skip_plain: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """Row indices and view indices of step ``step``: a function of (seed, step) alone, so a
        resumed run draws exactly the batches an uninterrupted one would. ``per_domain``: batch_size
        rows from each training domain (DomainBed's batches), else batch_size from the pooled rows.
        ``skip_plain``: views 1.. only (view 0 is the un-augmented canvas)."""
        rng = np.random.default_rng([seed, step])
        idx = np.concatenate([rng.choice(p, size=batch_size, replace=len(p) < batch_size) for p in self.pools(per_domain)])
        views = draw_views(rng, len(idx), self.views, views_used, skip_plain)
        return idx, views


DECODE_CHUNK = 256  # rows re-decoded between stop checks
DECODE_THREADS = 8  # at most: each holds a whole decoded image (a 24-megapixel photo is 72 MB)


def _require_canvas(reader: StoreReader, root: str, i: int, path: str, canvas, crc: Optional[np.ndarray]) -> None:
    """Refuse row ``i``'s re-decoded canvas (or the OSError reading it raised) where it is not the one
    the teacher saw."""
    file = source_file(root, path)
    if isinstance(canvas, OSError):
        where = "" if Path(root).is_absolute() else (
            f"; its dataset folder {root} was recorded relative (a store made before they were recorded "
            f"absolute), so it is taken from the working folder {Path.cwd()}: run from the folder it was "
            "extracted in")
        raise StoreError(f"cannot read {file} (row {i}: {type(canvas).__name__}): the store keeps no pixels "
                         "(canvas.store=false), so students re-decode its images; put it back, or extract "
                         f"again with canvas.store=true{where}")
    if crc is not None and checksum(canvas) != int(crc[i]):
        raise StoreError(f"{file} (row {i}) is not the image the teacher saw: the file changed since "
                         "the store was made, or decodes differently here; restore it, or extract again "
                         "(canvas.store=true keeps the canvases in the store)")


def _remake(reader: StoreReader) -> str:
    """How a store is made again with other settings: by the command that made it."""
    return "synthesise it again" if reader.store.producer == "synthesize" else "re-extract"
