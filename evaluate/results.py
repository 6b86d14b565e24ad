"""The results schema every scored row follows, and the one way to write a results file.

One row per (run, source, store, holdout, protocol, split, domain, class_name, episode, metric, the
store the run trained on):
``value`` and ``n`` (rows scored), with the run's settings as columns. Rows from ``embedcache evaluate`` and from sweeps
share this schema, so they combine in one report. Writing a results file *updates* it: a run's rows
of one protocol, store and setting are replaced whole (``upsert``), so scoring the same run twice
leaves the same rows, and a row a rescoring no longer gives does not linger.
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
KEY = ["run", "source", "store_key", "holdout", "protocol", "split", "domain", "class_name", "episode", "metric",
       "trained_on"]  # two runs of one folder name (plain/r0, contrastive/r0) trained on two stores: two runs
TRANSFER, TRAINED_WITHOUT = "transfer", "trained without: "  # a --transfer row's holdout (``holdout_tag``)
UNSEEN = "unseen: "  # the class part of a holdout
# domain values that name no one domain: every domain at once, and a run's training domains together
# (open_vocab's generalised rows of a run that held domains out); out of a table's avg and domain count
NOT_ONE_DOMAIN = ("all", "training_domains")
TAGS: Dict[str, object] = {  # run settings, with the value a row gets when it has none
    "recipe": "-", "student": "-", "run_seed": -1, "replicate": -1, "source": "-", "variant": "-", "holdout": "-",
    "store_key": "-", "search": "-", "settings": "-", "trained_on": "-",
}
# run_seed: the seed the run trained with (a sweep derives one per run, held-out domain included, from
# its grid's seed); the grid's seed is the replicate, the column to group replicates by. Files written
# before the column was renamed from "seed" read the same way.
# settings: a digest of the run's training settings but its seed and what it held out ("-": a teacher, or rows
# scored before the column existed): runs that differ in it are not replicates of one method
# trained_on: the key of the store the run trained on (its store_key, but on a --transfer store; "-": the
# teacher, or rows scored before the column existed): runs trained on two stores are two methods there
COLUMNS: List[str] = ["run", "recipe", "student", "run_seed", "replicate", "source", "variant", "holdout", "protocol",
                      "split", "domain", "class_name", "episode", "metric", "value", "n", "store_key", "search",
                      "settings", "trained_on"]


def holdout_tag(domains: Sequence[str] = (), classes: Sequence[str] = (), seen: Sequence[int] = (),
                transfer: bool = False) -> str:
    """A row's ``holdout``: what the scored model never trained on (domains; "unseen: " the ``classes``
    whose ids are not in ``seen``), or "-". With ``transfer`` (scored on another store, none of whose
    images it trained on): "transfer", and "trained without: " the ``domains`` its own store's split
    held out, which tell a lodo replicate's runs apart there as they do on its own store."""
    parts = ([TRANSFER] + ([TRAINED_WITHOUT + ",".join(domains)] if len(domains) else [])) if transfer \
        else ([",".join(domains)] if len(domains) else [])
    seen = {int(k) for k in seen}  # once: per class it made a tag over 10,000 classes take seconds (a trial)
    unseen = [c for i, c in enumerate(classes) if i not in seen]
    if unseen:
        parts.append(UNSEEN + ",".join(unseen))
    return "; ".join(parts) or "-"


def holdout_parts(holdout: pd.Series) -> pd.DataFrame:
    """``holdout_tag`` read back, the one place a holdout is parsed: per row ``transfer`` (a --transfer
    row), ``domains`` (the domains the run held out of its training store, joined by ","; '' for none:
    the teacher, a class split, a transfer row of a run trained on every domain or scored before transfer
    rows named them), ``named`` (a transfer row names them) and ``unseen`` (the classes, "-" for none)."""
    def parse(tag: str) -> tuple:  # (a run's own row holding out a domain named exactly "transfer" reads as one)
        parts = [] if tag == "-" else [p.strip() for p in tag.split(";")]
        transfer = bool(parts) and parts[0] == TRANSFER
        domains, named, unseen = "", False, "-"
        for part in parts[1:] if transfer else parts:
            if part.startswith(UNSEEN):
                unseen = part[len(UNSEEN):]
            elif transfer and part.startswith(TRAINED_WITHOUT):
                domains, named = part[len(TRAINED_WITHOUT):], True
            elif not transfer:
                domains = part
        return transfer, domains, named, unseen

    text = holdout.astype(str)
    read = {tag: parse(tag) for tag in text.unique()}
    return pd.DataFrame([read[t] for t in text], columns=["transfer", "domains", "named", "unseen"], index=holdout.index)


def held_domains(holdout: pd.Series) -> pd.Series:
    """The domains each row's run held out of its training store ('' for none: ``holdout_parts``)."""
    return holdout_parts(holdout)["domains"]


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


# what one scoring replaces as a whole: a run's rows of one protocol, text source, store and holdout, of
# one setting (``_setting``)
SCOPE = ["run", "source", "store_key", "holdout", "protocol", "trained_on"]


def _setting(split: pd.Series) -> pd.Series:
    """The setting a split's name carries: a fine-tuning split's whole name (its mode, steps and shots:
    finetune@50, finetune_mixed@50@1shot), else what follows its "@" (a shot count: prototype@1shot
    is "1shot"; plain splits "")."""
    split = split.astype(str)
    return split.where(split.str.startswith("finetune"), split.map(lambda s: s.partition("@")[2]))  # (.str.partition
    # gives an empty frame no columns)


def upsert(path: str, rows: pd.DataFrame) -> pd.DataFrame:
    """Merge ``rows`` into the results file at ``path`` and write it atomically; returns the whole
    table. Each scope of ``rows`` (a run's rows of one protocol on one store, of one setting: ``SCOPE``
    and ``_setting``) replaces that scope's old rows whole, so a row a rescoring no longer gives (an
    image left out since, a metric dropped) does not linger, while rows of settings it did not compute
    (fine-tuning of other steps or mode, other shot counts) stay."""
    rows = conform(rows)
    clash = rows[rows.duplicated(KEY, keep=False)].groupby(KEY).value.nunique()
    if (clash > 1).any():  # two different values under one key: the key misses a setting (a bug)
        raise ValueError(f"results rows with the same key {dict(zip(KEY, clash[clash > 1].index[0]))} differ in "
                         "value; the results key is missing a column that tells them apart")
    rows = rows[~rows.duplicated(KEY, keep="last")]
    p = Path(path)
    if p.exists():
        rows = merge(read_results(p), rows)
    atomic_write(p, lambda tmp: rows.to_parquet(tmp, index=False))
    return rows


def merge(old: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``old`` updated with ``rows`` as ``upsert`` updates a file: each scope ``rows`` gives replaces
    that scope's old rows whole; old rows of other scopes stay."""
    old, rows = conform(old), conform(rows)
    return pd.concat([old[~_redone(old, rows)], rows], ignore_index=True)


def _bare(holdout: pd.Series) -> pd.Series:
    """A transfer row's holdout as rows scored before transfer rows named their run's held-out domains
    have it ("transfer", with its classes part); other rows' as they are."""
    return holdout.astype(str).str.replace("; " + TRAINED_WITHOUT + "[^;]*", "", regex=True)


def _redone(old: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """Which ``old`` rows ``rows`` replace: those of a scope and setting it gives, an old row of no
    recorded ``trained_on`` ("-", scored before the column) taken for any store its run trained on, and an
    old transfer row's bare "transfer" for the domains its run held out (a run of the same name that held
    out others keeps its rows)."""
    on = [c for c in SCOPE if c not in ("trained_on", "holdout")] + ["setting"]
    done = rows[SCOPE].assign(setting=_setting(rows["split"]), bare=_bare(rows["holdout"])).drop_duplicates()
    was = old[SCOPE].assign(setting=_setting(old["split"]), row=np.arange(len(old)))
    pairs = was.merge(done, on=on, suffixes=("", "_now"))
    same_store = (pairs["trained_on"] == pairs["trained_on_now"]) | (pairs["trained_on"] == "-")
    same_split = (pairs["holdout"] == pairs["holdout_now"]) | (pairs["holdout"] == pairs["bare"])
    out = np.zeros(len(old), bool)
    out[pairs[same_store & same_split]["row"].to_numpy()] = True
    return out
