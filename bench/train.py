"""Student training speed from the cache, against a bare student step and against the teacher run online.

    python bench/train.py [--student resnet18] [--size 112] [--teacher ViT-B-32] [--steps 30] [--heads 16] [--rounds 3]

In one run, on one synthetic store: (1) a bare student step (forward, loss, backward, optimizer) on
pre-made tensors already on the device: the hardware's own limit; (2) the cached ``train`` loop
(inputs rebuilt from the stored canvases, targets from the store); (3) the same loop with the
``teacher_online`` target provider (each view rendered at the teacher's size and encoded every
step: what a cache-less run pays), and the cached loop on views with colour jitter and grayscale
(the student renders each view's stored colour change too); (4) a bare head step (linear head, VL2V-ADiP's align loss,
fused AdamW on pre-made tensors) through autograd and ``step()``, and in closed form with the direct
fused-kernel call (``headstep.py``, ``optim.py``: the loop's own math), and the ``train`` loop's head-only steps on cached features, also with closed forms
and the direct optimizer call switched off (the loop as it was);
(5) a pack of ``--heads`` head-only runs trained as one vectorised model (head-steps/s counts
every head's step). The head-step arms (4, 5) take turns over ``--rounds`` rounds, medians
reported. "vs bare" compares student steps with the bare student step and head steps with the
closed-form bare head step. Random weights. Prints a table and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import contextlib
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
from embedcache.teachers import build_teacher  # noqa: E402
from embedcache.students.config import OptimConfig  # noqa: E402
from embedcache.students.features import cache_features  # noqa: E402
from embedcache.students.heads import train_heads  # noqa: E402
from embedcache.students.headstep import HeadStep  # noqa: E402
from embedcache.students.losses import LOSSES, BatchContext  # noqa: E402
from embedcache.students.models import StudentConfig, build_student  # noqa: E402
from embedcache.students.optim import build_optimizer, optimizer_step  # noqa: E402
from embedcache.students.recipes import RECIPES  # noqa: E402
from embedcache.students.train import TrainConfig, train  # noqa: E402
from _common import measured, write_json  # noqa: E402  (bench/ is on sys.path when a benchmark runs)


def steps_per_s(cfg: TrainConfig, teacher=None) -> float:
    """Training steps per second of the loop itself (store loading, model building and saving excluded)."""
    res = train(cfg, log=lambda _m: None, teacher=teacher)
    return cfg.steps / res.loop_seconds


def bare_steps_per_s(student: StudentConfig, dim: int, batch: int, steps: int, device: torch.device) -> float:
    """The student's own step on tensors made once on the device: no data path at all."""
    model = build_student(student, dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(OptimConfig(), model.parameters())  # the loop's own optimizer (fused AdamW)
    x = torch.randn(batch, 3, model.input_size, model.input_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, dim, device=device), dim=-1)
    y = torch.randint(0, 8, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            s = model(x)["emb"]
            ctx = BatchContext(s, t, text, y)
            loss = sum(LOSSES.get(n)(ctx) for n in ("cls", "vlalign", "mse", "imcst"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed(step, steps, device)


def bare_head_steps_per_s(feat_dim: int, dim: int, batch: int, steps: int, device: torch.device, closed: bool) -> float:
    """VL2V-ADiP's align step on tensors made once: a linear head, its loss and fused AdamW, nothing else;
    through autograd and torch's ``step()`` (what a plain PyTorch step costs) or in closed form with the
    direct optimizer call (the loop's own math, headstep.py and optim.py)."""
    head = torch.nn.Linear(feat_dim, dim).to(device)
    opt = build_optimizer(OptimConfig(), head.parameters())
    x = torch.randn(batch, feat_dim, device=device)
    t = torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, dim, device=device), dim=-1)
    y = torch.randint(0, 8, (batch,), device=device)
    closed_step = HeadStep(head, None, RECIPES.get("vl2v_adip_align").stages[0], text) if closed else None

    def step():
        if closed_step is not None:  # the loop's math and its direct fused-kernel call
            closed_step(x, t, y)
            optimizer_step(opt)
        else:
            loss = LOSSES.get("vl2v_adip")(BatchContext(head(x), t, text, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return _timed(step, steps, device)


@contextlib.contextmanager
def autograd_heads():
    """The train loop as it was before closed-form head steps: autograd and torch's own optimizer step()."""
    import embedcache.students.train as loop

    applies, step = HeadStep.__dict__["applies"], loop.optimizer_step  # the staticmethod itself
    HeadStep.applies, loop.optimizer_step = staticmethod(lambda *a: False), lambda opt: opt.step()
    try:
        yield
    finally:
        HeadStep.applies, loop.optimizer_step = applies, step


def interleaved(arms, rounds: int) -> dict:
    """Each arm's median steps/s over ``rounds`` rounds in which the arms take turns."""
    got = {k: [] for k in arms}
    for r in range(rounds):
        for k, arm in arms.items():
            got[k].append(arm(r))
    return {k: statistics.median(v) for k, v in got.items()}


def _timed(step, steps: int, device: torch.device) -> float:
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="ViT-B-32")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--size", type=int, default=112, help="student input size")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--head-steps", type=int, default=1500)
    ap.add_argument("--heads", type=int, default=16, help="heads in the vectorised pack")
    ap.add_argument("--rounds", type=int, default=3, help="turns the head-step arms take (medians reported)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--canvas", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON results")
    args = ap.parse_args()

    device = resolve_device(args.device)
    tcfg = TeacherConfig(name="open_clip", model=args.teacher, pretrained=None, device=args.device,
                         precision="bf16" if device.type == "cuda" else "fp32")
    teacher = build_teacher(tcfg)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        def make_store(name: str, views: ViewsConfig) -> str:
            extract(ExtractConfig(dataset=DatasetConfig(name="synthetic", num_classes=8, num_domains=4,
                                                        per_class=max(1, args.images // 32), image_size=args.canvas),
                                  teacher=tcfg, views=views, text=TextConfig(sources=("name",)),
                                  canvas=CanvasConfig(size=args.canvas),
                                  out=f"{d}/{name}", progress=False, batch_size=32), teacher=teacher, log=lambda _m: None)
            return f"{d}/{name}"

        store = make_store("bench.zarr", ViewsConfig(count=2))
        scfg = StudentConfig(name=args.student, input_size=args.size)

        def cfg(name, **kw):
            base = dict(store=store, recipe="li_iccv23", student=scfg, steps=args.steps, batch_size=args.batch,
                        eval_every=10**9, ckpt_every=10**9, out=f"{d}/{name}", progress=False, device=args.device)
            base.update(kw)
            return TrainConfig(**base)

        bare = bare_steps_per_s(scfg, teacher.embed_dim, args.batch, args.steps, device)
        measured(rows, "bare student step, tensors already on the device", bare, 1.0)
        cached = steps_per_s(cfg("cached"))
        measured(rows, "student step, teacher targets from the store", cached, cached / bare)
        # the same views with VL2V-ADiP's colour augmentation (configs/extract/pacs-conse-dg.yaml): the student's
        # renderer applies each view's stored jitter and grayscale too
        colour = make_store("colour.zarr", ViewsConfig(count=2, color_jitter=0.3, grayscale=0.1))
        coloured = steps_per_s(cfg("colour", store=colour))
        measured(rows, "same, views with colour jitter and grayscale", coloured, coloured / bare)
        on = steps_per_s(cfg("online", targets="teacher_online", steps=max(3, args.steps // 3)), teacher=teacher)
        measured(rows, f"student step + {args.teacher} teacher online", on, on / bare)

        from safetensors.torch import save_file

        weights = Path(d) / "backbone.safetensors"
        save_file({k: v.contiguous() for k, v in build_student(scfg, 8).backbone.state_dict().items()}, str(weights))
        fixed = StudentConfig(name=args.student, input_size=args.size, pretrained=str(weights))
        cache_features(store, fixed, device=args.device, progress=False, log=lambda _m: None)
        feat_dim = build_student(fixed, teacher.embed_dim).feat_dim
        head_cfg = dict(recipe="vl2v_adip_align", student=fixed, features=True, steps=args.head_steps)

        def loop_as_before(r):
            with autograd_heads():
                return steps_per_s(cfg(f"head_ag{r}", **head_cfg))

        def pack(r):
            runs = [cfg(f"pack{r}-{k}", seed=k, optim=OptimConfig(lr=10 ** (-2 - k % 3)), **head_cfg) for k in range(args.heads)]
            return args.heads * args.head_steps / train_heads(runs, log=lambda _m: None)[0].loop_seconds

        # head-step figures move with this machine's load from one second to the next: the arms take
        # turns over --rounds rounds and each row is the median of its rounds
        m = interleaved({
            "autograd": lambda r: bare_head_steps_per_s(feat_dim, teacher.embed_dim, args.batch, args.head_steps, device, closed=False),
            "bare": lambda r: bare_head_steps_per_s(feat_dim, teacher.embed_dim, args.batch, args.head_steps, device, closed=True),
            "head": lambda r: steps_per_s(cfg(f"head{r}", **head_cfg)),
            "head_ag": loop_as_before,
            "pack": pack}, args.rounds)
        bare_head, head, head_ag = m["bare"], m["head"], m["head_ag"]
        measured(rows, f"bare head step ({feat_dim} -> {teacher.embed_dim}), autograd", m["autograd"], m["autograd"] / bare_head)
        measured(rows, "bare head step, closed form (the loop's math)", bare_head, 1.0)
        measured(rows, "head-only step on cached features", head, head / bare_head)
        measured(rows, "same, autograd and torch's step() (as before)", head_ag, head_ag / bare_head)
        measured(rows, f"head-only steps in a pack of {args.heads} heads", m["pack"], m["pack"] / bare_head)

    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"\nstudent {args.student} at {args.size}px, batch {args.batch}, recipe li_iccv23, teacher {args.teacher} "
          f"(random weights, {tcfg.precision}), device {dev}")
    print(f"{'what':<52} {'steps/s':>10} {'vs bare':>8}")
    for name, rate, ratio in rows:
        print(f"{name:<52} {rate:>10.2f} {ratio:>8.3f}")
    speed = cached / on
    print(f"cached training runs {speed:.1f}x the steps/s of running the teacher online"
          f"{'' if speed >= 1 else ' (slower: too few steps timed to warm up? raise --steps)'}; "
          f"closed-form head-only training is {head / head_ag:.2f}x the autograd loop; "
          f"the pack trains {rows[-1][1] / head:.1f}x more head-steps/s than one head at a time")
    write_json(Path(args.out) / f"train-{'gpu' if device.type == 'cuda' else 'cpu'}.json",
               {**vars(args), "device": dev, "rows": [{"what": n, "steps_per_s": r, "ratio_vs_bare": q} for n, r, q in rows]})


if __name__ == "__main__":
    main()
