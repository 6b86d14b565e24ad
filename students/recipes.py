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

from dataclasses import dataclass, field
from typing import Dict, Tuple

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
_add(Recipe("naive_kd", (Stage({"ce": 1.0, "kd": 0.5}, loss_args={"ce": {"temperature": 0.1}, "kd": {"student": "linear"}}),),
            classifier=True, predict="linear",
            doc="VL2V-ADiP's KD baseline as its code weighs it: CE on logits / 0.1 + 0.5 x logit KD from the "
                "teacher's zero-shot classifier, the KL corrected (log-probabilities, T^2)"))
_add(Recipe("feat_kd", (Stage({"cos": 1.0}),), doc="feature distillation only (1 - cos(s, t))"))
_add(Recipe("li_iccv23", (Stage(dict(_LI), loss_args=_LI_FILTER),), select="last",
            doc="Li et al. 2023 as their commands run it: L_cls + L_vlalign (correct teacher predictions only) "
                "+ L_mse + L_im-cst"))
_add(Recipe("li_iccv23_nofilter", (Stage(dict(_LI)),), select="last",
            doc="Li et al. 2023 with L_vlalign over every image (no correct-teacher filter)"))
_add(Recipe("li_iccv23_attr", (Stage(dict(_LI), loss_args=_LI_FILTER),), text_source="attributes", select="last",
            doc="Li et al. 2023 with language enrichment (attribute descriptions)"))
_add(Recipe("vl2v_adip", (Stage({"vl2v_adip": 1.0}, train="head", fraction=0.5),
                          Stage({"vl2v_adip": 1.0}, train="backbone", fraction=0.5)),
            doc="VL2V-ADiP: align (projection only), then distill (backbone, projection frozen)"))
_add(Recipe("vl2v_adip_align", (Stage({"vl2v_adip": 1.0}, train="head"),),
            doc="VL2V-ADiP stage 1 alone: a projection on a frozen backbone (runs head-only on cached features)"))
_add(Recipe("vl2v_sd", (Stage({"vl2v_sd": 1.0}),), doc="VL2V-SD: -0.5 [cos(s, T_y) + cos(s, t)]"))
_add(Recipe("linear_probe", (Stage({"ce": 1.0}, train="head"),), classifier=True, predict="linear",
            doc="a linear classifier on frozen features"))
