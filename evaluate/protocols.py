"""Evaluation protocols (a registry): functions of arrays that return tidy result rows.

Every protocol takes an ``EvalData`` (embeddings to score, labels, domains, class text embeddings,
and what the run held out) and returns a DataFrame with one row per (split, domain, metric).
The teacher's own zero-shot baselines are the same protocols applied to the store's image
embeddings: no model is loaded.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager, suppress

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from embedcache.registry import Registry
from embedcache.errors import EvaluationError

from .index import LabelIndex
from .metrics import (m_neigh, m_rel, m_vlalign, mean_per_class, per_group, teacher_student_cosine,
                      text_separability, top1, unit)

PROTOCOLS = Registry("protocol")
CLASS_SPLIT = ("open_vocab", "few_shot")  # the protocols that score classes held out of training


@dataclass
class EvalData:
    """emb (N, D) embeddings to score (view 0); labels (N,) store label ids; domains (N,); ok (N,)
    usable rows; class_emb (C, D) class text embeddings; classes (C,) names. val_idx: rows held out
    from the training domains (in-domain accuracy); test_idx: the other rows the run never trained on
    (held-out domains and classes, a dataset's own test rows); holdout_domains / seen_classes: what
    the run did not train on (None for the teacher). student: the embeddings are a trained run's (on
    another store, --transfer, it has no split there, yet a run that held classes out is scored on
    its own classes as on its own store)."""
    emb: np.ndarray
    labels: np.ndarray
    domains: np.ndarray
    ok: np.ndarray
    class_emb: np.ndarray
    classes: List[str]
    val_idx: Optional[np.ndarray] = None
    test_idx: Optional[np.ndarray] = None
    holdout_domains: Optional[Sequence[str]] = None
    seen_classes: Optional[Sequence[int]] = None
    scores: Optional[np.ndarray] = None   # (N, C) classifier logits; when set, predictions come from them
    teacher: Optional[np.ndarray] = None  # (N, D) the teacher's view-0 embeddings (distillation metrics)
    teacher_views: Optional[np.ndarray] = None  # (N, V, D) the teacher's embeddings of every stored view (Tip-Adapter keys)
    student: bool = False
    embedding_trained: bool = True  # False: a classifier run's projection as initialised (no Tip-Adapter rows)


def _unanswerable(d: EvalData, rows: np.ndarray, labels: np.ndarray) -> bool:
    """A classifier (``scores``) has no output for any of ``labels`` (-inf: classes it never trained on)."""
    return d.scores is not None and len(rows) > 0 and bool(np.isneginf(d.scores[np.ix_(rows, labels)]).all())


def _predict(d: EvalData, rows: np.ndarray, labels: Optional[Sequence[int]] = None) -> np.ndarray:
    """Label id of each row: nearest class text (FAISS), or the classifier's best, within ``labels``."""
    if d.scores is not None:
        allowed = np.arange(d.scores.shape[1]) if labels is None else np.asarray(sorted(set(labels)))
        scores = d.scores[rows][:, allowed]
        if _unanswerable(d, rows, allowed):
            raise EvaluationError("this run predicts with a linear classifier over its training classes, and none of "
                                  "the labels asked for is one of them: it has no answer to score")
        return allowed[np.argmax(scores, axis=1)]
    index = LabelIndex(d.class_emb) if labels is None else LabelIndex.subset(d.class_emb, labels)
    return index.predict(d.emb[rows])


def _rows(pred, labels, classes: Sequence[str], **tags) -> List[Dict]:
    rows = [{**tags, "metric": "top1", "value": top1(pred, labels), "n": len(labels)},
            {**tags, "metric": "mean_per_class", "value": mean_per_class(pred, labels), "n": len(labels)}]
    collapsed = collapsed_class(pred, labels, classes)
    if collapsed is not None:  # warned now, and kept in the results for the report (a warning scrolls away)
        name, share = collapsed
        _warn_collapsed(name, share, len(pred), tags)
        rows.append({**tags, "metric": "collapsed_share", "value": share, "n": len(labels), "class_name": name})
    return rows


@contextmanager
def named_warnings(who: str):
    """The protocols' warnings (a collapsed model, rows left out) said with the model they are about:
    `evaluate runs/` scores many runs, `evaluate --store` the teacher with each text source."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    except BaseException:  # said also when the block fails after warning, never in place of its error
        with suppress(Warning):  # (warnings turned into errors)
            _rewarn(who, caught)
        raise
    _rewarn(who, caught)


def _rewarn(who: str, caught: list) -> None:
    for w in caught:
        warnings.warn(f"{who}: {w.message}", w.category, stacklevel=4)


SAID_OF_A_RUN = re.compile(r"run (\S+): (.*)", re.DOTALL)  # a warning named_warnings said of run (1): (2)


COLLAPSED = 0.95  # a model answering one class for this share of images (of mixed classes) has collapsed
COLLAPSE_MIN_IMAGES = 10  # of fewer images, one answer for all may be chance: not judged


def collapsed_class(pred: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
    """(class, share) of a model that answers one class for nearly every image of mixed classes (its
    accuracy is that class's share of them, a number that reads like a result), else None."""
    if len(pred) < COLLAPSE_MIN_IMAGES:
        return None
    answer, count = np.unique(pred, return_counts=True)
    _, truth = np.unique(labels, return_counts=True)
    share = count.max() / len(pred)
    if share >= COLLAPSED and truth.max() / len(labels) <= 0.5:  # mixed: no class more than half (two balanced too)
        return classes[int(answer[np.argmax(count)])], float(share)
    return None


def _warn_collapsed(name: str, share: float, n: int, tags: Dict) -> None:
    where = f"{tags.get('split')} on {tags.get('domain')}" + (f", episode {tags['episode']}" if "episode" in tags else "")
    warnings.warn(f"{where}: the model predicts {name!r} for {share:.0%} of the {n} images (a collapsed "
                  "model: its top-1 is that class's share of them)")


def _average(df: pd.DataFrame, split: str) -> List[Dict]:
    sub = df[(df["split"] == split) & (df["domain"] != "avg") & (df["metric"] != "collapsed_share")]
    return [{"split": split, "domain": "avg", "metric": m, "value": float(g["value"].mean()), "n": int(g["n"].sum())}
            for m, g in sub.groupby("metric")]


@PROTOCOLS.register("lodo")
def lodo(d: EvalData, holdout_domains: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """DomainBed leave-one-domain-out. Out-of-domain: each held-out domain. In-domain: the validation
    rows of each training domain (a run that held out no domain has only these). The teacher
    (no held-out domains, no validation rows) is scored zero-shot on every domain (split "zero_shot").
    A run that also held out classes is scored on the classes it trained on, among their labels (as
    its own validation): its unseen classes are ``open_vocab``'s."""
    held = list(holdout_domains if holdout_domains is not None else (d.holdout_domains or []))
    own_split = bool(held) or d.val_idx is not None  # a run on its own store: out of / in domain
    seen = None if d.seen_classes is None or not (own_split or d.student) else np.asarray(d.seen_classes)  # teacher: all
    usable = d.ok if seen is None else d.ok & np.isin(d.labels, seen)
    rows: List[Dict] = []
    pooled: Dict[str, List] = {}  # split -> (predictions, labels) of each domain
    for dom in sorted(set(d.domains[usable])):
        rows_dom = np.flatnonzero(usable & (d.domains == dom))
        if own_split and dom not in held:
            if d.val_idx is None:
                continue
            rows_dom = np.intersect1d(rows_dom, d.val_idx)
            split = "in_domain"
        else:
            split = "out_of_domain" if held else "zero_shot"
        if len(rows_dom):
            pred = _predict(d, rows_dom, seen)
            rows += _rows(pred, d.labels[rows_dom], d.classes, split=split, domain=dom)
            pooled.setdefault(split, []).append((pred, d.labels[rows_dom]))
    if not rows and own_split:
        raise EvaluationError("lodo has nothing to score: this run held out no domain and kept no validation "
                              "rows (every image was trained on); train with split.holdout_domains=[...] or "
                              "split.val_fraction > 0, or score it on another store of its teacher and classes "
                              "(--store STORE --transfer: a run on synthesised images, on real ones)")
    if not rows:
        raise EvaluationError("lodo has nothing to score: the store has no usable image")
    df = pd.DataFrame(rows)
    for split in df["split"].unique():
        rows += _average(df, split)
        if not ((df["split"] == split) & (df["metric"] == "collapsed_share")).any():  # no domain said so already
            rows += _pooled_collapse(pooled[split], d.classes, split)
    return pd.DataFrame(rows)


def _pooled_collapse(parts: List, classes: Sequence[str], split: str) -> List[Dict]:
    """A ``collapsed_share`` row (domain avg) for a model answering one class for nearly all of a split's images
    over its domains, each too few to be judged alone: 96% 'person' over three domains of 8 in-domain images
    scored below chance without a word (a trial)."""
    if len(parts) < 2:
        return []
    pred, labels = (np.concatenate(x) for x in zip(*parts))
    collapsed = collapsed_class(pred, labels, classes)
    if collapsed is None:
        return []
    name, share = collapsed
    warnings.warn(f"{split} over its {len(parts)} domains: the model predicts {name!r} for {share:.0%} of the "
                  f"{len(pred)} images (a collapsed model: its top-1 is that class's share of them)")
    return [{"split": split, "domain": "avg", "metric": "collapsed_share", "value": share, "n": len(labels),
             "class_name": name}]


def lodo_rows(domains: np.ndarray, ok: np.ndarray, holdout_domains: Sequence[str],
              val_idx: Optional[Sequence[int]]) -> np.ndarray:
    """The rows ``lodo`` reads for a run: its held-out domains' and its validation rows."""
    wanted = np.isin(domains, list(holdout_domains or []))
    if val_idx is not None:
        wanted[np.asarray(val_idx, dtype=np.int64)] = True
    return np.flatnonzero(wanted & ok)


def rows_read(protocols: Sequence[str], domains: np.ndarray, ok: np.ndarray,
              holdout_domains: Optional[Sequence[str]], val_idx: Optional[Sequence[int]]) -> Optional[np.ndarray]:
    """The rows whose student embeddings the protocols read, so scoring embeds no other image; None
    when some protocol reads them all (every protocol but ``lodo`` on a run's own store)."""
    if set(protocols) != {"lodo"} or (not holdout_domains and val_idx is None):
        return None
    return lodo_rows(domains, ok, holdout_domains, val_idx)


def seeded_class_split(num_classes: int, unseen_fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Seen class ids: a seeded random (1 - unseen_fraction) of the classes, halves rounded up as
    Li et al. split (Food-101: 51 seen, 50 unseen), at least one class on each side."""
    if num_classes < 2:
        raise EvaluationError(f"a seen/unseen class split needs at least 2 classes; the store has {num_classes}")
    rng = np.random.default_rng([seed, 23])
    half_up = np.floor(num_classes * (1 - unseen_fraction) + 0.5 + 1e-9)  # 1e-9: 45 x 0.7 is 31.499999... in floats
    n_seen = min(num_classes - 1, max(1, int(half_up)))
    if half_up < 1:  # one unseen class is said where it is scored; one seen class here (it was silent: a trial)
        warnings.warn(f"unseen_fraction={unseen_fraction:g} of {num_classes} classes leaves no seen class; one is kept "
                      "seen, so a run of this split trains on one class; lower unseen_fraction")
    return np.sort(rng.permutation(num_classes)[:n_seen])


def class_split(d: EvalData, protocol: str, seen_classes: Optional[Sequence[int]], unseen_fraction: float,
                seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(seen, unseen) class ids: those given, else the run's own, else the seeded split; a run that
    trained on every class has no unseen class to score."""
    seen = np.asarray(seen_classes if seen_classes is not None else
                      (d.seen_classes if d.seen_classes is not None else seeded_class_split(len(d.classes), unseen_fraction, seed)))
    unseen = np.setdiff1d(np.arange(len(d.classes)), seen)
    if len(unseen) == 0:
        raise EvaluationError(f"{protocol} needs at least one unseen class, and this run trained on every class; "
                              "train with split.train_classes=[...] to hold classes out")
    return seen, unseen


@PROTOCOLS.register("open_vocab")
def open_vocab(d: EvalData, seen_classes: Optional[Sequence[int]] = None, unseen_fraction: float = 0.5,
               seed: int = 0) -> pd.DataFrame:
    """Zero-shot on unseen classes over unseen labels only (Li et al.), and generalised zero-shot
    over seen + unseen labels with the harmonic mean of seen and unseen accuracy. A run predicting with
    a linear classifier over its training classes gets the generalised rows only (it never predicts
    an unseen class: unseen accuracy 0)."""
    seen, unseen = class_split(d, "open_vocab", seen_classes, unseen_fraction, seed)
    u_rows = np.flatnonzero(d.ok & np.isin(d.labels, unseen))
    s_rows = np.flatnonzero(d.ok & np.isin(d.labels, seen))
    if d.val_idx is not None:  # seen classes: only images not trained on
        s_rows = np.intersect1d(s_rows, _unseen_by_run(d))
    rows: List[Dict] = []
    answerable = not _unanswerable(d, u_rows, unseen)  # a classifier has no answer among unseen labels only
    if answerable and len(unseen) == 1:
        warnings.warn(f"open_vocab: one unseen class ({d.classes[unseen[0]]!r}): unseen_zero_shot, among the unseen "
                      "labels only, is 100% by construction; hold two or more classes out")
    if answerable:
        rows += _rows(_predict(d, u_rows, unseen), d.labels[u_rows], d.classes, split="unseen_zero_shot", domain="all")
    else:
        warnings.warn("open_vocab: this run predicts with a linear classifier over its training classes, so it never "
                      "predicts an unseen class: gzsl_unseen and gzsl_harmonic are 0 by construction and "
                      "unseen_zero_shot is left out; a distillation recipe (predict=text) scores open-vocabulary")
    for domain, s_part, u_part in _gzsl_groups(d, s_rows, u_rows):
        rows += _gzsl(d, domain, s_part, u_part)
    return pd.DataFrame(rows)


def _gzsl_groups(d: EvalData, s_rows: np.ndarray, u_rows: np.ndarray) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """(domain, seen rows, unseen rows) of generalised zero-shot: every domain at once ("all") for a run
    that held out none; else each held-out domain and the training domains apart, both sides from the
    same domains (one side out-of-domain and the other not made a harmonic mean of two shifts)."""
    held = list(d.holdout_domains or [])
    if not held:
        return [("all", s_rows, u_rows)]
    groups = [(dom, s_rows[d.domains[s_rows] == dom], u_rows[d.domains[u_rows] == dom]) for dom in held]
    training = ~np.isin(d.domains, held)
    return groups + [("training_domains", s_rows[training[s_rows]], u_rows[training[u_rows]])]


def _gzsl(d: EvalData, domain: str, s_rows: np.ndarray, u_rows: np.ndarray) -> List[Dict]:
    """gzsl_seen, gzsl_unseen and their harmonic mean over every label, on one group's rows."""
    if not len(s_rows) and len(u_rows):
        if domain in ("all", "training_domains"):
            where = "" if domain == "all" else " of the training domains"
            warnings.warn(f"open_vocab: the run trained on every seen-class image{where} (no validation rows: "
                          "split.val_fraction=0, and no test rows in the store), so gzsl_seen and gzsl_harmonic "
                          f"{'' if domain == 'all' else 'on training_domains '}left out; train with "
                          "split.val_fraction > 0, or extract a dataset with a test split")
        else:
            warnings.warn(f"open_vocab: held-out domain {domain!r} has no usable image of a seen class, so its "
                          "gzsl_seen and gzsl_harmonic left out")
    rows: List[Dict] = []
    acc = {}
    for name, r in (("gzsl_seen", s_rows), ("gzsl_unseen", u_rows)):
        if len(r):
            part = _rows(_predict(d, r), d.labels[r], d.classes, split=name, domain=domain)
            rows += part
            acc[name] = {p["metric"]: p["value"] for p in part}
    if len(acc) == 2:
        for m in ("top1", "mean_per_class"):
            a, b = acc["gzsl_seen"][m], acc["gzsl_unseen"][m]
            rows.append({"split": "gzsl_harmonic", "domain": domain, "metric": m,
                         "value": 0.0 if a + b == 0 else 2 * a * b / (a + b), "n": len(s_rows) + len(u_rows)})
    return rows


def fewest_images(labels: np.ndarray, ok: np.ndarray, classes_in: Sequence[int]) -> Tuple[int, int]:
    """(class, its usable images) for the class of ``classes_in`` with the fewest: an episode needs shots + 1."""
    classes_in = np.asarray(classes_in, dtype=np.int64)
    counts = np.bincount(labels[ok], minlength=int(classes_in.max()) + 1)[classes_in]  # one pass, not one per class
    first = int(np.argmin(counts))
    return int(classes_in[first]), int(counts[first])


def episode(labels: np.ndarray, ok: np.ndarray, classes_in: np.ndarray, shots: int, seed: int, ep: int,
            names: Sequence[str]):
    """Seeded few-shot episode: ``shots`` support rows per class in ``classes_in``, the rest of those
    classes' usable rows as queries. Shared by every few-shot method so they see the same episodes."""
    rows_all = np.flatnonzero(ok & np.isin(labels, classes_in))
    c, n = fewest_images(labels, ok, classes_in)
    if n <= shots:
        fewer = f"--shots {n - 1} or fewer, or " if n > 1 else ""  # (c: the unseen class of fewest usable images)
        raise EvaluationError(f"class {names[c]!r} has {n} usable images, fewer than {shots} shots + 1 to test; "
                              f"few_shot needs {shots + 1} usable images in every unseen class: use {fewer}hold out "
                              "other classes (--seen-classes for the teacher, split.train_classes for a run)")
    rng = np.random.default_rng([seed, ep, 31])
    by_class = np.argsort(labels[rows_all], kind="stable")  # each class's rows in order, found without a scan per class
    ordered = labels[rows_all][by_class]
    starts, ends = np.searchsorted(ordered, classes_in, "left"), np.searchsorted(ordered, classes_in, "right")
    support = np.concatenate([rng.choice(rows_all[by_class[a:b]], shots, replace=False) for a, b in zip(starts, ends)])
    return support, np.setdiff1d(rows_all, support)


def cache_logits(q: np.ndarray, keys: np.ndarray, key_labels: np.ndarray, class_emb: np.ndarray, beta: float,
                 alpha: float, text_scale: float) -> np.ndarray:
    """text_scale cos(q, T_c) + alpha * sum over class c's keys of exp(-beta (1 - cos(q, k))): a text classifier
    and a cache of labelled keys, every vector unit-normalised."""
    q, keys, t = unit(q), unit(keys), unit(class_emb)
    onehot = np.eye(len(class_emb), dtype=np.float32)[key_labels]
    return text_scale * q @ t.T + alpha * np.exp(-beta * (1.0 - q @ keys.T)) @ onehot


def tip_adapter_logits(q: np.ndarray, keys: np.ndarray, key_labels: np.ndarray, class_emb: np.ndarray,
                       beta: float = 5.5, alpha: float = 1.0) -> np.ndarray:
    """Tip-Adapter (training-free): 100 cos(q, T_c) + alpha * exp(-beta (1 - cos(q, k))) @ onehot(labels), a key
    per shot (``support_views`` averaged)."""
    return cache_logits(q, keys, key_labels, class_emb, beta, alpha, text_scale=100.0)


def li_retrieval_logits(q: np.ndarray, keys: np.ndarray, key_labels: np.ndarray, class_emb: np.ndarray,
                        beta: float = 5.5, alpha: float = 1.0) -> np.ndarray:
    """Li et al.'s few-shot retrieval as their code scores it (main_experiments.py): cos(q, T_c), not scaled,
    + alpha * exp(-beta (1 - cos(q, k))) summed over a key per view of every shot, so the cache outweighs the
    text: nearly a nearest-neighbour search among the teacher's embeddings of the shots."""
    return cache_logits(q, keys, key_labels, class_emb, beta, alpha, text_scale=1.0)


def support_views(d: EvalData, support: np.ndarray) -> np.ndarray:
    """(S, V, D) float32: the teacher's embeddings of every stored view of the support images, the keys of
    Tip-Adapter's cache (a shot's views averaged, as it averages a shot's augmentations, so its cache term
    does not grow with the views) and of Li et al.'s retrieval (each view a key, as theirs keys each shot and
    9 RandAugment views of it)."""
    if d.teacher_views is None:
        raise EvaluationError("Tip-Adapter needs the teacher's embeddings of the support images (EvalData.teacher_views); "
                              "score from a store, which holds them")
    keys = np.asarray(d.teacher_views[support], dtype=np.float32)
    if keys.shape[-1] != d.emb.shape[1]:
        raise EvaluationError(f"Tip-Adapter compares the scored embeddings ({d.emb.shape[1]}-d) with the teacher's "
                              f"({keys.shape[-1]}-d): only a student that embeds into the teacher's space can be scored so")
    return keys


DEFAULT_SHOTS = 5  # Li et al.'s: rows of other shot counts name theirs in their split ("prototype@1shot")
EPISODES = 3  # seeded episodes per few-shot scoring, the protocol's and fine-tuning's alike (the same query images)


def shots_tag(shots: int) -> str:
    """What a few-shot split's name carries of its shot count: nothing for Li et al.'s 5."""
    return "" if shots == DEFAULT_SHOTS else f"@{shots}shot"


def episode_mean(df: pd.DataFrame) -> pd.DataFrame:
    """Each split's metrics averaged over its episodes (their rows summed in ``n``). A collapse stays a
    row of the episode it happened in: averaged over the episodes that had one, it read as the whole
    run's, with no class."""
    scored = df[df["metric"] != "collapsed_share"]
    return scored.groupby(["split", "metric"], as_index=False).agg(value=("value", "mean"), n=("n", "sum"))


@PROTOCOLS.register("few_shot")
def few_shot(d: EvalData, shots: int = DEFAULT_SHOTS, episodes: int = EPISODES, seen_classes: Optional[Sequence[int]] = None,
             unseen_fraction: float = 0.5, beta: float = 5.5, alpha: float = 1.0, seed: int = 0) -> pd.DataFrame:
    """k labelled images per unseen class (seeded episodes): a prototype classifier (FAISS over the
    class means of the shots, each a unit vector), Tip-Adapter logits (keys: the teacher's views of
    the shots), Li et al.'s retrieval (``li_retrieval``: the same keys, scored as their code scores them)
    and the unseen classes' text alone (``text_only``: Tip-Adapter without its cache), scored on the
    remaining unseen images."""
    _, unseen = class_split(d, "few_shot", seen_classes, unseen_fraction, seed)
    if len(unseen) == 1:  # every method names the one class
        warnings.warn(f"few_shot: one unseen class ({d.classes[unseen[0]]!r}): every query is given it, 100% by "
                      "construction; hold two or more classes out (--seen-classes for the teacher, "
                      "split.train_classes for a run)")
    rows: List[Dict] = []
    for ep in range(episodes):
        support, query = episode(d.labels, d.ok, unseen, shots, seed, ep, d.classes)
        shot_emb = unit(d.emb[support])  # each shot counts alike: a student's embeddings are not unit vectors
        protos = np.stack([own.mean(0) for own in shot_emb.reshape(len(unseen), shots, -1)])  # each class's shots in turn
        pred = LabelIndex(protos, unseen).predict(d.emb[query])
        rows += _rows(pred, d.labels[query], d.classes, split="prototype" + shots_tag(shots), domain="all", episode=ep)
        if not d.embedding_trained:  # it would compare an untrained projection with the teacher's space (said by
            continue                 # the scoring)
        views, ids = support_views(d, support), np.searchsorted(unseen, d.labels[support])
        text_emb = d.class_emb[unseen]
        logits = tip_adapter_logits(d.emb[query], views.mean(1), ids, text_emb, beta, alpha)
        rows += _rows(unseen[logits.argmax(1)], d.labels[query], d.classes, split="tip_adapter" + shots_tag(shots),
                      domain="all", episode=ep)
        logits = li_retrieval_logits(d.emb[query], views.reshape(-1, views.shape[-1]), np.repeat(ids, views.shape[1]),
                                     text_emb, beta, alpha)
        rows += _rows(unseen[logits.argmax(1)], d.labels[query], d.classes, split="li_retrieval" + shots_tag(shots),
                      domain="all", episode=ep)
        # Tip-Adapter without its cache, on the same queries: what its shots add is the gap to this row
        text = LabelIndex.subset(d.class_emb, unseen).predict(d.emb[query])
        rows += _rows(text, d.labels[query], d.classes, split="text_only" + shots_tag(shots), domain="all", episode=ep)
    df = pd.DataFrame(rows)
    mean = episode_mean(df)
    mean["domain"], mean["episode"] = "all", -1  # -1: the mean over episodes
    return pd.concat([df, mean], ignore_index=True)


def _unseen_by_run(d: EvalData) -> np.ndarray:
    """The rows a run never trained on: its validation rows and its test rows (held-out domains and
    classes, a dataset's own test split)."""
    parts = [p for p in (d.val_idx, d.test_idx) if p is not None]
    return np.union1d(*parts) if len(parts) == 2 else (parts[0] if parts else np.zeros(0, np.int64))


def _scored_rows(d: EvalData) -> np.ndarray:
    """Rows a run did not train on (held-out domains, validation and test rows), else every usable row."""
    if d.val_idx is None and not d.holdout_domains:
        return np.flatnonzero(d.ok)
    held = np.isin(d.domains, list(d.holdout_domains or []))
    unseen = np.zeros(len(d.ok), bool)
    unseen[_unseen_by_run(d)] = True
    rows = np.flatnonzero(d.ok & (held | unseen))
    if not len(rows):
        raise EvaluationError("the run trained on every usable image (no held-out domain or class, no validation "
                              "or test row): nothing is left to score; train with split.val_fraction > 0")
    return rows


def _per_class_scopes(d: EvalData) -> List[Tuple[str, np.ndarray, Optional[np.ndarray]]]:
    """(scope, rows, labels predicted among) of per-class accuracy, as the run's other protocols score
    them: out of domain and in domain apart (lodo), a run's seen classes among its seen labels, its
    unseen classes among the unseen labels only (Li et al.'s zero-shot); the teacher: every row, "all".
    In domain holds a dataset's own test rows of the training domains too (lodo scores validation rows)."""
    if d.val_idx is None and not d.holdout_domains:  # the teacher (its class split is open_vocab's), a transfer store
        if not d.student or d.seen_classes is None or len(set(d.seen_classes)) == len(d.classes):  # none held out
            return [("all", np.flatnonzero(d.ok), None)]
        seen = np.asarray(d.seen_classes)  # a transfer store's rows of a run that held classes out: as lodo's, open_vocab's
        is_seen = np.isin(d.labels, seen)
        scopes = [("zero_shot", np.flatnonzero(d.ok & is_seen), seen),
                  ("unseen_zero_shot", np.flatnonzero(d.ok & ~is_seen), np.setdiff1d(np.arange(len(d.classes)), seen))]
        return [(name, r, labels) for name, r, labels in scopes if len(r) and not _unanswerable(d, r, labels)]
    rows = _scored_rows(d)
    held = np.isin(d.domains[rows], list(d.holdout_domains or []))
    # in domain: the training domains' rows it never trained on (validation rows, and a dataset's own test
    # rows: with split.val_fraction=0, as Li et al. train, these are all there is)
    if d.seen_classes is None:
        scopes = [("out_of_domain", rows[held], None), ("in_domain", rows[~held], None)]
    else:
        seen = np.asarray(d.seen_classes)
        is_seen = np.isin(d.labels[rows], seen)
        unseen = np.setdiff1d(np.arange(len(d.classes)), seen)
        scopes = [("out_of_domain", rows[is_seen & held], seen), ("in_domain", rows[is_seen & ~held], seen),
                  ("unseen_zero_shot", rows[~is_seen], unseen)]
    return [(name, r, labels) for name, r, labels in scopes
            if len(r) and not _unanswerable(d, r, labels if labels is not None else np.arange(len(d.classes)))]


@PROTOCOLS.register("per_class")
def per_class(d: EvalData) -> pd.DataFrame:
    """Top-1 of each class over the rows the run did not train on, in the scopes its other protocols
    score (``domain``: out_of_domain, in_domain, unseen_zero_shot; "all" for the teacher; on a transfer
    store "all", or zero_shot and unseen_zero_shot for a run that held classes out)."""
    parts = []
    for scope, rows, labels in _per_class_scopes(d):
        tab = per_group(_predict(d, rows, labels), d.labels[rows], np.array(d.classes)[d.labels[rows]], "class_name")
        parts.append(pd.DataFrame({"split": "per_class", "domain": scope, "class_name": tab["class_name"],
                                   "metric": "top1", "value": tab["top1"], "n": tab["n"]}))
    if not parts:
        raise EvaluationError("per_class has nothing to score: the rows this run never trained on are of classes its "
                              "linear classifier cannot answer (no validation rows: split.val_fraction=0); train with "
                              "split.val_fraction > 0")
    return pd.concat(parts, ignore_index=True)


@PROTOCOLS.register("distill")
def distill(d: EvalData, k_neigh: int = 10, k_vl: int = 5, max_rows: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Li et al.'s metrics between student and teacher embeddings (M_rel, M_neigh(k), M_vlalign(k)),
    their mean cosine, and the mean pairwise cosine of the class text embeddings. The O(N^2) ones use
    a seeded sample of at most ``max_rows`` rows."""
    rows = []
    if d.teacher is not None:
        r = _scored_rows(d)
        if len(r) > max_rows:
            r = np.sort(np.random.default_rng([seed, 41]).choice(r, max_rows, replace=False))
        s, t = d.emb[r], d.teacher[r]
        # named by the k used: no more labels than classes
        k_vl = min(k_vl, len(d.class_emb))
        metrics = [("m_rel", lambda: m_rel(s, t)), (f"m_vlalign@{k_vl}", lambda: m_vlalign(s, t, d.class_emb, k_vl)),
                   ("teacher_student_cosine", lambda: teacher_student_cosine(s, t))]
        if len(r) - 1 > k_neigh:
            metrics.insert(1, (f"m_neigh@{k_neigh}", lambda: m_neigh(s, t, k_neigh)))
        else:  # every other image a neighbour: 1 by construction
            warnings.warn(f"distill: m_neigh@{k_neigh} is left out: {len(r)} images scored leave no more than "
                          f"{len(r) - 1} others, so all would be neighbours and it would be 1 by construction")
        for name, value in metrics:
            rows.append({"split": "distill", "domain": "all", "metric": name, "value": value(), "n": len(r)})
    rows.append({"split": "text", "domain": "all", "metric": "text_pairwise_cosine",
                 "value": text_separability(d.class_emb), "n": len(d.class_emb)})
    return pd.DataFrame(rows)
