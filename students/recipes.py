"""Recipes (a registry): named weighted sums of losses, with their stages and prediction rule.

A stage trains "all" parameters, only the "head" (backbone frozen in eval mode, as in VL2V-ADiP's
Align step and linear probes), or only the "backbone" (head frozen, VL2V-ADiP's Distill step), for
a fraction of the run's steps. ``predict`` says how a trained student classifies: "text" = nearest
class text embedding (the teacher's text is the classifier), "linear" = its own classifier.
``select`` is the model selection the recipe's paper uses: "best_val" (the checkpoint with the best
in-domain validation accuracy, DomainBed's training-domain validation, as VL2V-ADiP selects and as
the domain-generalisation baselines are run) or "last" (Li et al. train a fixed schedule).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Tuple

from embedcache.errors import ConfigError
from embedcache.registry import Registry

RECIPES = Registry("recipe")


@dataclass(frozen=True)
class Stage:
    losses: Dict[str, float]                        # loss name -> weight
    train: str = "all"                              # all | head | backbone
    fraction: float = 1.0                           # share of the run's steps
    loss_args: Dict[str, Dict] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    stages: Tuple[Stage, ...]
    text_source: str = "name"
    classifier: bool = False    # the student gets a linear classifier over the training classes
    predict: str = "text"       # text | linear
    select: str = "best_val"    # best_val | last (the default of TrainConfig.select=auto)
    # what each later stage starts from: the stage before's last weights, or (best_val) those of its best
    # validation top-1, as VL2V-ADiP's Distill loads Align's best checkpoint
    carry: str = "last"
    doc: str = ""

    @property
    def head_only(self) -> bool:
        return all(s.train == "head" for s in self.stages)


def _add(recipe: Recipe) -> None:
    RECIPES.register(recipe.name)(recipe)


_LI = {"cls": 1.0, "vlalign": 1.0, "mse": 1.0, "imcst": 1.0}
# Li et al.'s example commands all switch on the correct-teacher-prediction filter for L_vlalign.
_LI_FILTER = {"vlalign": {"correct_only": True}}
_add(Recipe("ce", (Stage({"ce": 1.0}),), classifier=True, predict="linear", doc="labels only"))
# VL2V-ADiP's code (DFC_STAGE36) divides the student's and the teacher's logits (100 cos) by one tmp,
# 0.1, before both its CE and its KL: the KD term runs at that temperature too, a scale of the logits
# both terms share, with no T^2 (which cut the KD term's gradient to 0.5% of the CE term's).
_add(Recipe("naive_kd", (Stage({"ce": 1.0, "kd": 0.5}, loss_args={"ce": {"temperature": 0.1},
                                                                  "kd": {"student": "linear", "temperature": 0.1,
                                                                         "t_squared": False}}),),
            classifier=True, predict="linear",
            doc="VL2V-ADiP's KD baseline as its code weighs it: CE on logits / 0.1 + 0.5 x logit KD on the same "
                "logits / 0.1 from the teacher's zero-shot classifier, the KL corrected (log-probabilities, batch "
                "mean) and, as in its code, not rescaled by T^2"))
_add(Recipe("feat_kd", (Stage({"cos": 1.0}),), doc="feature distillation only (1 - cos(s, t))"))
_add(Recipe("li_iccv23", (Stage(dict(_LI), loss_args=_LI_FILTER),), select="last",
            doc="Li et al. 2023 as their commands run it: L_cls + L_vlalign (correct teacher predictions only) "
                "+ L_mse + L_im-cst"))
_add(Recipe("li_iccv23_nofilter", (Stage(dict(_LI)),), select="last",
            doc="Li et al. 2023 with L_vlalign over every image (no correct-teacher filter)"))
_add(Recipe("li_iccv23_attr", (Stage(dict(_LI), loss_args=_LI_FILTER),), text_source="attributes", select="last",
            doc="Li et al. 2023 with language enrichment (attribute descriptions)"))
_add(Recipe("vl2v_adip", (Stage({"vl2v_adip": 1.0}, train="head", fraction=0.5),
                          Stage({"vl2v_adip": 1.0}, train="backbone", fraction=0.5)), carry="best_val",
            doc="VL2V-ADiP: align (projection only), then distill (backbone, projection frozen) from align's "
                "best-validation weights"))
_add(Recipe("vl2v_adip_align", (Stage({"vl2v_adip": 1.0}, train="head"),),
            doc="VL2V-ADiP stage 1 alone: a projection on a frozen backbone (runs head-only on cached features)"))
_add(Recipe("vl2v_sd", (Stage({"vl2v_sd": 1.0}),), doc="VL2V-SD: -0.5 [cos(s, T_y) + cos(s, t)]"))
_add(Recipe("linear_probe", (Stage({"ce": 1.0}, train="head"),), classifier=True, predict="linear",
            doc="a linear classifier on frozen features"))


# --- what a run trained with, recorded with it ------------------------------------------------------------
# Rules that changed after runs were made without a record of them (before 2026-12-03): such a run
# trained under the earlier rule, said here: by recipe name, by weight averaging, and by validation.
REDEFINED_RECIPES = {"naive_kd": "its KD term ran at temperature 4, not VL2V-ADiP's 0.1",
                     "vl2v_adip": "its Distill stage started from Align's last weights, not its best-validation ones"}
REDEFINED_AVERAGING = {"swad": "its SWAD valley followed the recipe's loss, not the prediction cross-entropy"}
REDEFINED_VALIDATION = "its validation pooled the training domains' images, not their mean over domains"
SWAD_LOSS = "prediction_ce"  # what SWAD's valley follows (recorded, as above)
# Rules recorded since 2026-12-07, where the kept weights depend on them: validation figures are the
# mean over the training domains (DomainBed's selection, SWAD's evaluator; they were pooled before), and a
# SWAD valley that never formed keeps the last segment's average, as SWAD's code does (the last weights before).
VALIDATION = "mean_over_domains"
SWAD_UNSETTLED = "last_segment"


def selects_by_validation(recipe: Recipe, averaging: str, select: str, carried: bool = True) -> bool:
    """Whether validation figures choose the kept weights: best_val selection, SWAD's valley, or (``carried``)
    the weights a stage hands on (``Recipe.carry``, since 2026-12-07)."""
    return averaging == "swad" or (recipe.select if select == "auto" else select) == "best_val" or \
        (carried and recipe.carry == "best_val")


def definition(recipe: Recipe, averaging: str = "none", select: str = "auto") -> Dict:
    """What a run trains with: its recipe, every loss argument resolved (defaults included), with SWAD the
    loss its valley follows and what it keeps when no valley forms, and how validation is measured where
    it chooses the weights, as JSON values. Written into each run's config.json, so a run made under
    another definition (by an earlier version of this package) is never resumed, or counted in a sweep,
    as one of this one."""
    import json

    from .losses import LOSSES

    def args(name: str, given: Dict) -> Dict:
        params = list(inspect.signature(LOSSES.get(name)).parameters.values())[1:]
        return {p.name: given.get(p.name, p.default) for p in params}

    d = {"stages": [{"losses": dict(sorted(st.losses.items())), "train": st.train, "fraction": st.fraction,
                     "args": {n: args(n, st.loss_args.get(n, {})) for n in sorted(st.losses)}} for st in recipe.stages],
         "text_source": recipe.text_source, "classifier": recipe.classifier, "predict": recipe.predict,
         "select": recipe.select, **({"carry": recipe.carry} if recipe.carry != "last" else {}),
         **({"swad_loss": SWAD_LOSS, "swad_unsettled": SWAD_UNSETTLED} if averaging == "swad" else {}),
         **({"validation": VALIDATION} if selects_by_validation(recipe, averaging, select) else {})}
    return json.loads(json.dumps(d))


def trains_embedding(recorded: Dict) -> bool:
    """Whether a run's losses (its recorded ``definition``) train its embedding, the projection the
    distillation metrics compare with the teacher's: a classifier recipe (ce, naive_kd, linear_probe)
    trains its linear classifier alone and leaves the projection as it was initialised."""
    from .losses import reads_embedding

    return any(w and reads_embedding(n, st["args"].get(n, {})) for st in recorded["stages"] for n, w in st["losses"].items())


def definition_change(cfg, recorded) -> str:
    """'' when a run of ``cfg`` that recorded ``recorded`` (None: made before records) trained as
    ``cfg`` trains now; else what differs, in words."""
    from embedcache.config import flatten

    select = getattr(cfg, "select", "auto")
    if recorded is None:
        validated = cfg.recipe in RECIPES and selects_by_validation(RECIPES.get(cfg.recipe), cfg.averaging, select,
                                                                    carried=False)  # (a rule those runs had not)
        said = (REDEFINED_RECIPES.get(cfg.recipe), REDEFINED_AVERAGING.get(cfg.averaging),
                REDEFINED_VALIDATION if validated else None)
        return "; ".join(s for s in said if s)

    def keyed(d: Dict) -> Dict:  # stage i's settings under "stage<i+1>."
        return {**d, **{f"stage{i + 1}": st for i, st in enumerate(d.get("stages", []))}, "stages": None}

    old, new = flatten(keyed(recorded)), flatten(keyed(definition(recipe_of(cfg), cfg.averaging, select)))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3]) + \
        (f" and {len(changed) - 3} more" if len(changed) > 3 else "")


# --- a run's own loss weights and arguments (loss ablations without a new recipe) ------------------------
def with_losses(recipe: Recipe, weights: Dict[str, float], args: Dict[str, Dict]) -> Recipe:
    """``recipe`` with every stage's losses overridden: ``weights`` name -> weight (0 drops a loss, a
    new name adds one), ``args`` name -> keyword arguments merged into that loss's own."""
    if not weights and not args:
        return recipe
    stages = []
    for st in recipe.stages:
        losses = {n: float(w) for n, w in {**st.losses, **weights}.items() if w != 0}
        loss_args = {n: {**st.loss_args.get(n, {}), **args.get(n, {})} for n in losses
                     if st.loss_args.get(n) or args.get(n)}
        stages.append(replace(st, losses=losses, loss_args=loss_args))
    return replace(recipe, stages=tuple(stages))


def recipe_of(cfg) -> Recipe:
    """The recipe a run trains with: its registered recipe, with the run's ``loss_weights`` and ``loss_args``."""
    return with_losses(RECIPES.get(cfg.recipe), cfg.loss_weights, cfg.loss_args)


def text_source_of(cfg) -> str:
    """The text source a run predicts with: its own ``text_source``, else its recipe's."""
    return cfg.text_source or RECIPES.get(cfg.recipe).text_source


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Loss arguments whose valid values are not told by their default's type (below).
_ARG_RULES = {("kd", "student"): (lambda v: v in ("text", "linear"), "text or linear"),
              ("vl2v_adip", "lam"): (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")}


def _arg_problem(loss: str, arg: str, value, default) -> str:
    """'' when ``value`` is valid for the argument; else what it should be. By the default's type:
    temperatures, scales and the like are numbers > 0 (0 divides by zero), counts whole numbers >= 1."""
    if (loss, arg) in _ARG_RULES:
        ok, want = _ARG_RULES[(loss, arg)]
        return "" if ok(value) else want
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return "" if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "a whole number >= 1"
    if isinstance(default, float):
        return "" if _number(value) and value > 0 else "a number > 0"
    return "" if isinstance(value, type(default)) else f"a {type(default).__name__}"


def check_losses(cfg) -> None:
    """A run's loss overrides, refused in one line before any work: unknown losses or arguments,
    weights that are not finite non-negative numbers, a stage left with no loss, a classifier loss
    on a recipe whose student has no classifier."""
    from .losses import LOSSES

    for name in sorted(set(cfg.loss_weights) | set(cfg.loss_args)):
        if name not in LOSSES:
            raise ConfigError(f"loss_weights/loss_args: {LOSSES.unknown(name)}")
    for name, w in cfg.loss_weights.items():
        if not _number(w) or w < 0:
            raise ConfigError(f"loss_weights.{name}={w!r} is not valid: expected a number >= 0 (0 drops the loss)")
    for name, a in cfg.loss_args.items():  # before the recipe merges them
        if not isinstance(a, dict):
            raise ConfigError(f"loss_args.{name}={a!r} is not valid: expected a mapping of its arguments")
    recipe = recipe_of(cfg)
    used = {n for st in recipe.stages for n in st.losses}
    for name, a in cfg.loss_args.items():
        if name not in used:
            with_weights = " (with the loss_weights given)" if cfg.loss_weights else ""
            raise ConfigError(f"loss_args.{name}: recipe {cfg.recipe}{with_weights} has no loss {name}; "
                              f"its losses: {', '.join(sorted(used))}")
        takes = {p.name: p.default for p in inspect.signature(LOSSES.get(name)).parameters.values() if p.name != "ctx"}
        for k, v in a.items():
            if k not in takes:
                raise ConfigError(f"loss_args.{name}.{k} is not an argument of {name}; it takes "
                                  f"{', '.join(takes) or 'none'}")
            want = _arg_problem(name, k, v, takes[k])
            if want:
                raise ConfigError(f"loss_args.{name}.{k}={v!r} is not valid: expected {want}")
    for i, st in enumerate(recipe.stages):
        if not st.losses:
            raise ConfigError(f"loss_weights leave stage {i + 1} of recipe {cfg.recipe} with no loss")
        logits = "ce" in st.losses or ("kd" in st.losses and st.loss_args.get("kd", {}).get("student") == "linear")
        if logits and not recipe.classifier:
            raise ConfigError(f"recipe {cfg.recipe}'s student has no linear classifier for ce or kd on logits; "
                              "start from a recipe with one (ce, naive_kd, linear_probe)")


def stage_ends(recipe: Recipe, steps: int) -> List[int]:
    """The step at which each stage ends (the last one at ``steps``)."""
    total = sum(s.fraction for s in recipe.stages)
    ends, acc = [], 0.0
    for s in recipe.stages:
        acc += s.fraction
        ends.append(int(round(steps * acc / total)))
    ends[-1] = steps
    return ends
