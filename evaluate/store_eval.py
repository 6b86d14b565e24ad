"""Evaluation over stores: teacher baselines from stored embeddings, and the shared step that turns
any embeddings (a teacher's or a student's) plus a run's split into tidy result rows.

Scoring a trained student needs the student, so it is driven from ``embedcache.students.scoring``,
which embeds the store's images and calls ``eval_data`` and ``run_protocols`` here; this package
never imports the students.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd

from embedcache import open_store
from embedcache.api import StoreReader
from embedcache.errors import EvaluationError

from .index import search_path
from .protocols import CLASS_SPLIT, PROTOCOLS, EvalData, named_warnings, seeded_class_split
from .results import NOT_ONE_DOMAIN, TRAINED_WITHOUT, TRANSFER, conform, held_domains, holdout_parts, holdout_tag


def _rows_of(split: Dict, name: str) -> Optional[np.ndarray]:
    """A run's row list as integer indices (an empty list would otherwise be read as floats)."""
    return np.asarray(split[name], dtype=np.int64) if name in split else None


def eval_data(reader: StoreReader, source: str, emb: np.ndarray, split: Optional[Dict] = None,
              scores: Optional[np.ndarray] = None, with_teacher: bool = True) -> EvalData:
    reader.require_table_names()
    meta = reader.meta
    split = split or {}
    return EvalData(emb=emb, labels=meta["label"].to_numpy(), domains=meta["domain"].to_numpy(),
                    ok=reader.ok, class_emb=reader.class_emb(source), classes=reader.classes,
                    val_idx=_rows_of(split, "val_idx"), test_idx=_rows_of(split, "test_idx"),
                    holdout_domains=split.get("holdout_domains") or None,
                    seen_classes=split.get("seen_classes"),  # a run's own: never a made-up split
                    scores=scores, teacher=reader.image_emb(0).astype(np.float32) if with_teacher else None,
                    teacher_views=reader.image_emb())


def run_protocols(data: EvalData, protocols: Sequence[str], tags: Dict, options: Optional[Dict] = None) -> pd.DataFrame:
    """Every protocol's rows, tagged with the run's settings, in the results schema."""
    frames = []
    for name in protocols:
        df = PROTOCOLS.get(name)(data, **(options or {}).get(name, {}))
        frames.append(df.assign(protocol=name, **tags))
    return conform(pd.concat(frames, ignore_index=True).assign(search=search_path()))


def teacher_baselines(store: str, sources: Optional[Sequence[str]] = None, protocols: Sequence[str] = ("lodo",),
                      options: Optional[Dict] = None, unseen_fraction: float = 0.5, split_seed: int = 0,
                      seen_classes: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """The teacher's own zero-shot accuracy from the store's view-0 embeddings: no model is loaded.
    open_vocab and few_shot hold out the classes a sweep with the same ``unseen_fraction`` and
    ``split_seed`` holds out (``seeded_class_split``), or all but ``seen_classes`` (names, as a run's
    ``split.train_classes``); their rows name them in ``holdout``."""
    with open_store(store) as reader:
        emb = reader.image_emb(0).astype(np.float32)
        t = reader.manifest["teacher"]
        name = f"teacher:{t.get('name')}:{t.get('model') or t.get('classifier')}"
        seen = (seen_ids(reader, seen_classes) if seen_classes is not None else
                seeded_class_split(len(reader.classes), unseen_fraction, split_seed))
        unseen = holdout_tag(classes=reader.classes, seen=seen)
        frames = []
        for src in sources or reader.text_sources:
            # with_teacher=False: teacher-vs-teacher distillation metrics are trivially perfect; keep the text ones
            data = eval_data(reader, src, emb, {"seen_classes": seen.tolist()}, with_teacher=False)
            tags = {"run": name, "recipe": "teacher", "student": "-", "source": src, "store_key": reader.key}
            for p in protocols:
                held = unseen if p in CLASS_SPLIT else "-"
                with named_warnings(f"teacher, {src} text"):
                    frames.append(run_protocols(data, [p], {**tags, "holdout": held}, options))
    return pd.concat(frames, ignore_index=True)


def seen_ids(reader: StoreReader, names: Sequence[str]) -> np.ndarray:
    """Sorted ids of the seen class ``names``: at least one class, not all."""
    ids, classes = reader.class_ids(names), reader.classes
    if not 0 < len(ids) < len(classes):
        raise EvaluationError(f"the seen classes must leave some unseen: give 1 to {len(classes) - 1} of the store's "
                              f"{len(classes)} classes")
    return ids


NAMED_BY = ["store_key", "recipe", "student", "source", "variant", "unseen"]  # a method, but for its settings


def method_frame(results: pd.DataFrame) -> pd.DataFrame:
    """The results in the schema, with ``unseen``: the classes a row's model never trained on (the
    class part of its ``holdout``; "-" for none), which a method's rows share. Held-out domains are
    not part of a method: a leave-one-domain-out method's runs each hold out one. Rows scored before
    runs recorded their ``settings`` ('-') are a method of their own: what they were trained with is
    not known (a naive_kd run of then ran another KD). Rows scored before ``trained_on`` was recorded
    on their run's own store get that store's key (a transfer row's stays unknown, "-")."""
    results = conform(results)
    own = (results["trained_on"] == "-") & ~transferred(results) & (results["recipe"] != "teacher")  # (it trained on none)
    results["trained_on"] = results["trained_on"].where(~own, results["store_key"])  # older rows: their own store's
    results["holdout"] = _with_held_domains(results)
    return results.assign(unseen=holdout_parts(results["holdout"])["unseen"])


def _with_held_domains(results: pd.DataFrame) -> pd.Series:
    """Each row's holdout, a bare "transfer" (scored before transfer rows named their run's held-out
    domains) given the domains its run held out, read from the run's own-store rows: beside rescored
    rows, a replicate of bare ones would read short of its runs."""
    holdout, parts = results["holdout"].astype(str), holdout_parts(results["holdout"])
    bare = parts["transfer"] & ~parts["named"]
    if not bare.any():
        return holdout
    own = results[~parts["transfer"]].assign(held=parts["domains"][~parts["transfer"]])
    held = own[own["held"] != ""].groupby(["run", "trained_on"])["held"].agg(lambda x: x.iloc[0] if x.nunique() == 1 else "")
    found = pd.Series([held.get((r, t), "") for r, t in zip(results["run"], results["trained_on"])], index=results.index)
    named = TRANSFER + "; " + TRAINED_WITHOUT + found + holdout.str[len(TRANSFER):]
    return holdout.where(~(bare & (found != "")), named)


def method_keys(results: pd.DataFrame) -> list:
    """The columns that name a method in a table (``results`` from ``method_frame``): recipe, student,
    text source, variant; the class split when the results hold several; the training settings (a
    digest) when runs of one recipe, student, source and variant were trained otherwise (runs trained
    one by one with another val_fraction or select: never replicates of one method); the store they
    trained on when runs of two stores were scored on one (--transfer); and the store first when they
    span several stores. Rows of different methods are never averaged together."""
    keys = ["recipe", "student", "source", "variant"] + (["unseen"] if results["unseen"].nunique() > 1 else [])
    if (results.groupby(NAMED_BY)["settings"].nunique() > 1).any():
        keys.append("settings")
    if (results.groupby(NAMED_BY)["trained_on"].nunique() > 1).any() or transferred(results).any():
        keys.append("trained_on")  # --transfer rows (of runs of two stores: apart), or of runs whose store is not known
    return (["store_key"] + keys) if results["store_key"].nunique() > 1 else keys


def transferred(results: pd.DataFrame) -> pd.Series:
    """The rows of runs scored on another store than the one they trained on (--transfer, their holdout says so,
    rows scored before ``trained_on`` was kept too): a table of them alone showed them as the runs' own scores,
    beside the teacher's zero_shot rows on the same store."""
    return holdout_parts(results["holdout"])["transfer"]


def _cell(mean: float, std: float, count: int) -> str:
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if count > 1 and std == std else "")


def _replicates(df: pd.DataFrame, keys: list) -> pd.DataFrame:
    """(keys, split, replicate, complete, own): a replicate is complete when it has the run of every
    domain held out in its split (in this store) and a value for every domain: a failed or unfinished
    run leaves its replicate short, and a short replicate's cells would average fewer runs or domains.
    ``own``: complete by its own method's runs alone (every domain and held-out domain any replicate of
    the method has, by name: two replicates each short of another run have as many as each other): a
    method that held out fewer domains than others is short of the table, not of a run."""
    _say_pooled(df, keys)
    # each store has its own domains, and a transfer store's rows hold out the domains of the store trained on
    scope = ["store_key", "trained_on", "split"]
    rows = df.assign(held=held_domains(df["holdout"]))
    real = rows[~rows["domain"].isin(NOT_ONE_DOMAIN)]
    wanted = (rows[rows["held"] != ""].groupby(scope)["held"].nunique().rename("want_h").reset_index(),
              real.groupby(scope)["domain"].nunique().rename("want_d").reset_index())
    by = keys + [c for c in scope if c not in keys]  # one store and one trained on per method unless in keys
    have = rows.groupby(by + ["replicate"], as_index=False).agg(
        h=("held", lambda x: x[x != ""].nunique()), d=("domain", lambda x: x[~x.isin(NOT_ONE_DOMAIN)].nunique()),
        held_set=("held", lambda x: frozenset(x[x != ""])),
        domain_set=("domain", lambda x: frozenset(x[~x.isin(NOT_ONE_DOMAIN)])))
    for w in wanted:
        have = have.merge(w, on=scope, how="left")
    have = have.fillna({"want_h": 0, "want_d": 0})
    # a method that holds no domain out (trained on every domain) has no held-out run to miss
    holds_out = have.groupby(keys + ["split"])["h"].transform("max") > 0
    have["complete"] = ((have["h"] >= have["want_h"]) | ~holds_out) & (have["d"] >= have["want_d"])
    have["own"] = _has_all_its_methods(have, keys + ["split"], "held_set") & _has_all_its_methods(
        have, keys + ["split"], "domain_set")
    return have[keys + ["split", "replicate", "complete", "own"]]


def _say_pooled(df: pd.DataFrame, keys: list) -> None:
    """A warning where one replicate holds two runs of one held-out split (the same settings and seed
    trained twice, in other folders): its value is their mean, and the table would count one replicate."""
    if "run" not in df.columns:
        return
    by = keys + [c for c in ("store_key", "trained_on", "split", "replicate", "holdout") if c not in keys and c in df]
    runs = df.groupby(by)["run"].unique()
    twice = runs[runs.map(len) > 1]
    if not len(twice):
        return
    first = dict(zip(by, twice.index[0]))
    a, b = sorted(twice.iloc[0])[:2]
    seeds = (sorted(df.loc[df["run"].isin([a, b]), "run_seed"].dropna().unique().tolist())
             if "run_seed" in df.columns else [])
    what = ("the same settings and seed trained twice" if len(seeds) < 2 else
            f"the same settings and replicate, trained from seeds {seeds[0]} and {seeds[1]} (sweep folders that named "
            "the store or device otherwise seed otherwise)")
    warnings.warn(f"{len(twice)} replicate(s) of recipe {first.get('recipe', '-')} hold two or more runs of one held-out "
                  f"split ({a} and {b}: replicate {first['replicate']}, holdout {first.get('holdout', '-')}): {what}; "
                  "each replicate's value is their mean, counted once. Give the runs other replicate seeds to count "
                  "them as replicates, or score one of them")


def _has_all_its_methods(have: pd.DataFrame, method: list, column: str) -> pd.Series:
    """Whether each replicate's set in ``column`` holds every member any replicate of its method has."""
    union = {k: frozenset().union(*sets) for k, sets in have.groupby(method)[column]}
    return pd.Series([mine >= union[k] for mine, k in zip(have[column], zip(*(have[c] for c in method)))],
                     index=have.index)


def _per_replicate(results: pd.DataFrame, split: Optional[str], metric: str):
    """(keys, doms, counts): one value per method, split, domain and replicate, of the replicates that
    count (the complete ones, when a method has any), and each method's replicates (n) and complete
    ones (k); doms is None when nothing is scored."""
    results = method_frame(results)
    df = results[(results["metric"] == metric) & ~results["split"].isin(["per_class", "distill", "text"])]
    if split is not None:
        df = df[df["split"] == split]
    df = df[(df["episode"] == -1) & (df["domain"] != "avg")]
    keys = method_keys(results)
    if df.empty:
        return keys, None, None
    status = _replicates(df, keys)
    counts = status.groupby(keys + ["split"], as_index=False).agg(n=("complete", "size"), k=("complete", "sum"),
                                                                  k_own=("own", "sum"))
    # one value per replicate and domain: in leave-one-domain-out each run scores the validation rows
    # of its training domains, so a replicate scores a domain in-domain once per other held-out domain;
    # their mean is the replicate's value, and ± stays a spread over replicates
    doms = df.groupby(keys + ["split", "domain", "replicate"], as_index=False)["value"].mean()
    doms = doms.merge(status, on=keys + ["split", "replicate"]).merge(counts, on=keys + ["split"])
    # the complete replicates where a method has any, else those complete by its own runs, else all it has
    keep = doms["complete"] | ((doms["k"] == 0) & (doms["own"] | (doms["k_own"] == 0)))
    return keys, doms[keep], counts


def domain_stats(results: pd.DataFrame, split: Optional[str] = None, metric: str = "top1") -> pd.DataFrame:
    """The numbers behind ``summary_table``'s domain cells: mean, sample std (ddof 1) and count over
    the replicates that count, per method, split and domain (fractions, not percent)."""
    return _domain_stats(*_per_replicate(results, split, metric))


def _domain_stats(keys: list, doms: Optional[pd.DataFrame], _counts=None) -> pd.DataFrame:
    if doms is None:
        return pd.DataFrame(columns=keys + ["split", "domain", "mean", "std", "count"])
    return _stats(doms, keys)


def _stats(doms: pd.DataFrame, keys: list) -> pd.DataFrame:
    return doms.groupby(keys + ["split", "domain"])["value"].agg(["mean", "std", "count"]).reset_index()


# what a summary table's ``avg`` column holds, said under each printed table (pooling images had weighed large domains)
AVG_IS = "avg: the unweighted mean over domains"


def avg_said(table: pd.DataFrame) -> str:
    """'; avg: the unweighted mean over domains' for a table with an avg column, else '' (a table of
    `all` cells only said what no column of it was: a trial)."""
    return f"; {AVG_IS}" if "avg" in table.columns else ""


def class_split_note(results: pd.DataFrame) -> str:
    """A line for results that hold runs which held classes out ('' for none; ``results`` from
    ``method_frame``): the classes, where one class split is all the results hold (with several, the
    tables' ``unseen`` column names each row's; unseen-class accuracy depends on which classes they are),
    and that those runs' in_domain and out_of_domain rows rank the seen classes' labels only (a 4-way
    choice on PACS beside a leave-one-domain-out run's 7-way one, under one split name: a trial)."""
    unseen = results.loc[results["unseen"] != "-", "unseen"]
    if unseen.empty:
        return ""
    named = f"unseen classes (never trained on): {unseen.iloc[0]}; " if results["unseen"].nunique() == 1 else ""
    return named + "in_domain and out_of_domain rows of runs with unseen classes rank the seen classes' labels only."


def summary_table(results: pd.DataFrame, split: Optional[str] = None, metric: str = "top1") -> pd.DataFrame:
    """Methods x domains, mean +- std over replicates, as the papers lay them out (percent), and how
    many replicates the cells hold. Only complete replicates count when a method has any (a replicate
    short of a run would average fewer runs in-domain and fewer domains in ``avg``); a method with none
    shows all it has, and its ``avg`` says it is incomplete."""
    return _summary_table(*_per_replicate(results, split, metric))


def _summary_table(keys: list, doms: Optional[pd.DataFrame], counts: Optional[pd.DataFrame]) -> pd.DataFrame:
    if doms is None:
        return pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=keys + ["split"]))
    stats = _stats(doms, keys)
    stats["cell"] = [_cell(m, s, c) for m, s, c in zip(stats["mean"], stats["std"], stats["count"])]
    avg = _avg(doms, keys)
    with_domains = doms[~doms["domain"].isin(NOT_ONE_DOMAIN)][keys + ["split"]].drop_duplicates()
    # no complete replicate, not even by its own runs: no avg
    short = counts[(counts["k"] == 0) & (counts["k_own"] == 0)].merge(with_domains, on=keys + ["split"])
    k_said = counts["k"].where(counts["k"] > 0, counts["k_own"])  # complete by its own runs where none is by all
    notes = counts.assign(domain="replicates", cell=[f"{n}" if k == n else f"{k} of {n} complete"
                                                    for n, k in zip(counts["n"], k_said)])
    cells = pd.concat([stats[keys + ["split", "domain", "cell"]], avg.assign(domain="avg")[keys + ["split", "domain", "cell"]],
                       short.assign(domain="avg", cell="incomplete")[keys + ["split", "domain", "cell"]],
                       notes[keys + ["split", "domain", "cell"]]], ignore_index=True)
    table = cells.pivot_table(index=keys + ["split"], columns="domain", values="cell", aggfunc="first")
    tail = [c for c in ("avg", "replicates") if c in table.columns]
    return table[[c for c in table.columns if c not in tail] + tail]


def avg_stats(results: pd.DataFrame, split: str, metric: str = "top1") -> pd.DataFrame:
    """The numbers behind ``summary_table``'s ``avg`` cells: per method of ``split``, mean, std and count
    over its replicates that count of each one's mean over the split's domains (fractions); a method
    with no avg there (incomplete) has no row. The in- vs out-of-domain plot's points."""
    return _avg_stats(*_per_replicate(results, split, metric))


def _avg_stats(keys: list, doms: Optional[pd.DataFrame], _counts=None) -> pd.DataFrame:
    if doms is None:
        return pd.DataFrame(columns=keys + ["split", "mean", "std", "count", "cell"])
    return _avg(doms, keys)


class Tables:
    """One results file's methods x domains numbers, as ``summary_table``, ``domain_stats`` and
    ``avg_stats`` give them, with each split's replicates worked out once: a report reads a split's
    cells, stats and avg several times over, and working them out again each time was most of the time
    a sweep spent writing its report."""

    def __init__(self, results: pd.DataFrame):
        self.results = method_frame(results)
        self.keys = method_keys(self.results)
        self._replicates: Dict[tuple, tuple] = {}

    def _of(self, split: str, metric: str) -> tuple:
        if (split, metric) not in self._replicates:
            self._replicates[split, metric] = _per_replicate(self.results, split, metric)
        return self._replicates[split, metric]

    def summary_table(self, split: str, metric: str = "top1") -> pd.DataFrame:
        return _summary_table(*self._of(split, metric))

    def domain_stats(self, split: str, metric: str = "top1") -> pd.DataFrame:
        return _domain_stats(*self._of(split, metric))

    def avg_stats(self, split: str, metric: str = "top1") -> pd.DataFrame:
        return _avg_stats(*self._of(split, metric))


def _avg(doms: pd.DataFrame, keys: list) -> pd.DataFrame:
    """Each method's avg (mean, std, count over replicates of their mean over the split's domains, and its
    cell): of its complete replicates, or, complete by its own runs only, said with the domains it spans."""
    real = doms[~doms["domain"].isin(NOT_ONE_DOMAIN) & (doms["k"] > 0)]
    per_rep = real.groupby(keys + ["split", "replicate"], as_index=False)["value"].mean()
    avg = per_rep.groupby(keys + ["split"])["value"].agg(["mean", "std", "count"]).reset_index()
    avg["cell"] = [_cell(m, s, c) for m, s, c in zip(avg["mean"], avg["std"], avg["count"])]
    return pd.concat([avg, _fewer_domains(doms, keys)], ignore_index=True)


def _fewer_domains(doms: pd.DataFrame, keys: list) -> pd.DataFrame:
    """The avg cells of methods complete by their own runs but over fewer domains than the table's (they
    held out fewer domains than other methods, or none): the mean over their own complete replicates,
    said with how many of the table's domains it spans, so it is not read as comparable with the others'."""
    real = doms[~doms["domain"].isin(NOT_ONE_DOMAIN)]
    table_domains = real.groupby("split")["domain"].nunique()
    mine = real[(real["k"] == 0) & (real["k_own"] > 0) & real["own"]]
    if mine.empty:
        return pd.DataFrame(columns=keys + ["split", "cell"])
    per_rep = mine.groupby(keys + ["split", "replicate"], as_index=False)["value"].mean()
    avg = per_rep.groupby(keys + ["split"])["value"].agg(["mean", "std", "count"]).reset_index()
    spans = mine.groupby(keys + ["split"])["domain"].nunique().reset_index(name="spans")
    avg = avg.merge(spans, on=keys + ["split"])
    avg["cell"] = [f"{_cell(m, s, c)} ({d} of {table_domains[sp]} domains)"
                   for m, s, c, d, sp in zip(avg["mean"], avg["std"], avg["count"], avg["spans"], avg["split"])]
    return avg


def per_class_table(results: pd.DataFrame) -> pd.DataFrame:
    """Methods x scopes (``domain``: out_of_domain, in_domain, unseen_zero_shot, zero_shot or all: the scopes of
    ``protocols._per_class_scopes``)
    x classes: top-1 (%) of each class, the mean over replicates of each replicate's mean over its runs,
    of the complete replicates when a method has any (as ``summary_table``: a replicate short of a
    held-out domain would weigh the domains it has more), and how many replicates count."""
    results = method_frame(results)
    keys = method_keys(results)
    pc = results[(results["split"] == "per_class") & (results["metric"] == "top1")]
    if pc.empty:
        return pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=keys + ["domain"]))
    # complete: every held-out domain's run, each scope a split of its own (and its classes not counted: each
    # method's class split has classes of its own)
    status = _replicates(pc.assign(split=pc["domain"]), keys)
    df = pc.assign(split=pc["domain"], domain=pc["class_name"].astype(str))  # the classes, as a table's domains
    counts = status.groupby(keys + ["split"], as_index=False).agg(n=("complete", "size"), k=("complete", "sum"))
    reps = df.groupby(keys + ["split", "domain", "replicate"], as_index=False)["value"].mean()
    reps = reps.merge(status, on=keys + ["split", "replicate"]).merge(counts, on=keys + ["split"])
    reps = reps[reps["complete"] | (reps["k"] == 0)]
    table = (100 * reps.pivot_table(index=keys + ["split"], columns="domain", values="value", aggfunc="mean")).round(1)
    said = counts.set_index(keys + ["split"])
    table["replicates"] = [f"{n}" if k == n else f"{k} of {n} complete" for n, k in zip(said.loc[table.index, "n"],
                                                                                         said.loc[table.index, "k"])]
    table.index = table.index.set_names(keys + ["domain"])
    table.columns.name = "class_name"
    return table
