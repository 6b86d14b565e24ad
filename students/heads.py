"""Many head-only runs at once: the heads of one head-only recipe that differ only in seed, learning
rate or weight decay, trained together on the same cached features as one vectorised model.

Small heads leave a GPU (and a CPU's BLAS) mostly idle; stacking H of them turns H tiny matrix
products per step into one batched product. Each head still draws its own batches from its own
seed, is evaluated, selected and written exactly as a separate run (each head is a ``Trainer``
whose model receives the pack's weights at evaluation points), and ends with the weights a separate
run reaches, to float32 rounding (tested). A pack has no mid-run checkpoint: it is restarted whole
if interrupted (heads run thousands of steps per second). Optimizers: the recipe's AdamW, Adam or
SGD, written out vectorised with a learning rate and weight decay per head.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from embedcache.config import to_dict
from embedcache.errors import ConfigError
from embedcache.fileio import json_digest

from .config import TrainConfig
from .features import features_key
from .losses import BatchContext
from .recipes import RECIPES
from .train import RunResult, Trainer, set_trainable, stage_loss

FREE = ("seed", "optim.lr", "optim.weight_decay")  # what may differ between the heads of a pack


def can_pack(cfg: TrainConfig) -> bool:
    return (RECIPES.get(cfg.recipe).head_only and cfg.features and cfg.averaging == "none"
            and cfg.optim.name in ("adamw", "adam", "sgd") and len(RECIPES.get(cfg.recipe).stages) == 1)


def pack_key(cfg: TrainConfig) -> str:
    """Runs with the same key can share a pack: everything but seed, lr and weight decay agrees."""
    d = to_dict(cfg)
    d.pop("seed"), d["optim"].pop("lr"), d["optim"].pop("weight_decay")
    for k in ("out", "progress", "keep_checkpoint"):
        d.pop(k)
    return json_digest(d)


class _Stack:
    """One linear layer of every head, stacked: weight (H, out, in), bias (H, out), and the optimizer state."""

    def __init__(self, layers: List[torch.nn.Linear]):
        self.weight = torch.stack([m.weight.detach() for m in layers]).clone().requires_grad_(True)
        self.bias = torch.stack([m.bias.detach() for m in layers]).clone().requires_grad_(True)
        self.state: Dict[str, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (H, B, in) -> (H, B, out)
        return torch.baddbmm(self.bias[:, None, :], x, self.weight.transpose(1, 2))

    def params(self):
        return (self.weight, self.bias)

    def write_to(self, layers: List[torch.nn.Linear]) -> None:
        with torch.no_grad():
            for h, m in enumerate(layers):
                m.weight.copy_(self.weight[h])
                m.bias.copy_(self.bias[h])


def _vector(values, like: torch.Tensor) -> torch.Tensor:
    """(H,) values broadcast over a stacked parameter's other dimensions."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


def optimizer_step(name: str, p: torch.Tensor, state: Dict, lr, wd, cfg, step: int) -> None:
    """torch.optim's AdamW / Adam / SGD update of a stacked parameter, with per-head lr and weight decay."""
    g = p.grad
    if g is None:
        return  # like torch.optim: a parameter without a gradient is left alone (weight decay included)
    lr, wd = _vector(lr, p), _vector(wd, p)
    with torch.no_grad():
        if name == "sgd":
            g = g + wd * p
            buf = state.get("momentum")
            buf = g.clone() if buf is None else buf.mul_(cfg.momentum).add_(g)
            state["momentum"] = buf
            p.sub_(lr * (buf if cfg.momentum else g))
            return
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        if name == "adamw":
            p.mul_(1 - lr * wd)
        else:
            g = g + wd * p
        m = state.setdefault("exp_avg", torch.zeros_like(p))
        v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        denom = (v.sqrt() / (bc2 ** 0.5)).add_(eps)
        p.sub_((lr / bc1) * m / denom)


def train_heads(cfgs: List[TrainConfig], log: Callable[[str], None] = print,
                should_stop: Optional[Callable[[], bool]] = None) -> List[RunResult]:
    """Train the runs of one pack together (see the module docstring); returns one result per run."""
    if not cfgs:
        return []
    bad = [c for c in cfgs if not can_pack(c)]
    if bad or len({pack_key(c) for c in cfgs}) > 1:
        raise ConfigError("a head pack takes head-only runs (features=true, no averaging, one stage, adamw/adam/sgd) "
                          f"that differ only in {', '.join(FREE)}")
    t0 = time.time()
    first = Trainer(cfgs[0], log=log)
    trainers = [first] + [Trainer(c, log=log, shared=first) for c in cfgs[1:]]
    if len({features_key(t.model) for t in trainers}) > 1:
        raise ConfigError("the heads of a pack must share one frozen backbone (the same student weights); "
                          "give student.pretrained, or train these runs separately")
    cfg, stage = first.cfg, first.recipe.stages[0]
    for t in trainers:
        t.run_dir.path.mkdir(parents=True, exist_ok=True)
        t.write_run_files()
        set_trainable(t.model, stage)
    heads = _Stack([t.model.head for t in trainers]) if isinstance(first.model.head, torch.nn.Linear) else None
    cls = _Stack([t.model.classifier for t in trainers]) if first.model.classifier is not None else None
    stacks = [s for s in (heads, cls) if s is not None]
    text, data, n = first.text, first.data, len(trainers)
    factors = [t.sched.lr_lambdas[0] for t in trainers]
    base_lr = [t.cfg.optim.lr for t in trainers]
    wd = [t.cfg.optim.weight_decay for t in trainers]
    t_loop = time.time()
    for step in range(cfg.steps):
        draws = [data.sample(step, t.cfg.seed, cfg.batch_size, cfg.views_used) for t in trainers]
        idx, views = np.concatenate([d[0] for d in draws]), np.concatenate([d[1] for d in draws])
        x = first.inputs(idx, views).view(n, cfg.batch_size, -1)
        tgt, y = first.targets(idx, views)
        tgt, y = tgt.view(n, cfg.batch_size, -1), y.view(n, cfg.batch_size)
        s = heads(x) if heads is not None else x
        logits = cls(x) if cls is not None else None
        total, parts = 0.0, []
        for h in range(n):
            loss, part = stage_loss(stage, BatchContext(s[h], tgt[h], text, y[h], None if logits is None else logits[h]))
            total = total + loss
            parts.append({"loss": loss, **part})
        for st in stacks:
            for p in st.params():
                p.grad = None
        total.backward()
        lrs = [b * f(step) for b, f in zip(base_lr, factors)]
        for st in stacks:
            for k, p in enumerate(st.params()):
                optimizer_step(cfg.optim.name, p, st.state.setdefault(k, {}), lrs, wd, cfg.optim, step + 1)
        for t, part in zip(trainers, parts):
            for name, v in part.items():
                v = v.detach().float()
                t.running[name] = t.running[name] + v if name in t.running else v
            t.n_running += 1
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            for t, lr_next in zip(trainers, [b * f(done) for b, f in zip(base_lr, factors)]):
                t.opt.param_groups[0]["lr"] = lr_next
            if heads is not None:
                heads.write_to([t.model.head for t in trainers])
            if cls is not None:
                cls.write_to([t.model.classifier for t in trainers])
            for t in trainers:
                t.check_finite(done)
                t.evaluate(done, 0, stage)
        if should_stop is not None and should_stop() and done < cfg.steps:
            from .train import RunInterrupted

            raise RunInterrupted(f"head pack stopped at step {done}; rerun to train it again")
    loop = time.time() - t_loop
    return [t.finish(t0, loop) for t in trainers]
