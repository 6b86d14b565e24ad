"""Embedding a store's images with a trained student (for evaluation)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from embedcache._device import resolve_device
from embedcache.config import build_config

from .data import SplitConfig, StoreData
from .models import Student, build_student
from .recipes import RECIPES


def load_run(run_dir: str, device: str = "cpu") -> Tuple[Student, dict]:
    """The finished student of a run directory and its resolved config."""
    from safetensors.torch import load_file

    from .train import TrainConfig

    run = Path(run_dir)
    if not (run / "done").exists():
        raise FileNotFoundError(f"run {run} has not finished (no done marker); finish it with the same `embedcache train` command")
    raw = json.loads((run / "config.json").read_text())
    cfg = build_config(TrainConfig, {k: v for k, v in raw.items() if k not in ("store_key",)})
    split = json.loads((run / "split.json").read_text())
    recipe = RECIPES.get(cfg.recipe)
    n_cls = len(split["seen_classes"]) if recipe.classifier else 0
    weights = load_file(str(run / "model.safetensors"))
    model = build_student(cfg.student, int(weights["head.weight"].shape[0]), n_cls)
    model.load_state_dict(weights)
    return model.to(device).eval(), {**raw, "split": split}


@torch.no_grad()
def embed_store(run_dir: str, store: str, device: str = "cpu", batch: int = 256) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Student outputs for view 0 (the centre view) of every image in ``store``: (N, D) float32
    embeddings, and for runs that predict with a linear classifier (N, C) logits over the store's
    classes (-inf for classes the run never saw), else None."""
    model, info = load_run(run_dir, device)
    data = StoreData(store, info["split"]["text_source"], SplitConfig(val_fraction=0.0))
    dev = resolve_device(device)
    emb = np.zeros((len(data.labels), data.dim), np.float32)
    linear = info["split"]["predict"] == "linear"
    scores = np.full((len(data.labels), len(data.classes)), -np.inf, np.float32) if linear else None
    seen = np.asarray(info["split"]["seen_classes"])
    for i in range(0, len(emb), batch):
        idx = np.arange(i, min(len(emb), i + batch))
        x = data.inputs(idx, np.zeros(len(idx), int), model.input_size, model.mean, model.std, dev)
        out = model(x)
        emb[idx] = out["emb"].float().cpu().numpy()
        if linear:
            scores[np.ix_(idx, seen)] = out["logits"].float().cpu().numpy()
    return emb, scores
