"""Synthesis throughput: image-iterations per second of the optimisation loop, against the teacher's
bare forward + backward on pre-made tensors, and a small store synthesised end to end.

    python bench/synthesize.py [--teacher conse] [--model efficientnet-lite0] [--batch 8] [--cutouts 8]
                               [--cut-size N] [--canvas 96] [--iterations 10] [--device auto]
    python bench/synthesize.py --teacher open_clip --model ViT-B-16 --batch 32 --cutouts 32   # GPU host

1. bare: the teacher's differentiable image encoder, forward + backward to its input, on
   (batch x cutouts) pre-made tensors at the cut size (teacher passes/s).
2. loop: ``image.optimise`` (render the Fourier parameterisation, augment, encode, spherical
   distance, Adam) for ``--iterations`` steps: image-iterations/s, and teacher passes/s (x cutouts)
   against bare.
3. store: ``synthesize`` of a small store (``--store-images`` images, ``--iterations`` steps each,
   ``plain`` prompts, 2 views) end to end: images/s, prompt planning and view embedding included.
The open_clip teacher uses random weights (speed does not depend on them); conse has its own.
Prints a table and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedcache.config import TeacherConfig, build_config, to_dict  # noqa: E402
from embedcache.synthesis import ImageConfig, SynthesizeConfig, build_generator, optimise, synthesize  # noqa: E402
from embedcache.teachers import build_teacher  # noqa: E402
from _common import write_json  # noqa: E402  (bench/ is on sys.path when a benchmark runs)


def sync(teacher) -> None:
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()


def bare(teacher, n: int, size: int, steps: int) -> float:
    """Teacher passes/s: forward + backward to the input on pre-made (n, 3, size, size) tensors."""
    x = torch.randn(n, 3, size, size, device=teacher.device, requires_grad=True)
    t = F.normalize(torch.randn(n, teacher.embed_dim, device=teacher.device), dim=-1)
    for i in range(steps + 1):
        if i == 1:
            sync(teacher)
            t0 = time.perf_counter()
        (g,) = torch.autograd.grad((teacher.encode_image_grad(x) * t).sum(), [x])
    sync(teacher)
    return n * steps / (time.perf_counter() - t0)


def loop(teacher, cfg: ImageConfig, canvas: int, batch: int, cut: int) -> dict:
    gen = build_generator(cfg, canvas, teacher.device)
    targets = F.normalize(torch.randn(batch, teacher.embed_dim), dim=-1).to(teacher.device)
    optimise(teacher, gen, targets, list(range(batch)), build_config(ImageConfig, {**to_dict(cfg), "iterations": 1}), cut)
    sync(teacher)
    t0 = time.perf_counter()
    out = optimise(teacher, gen, targets, list(range(batch)), cfg, cut)
    sync(teacher)
    dt = time.perf_counter() - t0
    return {"image_iterations_per_s": batch * cfg.iterations / dt, "seconds": dt,
            "loss_start": float(out.loss_start.mean()), "loss_end": float(out.loss_end.mean())}


def store(teacher, tcfg: TeacherConfig, cfg: ImageConfig, canvas: int, batch: int, images: int, tmp: Path) -> dict:
    classes = [f"class {i}" for i in range(max(2, min(7, images)))]
    per_class = -(-images // len(classes))
    scfg = build_config(SynthesizeConfig, {
        "classes": classes, "per_class": per_class, "prompts": {"method": "plain"}, "image": to_dict(cfg),
        "teacher": to_dict(tcfg), "views": {"count": 2}, "canvas": {"size": canvas}, "text": {"sources": ["name"]},
        "out": str(tmp / "bench.zarr"), "batch_size": batch, "block_rows": 64, "progress": False})
    t0 = time.perf_counter()
    res = synthesize(scfg, teacher=teacher, log=lambda _m: None)
    dt = time.perf_counter() - t0
    return {"images": res.images, "seconds": dt, "images_per_s": res.images / dt,
            "image_iterations_per_s": res.images * cfg.iterations / dt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="conse", choices=["conse", "open_clip"])
    ap.add_argument("--model", default=None, help="conse: efficientnet-lite0 (default); open_clip: ViT-B-16 (default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch", type=int, default=8, help="images optimised together")
    ap.add_argument("--cutouts", type=int, default=8)
    ap.add_argument("--cut-size", type=int, default=None, help="teacher input side of the cutouts (default: its own)")
    ap.add_argument("--canvas", type=int, default=96, help="side the images are synthesised at")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--store-images", type=int, default=8, help="images of the end-to-end store (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON results")
    args = ap.parse_args()
    model = args.model or ("efficientnet-lite0" if args.teacher == "conse" else "ViT-B-16")
    tcfg = TeacherConfig(name=args.teacher, model=model, device=args.device, precision=args.precision)
    teacher = build_teacher(tcfg)
    cut = args.cut_size or teacher.input_size
    cfg = build_config(ImageConfig, {"iterations": args.iterations, "cutouts": args.cutouts, "cut_size": cut})
    passes = bare(teacher, args.batch * args.cutouts, cut, max(2, args.iterations // 2))
    lp = loop(teacher, cfg, args.canvas, args.batch, cut)
    loop_passes = lp["image_iterations_per_s"] * args.cutouts
    with tempfile.TemporaryDirectory() as d:
        st = store(teacher, tcfg, cfg, args.canvas, args.batch, args.store_images, Path(d)) if args.store_images else None
    device = torch.cuda.get_device_name() if teacher.device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"\nteacher {args.teacher}/{model} ({args.precision}), device {device}; batch {args.batch} images x "
          f"{args.cutouts} cutouts at {cut} px, canvas {args.canvas} px, {args.iterations} iterations")
    print(f"{'what':<52} {'image-it/s':>11} {'teacher passes/s':>17} {'vs bare':>8}")
    print(f"{'bare forward+backward (pre-made tensors)':<52} {'':>11} {passes:>17.1f} {1.0:>8.2f}")
    print(f"{'optimisation loop (render, augment, encode, Adam)':<52} {lp['image_iterations_per_s']:>11.2f} "
          f"{loop_passes:>17.1f} {loop_passes / passes:>8.2f}")
    if st:
        print(f"{'synthesize(), end to end (plan, views, store)':<52} {st['image_iterations_per_s']:>11.2f} "
              f"{st['image_iterations_per_s'] * args.cutouts:>17.1f} "
              f"{st['image_iterations_per_s'] * args.cutouts / passes:>8.2f}")
        print(f"  = {st['images_per_s']:.3f} images/s ({st['images']} images in {st['seconds']:.1f} s)")
    print(f"loop loss (iteration-0 augmentations): {lp['loss_start']:.4f} -> {lp['loss_end']:.4f}")
    result = {"device": device, "teacher": args.teacher, "model": model, "precision": args.precision,
              "batch": args.batch, "cutouts": args.cutouts, "cut_size": cut, "canvas": args.canvas,
              "iterations": args.iterations, "host": platform.node(), "cpus": os.cpu_count(),
              "bare_teacher_passes_per_s": passes, "loop": lp, "store": st}
    tag = ("gpu" if teacher.device.type == "cuda" else "cpu") + f"-{args.teacher}-{model}-{cut}px"
    write_json(Path(args.out) / f"synthesize-{tag}.json", result)


if __name__ == "__main__":
    main()
