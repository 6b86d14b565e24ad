"""Metrics as functions of arrays (the evaluation issue grows this module)."""
from __future__ import annotations

import numpy as np


def nearest_label(emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """(N, D) embeddings, (C, D) class embeddings -> (N,) index of the most cosine-similar class."""
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    c = class_emb / np.maximum(np.linalg.norm(class_emb, axis=1, keepdims=True), 1e-12)
    return np.argmax(e @ c.T, axis=1)


def top1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to their label; an empty set is an error, not a zero."""
    if len(labels) == 0:
        raise ValueError("top-1 accuracy of an empty set is undefined; check the split")
    return float(np.mean(np.asarray(pred) == np.asarray(labels)))
