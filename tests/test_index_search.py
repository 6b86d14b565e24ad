"""Nearest-label search (issue 16): every path against a float64 brute-force reference, the tie rule,
blocking, the path detection on this machine, and the path recorded with results."""
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from embedcache.errors import EvaluationError
from embedcache.evaluate import index as ix
from embedcache.evaluate.index import LabelIndex, choose_path, search_path, search_plan

BACKENDS = ["faiss", "numpy", "torch"]
PATH_OF = {"faiss": "faiss-flat", "numpy": "numpy-blas", "torch": "torch-blas"}


def _unit64(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(q, lab):
    """float64 cosine scores (N, C) and the rule's ranking: best first, exact ties to the lower row."""
    ref = _unit64(q) @ _unit64(lab).T
    return ref, np.argsort(-ref, axis=1, kind="stable")


def _signs(rng, n, d, nnz=4):
    """Rows of four +-1 entries: norm 2, so normalised rows and every inner product (a multiple of
    1/4) are exact in float32 whatever the summation order -- lots of exact ties, bit-equal on all paths."""
    x = np.zeros((n, d), np.float32)
    for row in x:
        row[rng.choice(d, nnz, replace=False)] = rng.choice([-1.0, 1.0], nnz)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,d", [(60, 7, 16), (1500, 300, 32)])
def test_paths_equal_float64_reference(backend, n, c, d):
    rng = np.random.default_rng(0)
    q, lab = rng.normal(size=(n, d)), rng.normal(size=(c, d)) * rng.uniform(0.5, 2, (c, 1))
    index = LabelIndex(lab, backend=backend)
    assert index.path == PATH_OF[backend]
    ref, order = _reference(q, lab)
    best2 = np.take_along_axis(ref, order[:, :2], 1)
    untied = best2[:, 0] != best2[:, 1]
    assert untied.sum() == n  # random data: no exact ties, so every row is compared
    pred = index.predict(q)
    assert pred.shape == (n,) and pred.dtype.kind == "i"
    np.testing.assert_array_equal(pred[untied], order[untied, 0])
    scores, ids = index.search(q, k=5)
    assert scores.shape == ids.shape == (n, 5) and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, order[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(ref, order[:, :5], 1), atol=2e-6)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    np.testing.assert_array_equal(ids[:, 0], pred)  # predict is search's first column


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 5, 13, 40])
def test_exact_ties_go_to_the_lower_row(backend, k):
    rng = np.random.default_rng(3)
    lab, q = _signs(rng, 40, 16), _signs(rng, 400, 16)
    ref, order = _reference(q, lab)
    best2 = np.take_along_axis(ref, order[:, :2], 1)
    assert (best2[:, 0] == best2[:, 1]).mean() > 0.2  # the data really is full of ties
    scores, ids = LabelIndex(lab, backend=backend).search(q, k=k)
    np.testing.assert_array_equal(ids, order[:, :k])  # ties included: the rule, on every path
    np.testing.assert_array_equal(scores, np.take_along_axis(ref, order[:, :k], 1).astype(np.float32))
    np.testing.assert_array_equal(LabelIndex(lab, backend=backend).predict(q), order[:, 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 5, 64])
def test_bit_identical_label_rows_of_any_values_go_to_the_lower_row(backend, k):
    """Rows of general values, half of them copies of others: FAISS k = 1 answered a higher copy for 817 of
    4,000 queries, and numpy's BLAS scored two copies apart by where they sat in the matrix (a trial)."""
    rng = np.random.default_rng(0)
    lab, q = rng.standard_normal((65, 33)).astype(np.float32), rng.standard_normal((4000, 33)).astype(np.float32)
    for a in range(32):
        lab[rng.integers(32, 65)] = lab[a]
    _, order = _reference(q, lab)  # copies score bit-equal in float64 too: the stable sort puts the lower first
    index = LabelIndex(lab, backend=backend)
    np.testing.assert_array_equal(index.predict(q), order[:, 0])
    scores, ids = index.search(q, k=k)
    np.testing.assert_array_equal(ids, order[:, :k])
    assert (np.diff(scores, axis=1) <= 0).all()
    sub = LabelIndex.subset(lab, [40, 3, 50, 7], backend=backend)  # answers in its own ids, the rule kept
    _, sub_order = _reference(q, lab[[3, 7, 40, 50]])
    np.testing.assert_array_equal(sub.predict(q), np.array([3, 7, 40, 50])[sub_order[:, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_subset_answers_in_its_own_ids(backend):
    rng = np.random.default_rng(1)
    lab, q = rng.normal(size=(30, 8)), rng.normal(size=(200, 8))
    sub = [17, 2, 5, 29, 11]
    index = LabelIndex.subset(lab, sub, backend=backend)
    got = index.predict(q)
    kept = np.array(sorted(sub))
    _, order = _reference(q, lab[kept])
    np.testing.assert_array_equal(got, kept[order[:, 0]])
    assert set(got) <= set(sub) and len(set(got)) > 1
    _, ids = index.search(q, k=3)
    np.testing.assert_array_equal(ids, kept[order[:, :3]])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("block", [1, 7, 64])
def test_tiny_blocks_equal_one_block(backend, block):
    rng = np.random.default_rng(2)
    lab, q = rng.normal(size=(50, 24)), rng.normal(size=(300, 24)).astype(np.float16)  # float16 queries, as stored
    whole = LabelIndex(lab, backend=backend, block=10_000)
    tiny = LabelIndex(lab, backend=backend, block=block)
    s_whole, i_whole = whole.search(q, k=4)
    s_tiny, i_tiny = tiny.search(q, k=4)
    np.testing.assert_array_equal(i_tiny, i_whole)
    np.testing.assert_allclose(s_tiny, s_whole, atol=1e-6)
    np.testing.assert_array_equal(tiny.predict(q), whole.predict(q))
    np.testing.assert_array_equal(whole.predict(q, batch=block), whole.predict(q))
    np.testing.assert_array_equal(i_whole[:, 0], _reference(q, lab)[1][:, 0])


def test_blocked_search_memory_is_bounded():
    """The score matrix is never whole: 2,000 queries x 2,000 labels would be 16 MB of float32."""
    rng = np.random.default_rng(4)
    lab, q = rng.normal(size=(2000, 8)).astype(np.float32), rng.normal(size=(2000, 8)).astype(np.float32)
    index = LabelIndex(lab, backend="numpy", block=100)
    expected = np.argmax(q @ ix.unit(lab).T, axis=1)
    tracemalloc.start()
    try:
        got = index.predict(q)
        index.search(q, k=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, expected)
    assert peak < 4_000_000, peak  # about one 100 x 2,000 block (0.8 MB) plus the answers
    # and the default block keeps a 20,000-label index's block to BLOCK_ELEMENTS scores
    big = LabelIndex(rng.normal(size=(20000, 4)), backend="numpy")
    assert ix.MIN_BLOCK <= big.block and big.block * 20000 <= ix.BLOCK_ELEMENTS


def test_empty_queries_and_bad_input():
    lab = np.random.default_rng(0).normal(size=(5, 4))
    for backend in BACKENDS:
        s, i = LabelIndex(lab, backend=backend).search(np.zeros((0, 4), np.float32), k=3)
        assert s.shape == i.shape == (0, 3)
        assert LabelIndex(lab, backend=backend).predict(np.zeros((0, 4))).shape == (0,)
    with pytest.raises(EvaluationError, match="dimension 5, the labels 4"):
        LabelIndex(lab, backend="numpy").search(np.ones((2, 5)))
    with pytest.raises(EvaluationError, match="k >= 1"):
        LabelIndex(lab, backend="numpy").search(np.ones((2, 4)), k=0)
    with pytest.raises(EvaluationError, match="unknown label search backend 'gpu'.*auto, faiss, numpy, torch"):
        LabelIndex(lab, backend="gpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_queries_are_refused_not_given_a_label(backend):
    """NaN scores against every label: FAISS answered -1 (taken as the last label), argmax row 0."""
    from embedcache.evaluate.metrics import nearest_label

    lab = np.random.default_rng(0).normal(size=(5, 4))
    q = np.ones((3, 4), np.float32)
    q[1, 2] = np.nan
    index = LabelIndex(lab, backend=backend)
    for ask in (index.predict, index.search):
        with pytest.raises(EvaluationError, match=r"1 of 3 queries hold NaN or inf: a store.s unreadable images read as NaN \(keep the rows its reader.s `ok` marks\)"):
            ask(q)
    q[1, 2] = np.inf
    with pytest.raises(EvaluationError, match="1 of 3 embeddings hold NaN or inf"):
        nearest_label(q, lab)


# --- which path, and why ------------------------------------------------------------------------

SKYLAKEX = {"internal_api": "openblas", "version": "0.3.31", "architecture": "SkylakeX"}
PRESCOTT = {"internal_api": "openblas", "version": "0.3.15", "architecture": "Prescott"}
MKL = {"internal_api": "mkl", "version": "2024", "architecture": "MKL"}


@pytest.mark.parametrize("faiss_blas,numpy_blas,torch_blas,avx2,user,path,message", [
    (SKYLAKEX, SKYLAKEX, None, True, None, "faiss-flat", None),          # faiss's BLAS is fast: keep FAISS
    (PRESCOTT, SKYLAKEX, None, True, None, "numpy-blas", None),          # issue 16's machine
    (PRESCOTT, MKL, None, True, None, "numpy-blas", None),
    (PRESCOTT, PRESCOTT, MKL, True, None, "torch-blas", None),
    (PRESCOTT, PRESCOTT, None, True, None, "faiss-flat", "pip install a faiss-cpu build"),   # no fast path
    (PRESCOTT, SKYLAKEX, None, False, None, "faiss-flat", None),         # an SSE-only CPU: Prescott is its core
    (None, SKYLAKEX, None, True, None, "faiss-flat", None),              # a shared (conda) BLAS: not faiss's own
    (PRESCOTT, {**SKYLAKEX, "architecture": "Katmai"}, MKL, True, "Prescott", "torch-blas", "OPENBLAS_CORETYPE=Prescott"),
    (SKYLAKEX, SKYLAKEX, None, True, "SkylakeX", "faiss-flat", None),   # a user's own, fast setting is left alone
])
def test_choose_path(faiss_blas, numpy_blas, torch_blas, avx2, user, path, message):
    got, reason, msg, _ = choose_path(faiss_blas, numpy_blas, lambda: torch_blas, avx2, user)
    assert got == path and reason
    if message is None:
        assert msg is None
    else:
        assert message in msg and "\n" not in msg and "OPENBLAS_CORETYPE" in msg  # one line, naming the fix


def test_detection_on_this_machine(monkeypatch):
    """What threadpoolctl reports for faiss's and numpy's BLAS here decides the path."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.delenv(ix.SEARCH_ENV, raising=False)
    plan = search_plan()
    assert plan is search_plan()  # detected once per process
    assert plan.path in ix.PATHS and plan.reason and plan.cpu
    faiss_libs = [e for e in threadpoolctl.threadpool_info() if e.get("user_api") == "blas" and "faiss" in e["filepath"]]
    if faiss_libs:  # a faiss-cpu wheel vendors its OpenBLAS: the plan must describe that very library
        assert plan.faiss_blas is not None
        assert plan.faiss_blas["filepath"] == faiss_libs[0]["filepath"]
        assert plan.faiss_blas["architecture"] == faiss_libs[0].get("architecture")
    avx2 = ix._cpu_has_avx2()
    if ix.is_generic(plan.faiss_blas, avx2) and not ix.is_generic(plan.numpy_blas, avx2):
        assert plan.path == "numpy-blas"  # issue 16's machine (faiss: Prescott, numpy: SkylakeX)
    elif not ix.is_generic(plan.faiss_blas, avx2):
        assert plan.path == "faiss-flat"
    if not os.environ.get("OPENBLAS_CORETYPE") and plan.path != "faiss-flat":
        assert plan.message is None
    assert search_path() == plan.path == LabelIndex(np.eye(3)).path


def test_search_path_names_the_path_used(monkeypatch):
    from embedcache.evaluate.protocols import EvalData
    from embedcache.evaluate.store_eval import run_protocols

    rng = np.random.default_rng(5)
    class_emb = rng.normal(size=(4, 8))
    labels = rng.integers(0, 4, 80)
    data = EvalData(emb=class_emb[labels] + 0.1 * rng.normal(size=(80, 8)), labels=labels,
                    domains=np.array(["a", "b"])[np.arange(80) % 2], ok=np.ones(80, bool),
                    class_emb=class_emb, classes=["w", "x", "y", "z"])
    for env, path in [("numpy", "numpy-blas"), ("faiss", "faiss-flat"), ("torch", "torch-blas"), ("", search_plan().path)]:
        monkeypatch.setenv(ix.SEARCH_ENV, env)
        assert search_path() == path == LabelIndex(class_emb).path
        rows = run_protocols(data, ["lodo"], {"run": "r"})
        assert set(rows["search"]) == {path}
        assert rows.loc[rows.metric == "top1", "value"].min() > 0.9


def _child(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", ix.SEARCH_ENV)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**environ, **env})


def test_import_is_lazy_and_the_fast_path_is_silent():
    code = ("import sys, numpy as np\n"
            "from embedcache.evaluate import index\n"
            "lazy = 'faiss' not in sys.modules\n"
            "p = index.LabelIndex(np.eye(4)).predict(np.eye(4)[::-1])\n"
            "plan = index.search_plan()\n"
            "print(lazy, index.search_path() == plan.path, plan.message is None, p.tolist())")
    out = _child(code)  # its own plan: without this shell's OPENBLAS_CORETYPE, FAISS may pick other kernels
    assert out.returncode == 0, out.stderr
    lazy, same, silent_plan, pred = out.stdout.split(" ", 3)
    assert lazy == "True" and same == "True" and pred.strip() == "[3, 2, 1, 0]"
    if silent_plan == "True":
        assert "label search" not in out.stderr


def test_a_users_generic_coretype_gets_one_line():
    """OPENBLAS_CORETYPE=Prescott (as a user might set it on purpose): searches still run, exactly, and
    one line per process says what it costs and how to undo it."""
    code = ("import json, numpy as np\n"
            "from embedcache.evaluate import index\n"
            "rng = np.random.default_rng(0); lab, q = rng.normal(size=(20, 8)), rng.normal(size=(50, 8))\n"
            "a = index.LabelIndex(lab).predict(q); b = index.LabelIndex(lab[:10]).search(q, 3)[1]\n"
            "print(json.dumps({'path': index.search_path(), 'a': a.tolist(), 'b': b.tolist()}))")
    out = _child(code, OPENBLAS_CORETYPE="Prescott")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    lines = [line for line in out.stderr.splitlines() if "OPENBLAS_CORETYPE=Prescott" in line]
    assert len(lines) == 1, out.stderr
    assert "unset it or set it to this CPU's core" in lines[0]
    rng = np.random.default_rng(0)
    lab, q = rng.normal(size=(20, 8)), rng.normal(size=(50, 8))
    assert got["path"] in ix.PATHS
    np.testing.assert_array_equal(got["a"], _reference(q, lab)[1][:, 0])
    np.testing.assert_array_equal(got["b"], _reference(q, lab[:10])[1][:, :3])
