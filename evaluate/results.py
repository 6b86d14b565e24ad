"""The results schema every scored row follows, and the one way to write a results file.

One row per (run, source, store, holdout, protocol, split, domain, class_name, episode, metric):
``value`` and ``n`` (rows scored), with the run's settings as columns. Rows from ``embedcache evaluate`` and from sweeps
share this schema, so they combine in one report. Writing a results file *updates* it: rows with
the same key are replaced, so scoring the same run twice leaves the same rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pandas as pd

from embedcache.errors import EvaluationError
from embedcache.fileio import atomic_write

# the text source is part of a row's identity: a teacher's zero-shot rows differ in nothing else; so are
# the store (the teacher on two datasets, a run on its own store and with --transfer) and what was held out
# (the teacher on two class splits)
KEY = ["run", "source", "store_key", "holdout", "protocol", "split", "domain", "class_name", "episode", "metric"]
TAGS: Dict[str, object] = {  # run settings, with the value a row gets when it has none
    "recipe": "-", "student": "-", "run_seed": -1, "replicate": -1, "source": "-", "variant": "-", "holdout": "-",
    "store_key": "-", "search": "-", "settings": "-",
}
# run_seed: the seed the run trained with (a sweep derives one per run, held-out domain included, from
# its grid's seed); the grid's seed is the replicate, the column to group replicates by. Files written
# before the column was renamed from "seed" read the same way.
# settings: a digest of the run's training settings but its seed and what it held out ("-": a teacher, or rows
# scored before the column existed): runs that differ in it are not replicates of one method
COLUMNS: List[str] = ["run", "recipe", "student", "run_seed", "replicate", "source", "variant", "holdout", "protocol",
                      "split", "domain", "class_name", "episode", "metric", "value", "n", "store_key", "search",
                      "settings"]


def holdout_tag(domains: Sequence[str] = (), classes: Sequence[str] = (), seen: Sequence[int] = ()) -> str:
    """A row's ``holdout``: what the scored model never trained on (domains; "unseen: " the ``classes``
    whose ids are not in ``seen``), or "-"."""
    parts = [",".join(domains)] if len(domains) else []
    unseen = [c for i, c in enumerate(classes) if i not in set(int(k) for k in seen)]
    if unseen:
        parts.append("unseen: " + ",".join(unseen))
    return "; ".join(parts) or "-"


def conform(df: pd.DataFrame) -> pd.DataFrame:
    """Every column of the schema, in order, with defaults where a row has none (episode -1 is the
    aggregate over episodes, and the only row of protocols without episodes; class_name '' means
    all classes); columns outside the schema are kept after it."""
    df = df.rename(columns={"seed": "run_seed"}) if "seed" in df.columns and "run_seed" not in df.columns else df.copy()
    defaults = {**TAGS, "run": "-", "protocol": "-", "split": "-", "domain": "all", "class_name": "", "episode": -1,
                "n": 0}
    for col, default in defaults.items():
        if col not in df.columns:
            df[col] = default
        else:
            df[col] = df[col].fillna(default) if not isinstance(default, str) else df[col].fillna(default).astype(str)
    for col in ("run_seed", "replicate", "episode", "n"):
        df[col] = df[col].astype(np.int64)
    df["value"] = df["value"].astype(np.float64)
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


# columns every results file has had: a file without one is not a results file (without ``replicate``
# its seeds would be pooled as one replicate, silently)
REQUIRED = ["run", "replicate", "protocol", "split", "domain", "metric", "value"]


def read_results(path) -> pd.DataFrame:
    """A results file in the schema, or a one-line error when the file is not one."""
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise EvaluationError(f"{path} is not a results file (not readable as parquet: {type(exc).__name__}); give "
                              "a parquet file written by `embedcache evaluate --out`, or a sweep directory") from None
    lacks = [c for c in REQUIRED if c not in df.columns]
    if lacks:
        raise EvaluationError(f"{path} is not a results file (it has no {', '.join(lacks)} column); give a parquet "
                              "file written by `embedcache evaluate --out`, or a sweep directory")
    return conform(df)


# what one scoring replaces as a whole: a run's rows of one protocol, text source, store and holdout
SCOPE = ["run", "source", "store_key", "holdout", "protocol"]


def upsert(path: str, rows: pd.DataFrame) -> pd.DataFrame:
    """Merge ``rows`` into the results file at ``path`` and write it atomically; returns the whole
    table. Each scope of ``rows`` (a run's rows of one protocol on one store: ``SCOPE``) replaces that
    scope's old rows whole, so a row a rescoring no longer gives (an image left out since, a metric
    dropped) does not linger; only old rows of a setting this scoring did not compute stay (the part
    of a split's name after its first "@": fine-tuning steps, a shot count: ``finetune@50``,
    ``prototype@1shot``)."""
    rows = conform(rows)
    clash = rows[rows.duplicated(KEY, keep=False)].groupby(KEY).value.nunique()
    if (clash > 1).any():  # two different values under one key: the key misses a setting (a bug)
        raise ValueError(f"results rows with the same key {dict(zip(KEY, clash[clash > 1].index[0]))} differ in "
                         "value; the results key is missing a column that tells them apart")
    rows = rows[~rows.duplicated(KEY, keep="last")]
    p = Path(path)
    if p.exists():
        old = read_results(p)
        redone = old.merge(rows[SCOPE].drop_duplicates(), on=SCOPE, how="left", indicator=True)["_merge"] == "both"
        def setting(split: pd.Series) -> pd.Series:
            return split.astype(str).str.partition("@")[2]

        other_setting = ~setting(old["split"]).isin(set(setting(rows["split"])))
        old = old[(~redone.to_numpy()) | other_setting.to_numpy()]
        rows = pd.concat([old, rows], ignore_index=True)
    atomic_write(p, lambda tmp: rows.to_parquet(tmp, index=False))
    return rows
