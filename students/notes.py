"""Notes a run (and a sweep, once for its runs) prints about settings that do not do what a reader of its
results would assume: a schedule that moves the last stage's rate, a head trained on random features."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import TrainConfig
from .optim import build_scheduler
from .recipes import recipe_of, stage_ends


def _last_stage_rates(cfg: TrainConfig) -> Optional[Tuple[int, float, float]]:
    """(first step, first lr, last lr) of a recipe's last stage where it has several and the schedule
    moves the rate away from optim.lr there; else None."""
    recipe = recipe_of(cfg)
    if len(recipe.stages) < 2:
        return None
    start = stage_ends(recipe, cfg.steps)[-2]
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    factor = build_scheduler(cfg.optim, probe, cfg.steps).lr_lambdas[0]
    first, last = (cfg.optim.lr * factor(s) for s in (start, cfg.steps - 1))
    return None if first == last == cfg.optim.lr else (start, first, last)


def schedule_spans_stages(cfg: TrainConfig) -> bool:
    return _last_stage_rates(cfg) is not None


def frozen_random_note(cfg: TrainConfig) -> str:
    """A note when a recipe trains a head on a frozen backbone that starts from random weights ('' otherwise):
    VL2V-ADiP's Align stage and linear probes fit it on an ImageNet-pretrained backbone's features; on random
    ones the run's rows, named after the recipe, say nothing of the method (an audit: a shipped CPU sweep)."""
    from .models import starts_random

    if not starts_random(cfg.student) or not any(st.train == "head" for st in recipe_of(cfg).stages):
        return ""
    why, fix = (("student.pretrained=scratch", "leave student.pretrained out for its packaged ImageNet weights")
                if cfg.student.pretrained == "scratch" and cfg.student.name.startswith("efficientnet_lite") else
                ("student.pretrained=scratch" if cfg.student.pretrained else "student.pretrained unset",
                 "set student.pretrained (a weights file), or use a pretrained student such as efficientnet_lite0"))
    return (f"note: recipe {cfg.recipe} trains a head on student {cfg.student.name}'s frozen backbone, which starts "
            f"from random weights ({why}): its features are random, so its scores say nothing of the method's; {fix}")


def stage_schedule_note(cfg: TrainConfig) -> str:
    """A note when one schedule across a recipe's stages moves the rate of its last stage, which the kept
    model comes from, away from optim.lr ('' otherwise): under cosine it trains at the schedule's tail."""
    rates = _last_stage_rates(cfg)
    if rates is None:
        return ""
    start, first, last = rates
    return (f"note: schedule {cfg.optim.schedule} runs across recipe {cfg.recipe}'s {len(recipe_of(cfg).stages)} "
            f"stages, so its last stage (steps {start + 1}-{cfg.steps}, the kept model's) starts at lr {first:.3g} and "
            f"ends at {last:.3g} of optim.lr {cfg.optim.lr:g}; `--set optim.schedule=constant` trains every stage at "
            "optim.lr")
