"""Extraction throughput against the teacher's bare forward pass, and store read speed against .npy.

    python bench/extract.py [--images 256] [--model ViT-B-32] [--device auto] [--workers 1]

1. bare: the teacher's ``encode_image`` on pre-made tensors (no decoding, no writing).
2. extract: the full pipeline (decode -> canvas -> views -> teacher -> store) on real PACS
   images when ../shared/datasets/pacs exists, else synthetic ones; same teacher, same batch size.
   The figure is extract / bare: how much of the teacher's speed the pipeline keeps.
3. read: loading a whole (N, 1, 512) float16 embedding array from Zarr and HDF5 against np.load.
Random weights are fine for speed. Prints a table and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedcache.config import DatasetConfig, ExtractConfig, TeacherConfig, TextConfig, ViewsConfig  # noqa: E402
from embedcache.extract import extract  # noqa: E402
from embedcache.store import SCHEMA_VERSION, Store, plan_layout  # noqa: E402
from embedcache.teachers import build_teacher  # noqa: E402

PACS = ROOT.parent / "shared" / "datasets" / "pacs"


def bare_forward(teacher, n: int, batch: int) -> float:
    x = torch.randn(batch, 3, teacher.input_size, teacher.input_size)
    teacher.encode_image(x)  # warm-up
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    t0, done = time.perf_counter(), 0
    while done < n:
        teacher.encode_image(x)
        done += batch
    return done / (time.perf_counter() - t0)


def pipeline(teacher, teacher_cfg, n: int, batch: int, workers: int, views: int, tmp: Path, pacs: Path,
             repeat: int = 1) -> float:
    domains = len([d for d in pacs.iterdir() if d.is_dir()]) if pacs.is_dir() else 4
    per_class = max(1, -(-n // (7 * domains)))
    ds = (DatasetConfig(name="domainbed", path=str(pacs), max_per_class=per_class) if pacs.is_dir()
          else DatasetConfig(name="synthetic", num_classes=7, num_domains=4, per_class=per_class, image_size=227))
    if repeat > 1 and pacs.is_dir():  # list each image `repeat` times so fast teachers run long enough
        from embedcache.datasets import build_dataset
        rows = [f"{(pacs / s.path).resolve()},{s.class_name},{s.domain}" for s in build_dataset(ds).samples] * repeat
        (tmp / "repeat.csv").write_text("path,label,domain\n" + "\n".join(rows) + "\n")  # never write into the data
        ds = DatasetConfig(name="csv", path=str(tmp / "repeat.csv"))
    cfg = ExtractConfig(dataset=ds, teacher=teacher_cfg, views=ViewsConfig(count=views), text=TextConfig(sources=("name",)),
                        out=str(tmp / f"bench-{views}.zarr"), batch_size=batch, num_workers=workers,
                        block_rows=batch * 4, progress=False)
    res = extract(cfg, teacher=teacher, log=lambda _m: None)
    return res.images * views / res.seconds


def read_speed(tmp: Path, rows: int, dim: int = 512) -> dict:
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((rows, 1, dim)).astype(np.float16)
    np.save(tmp / "emb.npy", arr)
    out = {}
    t0 = time.perf_counter()
    np.load(tmp / "emb.npy")
    out["npy_s"] = time.perf_counter() - t0
    layout = plan_layout(rows, 1, dim, 8, False, 4096)
    manifest = {"schema": SCHEMA_VERSION, "key": "bench", "complete": False}
    for name, path in (("zarr", tmp / "r.zarr"), ("hdf5", tmp / "r.h5")):
        with Store.create(str(path), manifest, layout, name) as st:
            for b in range(st.num_blocks):
                start, stop = st.block_range(b)
                st.write_block(b, {"image/emb": arr[start:stop], "image/status": np.ones(stop - start, np.uint8),
                                   "image/view_params": np.zeros((stop - start, 1, 5), np.int32)})
        with Store(str(path)) as st:  # the store's own whole-array read, checksums verified
            t0 = time.perf_counter()
            got = st.read("image/emb")
            out[f"{name}_s"] = time.perf_counter() - t0
        assert np.array_equal(got, arr)
    out["mb"] = arr.nbytes / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--views", type=int, nargs="+", default=[1])
    ap.add_argument("--read-rows", type=int, default=200_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--repeat", type=int, default=1, help="list each image this many times (GPU runs)")
    ap.add_argument("--pacs", default=str(PACS), help="DomainBed-layout image folder (default ../shared/datasets/pacs)")
    args = ap.parse_args()
    pacs = Path(args.pacs)

    tcfg = TeacherConfig(name="open_clip", model=args.model, pretrained=None, device=args.device, precision=args.precision)
    teacher = build_teacher(tcfg)
    rows = []
    bare = bare_forward(teacher, args.images * args.repeat, args.batch)
    rows.append(("bare forward (pre-made tensors)", bare, 1.0))
    with tempfile.TemporaryDirectory() as d:
        for v in args.views:
            rate = pipeline(teacher, tcfg, args.images, args.batch, args.workers, v, Path(d), pacs, args.repeat)
            rows.append((f"extract, {v} view(s)/image, {args.workers} worker(s)", rate, rate / bare))
        rd = read_speed(Path(d), args.read_rows)
    device = torch.cuda.get_device_name() if teacher.device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"\nteacher {args.model} (random weights, {args.precision}), batch {args.batch}, device {device}, "
          f"images from {pacs if pacs.is_dir() else 'synthetic'}")
    print(f"{'what':<44} {'teacher images/s':>16} {'vs bare':>8}")
    for name, rate, ratio in rows:
        print(f"{name:<44} {rate:>16.1f} {ratio:>8.2f}")
    print(f"\nload-all read of a {rd['mb']:.0f} MB (N, 1, 512) float16 array")
    print(f"{'format':<10} {'seconds':>8} {'MB/s':>8} {'vs npy':>8}")
    for k in ("npy", "zarr", "hdf5"):
        s = rd[f"{k}_s"]
        print(f"{k:<10} {s:>8.3f} {rd['mb'] / s:>8.0f} {rd['npy_s'] / s:>8.2f}")
    result = {"device": device, "model": args.model, "precision": args.precision, "batch": args.batch,
              "workers": args.workers, "images": args.images, "host": platform.node(), "cpus": os.cpu_count(),
              "throughput": [{"what": n, "images_per_s": r, "ratio_vs_bare": q} for n, r, q in rows], "read": rd}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tag = ("gpu" if teacher.device.type == "cuda" else "cpu") + f"-{args.model}"
    path = Path(args.out) / f"extract-{tag}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
