"""Label-search speed against numpy, and end-to-end evaluation of a large store.

    python bench/evaluate.py [--queries 100000] [--dim 512] [--repeats 7]

1. Queries/s of the project's nearest-label search (``LabelIndex``, whichever path it picks here:
   see ``embedcache.evaluate.index``), of a plain FAISS ``IndexFlatIP`` and of numpy's float32
   ``argmax(q @ L.T)`` for 1k and 20k labels, on the same normalised arrays, in the same run: the
   three are timed in turn, ``--repeats`` rounds, and the table gives medians with the min-max over
   rounds (other work on a small machine moves single timings by 2x). Predictions are checked equal.
   The processor and each path's BLAS (threadpoolctl: library, version, core type) are printed.
2. Seconds to evaluate a 100k-image store end to end (open, load, lodo + per_class + open_vocab)
   from the teacher's stored embeddings. Prints the tables and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedcache.store import SCHEMA_VERSION, Store, add_text_arrays, plan_layout  # noqa: E402
from embedcache.evaluate.index import SEARCH_ENV, LabelIndex, torch_blas_info, search_plan  # noqa: E402
from embedcache.evaluate.store_eval import teacher_baselines  # noqa: E402
from _common import write_json  # noqa: E402  (bench/ is on sys.path when a benchmark runs)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fake_store(path: str, n: int, classes: int, dim: int) -> None:
    """A complete store with teacher embeddings near their class text (no images, no teacher)."""
    rng = np.random.default_rng(0)
    text = unit(rng.normal(size=(classes, dim)))
    labels = rng.integers(0, classes, n)
    emb = unit(text[labels] + 0.08 * rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float16)[:, None]
    layout = plan_layout(n, 1, dim, 8, False, 4096)
    add_text_arrays(layout, {"name": classes}, classes, dim)
    names = [f"class{i}" for i in range(classes)]
    doms = np.array(["a", "b", "c", "d"])[np.arange(n) % 4]
    manifest = {"schema": SCHEMA_VERSION, "key": "bench", "complete": False, "teacher": {"name": "synthetic", "model": "-"},
                "dataset": {"classes": names, "domains": ["a", "b", "c", "d"], "root": None}, "text": {"sources": ["name"]}}
    with Store.create(path, manifest, layout) as st:
        for b in range(st.num_blocks):
            start, stop = st.block_range(b)
            st.write_block(b, {"image/emb": emb[start:stop], "image/status": np.ones(stop - start, np.uint8),
                               "image/view_params": np.tile(np.array([0, 0, 8, 8, 0], np.int32), (stop - start, 1, 1)),
                               "image/canvas_crc32c": np.zeros(stop - start, np.uint32)})  # a store without pixels
        st.write_array("text/name/emb", text)
        st.write_array("text/name/class_emb", text)
        st.put_table("text.parquet", pd.DataFrame({"source": "name", "label": np.arange(classes), "class_name": names,
                                                   "prompt": names}))
        st.put_table("meta.parquet", pd.DataFrame({"index": np.arange(n), "path": "-", "class_name": np.array(names)[labels],
                                                   "label": labels, "domain": doms, "split": "train", "status": "ok",
                                                   "reason": ""}))
        st.finish(failed=0)


def _blas_line(blas) -> str:
    if not blas:
        return "unknown"
    return f"{blas.get('internal_api')} {blas.get('version')}, core {blas.get('architecture')}"


def time_search(labels: int, nq: int, dim: int, repeats: int, rng) -> dict:
    """The project's search, FAISS IndexFlatIP and numpy argmax, timed in turn for ``repeats`` rounds."""
    import faiss

    lab, q = unit(rng.normal(size=(labels, dim))), unit(rng.normal(size=(nq, dim)))
    index = LabelIndex(lab)
    flat = faiss.IndexFlatIP(dim)
    flat.add(lab)
    runs = {"project": lambda: index.predict(q), "faiss": lambda: flat.search(q, 1)[1][:, 0],
            "numpy": lambda: np.argmax(q @ lab.T, axis=1)}
    out = {name: f() for name, f in runs.items()}  # warm-up, and the answers to compare
    secs = {name: [] for name in runs}
    for r in range(repeats):
        names = list(runs)[r % 3:] + list(runs)[:r % 3]  # rotate the order: no path always runs first
        for name in names:
            t0 = time.perf_counter()
            runs[name]()
            secs[name].append(time.perf_counter() - t0)
    qps = {name: nq / np.array(s) for name, s in secs.items()}
    ratio = {name: qps[name] / qps["numpy"] for name in ("project", "faiss")}  # per round, same conditions
    return {"labels": labels, "queries": nq, "path": index.path, "repeats": repeats,
            **{f"{n}_qps": float(np.median(v)) for n, v in qps.items()},
            **{f"{n}_qps_range": [float(v.min()), float(v.max())] for n, v in qps.items()},
            **{f"{n}_over_numpy": float(np.median(v)) for n, v in ratio.items()},
            **{f"{n}_over_numpy_range": [float(v.min()), float(v.max())] for n, v in ratio.items()},
            "project_same_argmax": float(np.mean(out["project"] == out["numpy"])),
            "faiss_same_argmax": float(np.mean(out["faiss"] == out["numpy"]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON results")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    plan = search_plan()
    project_blas = {"numpy-blas": plan.numpy_blas, "faiss-flat": plan.faiss_blas,
                    "torch-blas": plan.torch_blas or torch_blas_info()}
    rows = [time_search(labels, nq, args.dim, args.repeats, rng) for labels, nq in ((1000, 20000), (20000, 5000))]
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/big.zarr"
        fake_store(path, args.queries, 100, args.dim)
        t0 = time.perf_counter()
        res = teacher_baselines(path, protocols=("lodo", "per_class", "open_vocab"))
        e2e = time.perf_counter() - t0
        acc = float(res[(res.split == "zero_shot") & (res.domain == "avg") & (res.metric == "top1")].value.iloc[0])
        recorded = sorted(set(res["search"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    blas = {"project": {"path": rows[0]["path"], **(project_blas.get(rows[0]["path"]) or {})},
            "faiss": plan.faiss_blas, "numpy": plan.numpy_blas}
    print(f"\nprocessor: {plan.cpu}, {cores} cores, D = {args.dim}, {args.repeats} rounds (median, min-max)")
    why = plan.reason if rows[0]["path"] == plan.path else f"${SEARCH_ENV}={os.environ.get(SEARCH_ENV)}"
    print(f"  project search: {rows[0]['path']} ({why}): {_blas_line(blas['project'])}")
    print(f"  FAISS IndexFlatIP: {_blas_line(plan.faiss_blas)}")
    print(f"  numpy argmax(q @ L.T): {_blas_line(plan.numpy_blas)}")
    print(f"\n{'labels':>7} {'queries':>8} {'project q/s':>12} {'FAISS q/s':>12} {'numpy q/s':>12} "
          f"{'project/numpy':>20} {'FAISS/numpy':>20} {'same argmax':>12}")
    for r in rows:
        pr, fr = r["project_over_numpy_range"], r["faiss_over_numpy_range"]
        print(f"{r['labels']:>7} {r['queries']:>8} {r['project_qps']:>12.0f} {r['faiss_qps']:>12.0f} "
              f"{r['numpy_qps']:>12.0f} {r['project_over_numpy']:>7.2f} ({pr[0]:.2f}-{pr[1]:.2f}) "
              f"{r['faiss_over_numpy']:>7.2f} ({fr[0]:.2f}-{fr[1]:.2f}) "
              f"{min(r['project_same_argmax'], r['faiss_same_argmax']):>12.4f}")
    print(f"\nend-to-end evaluation of a {args.queries:,}-image store (lodo + per_class + open_vocab): {e2e:.2f} s "
          f"(zero-shot top-1 {acc:.3f}, results record search = {', '.join(recorded)})")
    write_json(Path(args.out) / "evaluate-cpu.json",
               {"index": rows, "end_to_end_s": e2e, "queries": args.queries, "dim": args.dim, "cpu": plan.cpu,
                "cores": cores, "search_path": rows[0]["path"], "search_reason": plan.reason, "blas": blas,
                "recorded_search": recorded})


if __name__ == "__main__":
    main()
