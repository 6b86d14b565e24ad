"""Training a student from a store: one function, ``train(cfg)``, writing one run directory.

run_dir/config.json    the resolved config (and the store's key)
run_dir/metrics.jsonl  one row per evaluation point: step, stage, lr, losses, val_top1
run_dir/checkpoint.pt  model, optimizer, schedule, weight average, step (resume point)
run_dir/model.safetensors  final weights (the weight average when averaging is on)
run_dir/summary.json, run_dir/done   written last

Batches are a function of (seed, step) alone and the torch seed is reset every step, so a run
resumed from its checkpoint ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from embedcache._device import resolve_device
from embedcache.config import to_dict
from embedcache.errors import ConfigError, StoreMismatchError
from evaluate.metrics import nearest_label, top1

from .averaging import LossValley, SegmentMean
from .data import SplitConfig, StoreData
from .losses import LOSSES, BatchContext
from .models import Student, StudentConfig, build_student
from .recipes import RECIPES, Recipe, Stage


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"                 # sgd | adamw | adam
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9               # sgd only
    schedule: str = "cosine"            # cosine | step | constant
    milestones: Tuple[float, ...] = (1 / 3, 2 / 3)  # step schedule: fractions of the run
    gamma: float = 0.1
    warmup_steps: int = 0


@dataclass(frozen=True)
class SwadConfig:
    n_converge: int = 3         # evaluations without improvement that start the valley
    n_tolerance: int = 6        # evaluations a segment waits before it is judged
    tolerance_ratio: float = 0.3


@dataclass(frozen=True)
class TrainConfig:
    store: Optional[str] = None
    recipe: str = "li_iccv23"
    student: StudentConfig = field(default_factory=StudentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    text_source: Optional[str] = None   # default: the recipe's
    steps: int = 200
    batch_size: int = 32
    views_used: Optional[int] = None    # draw from the first k views (None: all stored views)
    averaging: str = "none"             # none | swa (at each eval point) | swad (loss-valley, students/averaging.py)
    average_start: float = 0.5          # fraction of the run after which weights are averaged (0 for SWAD as published)
    swad: SwadConfig = field(default_factory=SwadConfig)
    eval_every: int = 50
    ckpt_every: int = 50
    amp: bool = True                    # bf16 autocast on CUDA; ignored on CPU
    seed: int = 0
    device: str = "auto"
    features: bool = False              # head-only: train on cached student features (embedcache features)
    out: Optional[str] = None           # run directory (default runs/<recipe>-<student>-<hash>)
    progress: bool = True


@dataclass
class RunResult:
    out: str
    val_top1: Optional[float]
    steps: int
    seconds: float                      # the whole call, setup and saving included
    resumed_from: int = 0
    loop_seconds: float = 0.0           # the training steps alone (what a steps/s figure should use)


def run_name(cfg: TrainConfig) -> str:
    """<recipe>-<student>-<hash of the sorted-key JSON config, output and display settings excluded>."""
    d = to_dict(cfg)
    for k in ("out", "progress"):
        d.pop(k)
    h = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.recipe}-{cfg.student.name.replace(':', '_')}-{h}"


def _optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.name!r}; use sgd, adamw or adam")


def _lr_factor(cfg: OptimConfig, steps: int) -> Callable[[int], float]:
    if cfg.schedule not in ("cosine", "step", "constant"):
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; use cosine, step or constant")

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            p = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m * steps for m in cfg.milestones)
        return 1.0
    return factor


def _stage_ends(recipe: Recipe, steps: int) -> List[int]:
    total = sum(s.fraction for s in recipe.stages)
    ends, acc = [], 0.0
    for s in recipe.stages:
        acc += s.fraction
        ends.append(int(round(steps * acc / total)))
    ends[-1] = steps
    return ends


def _set_trainable(model: Student, stage: Stage) -> None:
    """head: backbone frozen (eval mode, BN statistics fixed); backbone: projection frozen."""
    train_backbone = stage.train in ("all", "backbone")
    for p in model.backbone.parameters():
        p.requires_grad_(train_backbone)
    for p in model.head.parameters():
        p.requires_grad_(stage.train in ("all", "head"))
    if model.classifier is not None:
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    model.train()
    if not train_backbone:
        model.backbone.eval()


def _forward(model: Student, data: StoreData, feats: Optional[np.ndarray], idx, views, device, frozen: bool):
    if feats is not None:
        return model.from_features(torch.from_numpy(feats[idx, views]).to(device))
    x = data.inputs(idx, views, model.input_size, model.mean, model.std, device)
    if frozen:  # a frozen backbone needs no graph
        with torch.no_grad():
            f = model.features(x)
        return model.from_features(f)
    return model(x)


@torch.no_grad()
def validate(model: Student, data: StoreData, rows: np.ndarray, feats: Optional[np.ndarray], predict_with: str,
             device: torch.device, stage: Optional[Stage] = None, batch: int = 256) -> Tuple[np.ndarray, Optional[float]]:
    """Predicted training-class index of each row (view 0: nearest class text, or the classifier), and
    the mean of ``stage``'s recipe loss over the rows (None without a stage)."""
    modes = [(m, m.training) for m in model.modules()]  # a frozen backbone must stay in eval mode after
    model.eval()
    preds, loss_sum = [], 0.0
    text = torch.from_numpy(data.text).to(device)
    for i in range(0, len(rows), batch):
        r = rows[i:i + batch]
        v0 = np.zeros(len(r), int)
        o = _forward(model, data, feats, r, v0, device, frozen=True)
        preds.append(o["logits"].argmax(1).cpu().numpy() if predict_with == "linear"
                     else nearest_label(o["emb"].float().cpu().numpy(), data.text))
        if stage is not None:
            t, y = data.targets_for(r, v0, device)
            ctx = BatchContext(o["emb"].float(), t, text, y, o["logits"])
            loss_sum += len(r) * float(sum(w * LOSSES.get(n)(ctx, **stage.loss_args.get(n, {})) for n, w in stage.losses.items()))
    for m, mode in modes:
        m.training = mode
    pred = np.concatenate(preds) if preds else np.zeros(0, int)
    return pred, (loss_sum / len(rows) if stage is not None and len(rows) else None)


def _reseed(seed: int, device: torch.device) -> None:
    """Seed the generators in use. Not torch.manual_seed: without initialised CUDA it queues a lazy
    CUDA seeding call with a formatted stack trace every time (measured: a third of a head-only
    step, and a queue that grows for the whole run)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig, on_step: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = print) -> RunResult:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .features import load_features

    t0 = time.time()
    if not cfg.store:
        raise ConfigError("no store given; pass --store PATH (made by `embedcache extract`)")
    recipe = RECIPES.get(cfg.recipe)
    if cfg.averaging not in ("none", "swa", "swad"):
        raise ConfigError(f"unknown averaging {cfg.averaging!r}; use none, swa or swad")
    if cfg.averaging == "swad" and cfg.split.val_fraction <= 0:
        raise ConfigError("averaging=swad picks its window by validation loss; set split.val_fraction > 0")
    out = Path(cfg.out or Path("runs") / run_name(cfg))
    if (out / "done").exists():
        s = json.loads((out / "summary.json").read_text())
        log(f"{out} is already done (val top-1 {s['val_top1']})")
        return RunResult(str(out), s["val_top1"], s["steps"], 0.0)
    data = StoreData(cfg.store, cfg.text_source or recipe.text_source, cfg.split)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_student(cfg.student, data.dim, len(data.train_class_ids) if recipe.classifier else 0).to(device)
    feats = None
    if cfg.features:
        if not recipe.head_only:
            raise ConfigError(f"head-only training (features=true) needs a recipe that trains only the head; "
                              f"{recipe.name} trains more; head-only recipes: "
                              f"{', '.join(n for n in RECIPES.names() if RECIPES.get(n).head_only)}")
        feats = load_features(cfg.store, cfg.student, model)
    opt = _optimizer(cfg.optim, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg.optim, cfg.steps))
    avg = torch.optim.swa_utils.AveragedModel(model, use_buffers=True) if cfg.averaging == "swa" else None
    segment, valley = SegmentMean(), LossValley(cfg.swad.n_converge, cfg.swad.n_tolerance, cfg.swad.tolerance_ratio)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    start = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state["store_key"] != data.key:
            raise StoreMismatchError(f"run {out} was trained on another store (key {state['store_key']}, this one "
                                     f"{data.key}); use another --out")
        model.load_state_dict(state["model"]); opt.load_state_dict(state["optim"]); sched.load_state_dict(state["sched"])
        if avg is not None and state.get("avg") is not None:
            avg.load_state_dict(state["avg"])
        if state.get("valley") is not None:
            valley.load_state_dict(state["valley"])
            segment.sum, segment.n = state["segment"]["sum"], state["segment"]["n"]
        start = int(state["step"])
        kept = [ln for ln in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
                if json.loads(ln)["step"] <= start]
        metrics_path.write_text("".join(k + "\n" for k in kept))  # drop rows logged after the checkpoint
        log(f"resuming {out} from step {start}")
    (out / "config.json").write_text(json.dumps({**to_dict(cfg), "store_key": data.key, "out": str(out)}, indent=2))
    (out / "split.json").write_text(json.dumps({  # what the run trained on, for evaluation without this package
        "train_idx": data.train_idx.tolist(), "val_idx": data.val_idx.tolist(), "test_idx": data.test_idx.tolist(),
        "holdout_domains": list(cfg.split.holdout_domains), "seen_classes": data.train_class_ids.tolist(),
        "text_source": cfg.text_source or recipe.text_source, "predict": recipe.predict}))
    ends = _stage_ends(recipe, cfg.steps)
    amp = cfg.amp and device.type == "cuda"
    avg_from = int(cfg.average_start * cfg.steps)
    text = torch.from_numpy(data.text).to(device)
    bar = tqdm(total=cfg.steps, initial=start, desc=out.name, unit="step", disable=not cfg.progress, dynamic_ncols=True)
    stage_i, running, n_running, val = None, {}, 0, None
    t_loop = time.time()
    try:
        for step in range(start, cfg.steps):
            si = next(i for i, e in enumerate(ends) if step < e)
            stage = recipe.stages[si]
            if si != stage_i:
                _set_trainable(model, stage)
                stage_i = si
            idx, views = data.sample(step, cfg.seed, cfg.batch_size, cfg.views_used)
            _reseed(cfg.seed * 1_000_003 + step, device)  # dropout / drop-path draws, reproducible on resume
            t, y = data.targets_for(idx, views, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                o = _forward(model, data, feats, idx, views, device, frozen=stage.train == "head")
                ctx = BatchContext(o["emb"], t, text, y, o["logits"])
                parts = {n: LOSSES.get(n)(ctx, **stage.loss_args.get(n, {})) for n in stage.losses}
                loss = sum(w * parts[n] for n, w in stage.losses.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for n, v in {"loss": loss, **parts}.items():
                running[n] = running.get(n, 0.0) + float(v.detach())
            n_running += 1
            last = step + 1 == cfg.steps
            if avg is not None and step >= avg_from and ((step + 1) % cfg.eval_every == 0 or last):
                avg.update_parameters(model)
            if cfg.averaging == "swad" and step >= avg_from:
                segment.add(model.state_dict())
            if (step + 1) % cfg.eval_every == 0 or last:
                val, val_loss = None, None
                if len(data.val_idx):
                    pred, val_loss = validate(model, data, data.val_idx, feats, recipe.predict, device, stage)
                    val = top1(pred, data.targets[data.val_idx])
                    seg = segment.take() if cfg.averaging == "swad" else None
                    if seg is not None:
                        valley.update(seg, val_loss)
                row = {"step": step + 1, "stage": si, "lr": sched.get_last_lr()[0], "val_top1": val, "val_loss": val_loss,
                       **{k: v / n_running for k, v in running.items()}}
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                running, n_running = {}, 0
                bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{val:.3f}" if val is not None else "-")
            if (step + 1) % cfg.ckpt_every == 0 or last:
                _atomic_save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                              "avg": avg.state_dict() if avg is not None else None, "step": step + 1,
                              "valley": valley.state_dict() if cfg.averaging == "swad" else None,
                              "segment": {"sum": segment.sum, "n": segment.n},
                              "store_key": data.key}, ckpt_path)
            bar.update(1)
            if on_step is not None:
                on_step(step + 1)
    finally:
        bar.close()
    loop_seconds = time.time() - t_loop
    final = model
    if avg is not None and int(avg.n_averaged) > 0:
        final = avg.module
    if cfg.averaging == "swad":
        state = valley.result()
        if state is None:
            log(f"SWAD: the validation loss never settled in {cfg.steps} steps; keeping the last weights")
        else:
            model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
            log(f"SWAD averaged evaluation segments {valley.chosen}")
    if final is not model or (cfg.averaging == "swad" and valley.final is not None):
        val = top1(validate(final, data, data.val_idx, feats, recipe.predict, device)[0], data.targets[data.val_idx]) \
            if len(data.val_idx) else None
    save_file({k: v.detach().contiguous().cpu() for k, v in final.state_dict().items()}, str(out / "model.safetensors"))
    summary = {"val_top1": val, "steps": cfg.steps, "loop_seconds": loop_seconds, "swad_segments": valley.chosen if cfg.averaging == "swad" else None, "seconds": time.time() - t0, "store_key": data.key,
               "recipe": recipe.name, "student": cfg.student.name, "train_classes": [data.classes[i] for i in data.train_class_ids]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "done").write_text("ok\n")  # last: the run is finished
    return RunResult(str(out), val, cfg.steps, time.time() - t0, start, loop_seconds)
