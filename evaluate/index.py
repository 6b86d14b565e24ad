"""Nearest-label search: exact inner product over L2-normalised class embeddings.

Cosine similarity is the inner product of unit vectors, so the largest inner product with the
normalised class rows gives the nearest class text embedding. Any label subset (the unseen classes of
an open-vocabulary split, say) is an index over those rows, answering in the subset's own label ids.

Three exact paths answer the same search (``search_path()`` names the one in use; it is written into
every result row):

- ``numpy-blas``: blocked float32 ``queries @ labels.T`` through numpy's BLAS, then ``argmax`` (k = 1)
  or ``argpartition`` + a sort within the k. Chosen when faiss's BLAS runs generic kernels (below).
- ``torch-blas``: the same blocks through ``torch.mm`` (MKL on x86 wheels), chosen when numpy's
  OpenBLAS runs generic kernels as well.
- ``faiss-flat``: a FAISS ``IndexFlatIP``: everywhere faiss's BLAS is as fast as the machine's.

Why: the faiss-cpu wheel bundles its own OpenBLAS (0.3.15 in faiss-cpu 1.15), which does not know
recent Xeons and falls back to its SSE3 "Prescott" kernels, 2.5-4x slower than numpy on the same
matrices (issue 16). We never set ``OPENBLAS_CORETYPE`` ourselves: some users set it on purpose,
where older OpenBLAS builds compute wrong results. Detection (``search_plan()``) runs once per process:
it imports faiss, asks threadpoolctl which core type each OpenBLAS runs, and compares with the CPU's
own features. Where no fast path can be had, or the user's ``OPENBLAS_CORETYPE`` names a generic core,
one WARNING line on the ``embedcache.evaluate.index`` logger says so and names the fix.

Override: ``LabelIndex(..., backend=...)`` or the environment variable ``EMBEDCACHE_SEARCH`` (read each
time an index is built), each one of ``auto`` (default), ``faiss``, ``numpy``, ``torch`` (or the full
path names above).

Ties: when labels score exactly equal, the lower label row wins (numpy's ``argmax`` rule), and top-k
lists tied labels in row order, on every path. Bit-identical label rows are searched once, as their first
row, and their copies put back after it (``_Copies``): FAISS answered any copy (817 of 4,000 queries, 65
rows half copies), and a BLAS may score two copies apart by where they sit in the matrix. Of labels tied
otherwise, FAISS k = 1 answers the lower; for k > 1 it keeps any of the labels tied at the k-th place, in
any order, so those rows are redone here (``_faiss_topk``).
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from embedcache.errors import EvaluationError

from .metrics import BAD_QUERIES, BAD_TEXT, require_finite, unit

log = logging.getLogger(__name__)

SEARCH_ENV = "EMBEDCACHE_SEARCH"
PATHS = ("faiss-flat", "numpy-blas", "torch-blas")
_ALIASES = {"faiss": "faiss-flat", "numpy": "numpy-blas", "torch": "torch-blas", **{p: p for p in PATHS}}

# OpenBLAS core types whose kernels stop at SSE (no AVX): on a CPU with AVX2 these are a fallback,
# 2.5-4x slower than the machine's own kernels. "Sandybridge" (AVX) and newer are not counted.
GENERIC_CORES = frozenset(c.lower() for c in (
    "Unknown", "Generic", "Katmai", "Coppermine", "Northwood", "Prescott", "Banias", "Atom", "Core2",
    "Penryn", "Dunnington", "Nehalem", "Athlon", "Opteron", "Opteron_SSE3", "Barcelona", "Nano", "Bobcat"))

# Scores held per block: 16M float32 = 64 MB, whatever the number of queries (1M queries x 20k labels
# would otherwise be an 80 GB matrix). Measured on 2 busy cores: each block is one BLAS call whose
# threads meet at a barrier, so small blocks lose badly when other work holds a core (0.13x numpy
# at 256 x 1k); 16M is numpy's speed at 1k labels (1-2 calls) and 1.1-1.25x at 20k, where the
# blocks' scores stay in cache for the argmax and no 400 MB result is paged in.
BLOCK_ELEMENTS = 1 << 24
MIN_BLOCK, MAX_BLOCK = 64, 65536


# ---------------------------------------------------------------------------------------------------
# Detection: which BLAS each path would use, and which path to take (once per process)

@dataclass(frozen=True)
class SearchPlan:
    """The path ``auto`` takes in this process and why. *_blas: threadpoolctl's description of that
    library (internal_api, version, architecture, filepath), None where it could not be told."""
    path: str
    reason: str
    cpu: str
    faiss_blas: Optional[Dict] = None
    numpy_blas: Optional[Dict] = None
    torch_blas: Optional[Dict] = None
    message: Optional[str] = None  # the one line logged, if any


def cpu_model() -> str:
    """The processor's name and, on Linux, its family/model numbers (VMs often hide the name)."""
    fields: Dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def _cpu_has_avx2() -> Optional[bool]:
    """Whether the CPU has AVX2 (numpy's own runtime dispatch table); None where unknown."""
    for mod in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            features = __import__(mod, fromlist=["__cpu_features__"]).__cpu_features__
            return bool(features.get("AVX2", False))
        except (ImportError, AttributeError):
            continue
    return None


def is_generic(blas: Optional[Dict], avx2: Optional[bool]) -> bool:
    """True when an OpenBLAS runs SSE-era kernels on a CPU that has AVX2."""
    if not blas or blas.get("internal_api") != "openblas" or not avx2:
        return False
    return str(blas.get("architecture") or "unknown").lower() in GENERIC_CORES


def _describe(entry: Dict) -> Dict:
    return {k: entry.get(k) for k in ("internal_api", "version", "architecture", "filepath")}


def _blas_libraries() -> Tuple[Optional[Dict], Optional[Dict]]:
    """(faiss's BLAS, numpy's BLAS) as threadpoolctl sees them; imports faiss so its library is loaded.

    A faiss or numpy wheel vendors its library next to the package (``faiss_cpu.libs``,
    ``numpy.libs``); a library shared by both (conda, a distro) is counted as numpy's, and faiss's
    is then unknown, which keeps FAISS (it runs at numpy's speed there)."""
    import faiss  # noqa: F401  (loads faiss's BLAS)
    import threadpoolctl

    def owned_by(module_file: str, stem: str) -> Callable[[str], bool]:
        pkg = Path(module_file).resolve().parent

        def owns(filepath: str) -> bool:
            lib = Path(filepath).resolve()
            vendored = lib.parent.parent == pkg.parent and lib.parent.name.startswith(stem)  # e.g. faiss_cpu.libs
            return lib.is_relative_to(pkg) or vendored
        return owns

    faiss_owns = owned_by(faiss.__file__, "faiss")
    blas = [e for e in threadpoolctl.threadpool_info() if e.get("user_api") == "blas"]
    faiss_blas = next((e for e in blas if faiss_owns(e["filepath"])), None)
    others = [e for e in blas if e is not faiss_blas]
    numpy_owns = owned_by(np.__file__, "numpy")
    numpy_blas = next((e for e in others if numpy_owns(e["filepath"]) or "scipy_openblas" in e["filepath"]),
                      others[0] if others else None)
    return (_describe(faiss_blas) if faiss_blas else None), (_describe(numpy_blas) if numpy_blas else None)


def torch_blas_info() -> Optional[Dict]:
    """torch's BLAS where it is MKL (x86 wheels link it statically; it dispatches on CPUID itself)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.backends.mkl.is_available():
        return None
    return {"internal_api": "mkl", "version": f"bundled with torch {torch.__version__}",
            "architecture": f"MKL dispatch, ATen {torch.backends.cpu.get_cpu_capability()}", "filepath": torch.__file__}


_FIX = ("pip install a faiss-cpu build whose OpenBLAS knows this CPU, or set OPENBLAS_CORETYPE=<this CPU's core, "
        "e.g. SkylakeX or Haswell> yourself")


def choose_path(faiss_blas: Optional[Dict], numpy_blas: Optional[Dict], torch_blas: Callable[[], Optional[Dict]],
                avx2: Optional[bool], user_coretype: Optional[str]) -> Tuple[str, str, Optional[str], Optional[Dict]]:
    """The decision, as a pure function of what was detected -> (path, reason, message, torch's BLAS).

    FAISS unless its OpenBLAS runs generic kernels; then numpy's BLAS if that one is not generic,
    else torch's MKL; else FAISS with a message. A user's generic OPENBLAS_CORETYPE always gets the
    message (it was maybe set on purpose, so we say what it costs and leave it)."""
    user_generic = bool(user_coretype) and user_coretype.strip().lower() in GENERIC_CORES
    if not is_generic(faiss_blas, avx2):
        why = ("faiss's BLAS is not a generic OpenBLAS" if faiss_blas else "faiss's BLAS could not be told apart")
        path, reason, tb = "faiss-flat", why, None
    elif not is_generic(numpy_blas, avx2) and numpy_blas is not None:
        path, reason, tb = "numpy-blas", (f"faiss's OpenBLAS {faiss_blas.get('version')} runs generic "
                                          f"{faiss_blas.get('architecture')} kernels"), None
    else:
        tb = torch_blas()
        if tb is not None:
            path, reason = "torch-blas", "faiss's and numpy's OpenBLAS both run generic kernels; torch has MKL"
        else:
            path, reason = "faiss-flat", "every BLAS here runs generic kernels"
    message = None
    if user_generic:
        message = (f"embedcache label search ({path}): OPENBLAS_CORETYPE={user_coretype} is set in this environment, "
                   f"so OpenBLAS runs generic kernels (2.5-4x slower on a CPU with AVX2); if that was not on purpose, "
                   f"unset it or set it to this CPU's core (e.g. SkylakeX or Haswell)")
    elif path == "faiss-flat" and is_generic(faiss_blas, avx2):
        message = (f"embedcache label search (faiss-flat): faiss's OpenBLAS {faiss_blas.get('version')} runs generic "
                   f"{faiss_blas.get('architecture')} kernels on this CPU and no faster BLAS is available, "
                   f"so search runs 2.5-4x slower than it could: {_FIX}")
    return path, reason, message, tb


@functools.lru_cache(maxsize=None)
def search_plan() -> SearchPlan:
    """Detect once per process which path ``auto`` takes: imports faiss (and torch only where numpy's
    BLAS is generic too), then one threadpoolctl scan of the loaded libraries."""
    cpu = cpu_model()
    try:
        faiss_blas, numpy_blas = _blas_libraries()
    except ImportError as e:  # threadpoolctl missing: keep FAISS, as before detection existed
        return SearchPlan("faiss-flat", f"cannot inspect the BLAS libraries ({e}); pip install threadpoolctl", cpu)
    path, reason, message, tb = choose_path(faiss_blas, numpy_blas, torch_blas_info, _cpu_has_avx2(),
                                            os.environ.get("OPENBLAS_CORETYPE"))
    if message:
        log.warning(message)
    return SearchPlan(path, reason, cpu, faiss_blas, numpy_blas, tb, message)


def resolve_backend(backend: Optional[str] = "auto") -> str:
    """A backend name (or ``auto``, or None: ``$EMBEDCACHE_SEARCH``, default auto) -> one of PATHS."""
    name = (backend or "auto").strip().lower()
    if name == "auto":
        name = os.environ.get(SEARCH_ENV, "auto").strip().lower() or "auto"
    if name == "auto":
        return search_plan().path
    if name not in _ALIASES:
        raise EvaluationError(f"unknown label search backend {name!r} (from backend= or ${SEARCH_ENV}); "
                              f"use one of auto, faiss, numpy, torch")
    return _ALIASES[name]


def search_path() -> str:
    """Which nearest-label search scores results in this process (recorded with every result row):
    ``$EMBEDCACHE_SEARCH`` if set, else the detected path; stable for the process."""
    return resolve_backend("auto")


# ---------------------------------------------------------------------------------------------------
# Search

def _topk_rows(s: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(B, C) scores -> (B, k) scores and rows, best first, exact ties to the lower row."""
    c = s.shape[1]
    if k == 1:
        rows = s.argmax(axis=1)[:, None]
        return np.take_along_axis(s, rows, 1), rows
    part = np.broadcast_to(np.arange(c), s.shape) if k >= c else np.argpartition(s, c - k, axis=1)[:, c - k:]
    vals = np.take_along_axis(s, part, 1)
    order = np.lexsort((part, -vals), axis=-1)
    rows, vals = np.take_along_axis(part, order, 1), np.take_along_axis(vals, order, 1)
    if k < c:
        # argpartition keeps any of the labels tied with the k-th score; the rule wants the lowest rows
        for r in np.flatnonzero(np.count_nonzero(s >= vals[:, -1:], axis=1) > k):
            rows[r] = np.argsort(-s[r], kind="stable")[:k]
            vals[r] = s[r, rows[r]]
    return vals, rows


class _Copies:
    """Label rows searched once each: ``kept`` the first of each set of bit-identical rows (in row order),
    ``rows`` (U, m) the rows each stands for, ascending, -1 padded."""

    def __init__(self, labels: np.ndarray):
        rows = np.ascontiguousarray(labels).view(np.dtype((np.void, labels.dtype.itemsize * labels.shape[1])))
        _, first, inverse = np.unique(rows.ravel(), return_index=True, return_inverse=True)  # by bytes: 100x axis=0
        kept_of = np.argsort(first)  # unique rows in the order of their first row
        self.kept = first[kept_of]
        slot = np.empty_like(kept_of)
        slot[kept_of] = np.arange(len(kept_of))
        of_row = slot[np.ravel(inverse)]  # each row's searched row
        counts = np.bincount(of_row, minlength=len(self.kept))
        self.rows = np.full((len(self.kept), counts.max()), -1, np.int64)
        order = np.argsort(of_row, kind="stable")  # rows grouped by searched row, ascending within each
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.rows[of_row[order], np.arange(len(order)) - starts[of_row[order]]] = order

    def expand(self, scores: np.ndarray, kept_rows: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """(B, k') scores and searched rows -> (B, k) scores and label rows, best first, copies after their first
        and exact ties to the lower row."""
        rows = self.rows[kept_rows].reshape(len(kept_rows), -1)
        vals = np.repeat(scores, self.rows.shape[1], axis=1).astype(np.float32)
        vals[rows < 0] = -np.inf
        order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -vals), axis=-1)[:, :k]
        return np.take_along_axis(vals, order, 1), np.take_along_axis(rows, order, 1)


class LabelIndex:
    """Exact nearest-label search. class_emb: (C, D) class embeddings (normalised here); ids: the
    label id of each row (default 0..C-1); backend: ``auto`` | ``faiss`` | ``numpy`` | ``torch``
    (module docstring); block: queries per BLAS block (default: BLOCK_ELEMENTS scores per block)."""

    def __init__(self, class_emb: np.ndarray, ids: Optional[Sequence[int]] = None, backend: str = "auto",
                 block: Optional[int] = None):
        if class_emb.ndim != 2 or len(class_emb) == 0:
            raise EvaluationError("a label index needs at least one class embedding; the label subset is empty")
        self.ids = np.arange(len(class_emb)) if ids is None else np.asarray(ids)
        if len(self.ids) != len(class_emb):
            raise EvaluationError(f"{len(self.ids)} label ids for {len(class_emb)} class embeddings")
        require_finite(class_emb, "class embeddings", BAD_TEXT)
        self.dim = class_emb.shape[1]
        self.labels = unit(class_emb)  # (C, D) float32, L2-normalised; searched once per set of identical rows
        self.copies = _Copies(self.labels)
        if len(self.copies.kept) == len(self.labels):
            self.copies = None
        else:
            self.labels = self.labels[self.copies.kept]
        self.path = resolve_backend(backend)
        c = len(self.labels)
        self.block = int(block) if block else int(np.clip(BLOCK_ELEMENTS // (c + self.dim), MIN_BLOCK, MAX_BLOCK))
        if self.path == "faiss-flat":
            import faiss

            self.index = faiss.IndexFlatIP(self.dim)
            self.index.add(self.labels)
        elif self.path == "torch-blas":
            import torch

            self._torch, self._torch_lt = torch, torch.from_numpy(self.labels).T

    @classmethod
    def subset(cls, class_emb: np.ndarray, labels: Sequence[int], **kw) -> "LabelIndex":
        labels = np.asarray(sorted(set(int(x) for x in labels)))
        if len(labels) == 0:
            raise EvaluationError("the label subset is empty; an accuracy over no labels is undefined")
        return cls(class_emb[labels], labels, **kw)

    def _check(self, queries: np.ndarray) -> None:
        if queries.ndim != 2:
            raise EvaluationError(f"queries must be an (N, D) array, not shape {queries.shape}")
        if queries.shape[1] != self.dim:
            raise EvaluationError(f"queries have dimension {queries.shape[1]}, the labels {self.dim}: "
                                  "different teachers?")
        require_finite(queries, "queries", BAD_QUERIES)

    def _blocks(self, queries: np.ndarray, block: Optional[int]):
        """Yield (start, stop, query block (B, D) float32, raw inner products (B, C) float32).

        Queries are not normalised: the argmax is the same, and scores are divided by the norms after."""
        b = int(block or self.block)
        buf = np.empty((min(b, len(queries)), len(self.labels)), np.float32)  # reused: no page faults per block
        for i in range(0, len(queries), b):
            q = np.ascontiguousarray(queries[i:i + b], dtype=np.float32)  # a view when already float32
            s = buf[:len(q)]
            if self.path == "torch-blas":
                t = self._torch
                t.mm(t.from_numpy(q), self._torch_lt, out=t.from_numpy(s))
            else:
                np.matmul(q, self.labels.T, out=s)
            yield i, i + len(q), q, s

    def search(self, queries: np.ndarray, k: int = 1, batch: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """(N, D) queries -> (N, k) cosine scores float32 and (N, k) label ids, best first; exact ties
        go to the lower label row. batch: queries per block (default: self.block)."""
        self._check(queries)
        if k < 1:
            raise EvaluationError(f"top-k search needs k >= 1, not {k}")
        k = min(int(k), len(self.ids))
        searched = min(k, len(self.labels))  # of the rows searched (a copy's first row stands for its copies)
        n = len(queries)
        scores, rows = np.empty((n, searched), np.float32), np.empty((n, searched), np.int64)
        if self.path == "faiss-flat":
            b = int(batch or max(self.block, 4096))
            for i in range(0, n, b):
                scores[i:i + b], rows[i:i + b] = self._faiss_topk(unit(queries[i:i + b]), searched)
        else:
            for i, j, q, s in self._blocks(queries, batch):
                vals, rows[i:j] = _topk_rows(s, searched)
                norms = np.sqrt(np.einsum("ij,ij->i", q, q))
                scores[i:j] = vals / np.maximum(norms, 1e-12)[:, None]
        if self.copies is not None:
            scores, rows = self.copies.expand(scores, rows, k)
        return scores, self.ids[rows]

    def _faiss_topk(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """FAISS's top-k of unit queries, made to follow the tie rule: it keeps an arbitrary subset of
        the labels tied at the k-th place (so those rows are redone by brute force, seen from the
        (k+1)-th score) and lists equal scores in any order (re-sorted by row)."""
        if k == 1:
            return self.index.search(q, 1)
        extra = int(k < len(self.labels))
        s, r = self.index.search(q, k + extra)
        if extra:
            straddle = np.flatnonzero(s[:, k] == s[:, k - 1])
            s, r = s[:, :k], r[:, :k]
            if len(straddle):
                s[straddle], r[straddle] = _topk_rows(q[straddle] @ self.labels.T, k)
        order = np.lexsort((r, -s), axis=-1)
        return np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)

    def predict(self, queries: np.ndarray, batch: Optional[int] = None) -> np.ndarray:
        """(N, D) queries -> (N,) id of the nearest label (lower row on exact ties)."""
        if self.path == "faiss-flat":
            return self.search(queries, 1, batch)[1][:, 0]
        self._check(queries)
        rows = np.empty(len(queries), np.intp)
        for i, j, _, s in self._blocks(queries, batch):
            np.argmax(s, axis=1, out=rows[i:j])
        return self.ids[rows if self.copies is None else self.copies.kept[rows]]
