"""Nearest-label search: a FAISS inner-product index over L2-normalised class embeddings.

Cosine similarity is the inner product of unit vectors, so an exact ``IndexFlatIP`` over
normalised rows gives the nearest class text embedding. Any label subset (the unseen classes of
an open-vocabulary split, say) is an index over those rows, answering in the subset's own label ids.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from embedcache.errors import EvaluationError

from .metrics import unit


class LabelIndex:
    """labels: (C, D) class embeddings; ids: the label id of each row (default 0..C-1)."""

    def __init__(self, class_emb: np.ndarray, ids: Optional[Sequence[int]] = None):
        import faiss

        if class_emb.ndim != 2 or len(class_emb) == 0:
            raise EvaluationError("a label index needs at least one class embedding; the label subset is empty")
        self.ids = np.arange(len(class_emb)) if ids is None else np.asarray(ids)
        if len(self.ids) != len(class_emb):
            raise EvaluationError(f"{len(self.ids)} label ids for {len(class_emb)} class embeddings")
        self.dim = class_emb.shape[1]
        self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(unit(class_emb))

    @classmethod
    def subset(cls, class_emb: np.ndarray, labels: Sequence[int]) -> "LabelIndex":
        labels = np.asarray(sorted(set(int(x) for x in labels)))
        if len(labels) == 0:
            raise EvaluationError("the label subset is empty; an accuracy over no labels is undefined")
        return cls(class_emb[labels], labels)

    def search(self, queries: np.ndarray, k: int = 1, batch: int = 65536) -> Tuple[np.ndarray, np.ndarray]:
        """(N, D) queries -> (N, k) cosine scores and (N, k) label ids, best first."""
        if queries.shape[1] != self.dim:
            raise EvaluationError(f"queries have dimension {queries.shape[1]}, the labels {self.dim}: different teachers?")
        k = min(k, len(self.ids))
        scores, rows = [], []
        for i in range(0, len(queries), batch):
            s, r = self.index.search(unit(queries[i:i + batch]), k)
            scores.append(s)
            rows.append(r)
        if not scores:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(scores), self.ids[np.concatenate(rows)]

    def predict(self, queries: np.ndarray) -> np.ndarray:
        return self.search(queries, 1)[1][:, 0]


def search_path() -> str:
    """Which nearest-label search scored a result (recorded with every result row)."""
    return "faiss-flat"
