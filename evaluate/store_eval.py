"""Evaluation over stores: teacher baselines from stored embeddings, runs from their outputs.

Results are tidy: one row per (run, protocol, split, domain, metric), plus the run's settings
as columns, so a results file concatenates across runs and sweeps and pivots into tables.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd

from embedcache import open_store
from embedcache.api import StoreReader

from .protocols import PROTOCOLS, EvalData

COLUMNS = ["run", "recipe", "student", "seed", "source", "protocol", "split", "domain", "metric", "value", "n"]


def eval_data(reader: StoreReader, source: str, emb: np.ndarray, split: Optional[Dict] = None,
              scores: Optional[np.ndarray] = None, with_teacher: bool = True) -> EvalData:
    meta = reader.meta
    split = split or {}
    return EvalData(emb=emb, labels=meta["label"].to_numpy(), domains=meta["domain"].to_numpy(),
                    ok=(meta["status"] == "ok").to_numpy(), class_emb=reader.class_emb(source), classes=reader.classes,
                    val_idx=np.asarray(split["val_idx"]) if "val_idx" in split else None,
                    holdout_domains=split.get("holdout_domains") or None,
                    seen_classes=split.get("seen_classes"),  # a run's own: never a made-up split
                    scores=scores, teacher=reader.image_emb(0).astype(np.float32) if with_teacher else None)


def run_protocols(data: EvalData, protocols: Sequence[str], tags: Dict, options: Optional[Dict] = None) -> pd.DataFrame:
    frames = []
    for name in protocols:
        df = PROTOCOLS.get(name)(data, **(options or {}).get(name, {}))
        df.insert(0, "protocol", name)
        for k, v in reversed(list(tags.items())):
            df.insert(0, k, v)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    return out[[c for c in COLUMNS if c in out.columns] + [c for c in out.columns if c not in COLUMNS]]


def teacher_baselines(store: str, sources: Optional[Sequence[str]] = None, protocols: Sequence[str] = ("lodo",),
                      options: Optional[Dict] = None) -> pd.DataFrame:
    """The teacher's own zero-shot accuracy from the store's view-0 embeddings: no model is loaded."""
    reader = open_store(store)
    emb = reader.image_emb(0).astype(np.float32)
    t = reader.manifest["teacher"]
    name = f"teacher:{t.get('name')}:{t.get('model') or t.get('classifier')}"
    frames = []
    for src in sources or reader.text_sources:
        # with_teacher=False: teacher-vs-teacher distillation metrics are trivially perfect; keep the text ones
        data = eval_data(reader, src, emb, with_teacher=False)
        frames.append(run_protocols(data, protocols, {"run": name, "recipe": "teacher", "student": "-", "seed": -1,
                                                      "source": src}, options))
    return pd.concat(frames, ignore_index=True)


def evaluate_run(run_dir: str, protocols: Sequence[str] = ("lodo",), store: Optional[str] = None,
                 outputs=None, options: Optional[Dict] = None) -> pd.DataFrame:
    """Score a finished run. ``outputs`` = (emb, scores) from ``students.embed.embed_store`` (the
    CLI computes them; this package never imports the students). The store must be the one the
    run was trained on: its key is checked."""
    run = Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())
    split = json.loads((run / "split.json").read_text())
    reader = open_store(store or cfg["store"], expect_key=cfg["store_key"])
    emb, scores = outputs
    tags = {"run": run.name, "recipe": cfg["recipe"], "student": cfg["student"]["name"], "seed": cfg["seed"],
            "source": split["text_source"]}
    return run_protocols(eval_data(reader, split["text_source"], emb, split, scores), protocols, tags, options)


def summary_table(results: pd.DataFrame, split: Optional[str] = None, metric: str = "top1") -> pd.DataFrame:
    """Methods x domains, mean +- std over seeds, as the papers lay them out (percent)."""
    df = results[(results["metric"] == metric) & ~results["split"].isin(["per_class", "distill", "text"])]
    if split is not None:
        df = df[df["split"] == split]
    if "episode" in df.columns:
        df = df[df["episode"].isna() | (df["episode"] == -1)]
    keys = ["recipe", "student", "source"] + (["variant"] if "variant" in df.columns else [])
    doms = df[df["domain"] != "avg"]
    # "avg": each seed's mean over domains first, then mean ± std over seeds (as the papers report;
    # in leave-one-domain-out each run scores one domain, so per-run "avg" rows would mix the two).
    # Sweeps tag rows with the replicate index, since their training seeds differ per held-out domain.
    rep = "replicate" if "replicate" in doms.columns and doms["replicate"].notna().all() else "seed"
    per_seed = doms.groupby(keys + ["split", rep], as_index=False)["value"].mean().assign(domain="avg")
    by_domain = doms[doms["domain"] != "all"][keys + ["split"]].drop_duplicates()  # splits with real domains
    df = pd.concat([doms, per_seed.merge(by_domain, on=keys + ["split"])], ignore_index=True)
    g = df.groupby(keys + ["split", "domain"])["value"]
    stats = g.agg(["mean", "std", "count"]).reset_index()
    stats["cell"] = [f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if c > 1 and s == s else "")
                     for m, s, c in zip(stats["mean"], stats["std"], stats["count"])]
    table = stats.pivot_table(index=keys + ["split"], columns="domain", values="cell", aggfunc="first")
    cols = [c for c in table.columns if c != "avg"] + (["avg"] if "avg" in table.columns else [])
    return table[cols]
