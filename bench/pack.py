"""Runs per hour on one device: a leave-one-domain-out sweep one run at a time, then packed.

    python bench/pack.py [--workers 2 4] [--seeds 1] [--steps 20] [--size 64] [--batch 96] [--images 256]

One synthetic store with 4 domains (the teacher only makes it: student runs read the store); the same
sweep (``--recipe`` vl2v_adip, ``--seeds`` runs per held-out domain, ``--steps`` steps of batch ``--batch``)
through the ``local`` launcher with 1 worker per device, then with each count in ``--workers`` on the
same device (on a GPU machine the workers share the GPU: packing). Per arm: the wall time of the
whole sweep (worker start, store load, training, scoring) and runs/hour. The papers' runs are longer
(one VL2V-ADiP stage: 5,000 steps), so each arm is also projected to ``--full-steps``: a round of concurrent runs
takes (full - steps) steps more at the rate its runs trained at in this arm (from each run's
``loop_seconds``), i.e. projected wall = wall + rounds x mean over runs of
(full - steps) x loop_seconds / steps, rounds = ceil(runs / workers). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedcache.config import CanvasConfig, DatasetConfig, ExtractConfig, TeacherConfig, TextConfig, ViewsConfig  # noqa: E402
from embedcache.device import resolve_device  # noqa: E402
from embedcache.extract import extract  # noqa: E402
from embedcache.students.sweep import SweepSpec, run_sweep  # noqa: E402
from _common import write_json  # noqa: E402  (bench/ is on sys.path when a benchmark runs)


def make_store(path: str, args, device: torch.device) -> None:
    """A synthetic 4-domain store; its teacher's weights are random (the runs only read its embeddings)."""
    tcfg = TeacherConfig(name="open_clip", model=args.teacher, pretrained=None, device=args.device,
                         precision="bf16" if device.type == "cuda" else "fp32")
    per_class = max(1, args.images // (4 * args.classes))
    extract(ExtractConfig(dataset=DatasetConfig(name="synthetic", num_classes=args.classes, num_domains=4,
                                                per_class=per_class, image_size=args.canvas),
                          teacher=tcfg, views=ViewsConfig(count=2), text=TextConfig(sources=("name",)),
                          canvas=CanvasConfig(size=args.canvas), out=path, progress=False, batch_size=64),
            log=lambda _m: None)


def arm(store: str, out: str, workers: int, args) -> dict:
    """One sweep through the local launcher with ``workers`` worker processes; its timings."""
    base = {"student": {"name": "resnet18", "input_size": args.size}, "recipe": args.recipe, "steps": args.steps,
            "batch_size": args.batch, "eval_every": args.steps, "ckpt_every": args.steps, "select": "last"}
    spec = SweepSpec(store=store, protocol="lodo", base=base, grid={"seed": list(range(args.seeds))}, launcher="local",
                     workers=workers)
    t0 = time.perf_counter()
    res = run_sweep(spec, out, device=args.device, progress=False, log=lambda _m: None)
    wall = time.perf_counter() - t0
    if res["done"] != res["runs"]:
        sys.exit(f"{workers} workers: {res['runs'] - res['done']} of {res['runs']} runs did not finish; see {out}/runs/*/error.txt")
    loops = [json.loads(p.read_text())["loop_seconds"] for p in sorted(Path(out, "runs").glob("*/summary.json"))]
    if len(loops) != res["runs"]:
        sys.exit(f"{workers} workers: found {len(loops)} run summaries for {res['runs']} runs under {out}/runs")
    rounds = math.ceil(res["runs"] / workers)
    extra = rounds * statistics.mean((args.full_steps - args.steps) * s / args.steps for s in loops)
    return {"workers": workers, "runs": res["runs"], "wall_s": wall, "steps_per_s_per_run": args.steps / statistics.mean(loops),
            "runs_per_hour": 3600 * res["runs"] / wall, "projected_wall_s": wall + extra,
            "projected_runs_per_hour": 3600 * res["runs"] / (wall + extra)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="packed arms: runs sharing the device (1 is always run)")
    ap.add_argument("--recipe", default="vl2v_adip")
    ap.add_argument("--seeds", type=int, default=1, help="runs per held-out domain")
    ap.add_argument("--steps", type=int, default=20, help="steps per run in this benchmark")
    ap.add_argument("--full-steps", type=int, default=5000, help="steps of the runs the projection is for")
    ap.add_argument("--size", type=int, default=64, help="student input size")
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--canvas", type=int, default=96)
    ap.add_argument("--teacher", default="ViT-B-32", help="makes the store (random weights)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON results")
    args = ap.parse_args()
    if min(args.workers) < 1 or args.steps < 1 or args.seeds < 1:
        sys.exit("--workers, --steps and --seeds take counts of 1 or more")
    if args.full_steps < args.steps:
        sys.exit(f"--full-steps ({args.full_steps}) must be at least --steps ({args.steps})")
    device = resolve_device(args.device)
    counts = [1] + sorted(set(args.workers) - {1})
    with tempfile.TemporaryDirectory() as d:
        store = f"{d}/pack.zarr"
        make_store(store, args, device)
        rows = []
        for k in counts:
            rows.append(arm(store, f"{d}/w{k}", k, args))
            print(f"  measured: {k} run(s) at once: {rows[-1]['runs_per_hour']:,.0f} runs/hour, "
                  f"{rows[-1]['projected_runs_per_hour']:,.1f} at {args.full_steps} steps", flush=True)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"\nleave-one-domain-out sweep ({rows[0]['runs']} runs), {args.recipe}, resnet18 at {args.size}px, batch "
          f"{args.batch}, {args.steps} steps per run, device {dev}")
    print(f"{'runs at once':>12} {'wall s':>8} {'steps/s/run':>12} {'runs/hour':>10} "
          f"{f'at {args.full_steps} steps':>16} {'vs 1':>6}")
    one = rows[0]["projected_runs_per_hour"]
    for r in rows:
        print(f"{r['workers']:>12} {r['wall_s']:>8.1f} {r['steps_per_s_per_run']:>12.2f} {r['runs_per_hour']:>10.0f} "
              f"{r['projected_runs_per_hour']:>16.1f} {r['projected_runs_per_hour'] / one:>6.2f}")
    write_json(Path(args.out) / f"pack-{'gpu' if device.type == 'cuda' else 'cpu'}.json",
               {**vars(args), "device": dev, "rows": rows})


if __name__ == "__main__":
    main()
