"""Sweep wall time with the cache against the same sweep with the teacher run online every step.

    python bench/sweep.py [--steps 20] [--seeds 1]

Both arms run the demo store's leave-one-domain-out sweep in this process (serial launcher), the
online arm using the ``teacher_online`` target provider (each view rendered and encoded by the
store's own teacher every step). Then head-only runs/hour: the VL2V-ADiP align step on cached
features of a fixed backbone, one run at a time and with each held-out domain's seeds trained as one
pack of heads. Needs the demo store (`make extract`). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedcache import open_store  # noqa: E402
from embedcache.config import to_dict  # noqa: E402
from embedcache.students.features import cache_features  # noqa: E402
from embedcache.students.models import StudentConfig, build_student  # noqa: E402
from embedcache.students.sweep import SweepSpec, run_sweep  # noqa: E402
from _common import write_json  # noqa: E402  (bench/ is on sys.path when a benchmark runs)


def timed(spec: SweepSpec, out: str, teacher=None) -> tuple:
    t0 = time.perf_counter()
    res = run_sweep(spec, out, "serial", progress=False, log=lambda _m: None, teacher=teacher)
    return time.perf_counter() - t0, res["runs"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=str(ROOT / "stores" / "demo.zarr"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--head-steps", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON results")
    args = ap.parse_args()
    if not Path(args.store).exists():
        sys.exit(f"no store at {args.store}; run `make extract` first")
    base = {"student": {"name": "resnet18", "input_size": 64}, "steps": args.steps, "batch_size": 32,
            "eval_every": args.steps, "ckpt_every": args.steps, "device": "cpu", "select": "last"}
    spec = SweepSpec(store=args.store, protocol="lodo", base=base,
                     grid={"recipe": ["li_iccv23"], "seed": list(range(args.seeds))}, launcher="serial")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        cached_s, n = timed(spec, f"{d}/cached")
        rows.append(("sweep, teacher targets from the store", n, cached_s))
        teacher = open_store(args.store).load_teacher()
        online = SweepSpec(**{**to_dict(spec), "base": {**base, "targets": "teacher_online"}})
        online_s, _ = timed(online, f"{d}/online", teacher=teacher)
        rows.append((f"same sweep, {teacher.registry_name} teacher online", n, online_s))
        torch.manual_seed(0)
        weights = Path(d) / "backbone.safetensors"
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in build_student(StudentConfig(name="resnet18"), 8).backbone.state_dict().items()},
                  str(weights))
        student = {"name": "resnet18", "input_size": 64, "pretrained": str(weights)}
        cache_features(args.store, StudentConfig(**student), device="cpu", progress=False, log=lambda _m: None)
        head = SweepSpec(store=args.store, protocol="lodo", grid={"seed": list(range(4))}, launcher="serial",
                         base={**base, "student": student, "recipe": "vl2v_adip_align", "features": True,
                               "steps": args.head_steps, "eval_every": args.head_steps, "ckpt_every": args.head_steps})
        head_s, hn = timed(head, f"{d}/head")
        rows.append((f"head-only sweep ({args.head_steps} steps per run)", hn, head_s))
        packed = SweepSpec(**{**to_dict(head), "pack_heads": True})
        pack_s, pn = timed(packed, f"{d}/pack")
        rows.append(("same, seeds packed (pack_heads: true)", pn, pack_s))
    print(f"\n{'what':<44} {'runs':>5} {'seconds':>9} {'runs/hour':>10}")
    for name, runs, sec in rows:
        print(f"{name:<44} {runs:>5} {sec:>9.1f} {3600 * runs / sec:>10.0f}")
    print(f"\nthe cached sweep takes {cached_s / online_s:.2f} of the online sweep's time ({online_s / cached_s:.1f}x faster)")
    write_json(Path(args.out) / "sweep-cpu.json",
               {"rows": [{"what": a, "runs": b, "seconds": c} for a, b, c in rows], **vars(args)})


if __name__ == "__main__":
    main()
