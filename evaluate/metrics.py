"""Metrics as functions of arrays: accuracies and the distillation metrics of Li et al. (2023).

Shapes: student embeddings s (N, D), teacher embeddings t (N, D), class text embeddings T (C, D),
labels (N,). Embeddings need not be normalised; every function normalises what it compares.
"""
from __future__ import annotations


import numpy as np
import pandas as pd

from embedcache.errors import EvaluationError


def unit(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised, as a new contiguous float32 array (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


DIVERGED = "the model's outputs are not finite (its weights diverged); retrain it with a lower optim.lr"
# queries given to a label index by hand: a store's own embeddings hold NaN in the rows of unreadable images
BAD_QUERIES = ("a store's unreadable images read as NaN (keep the rows its reader's `ok` marks), and a model whose "
               "outputs are not finite diverged (retrain it with a lower optim.lr)")
BAD_TEXT = ("the store's teacher gave non-finite text embeddings (a damaged checkpoint or an overflowing precision); "
            "extract the store again with a sound teacher")


def require_finite(x: np.ndarray, what: str, why: str = DIVERGED) -> None:
    """A nearest-label answer from NaN or inf would be a made-up label: refused in one line."""
    bad = ~np.isfinite(x)
    if bad.any():
        rows = int(bad.reshape(len(x), -1).any(axis=1).sum()) if x.ndim > 1 else int(bad.sum())
        raise EvaluationError(f"{rows} of {len(x)} {what} hold NaN or inf: {why}")


def nearest_label(emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """(N, D) embeddings, (C, D) class embeddings -> (N,) index of the most cosine-similar class."""
    require_finite(emb, "embeddings")
    require_finite(class_emb, "class embeddings", BAD_TEXT)
    return np.argmax(unit(emb) @ unit(class_emb).T, axis=1)


def _nonempty(labels) -> None:
    if len(labels) == 0:
        raise EvaluationError("accuracy over an empty set is undefined; check the split")


def top1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to their label; an empty set is an error, not a zero."""
    _nonempty(labels)
    return float(np.mean(np.asarray(pred) == np.asarray(labels)))


def topk(ranked: np.ndarray, labels: np.ndarray) -> float:
    """ranked: (N, k) label ids best first -> fraction whose label is among them."""
    _nonempty(labels)
    return float(np.mean((np.asarray(ranked) == np.asarray(labels)[:, None]).any(1)))


def mean_per_class(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of each class's accuracy (Li et al.'s metric)."""
    _nonempty(labels)
    pred, labels = np.asarray(pred), np.asarray(labels)
    _, cls = np.unique(labels, return_inverse=True)  # one pass, not one per class (a trial: 20,000 classes)
    return float(np.mean(np.bincount(cls, weights=pred == labels) / np.bincount(cls)))


def per_group(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray, name: str = "group") -> pd.DataFrame:
    """Top-1 and sample count per group (domain or class), as a tidy table."""
    df = pd.DataFrame({name: groups, "hit": np.asarray(pred) == np.asarray(labels)})
    out = df.groupby(name, sort=True)["hit"].agg(["mean", "size"]).reset_index()
    return out.rename(columns={"mean": "top1", "size": "n"})


def m_rel(s: np.ndarray, t: np.ndarray) -> float:
    """Fraction of images whose student embedding is nearest to their own teacher embedding."""
    sim = unit(s) @ unit(t).T
    return float(np.mean(np.argmax(sim, axis=1) == np.arange(len(s))))


def m_neigh(s: np.ndarray, t: np.ndarray, k: int = 10) -> float:
    """Mean overlap (/ k) of each image's k nearest other images in student and teacher space."""
    k = min(k, len(s) - 1)
    if k < 1:
        raise EvaluationError("M_neigh needs at least two images")

    def knn(x):
        sim = unit(x) @ unit(x).T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = knn(s), knn(t)
    return float(np.mean([len(set(a[i]) & set(b[i])) / k for i in range(len(s))]))


def m_vlalign(s: np.ndarray, t: np.ndarray, class_emb: np.ndarray, k: int = 5) -> float:
    """Fraction of discordant pairs (inversions) in the student's ordering of the teacher's top-k
    labels, per image, averaged: 0 = the student ranks them exactly as the teacher does."""
    k = min(k, len(class_emb))
    if k < 2:
        raise EvaluationError("M_vlalign needs k >= 2 labels")
    ts, ss = unit(t) @ unit(class_emb).T, unit(s) @ unit(class_emb).T
    top = np.argsort(-ts, axis=1, kind="stable")[:, :k]          # teacher order, best first
    st = np.take_along_axis(ss, top, axis=1)                     # student scores in that order
    i, j = np.triu_indices(k, 1)
    return float(np.mean(st[:, i] < st[:, j]))  # pair (i before j) is inverted if the student prefers j


def text_separability(class_emb: np.ndarray) -> float:
    """Mean pairwise cosine between distinct class text embeddings (lower = more separable labels)."""
    c = unit(class_emb)
    sim = c @ c.T
    n = len(c)
    if n < 2:
        raise EvaluationError("pairwise cosine needs at least two classes")
    return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def teacher_student_cosine(s: np.ndarray, t: np.ndarray) -> float:
    """Mean cosine between each image's student and teacher embedding."""
    return float(np.mean(np.sum(unit(s) * unit(t), axis=1)))
