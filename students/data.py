"""Training data read from a store, loaded into memory once.

Each step draws images and, per image, one of the first ``views_used`` views; the student's
input is rebuilt from the stored canvas and that view's crop parameters (the same
``render_views`` the teacher's input came from), and the target is the teacher's embedding of
that very view. Splits come from the store's metadata, so one code path serves
leave-one-domain-out (held-out domains) and open-vocabulary (held-out classes) protocols.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from embedcache import open_store
from embedcache.errors import StoreError
from embedcache.views import make_canvas, normalize, render_views


@dataclass(frozen=True)
class SplitConfig:
    holdout_domains: Tuple[str, ...] = ()          # test domains (leave-one-domain-out); never trained on
    train_classes: Optional[Tuple[str, ...]] = None  # None: all; else the seen classes (open vocabulary)
    val_fraction: float = 0.2                      # of each training domain, held out for model selection
    seed: int = 0


class StoreData:
    """Arrays of one store plus index sets. pixels (N, S, S, 3) uint8; params (N, V, 5); emb (N, V, D)
    float32; labels (N,) in the store's class order; text (C_train, D) float32 for the training classes."""

    def __init__(self, store: str, text_source: str, split: SplitConfig = SplitConfig()):
        reader = open_store(store)
        self.reader, self.key = reader, reader.key
        if text_source not in reader.text_sources:
            raise StoreError(f"store {store} has no text source {text_source!r} (it has {', '.join(reader.text_sources)}); "
                             f"re-extract with --set text.sources=[...,{text_source}]")
        meta = reader.meta
        self.dim = int(reader.layout["dim"])
        self.views = int(reader.layout["views"])
        self.params = reader.view_params()
        self.emb = reader.image_emb().astype(np.float32)
        self.pixels = reader.pixels() if reader.layout.get("store_pixels") else self._decode_canvases(reader)
        self.labels = meta["label"].to_numpy()
        self.classes = reader.classes
        unknown = set(split.holdout_domains) - set(reader.domains)
        if unknown:
            raise StoreError(f"holdout domain {sorted(unknown)[0]!r} is not in the store; domains: {', '.join(reader.domains)}")
        names = split.train_classes or tuple(self.classes)
        bad = [c for c in names if c not in self.classes]
        if bad:
            raise StoreError(f"train class {bad[0]!r} is not in the store; classes: {', '.join(self.classes)}")
        self.train_class_ids = np.array(sorted(self.classes.index(c) for c in names))
        self.text = reader.class_emb(text_source)[self.train_class_ids]
        to_train = np.full(len(self.classes), -1)
        to_train[self.train_class_ids] = np.arange(len(self.train_class_ids))
        self.targets = to_train[self.labels]  # index into the training classes, -1 for unseen ones
        ok = (meta["status"] == "ok").to_numpy()
        held = meta["domain"].isin(split.holdout_domains).to_numpy()
        seen = self.targets >= 0
        pool = np.flatnonzero(ok & ~held & seen)
        rng = np.random.default_rng([split.seed, 17])
        val_mask = np.zeros(len(meta), bool)
        for dom in sorted(meta["domain"].iloc[pool].unique()):  # val_fraction of each training domain
            rows = pool[meta["domain"].iloc[pool].to_numpy() == dom]
            val_mask[rng.permutation(rows)[: int(round(len(rows) * split.val_fraction))]] = True
        self.train_idx = np.setdiff1d(pool, np.flatnonzero(val_mask))
        self.val_idx = np.flatnonzero(val_mask)
        self.test_idx = np.flatnonzero(ok & (held | ~seen))
        if len(self.train_idx) == 0:
            raise StoreError(f"no training images left in {store} after the split; check holdout_domains and train_classes")

    @staticmethod
    def _decode_canvases(reader) -> np.ndarray:
        """canvas.store was false: rebuild every canvas from the source files, once, the same way."""
        from PIL import Image

        root, size = reader.manifest["dataset"]["root"], int(reader.layout["canvas"])
        if not root:
            raise StoreError("the store keeps no pixels and its dataset has no files to re-decode; re-extract with canvas.store=true")
        out = np.zeros((len(reader.meta), size, size, 3), np.uint8)
        for i, (path, status) in enumerate(zip(reader.meta["path"], reader.meta["status"])):
            if status == "ok":
                with Image.open(f"{root}/{path}") as im:
                    out[i] = make_canvas(im, size)
        return out

    def sample(self, step: int, seed: int, batch_size: int, views_used: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Row indices and view indices of step ``step``: a function of (seed, step) alone, so a
        resumed run draws exactly the batches an uninterrupted one would."""
        rng = np.random.default_rng([seed, step])
        idx = rng.choice(self.train_idx, size=batch_size, replace=len(self.train_idx) < batch_size)
        views = rng.integers(0, min(views_used or self.views, self.views), size=batch_size)
        return idx, views

    def inputs(self, idx: np.ndarray, views: np.ndarray, size: int, mean, std, device: torch.device) -> torch.Tensor:
        """(B, 3, size, size) normalised student input: view ``views[b]`` of image ``idx[b]``."""
        canvas = torch.from_numpy(self.pixels[idx]).to(device)
        params = torch.from_numpy(self.params[idx, views][:, None])
        return normalize(render_views(canvas, params, size)[:, 0], mean, std)

    def targets_for(self, idx: np.ndarray, views: np.ndarray, device: torch.device):
        """Teacher embeddings (B, D) of exactly those views, and class targets (B,)."""
        return (torch.from_numpy(self.emb[idx, views]).to(device),
                torch.from_numpy(self.targets[idx]).to(device))
