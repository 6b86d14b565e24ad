"""Label-index speed against numpy, and end-to-end evaluation of a large store.

    python bench/evaluate.py [--queries 100000] [--dim 512]

1. Queries/s of the FAISS label index (exact inner product) for 1k and 20k labels against numpy
   matmul + argmax on the same normalised arrays, in the same run (results are checked equal).
2. Seconds to evaluate a 100k-image store end to end (open, load, lodo + per_class + open_vocab)
   from the teacher's stored embeddings. Prints a table and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedcache.store import SCHEMA_VERSION, Store, add_text_arrays, plan_layout  # noqa: E402
from embedcache.evaluate.index import LabelIndex  # noqa: E402
from embedcache.evaluate.store_eval import teacher_baselines  # noqa: E402


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
                               "image/view_params": np.zeros((stop - start, 1, 5), np.int32)})
        st.write_array("text/name/emb", text)
        st.write_array("text/name/class_emb", text)
        st.put_table("text.parquet", pd.DataFrame({"source": "name", "label": np.arange(classes), "class_name": names,
                                                   "prompt": names}))
        st.put_table("meta.parquet", pd.DataFrame({"index": np.arange(n), "path": "-", "class_name": np.array(names)[labels],
                                                   "label": labels, "domain": doms, "split": "train", "status": "ok",
                                                   "reason": ""}))
        st.finish(failed=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    rows = []
    for labels in (1000, 20000):
        nq = 20000 if labels == 1000 else 5000
        lab, q = unit(rng.normal(size=(labels, args.dim))), unit(rng.normal(size=(nq, args.dim)))
        index = LabelIndex(lab)
        index.predict(q[:100])
        t0 = time.perf_counter(); got = index.predict(q); tf = time.perf_counter() - t0
        t0 = time.perf_counter(); ref = np.argmax(q @ lab.T, axis=1); tn = time.perf_counter() - t0
        agree = float(np.mean(got == ref))
        rows.append({"labels": labels, "queries": nq, "faiss_qps": nq / tf, "numpy_qps": nq / tn,
                     "ratio": tn / tf, "agreement": agree})
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/big.zarr"
        fake_store(path, args.queries, 100, args.dim)
        t0 = time.perf_counter()
        res = teacher_baselines(path, protocols=("lodo", "per_class", "open_vocab"))
        e2e = time.perf_counter() - t0
        acc = float(res[(res.split == "zero_shot") & (res.domain == "avg") & (res.metric == "top1")].value.iloc[0])
    print(f"\n{'labels':>7} {'queries':>8} {'FAISS q/s':>12} {'numpy q/s':>12} {'FAISS/numpy':>12} {'same argmax':>12}")
    for r in rows:
        print(f"{r['labels']:>7} {r['queries']:>8} {r['faiss_qps']:>12.0f} {r['numpy_qps']:>12.0f} {r['ratio']:>12.2f} {r['agreement']:>12.4f}")
    print(f"\nend-to-end evaluation of a {args.queries:,}-image store (lodo + per_class + open_vocab): {e2e:.2f} s "
          f"(zero-shot top-1 {acc:.3f})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "evaluate-cpu.json"
    out.write_text(json.dumps({"index": rows, "end_to_end_s": e2e, "queries": args.queries, "dim": args.dim}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
