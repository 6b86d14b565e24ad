"""Distillation losses (a registry): small pure functions of a batch context, returning a scalar.

Notation as in ../shared/PAPERS.md: s = student embedding after its projection head, t = teacher
embedding of the same view (L2-normalised in the store), T = class text embeddings (C, D,
L2-normalised), a hat = L2-normalised, tau = temperature. Each loss is checked against a direct
numpy computation of its formula in tests/test_losses.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from embedcache.registry import Registry

LOSSES = Registry("loss")


def weighted_sum(terms: Iterable[Tuple[float, Optional[torch.Tensor]]]) -> Optional[torch.Tensor]:
    """sum(w * x) over the terms whose x is not None (None if there are none). A weight of 1
    multiplies nothing and the sum starts at its first term: the same number as ``sum(w * x)``, with
    fewer operations for autograd to record."""
    total = None
    for w, x in terms:
        if x is None:
            continue
        x = x if w == 1 else w * x
        total = x if total is None else total + x
    return total


def _full(x: torch.Tensor) -> torch.Tensor:
    """Half precision (under autocast) is upcast to float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@dataclass
class BatchContext:
    """s: (B, D) student embedding (raw); t: (B, D) teacher view embedding; text: (C, D) class text
    embeddings of the training classes; labels: (B,) indices into ``text`` rows; logits: (B, C)
    a linear classifier's logits when the student has one, else None."""
    s: torch.Tensor
    t: torch.Tensor
    text: torch.Tensor
    labels: torch.Tensor
    logits: Optional[torch.Tensor] = None

    @property
    def s_hat(self) -> torch.Tensor:
        return F.normalize(_full(self.s), dim=-1)

    @property
    def t_hat(self) -> torch.Tensor:
        return F.normalize(_full(self.t), dim=-1)

    @property
    def text_hat(self) -> torch.Tensor:
        return F.normalize(_full(self.text), dim=-1)


def reads_embedding(name: str, args: dict) -> bool:
    """Whether loss ``name`` (with ``args``) trains the student's embedding s: all but ``ce`` and a
    ``kd`` on the linear classifier's logits, which read the logits alone."""
    return not (name == "ce" or (name == "kd" and args.get("student") == "linear"))


@LOSSES.register("ce")
def ce(ctx: BatchContext, temperature: float = 1.0) -> torch.Tensor:
    """Supervised cross-entropy on the student's linear classifier logits / ``temperature`` (labels only)."""
    if ctx.logits is None:
        raise ValueError("loss 'ce' needs a student with a linear classifier (recipe.classifier: true)")
    return F.cross_entropy(_full(ctx.logits) / temperature, ctx.labels)


@LOSSES.register("cls")
def cls(ctx: BatchContext, tau: float = 0.07) -> torch.Tensor:
    """Li et al. L_cls: cross-entropy over cos(s, T_c) / tau."""
    return F.cross_entropy(ctx.s_hat @ ctx.text_hat.T / tau, ctx.labels)


@LOSSES.register("vlalign")
def vlalign(ctx: BatchContext, tau: float = 0.07, k: int = 256, correct_only: bool = False) -> torch.Tensor:
    """Li et al. L_vlalign: KL(P_T || P_S) over the teacher's top-k classes, both renormalised.
    With ``correct_only`` only images whose teacher prediction is right count."""
    zt = ctx.t_hat @ ctx.text_hat.T / tau
    zs = ctx.s_hat @ ctx.text_hat.T / tau
    top = zt.topk(min(k, zt.shape[1]), dim=1).indices
    log_pt = F.log_softmax(zt.gather(1, top), dim=1)
    log_ps = F.log_softmax(zs.gather(1, top), dim=1)
    per = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    if correct_only:
        keep = (zt.argmax(1) == ctx.labels).float()
        return (per * keep).sum() / keep.sum().clamp(min=1.0)
    return per.mean()


@LOSSES.register("mse")
def mse(ctx: BatchContext) -> torch.Tensor:
    """Li et al. L_mse: squared distance between normalised s and t, summed over D, batch mean."""
    return (ctx.s_hat - ctx.t_hat).pow(2).sum(1).mean()


@LOSSES.register("cos")
def cos(ctx: BatchContext) -> torch.Tensor:
    """Feature distillation: 1 - cos(s, t), batch mean."""
    return (1.0 - (ctx.s_hat * ctx.t_hat).sum(1)).mean()


@LOSSES.register("imcst")
def imcst(ctx: BatchContext, tau: float = 0.07) -> torch.Tensor:
    """Li et al. L_im-cst: 0.5 [CE(M) + CE(M^T)], M = s_hat t_hat^T / tau, diagonal targets. A row drawn
    twice (a pool smaller than the batch is drawn with replacement) is left out of its copy's softmax:
    as a negative of itself it was a contradictory target."""
    t = ctx.t_hat
    m = ctx.s_hat @ t.T / tau
    with torch.no_grad():  # copies: the same teacher embedding (one image, one view), off the diagonal
        copy = (t @ t.T > 1 - 1e-6) & ~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)
    m = m.masked_fill(copy, float("-inf"))
    target = torch.arange(m.shape[0], device=m.device)
    return 0.5 * (F.cross_entropy(m, target) + F.cross_entropy(m.T, target))


@LOSSES.register("kd")
def kd(ctx: BatchContext, temperature: float = 4.0, scale: float = 100.0, student: str = "text",
       t_squared: bool = True) -> torch.Tensor:
    """Logit KD done right: KL(softmax(z_t/T) || softmax(z_s/T)) * T^2, with log-probabilities for
    the student (VL2V-ADiP's baseline passed probabilities). z_t = scale * cos(t, T_c) is the
    teacher's zero-shot classifier; z_s is ``scale * cos(s, T_c)`` (student="text") or the
    student's linear classifier logits (student="linear"). ``t_squared=False`` where T is the logits'
    own scale, shared with a CE term on z_s / T (VL2V-ADiP's tmp 0.1), not a softening for distillation:
    Hinton's T^2 keeps a softened KL's gradients at the size of T=1's, and at T=0.1 it cut the term's
    gradient to 0.5% of that CE's."""
    zt = scale * ctx.t_hat @ ctx.text_hat.T
    if student == "linear":
        if ctx.logits is None:
            raise ValueError("kd with student='linear' needs a student with a linear classifier")
        zs = _full(ctx.logits)
    else:
        zs = scale * ctx.s_hat @ ctx.text_hat.T
    log_ps = F.log_softmax(zs / temperature, dim=1)
    log_pt = F.log_softmax(zt / temperature, dim=1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * (temperature ** 2 if t_squared else 1.0)


@LOSSES.register("vl2v_adip")
def vl2v_adip(ctx: BatchContext, lam: float = 0.5) -> torch.Tensor:
    """VL2V-ADiP: lambda * (-cos(s, t)) + (1 - lambda) * (-cos(s, T_y)), batch mean."""
    s = ctx.s_hat
    return (lam * -(s * ctx.t_hat).sum(1) + (1 - lam) * -(s * ctx.text_hat[ctx.labels]).sum(1)).mean()


@LOSSES.register("vl2v_sd")
def vl2v_sd(ctx: BatchContext) -> torch.Tensor:
    """VL2V-SD: -0.5 [cos(s, T_y) + cos(s, t)], batch mean."""
    s = ctx.s_hat
    return (-0.5 * ((s * ctx.text_hat[ctx.labels]).sum(1) + (s * ctx.t_hat).sum(1))).mean()
