"""Many head-only runs at once: the heads of one head-only recipe that differ only in seed, learning
rate or weight decay, trained together on the same cached features as one vectorised model.

Small heads leave a GPU (and a CPU's BLAS) mostly idle; stacking H of them turns H tiny matrix
products per step into one batched product, and the loss of every head is one vectorised call: the
closed forms of ``headstep.py`` on (H, B, D) tensors where the stage has them, else a
``torch.func.vmap`` of the recipe's own loss through autograd. Each head is a ``Trainer``: its model's head
parameters are views of the stack, so its own optimizer (the fused AdamW of a separate run) and
learning-rate schedule update them in place, and it is evaluated, selected and written exactly as a
separate run. Each head draws its own batches from its own seed and ends with the weights a
separate run reaches, to float32 rounding (tested). A pack has no mid-run checkpoint: it is
restarted whole if interrupted (heads run thousands of steps per second).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch

from embedcache.config import flatten, to_dict
from embedcache.errors import ConfigError, TrainingError
from embedcache.fileio import json_digest

from .config import TrainConfig
from .headstep import HeadStep, linear
from .losses import BatchContext
from .optim import optimizer_step
from .recipes import RECIPES
from .rundir import RunDir
from .identity import NOT_IN_NAME
from .train import RunResult, Trainer, add_running, one_trainer, set_trainable, settled_time, stage_loss

FREE = ("seed", "optim.lr", "optim.weight_decay")  # what may differ between the heads of a pack


def can_pack(cfg: TrainConfig) -> bool:
    return (RECIPES.get(cfg.recipe).head_only and cfg.features and cfg.averaging == "none"
            and len(RECIPES.get(cfg.recipe).stages) == 1)


def _pack_fields(cfg: TrainConfig) -> Dict[str, object]:
    """The settings the heads of a pack share: all but what may differ and what changes no result."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if k not in FREE + NOT_IN_NAME}


def pack_key(cfg: TrainConfig) -> str:
    """Runs with the same key can share a pack: everything but seed, lr and weight decay agrees."""
    return json_digest(_pack_fields(cfg))  # a key within a launch, never recorded


def pack_differences(cfgs: List[TrainConfig]) -> List[str]:
    """The shared settings in which these runs differ (what keeps them from one pack), sorted."""
    fields = [_pack_fields(c) for c in cfgs]
    return sorted(k for k in set().union(*fields) if len({json_digest({"v": f.get(k)}) for f in fields}) > 1)


class _Stack:
    """One linear layer of every head stacked as one leaf tensor (weight (H, out, in), bias (H, out));
    each head's own ``nn.Linear`` parameters become views of it, so its optimizer updates the stack."""

    def __init__(self, layers: List[torch.nn.Linear]):
        self.weight = torch.stack([m.weight.detach() for m in layers]).requires_grad_(True)
        self.bias = torch.stack([m.bias.detach() for m in layers]).requires_grad_(True)
        self.layers = layers
        for h, m in enumerate(layers):
            m.weight.data, m.bias.data = self.weight.detach()[h], self.bias.detach()[h]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (H, B, in) -> (H, B, out)
        return linear(x, self.weight, self.bias)

    def zero_grad(self) -> None:
        self.weight.grad = self.bias.grad = None

    def hand_out_grads(self) -> None:
        """Each head's parameters get their slice of the stacked gradients (views, no copies); a layer
        the loss does not use keeps no gradient, so its optimizer leaves it alone, as in a separate run."""
        gw, gb = self.weight.grad, self.bias.grad
        for h, m in enumerate(self.layers):
            m.weight.grad, m.bias.grad = None if gw is None else gw[h], None if gb is None else gb[h]


def _vectorised_loss(stage, text: torch.Tensor, with_logits: bool):
    """The stage's loss of every head at once: (H, B, ...) batches in, a dict of (H,) losses out."""
    def one(s, t, y, logits):
        loss, parts = stage_loss(stage, BatchContext(s, t, text, y, logits))
        return {"loss": loss, **parts}

    return torch.func.vmap(one, in_dims=(0, 0, 0, 0 if with_logits else None))


def train_heads(cfgs: List[TrainConfig], log: Callable[[str], None] = print,
                should_stop: Optional[Callable[[], bool]] = None) -> List[Union[RunResult, TrainingError]]:
    """Train the runs of one pack together (see the module docstring); returns one result per run, or
    for a run whose head diverged its error: that head fails alone (its NaNs stay in its own slice of
    the stacks, batches and optimizer) and the others train on. A pack whose every head diverged
    raises the first one's error."""
    if not cfgs:
        return []
    bad = [c for c in cfgs if not can_pack(c)]
    if bad or len({pack_key(c) for c in cfgs}) > 1:
        raise ConfigError("a head pack takes head-only runs (features=true, no averaging, one stage) "
                          f"that differ only in {', '.join(FREE)}")
    with contextlib.ExitStack() as held:  # each run folder held as a lone `train` holds its own
        for c in cfgs:
            held.enter_context(one_trainer(RunDir(c.out)))
        return _train_pack(cfgs, log, should_stop)


def _train_pack(cfgs: List[TrainConfig], log: Callable[[str], None],
                should_stop: Optional[Callable[[], bool]]) -> List[Union[RunResult, TrainingError]]:
    t0 = time.time()
    first = Trainer(cfgs[0], log=log)
    trainers = [first] + [Trainer(c, log=log, shared=first) for c in cfgs[1:]]
    if len({t.backbone_key for t in trainers}) > 1:
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
    n = len(trainers)
    closed = HeadStep(heads, cls, stage, first.text) if HeadStep.applies(first.model, stage, first.inputs.kind) else None
    losses = _vectorised_loss(stage, first.text, cls is not None) if closed is None else None
    running: Dict[str, torch.Tensor] = {}
    failed: Dict[int, TrainingError] = {}
    count = 0
    t_loop, paused = time.time(), 0.0
    for step in range(cfg.steps):
        draws = [t.draw(step) for t in trainers]
        idx, views = np.concatenate([d[0] for d in draws]), np.concatenate([d[1] for d in draws])
        b = len(draws[0][0])  # batch_size, or batch_size per training domain
        x = first.inputs(idx, views).view(n, b, -1)
        tgt, y = first.targets(idx, first.target_views(views))
        tgt, y = tgt.view(n, b, -1), y.view(n, b)
        if closed is not None:
            total, parts = closed(x, tgt, y)
            parts = {"loss": total, **parts}
        else:
            parts = losses(heads(x) if heads is not None else x, tgt, y, cls(x) if cls is not None else None)
            for st in stacks:
                st.zero_grad()
            parts["loss"].sum().backward()
        for st in stacks:
            st.hand_out_grads()
        for t in trainers:
            optimizer_step(t.opt)
            t.last_lr = t.opt.param_groups[0]["lr"]  # as Trainer.step records it
            t.sched.step()
        add_running(running, parts)  # (H,) sums, handed to each head at evaluation
        count += 1
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            t_pause = settled_time(first.device)
            for h, t in enumerate(trainers):
                if h in failed:
                    continue
                t.running, t.n_running = {name: v[h] for name, v in running.items()}, count
                try:
                    t.check_finite(done)
                    t.evaluate(done, 0, stage)
                except TrainingError as exc:
                    failed[h] = exc
            if len(failed) == n:
                raise failed[min(failed)]
            running, count = {}, 0
            paused += time.time() - t_pause
        if should_stop is not None and should_stop() and done < cfg.steps:
            from .train import RunInterrupted

            raise RunInterrupted(f"head pack stopped at step {done}; rerun to train it again")
    loop = time.time() - t_loop - paused  # the steps alone, as a single run counts them
    for t in trainers:
        t.pack_size = n
    return [failed[h] if h in failed else t.finish(t0, loop) for h, t in enumerate(trainers)]
