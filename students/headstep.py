"""Head-only steps in closed form: a linear head's losses and their gradients, without autograd.

On cached features a head-only step is one (B, F) x (F, D) product, a loss over (B, D) and an
optimizer step. Autograd records and replays the loss's few dozen small operations, which was about
half of the step on 2 CPU cores. The losses heads are trained with are simple functions of the
normalised embedding s_hat (or of a linear classifier's logits), and their gradients are a few tensor
operations each. Every closed form here mirrors the loss of the same name in ``losses.py`` (same
arguments and defaults; value and gradient tested against autograd of that loss). A head-only stage
on cached features whose losses all have one trains this way; every other stage uses autograd.
The numbers agree with autograd's to float32 rounding, not bit for bit. The step runs in float32
whatever ``amp`` says (a head's product is too small for bf16 to pay; packs never used autocast
either), and a run's ``summary.json`` records which stages took it.

Tensors may carry leading dimensions (a pack of H heads: (H, B, D)); batch means are over dim -2.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from embedcache.registry import Registry

from .losses import weighted_sum
from .recipes import Stage

GRADS = Registry("closed-form loss")
LOGIT_LOSSES = ("ce",)  # closed forms of the classifier's logits; every other one is of the embedding
EPS = 1e-12  # F.normalize's


@dataclass
class Batch:
    """A step's inputs to the closed forms: s_hat, t_hat (..., B, D), text_hat (C, D), labels (..., B),
    logits (..., B, C) or None."""
    s_hat: Optional[torch.Tensor]
    t_hat: torch.Tensor
    text_hat: torch.Tensor
    labels: torch.Tensor
    logits: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return self.labels.shape[-1]

    @cached_property
    def text_y(self) -> torch.Tensor:
        return self.text_hat.index_select(0, self.labels.reshape(-1)).view(*self.labels.shape, -1)


@dataclass
class Terms:
    """One loss's value (...,) and its gradient with respect to s_hat or to the logits."""
    value: torch.Tensor
    d_s_hat: Optional[torch.Tensor] = None
    d_logits: Optional[torch.Tensor] = None


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def _ce(z: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of logits z (..., B, C) and its gradient (softmax - one-hot) / B."""
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    value = (lse - z.gather(-1, labels[..., None])).squeeze(-1).mean(-1)
    dz = (z - lse).exp_().sub_(F.one_hot(labels, z.shape[-1]).to(z.dtype)).div_(z.shape[-2])
    return value, dz


def _against(b: Batch, c: torch.Tensor) -> Terms:
    """-mean(s_hat . c) for a fixed c: VL2V-ADiP's, VL2V-SD's and cosine distillation's form."""
    return Terms(-_rowdot(b.s_hat, c).mean(-1), c * (-1.0 / b.rows))


@GRADS.register("ce")
def ce(b: Batch, temperature: float = 1.0) -> Terms:
    value, dz = _ce(b.logits / temperature, b.labels)
    return Terms(value, d_logits=dz / temperature)


@GRADS.register("cls")
def cls(b: Batch, tau: float = 0.07) -> Terms:
    value, dz = _ce(b.s_hat @ b.text_hat.T / tau, b.labels)
    return Terms(value, dz @ b.text_hat / tau)


@GRADS.register("mse")
def mse(b: Batch) -> Terms:
    diff = b.s_hat - b.t_hat
    return Terms(diff.pow(2).sum(-1).mean(-1), diff * (2.0 / b.rows))


@GRADS.register("cos")
def cos(b: Batch) -> Terms:
    t = _against(b, b.t_hat)
    return Terms(1.0 + t.value, t.d_s_hat)


@GRADS.register("vl2v_adip")
def vl2v_adip(b: Batch, lam: float = 0.5) -> Terms:
    return _against(b, b.t_hat * lam + b.text_y * (1 - lam))


@GRADS.register("vl2v_sd")
def vl2v_sd(b: Batch) -> Terms:
    return _against(b, (b.text_y + b.t_hat) * 0.5)


def has_closed_form(stage: Stage) -> bool:
    """Every loss of the stage has a closed form that takes the stage's arguments for it."""
    if not stage.losses:
        return False
    for name in stage.losses:
        if name not in GRADS:
            return False
        params = inspect.signature(GRADS.get(name)).parameters
        if not set(stage.loss_args.get(name, {})) <= set(params) - {"b"}:
            return False
    return True


def uses_embedding(stage: Stage) -> bool:
    return any(n not in LOGIT_LOSSES for n in stage.losses)


def uses_logits(stage: Stage) -> bool:
    return any(n in LOGIT_LOSSES for n in stage.losses)


def stage_terms(stage: Stage, s: Optional[torch.Tensor], t: torch.Tensor, text_hat: torch.Tensor,
                labels: torch.Tensor, logits: Optional[torch.Tensor]):
    """The stage's weighted loss (...,), each loss, and the gradients of the weighted loss with
    respect to the raw embedding s and to the logits (None where no loss uses them)."""
    norm = s_hat = None
    if s is not None:
        norm = s.norm(dim=-1, keepdim=True)
        s_hat = s / norm.clamp_min(EPS)
    b = Batch(s_hat, F.normalize(t, dim=-1), text_hat, labels, logits)
    terms = {n: GRADS.get(n)(b, **stage.loss_args.get(n, {})) for n in stage.losses}
    weights = stage.losses.items()
    total = weighted_sum((w, terms[n].value) for n, w in weights)
    d_hat = weighted_sum((w, terms[n].d_s_hat) for n, w in weights)
    d_logits = weighted_sum((w, terms[n].d_logits) for n, w in weights)
    return total, {n: r.value for n, r in terms.items()}, _through_normalize(d_hat, s_hat, norm), d_logits


def _through_normalize(d_hat, s_hat, norm):
    """d/ds of s / max(|s|, eps): (d_hat - (d_hat . s_hat) s_hat) / |s|; where the norm is clamped,
    only d_hat / eps (the clamp passes no gradient to the norm)."""
    if d_hat is None:
        return None
    radial = _rowdot(d_hat, s_hat)[..., None] * (norm >= EPS)
    return (d_hat - radial * s_hat) / norm.clamp_min(EPS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x W^T + b for x (B, F) and weight (D, F), or a pack's x (H, B, F) and weight (H, D, F)."""
    if x.dim() == 3:
        return torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))
    return F.linear(x, weight, bias)


def linear_grads(d: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of x W^T + b's weight and bias, given the gradient d of its output."""
    return torch.matmul(d.transpose(-1, -2), x), d.sum(-2)


class HeadStep:
    """A head-only step in closed form: sets the gradients of the head and the classifier (``nn.Linear``
    layers, or a pack's stacked ones; None for a layer no loss uses, as autograd leaves it) and returns
    (loss, parts) as ``stage_loss`` does."""

    def __init__(self, head, classifier, stage: Stage, text: torch.Tensor):
        self.head, self.classifier, self.stage = head, classifier, stage
        self.text_hat = F.normalize(text.float(), dim=-1)
        self.emb, self.logits = uses_embedding(stage), uses_logits(stage)

    @staticmethod
    def applies(model, stage: Stage, inputs_kind: str) -> bool:
        """A head-only stage on cached features, every loss with a closed form, and a linear layer under
        every output a loss uses (a head stage trains the head and the classifier: ``set_trainable``)."""
        if inputs_kind != "features" or stage.train != "head" or not has_closed_form(stage):
            return False
        head_ok = isinstance(model.head, torch.nn.Linear)
        return (head_ok or not uses_embedding(stage)) and (model.classifier is not None or not uses_logits(stage))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
        s = linear(x, self.head.weight, self.head.bias) if self.emb else None
        logits = linear(x, self.classifier.weight, self.classifier.bias) if self.logits else None
        total, parts, d_s, d_logits = stage_terms(self.stage, s, t, self.text_hat, labels, logits)
        for layer, d in ((self.head, d_s), (self.classifier, d_logits)):
            if layer is None or not hasattr(layer, "weight"):  # no classifier; an identity head (no loss uses it: applies)
                continue
            # a layer no loss uses gets no gradient, as autograd leaves it (and none left by an earlier stage)
            layer.weight.grad, layer.bias.grad = linear_grads(d, x) if d is not None else (None, None)
        return total, parts
