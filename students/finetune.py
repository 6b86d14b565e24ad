"""Few-shot fine-tuning of a trained student on k images per unseen class (Li et al.'s few-shot
protocol, fine-tuning variant). The episodes are evaluate's, so fine-tuning, prototypes and
Tip-Adapter are compared on the same support and query images.

Two modes:
- ``shots``: each step trains on support images only, with L_cls over the unseen classes' text;
- ``mixed`` (Li et al.'s code): each batch mixes the support images into training images of the
  seen classes and keeps the run's full recipe loss, with every class's text as the classifier.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import numpy as np
import pandas as pd
import torch

from embedcache.errors import ConfigError, EvaluationError
from embedcache.evaluate.metrics import mean_per_class, nearest_label, top1
from embedcache.evaluate.protocols import DEFAULT_SHOTS, EPISODES, episode, episode_mean, shots_tag

from .config import TrainConfig
from .data import StoreData, draw_views, target_views
from .losses import LOSSES, BatchContext
from .models import batchnorms, freeze_batchnorm
from .providers import student_views
from .recipes import recipe_of

MODES = ("shots", "mixed")


def mixed_on_transfer(option: str = "--finetune-mode ") -> str:
    """The refusal of the mixed mode on a transfer store (``option``: how the caller names the setting)."""
    return (f"{option}mixed mixes the run's own training images into each batch, and transfer stores hold none of "
            f"them; use {option}shots (a transfer store's shots alone)")


def _batch(data: StoreData, support: np.ndarray, train_rows: np.ndarray, mode: str, rng, batch_size: int) -> np.ndarray:
    if mode == "shots":
        return rng.choice(support, size=min(batch_size, len(support)), replace=False)
    k = min(len(support), batch_size // 2 or 1)
    rest = rng.choice(train_rows, size=max(0, batch_size - k), replace=len(train_rows) < batch_size - k)
    return np.concatenate([rng.choice(support, size=k, replace=False), rest])


def require_trainable_batches(model, shots: int, unseen: int, mode: str, transfer: bool = False) -> None:
    """On the shots alone a batch holds shots x unseen classes images: one, BatchNorm cannot train on.
    ``transfer``: on a transfer store, where the mixed mode is refused, it is not offered."""
    if mode == "shots" and shots * unseen == 1 and batchnorms(model):
        mixed = "" if transfer else "--finetune-mode mixed, "
        raise EvaluationError(f"few-shot fine-tuning on the shots alone trains on batches of {shots * unseen} "
                              "image (shots x unseen classes), and this student's BatchNorm needs 2 or more; use more "
                              f"shots, {mixed}or --finetune-steps 0")


def few_shot_finetune(base, cfg: TrainConfig, data: StoreData, split: Dict, shots: int = DEFAULT_SHOTS,
                      episodes: int = EPISODES, steps: int = 50, lr: float = 1e-4, batch_size: int = 32, seed: int = 0,
                      device="cpu", unseen: Optional[np.ndarray] = None, mode: str = "shots") -> pd.DataFrame:
    """Per episode: copy the student, train it for ``steps`` (see the modes above), then score the
    query images (view 0) by nearest unseen-class text. Returns rows (split "finetune@<steps>" or
    "finetune_mixed@<steps>", with "@<k>shot" after it for other than 5 shots; episode -1 = the mean)."""
    if mode not in MODES:
        raise ConfigError(f"unknown few-shot fine-tuning mode {mode!r}; use one of {', '.join(MODES)}")
    if unseen is None:
        unseen = np.setdiff1d(np.arange(len(data.classes)), split["seen_classes"])
    if len(unseen) == 0:
        raise EvaluationError("few-shot fine-tuning needs unseen classes; this run trained on every class")
    require_trainable_batches(base, shots, len(unseen), mode)
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    text_all = data.reader.class_emb(split["text_source"])
    recipe = recipe_of(cfg)
    stage = recipe.stages[-1]
    seen_rows = np.asarray(split["train_idx"])
    if mode == "mixed" and not len(seen_rows):
        raise EvaluationError(mixed_on_transfer())
    text = torch.from_numpy(np.array(text_all[unseen] if mode == "shots" else text_all)).to(dev)
    rows = []
    for ep in range(episodes):
        support, query = episode(data.labels, data.ok, unseen, shots, seed, ep, data.classes)
        model = copy.deepcopy(base).train()
        if cfg.freeze_bn:  # as the run trained: BatchNorm statistics the pretrained weights'
            freeze_batchnorm(model.backbone)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        for step in range(steps):
            rng = np.random.default_rng([seed, ep, step, 43])
            idx = _batch(data, support, seen_rows, mode, rng, batch_size)
            as_run = mode != "shots"  # mixed training goes on as the run trained: its views and targets (a review)
            views = draw_views(rng, len(idx), data.views, cfg.views_used if as_run else None, as_run and cfg.skip_plain_view)
            x = student_views(data, idx, views, model.input_size, model.mean, model.std, dev)
            out = model(x)
            if mode == "shots":
                y = torch.from_numpy(np.searchsorted(unseen, data.labels[idx])).to(dev)
                loss = LOSSES.get("cls")(BatchContext(out["emb"], out["emb"].detach(), text, y))
            else:
                t = torch.from_numpy(data.emb[idx, target_views(views, cfg.plain_targets)].astype(np.float32)).to(dev)
                y = torch.from_numpy(data.labels[idx]).to(dev)
                # the classifier losses have no outputs for the new classes; L_cls stands in for them
                losses = {n: w for n, w in stage.losses.items() if n not in ("ce", "kd")} or {"cls": 1.0}
                ctx = BatchContext(out["emb"], t, text, y, None)
                loss = sum(w * LOSSES.get(n)(ctx, **stage.loss_args.get(n, {})) for n, w in losses.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            emb = np.concatenate([model(student_views(data, query[i:i + 256], np.zeros(len(query[i:i + 256]), int),
                                                      model.input_size, model.mean, model.std, dev))["emb"].float().cpu().numpy()
                                  for i in range(0, len(query), 256)])
        pred = unseen[nearest_label(emb, text_all[unseen])]
        # the steps in the name: fine-tuning for 2 and for 50 steps are two measurements, not one replaced by the other
        name = f"{'finetune' if mode == 'shots' else 'finetune_mixed'}@{steps}{shots_tag(shots)}"
        for metric, fn in (("top1", top1), ("mean_per_class", mean_per_class)):
            rows.append({"split": name, "domain": "all", "metric": metric, "value": fn(pred, data.labels[query]),
                         "n": len(query), "episode": ep})
    df = pd.DataFrame(rows)
    mean = episode_mean(df)
    mean["domain"], mean["episode"] = "all", -1
    return pd.concat([df, mean], ignore_index=True)
