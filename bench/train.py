"""Student training speed with the cache against the same training with the teacher run online.

    python bench/train.py [--student resnet18] [--size 112] [--teacher ViT-B-32] [--steps 30]

Both arms run the same ``train`` loop on the same synthetic store and batches; the online arm uses
the ``teacher_online`` target provider, which renders each view at the teacher's input size and runs
the teacher on it, every step (what a cache-less run pays).
Head-only: the VL2V-ADiP align step on cached backbone features. Random weights; prints a table
and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedcache.config import CanvasConfig, DatasetConfig, ExtractConfig, TeacherConfig, TextConfig, ViewsConfig  # noqa: E402
from embedcache.extract import extract  # noqa: E402
from embedcache.teachers import build_teacher  # noqa: E402
from embedcache.students.features import cache_features  # noqa: E402
from embedcache.students.models import StudentConfig  # noqa: E402
from embedcache.students.train import TrainConfig, train  # noqa: E402


def steps_per_s(cfg: TrainConfig, teacher=None) -> float:
    """Training steps per second of the loop itself (store loading, model building and saving excluded)."""
    res = train(cfg, log=lambda _m: None, teacher=teacher)
    return cfg.steps / res.loop_seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="ViT-B-32")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--size", type=int, default=112, help="student input size")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--head-steps", type=int, default=3000)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    tcfg = TeacherConfig(name="open_clip", model=args.teacher, pretrained=None, device=args.device)
    teacher = build_teacher(tcfg)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        store = f"{d}/bench.zarr"
        extract(ExtractConfig(dataset=DatasetConfig(name="synthetic", num_classes=8, num_domains=4,
                                                    per_class=max(1, args.images // 32), image_size=128),
                              teacher=tcfg, views=ViewsConfig(count=2), text=TextConfig(sources=("name",)),
                              canvas=CanvasConfig(size=128),
                              out=store, progress=False, batch_size=32), teacher=teacher, log=lambda _m: None)
        scfg = StudentConfig(name=args.student, input_size=args.size)

        def cfg(name, **kw):
            base = dict(store=store, recipe="li_iccv23", student=scfg, steps=args.steps, batch_size=args.batch,
                        eval_every=10**9, ckpt_every=10**9, out=f"{d}/{name}", progress=False, device=args.device)
            base.update(kw)
            return TrainConfig(**base)

        cached = steps_per_s(cfg("cached"))
        rows.append(("student step, teacher targets from the store", cached, 1.0))

        on = steps_per_s(cfg("online", targets="teacher_online", steps=max(3, args.steps // 3)), teacher=teacher)
        rows.append((f"student step + {args.teacher} teacher online", on, on / cached))

        cache_features(store, scfg, device=args.device, progress=False, log=lambda _m: None)
        head = steps_per_s(cfg("head", recipe="vl2v_adip_align", features=True, steps=args.head_steps))
        rows.append(("head-only step on cached features", head, head / cached))

    dev = torch.cuda.get_device_name() if teacher.device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"\nstudent {args.student} at {args.size}px, batch {args.batch}, recipe li_iccv23, teacher {args.teacher} "
          f"(random weights), device {dev}")
    print(f"{'what':<48} {'steps/s':>9} {'vs cached':>10}")
    for name, rate, ratio in rows:
        print(f"{name:<48} {rate:>9.2f} {ratio:>10.3f}")
    print(f"cached training is {cached / on:.1f}x faster than running the teacher online")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"train-{'gpu' if teacher.device.type == 'cuda' else 'cpu'}.json"
    path.write_text(json.dumps({"device": dev, **vars(args), "rows": [
        {"what": n, "steps_per_s": r, "ratio_vs_cached": q} for n, r, q in rows]}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
