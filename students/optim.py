"""Optimizers and learning-rate schedules (registries): ``OPTIMIZERS[name](cfg, params)`` and
``SCHEDULES[name](cfg, steps) -> factor(step)``, a multiplier of ``cfg.lr`` after warm-up."""
from __future__ import annotations

import math
from typing import Callable, List

import torch

from embedcache.registry import Registry

from .config import OptimConfig

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


@OPTIMIZERS.register("sgd")
def sgd(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _fused(cls, params, **kw) -> torch.optim.Optimizer:
    """The fused (single-kernel) implementation where torch has one for these parameters: on 2 CPU
    cores it steps a 512x512 head about 3x faster than the per-op one, which dominated head-only steps."""
    params = list(params)
    try:
        return cls(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **kw)


@OPTIMIZERS.register("adamw")
def adamw(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    return _fused(torch.optim.AdamW, params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def adam(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    return _fused(torch.optim.Adam, params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@SCHEDULES.register("cosine")
def cosine(cfg: OptimConfig, steps: int) -> Callable[[int], float]:
    span = max(1, steps - cfg.warmup_steps)
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))


def milestone_steps(cfg: OptimConfig, steps: int) -> List[int]:
    """The steps a step schedule decays at: fractions written rounded (0.6666667) still land on their step."""
    return [round(m * steps) for m in cfg.milestones]


@SCHEDULES.register("step")
def step_decay(cfg: OptimConfig, steps: int) -> Callable[[int], float]:
    at = milestone_steps(cfg, steps)
    return lambda step: cfg.gamma ** sum(step >= a for a in at)


@SCHEDULES.register("constant")
def constant(cfg: OptimConfig, steps: int) -> Callable[[int], float]:
    return lambda step: 1.0


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name)(cfg, params)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)``, with each per-parameter tensor laid out as its parameter. torch
    restores dtype and device, not the memory layout, and the fused CPU kernel pairs the memory of
    moments and weights element by element: moments saved channels-last (a run begun on a GPU) resumed
    into a plain model (on a CPU) trained silently otherwise (CUDA's kernel refuses the mix)."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def optimizer_step(opt: torch.optim.Optimizer) -> None:
    """``opt.step()``; for torch's fused Adam/AdamW, its kernel called directly. ``step()`` wraps the kernel
    in Python (hooks, profiler records, grouping tensors by device and dtype) that took as long as the
    kernel itself on a 512x512 head on 2 CPU cores (0.31 vs 0.16 ms a step), which counts in head-only
    steps and in packs (one step per head). The same kernel with the same arguments: bit-identical
    results and state (tested). The first step (torch creates the state), hooks, and any setting this
    does not cover go through ``step()``."""
    calls = _direct_fused_calls(opt)
    if calls is None:
        opt.step()
        return
    with torch.no_grad():
        for kernel, steps, args, kw in calls:
            torch._foreach_add_(steps, 1)
            kernel(*args, **kw)


def _direct_fused_calls(opt: torch.optim.Optimizer):
    """(kernel, state steps, arguments, keywords) for each parameter group, or None where the direct
    call would not be exactly what ``step()`` does."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW) or _has_hooks(opt):
        return None  # exact types: a subclass may override step()
    if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
        return None  # a GradScaler's arguments: step() passes them to the kernel
    calls = []
    for g in opt.param_groups:
        if not g.get("fused") or any(g.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable")):
            return None
        if not isinstance(g["lr"], float) or not all(isinstance(b, float) for b in g["betas"]):
            return None
        ps = [p for p in g["params"] if p.grad is not None]
        if not ps:
            continue
        states = [opt.state.get(p) for p in ps]
        if not all(st and "exp_avg" in st for st in states):
            return None  # the first step: torch creates the state
        if len({(p.device, p.dtype) for p in ps}) > 1 or any(p.grad.is_sparse or p.is_complex() for p in ps):
            return None
        decoupled = isinstance(opt, torch.optim.AdamW) or g.get("decoupled_weight_decay", False)
        kernel = getattr(torch, "_fused_adamw_" if decoupled else "_fused_adam_", None)
        if kernel is None:
            return None
        steps = [st["step"] for st in states]
        args = (ps, [p.grad for p in ps], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [], steps)
        kw = dict(lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1], weight_decay=g["weight_decay"], eps=g["eps"],
                  amsgrad=False, maximize=False)
        calls.append((kernel, steps, args, kw))
    return calls


def _has_hooks(opt: torch.optim.Optimizer) -> bool:
    from torch.optim import optimizer as o

    return bool(getattr(opt, "_optimizer_step_pre_hooks", None) or getattr(opt, "_optimizer_step_post_hooks", None)
                or getattr(o, "_global_optimizer_pre_hooks", None) or getattr(o, "_global_optimizer_post_hooks", None))


def build_scheduler(cfg: OptimConfig, opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    after = SCHEDULES.get(cfg.schedule)(cfg, steps)

    def factor(step: int) -> float:
        return (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else after(step)
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
