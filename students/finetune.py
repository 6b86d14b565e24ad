"""Few-shot fine-tuning of a trained student on k images per unseen class (Li et al.'s few-shot
protocol, fine-tuning variant). The episodes are evaluate's, so fine-tuning, prototypes and
Tip-Adapter are compared on the same support and query images."""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import pandas as pd
import torch

from embedcache._device import resolve_device
from evaluate.metrics import mean_per_class, nearest_label, top1
from evaluate.protocols import episode

from .data import SplitConfig, StoreData
from .embed import load_run
from .losses import LOSSES, BatchContext


def few_shot_finetune(run_dir: str, store: str, shots: int = 5, episodes: int = 3, steps: int = 50, lr: float = 1e-4,
                      batch_size: int = 32, seed: int = 0, device: str = "cpu",
                      unseen: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Per episode: copy the student, train it for ``steps`` on the support images (random stored
    views) with L_cls over the unseen classes' text embeddings, then score the query images (view 0)
    by nearest unseen-class text. Returns tidy rows (split "finetune"; episode -1 = the mean)."""
    base, info = load_run(run_dir, device)
    split = info["split"]
    data = StoreData(store, split["text_source"], SplitConfig(val_fraction=0.0))
    if unseen is None:
        unseen = np.setdiff1d(np.arange(len(data.classes)), split["seen_classes"])
    if len(unseen) == 0:
        raise ValueError("few-shot fine-tuning needs unseen classes; this run trained on every class")
    dev = resolve_device(device)
    ok = (data.reader.meta["status"] == "ok").to_numpy()
    text_all = data.reader.class_emb(split["text_source"])
    text = torch.from_numpy(text_all[unseen]).to(dev)
    rows = []
    for ep in range(episodes):
        support, query = episode(data.labels, ok, unseen, shots, seed, ep, data.classes)
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        for step in range(steps):
            rng = np.random.default_rng([seed, ep, step, 43])
            idx = rng.choice(support, size=min(batch_size, len(support)), replace=False)
            views = rng.integers(0, data.views, size=len(idx))
            x = data.inputs(idx, views, model.input_size, model.mean, model.std, dev)
            y = torch.from_numpy(np.searchsorted(unseen, data.labels[idx])).to(dev)
            out = model(x)
            loss = LOSSES.get("cls")(BatchContext(out["emb"], out["emb"].detach(), text, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            emb = np.concatenate([model(data.inputs(query[i:i + 256], np.zeros(len(query[i:i + 256]), int), model.input_size,
                                                    model.mean, model.std, dev))["emb"].float().cpu().numpy()
                                  for i in range(0, len(query), 256)])
        pred = unseen[nearest_label(emb, text_all[unseen])]
        for metric, fn in (("top1", top1), ("mean_per_class", mean_per_class)):
            rows.append({"split": "finetune", "domain": "all", "metric": metric, "value": fn(pred, data.labels[query]),
                         "n": len(query), "episode": ep})
    df = pd.DataFrame(rows)
    mean = df.groupby(["split", "metric"], as_index=False).agg(value=("value", "mean"), n=("n", "sum"))
    mean["domain"], mean["episode"] = "all", -1
    return pd.concat([df, mean], ignore_index=True)
