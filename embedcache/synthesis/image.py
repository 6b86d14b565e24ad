"""Optimising images against the teacher: augmentations, the loss, and the loop.

Each image is pulled towards its target text embedding t by minimising, over ``cutouts`` random
augmentations a of it, mean_a D(E(a(x)), t), with E the teacher's image encoder and D the squared
spherical distance D(u, v) = 2 arcsin^2(|u_hat - v_hat| / 2) (VQGAN-CLIP's loss; the paper's D).

An augmentation is one affine resampling of the image at ``cut_size``: a random-resized crop
(area ``cut_scale``, aspect ``cut_ratio``), a horizontal flip, a small rotation and translation
(reflection padding), then Gaussian pixel noise. Every draw comes from generators seeded by
(seed, row, iteration) alone, and losses are summed over images, so an image's draws do not depend on
which images share its batch; its pixels do, through the rounding of batched kernels, which grows over
the iterations (two batch sizes give visibly different images: a resume says so).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..views import normalize
from .config import ImageConfig
from .generators import seed_of


# what the loop does beyond its settings, recorded with the plan (PAPERS.md: every design choice in the manifest)
DETAILS = {"optimizer": "torch.optim.Adam, betas (0.9, 0.999), eps 1e-8, no weight decay",
           "noise": "each cut-out's Gaussian pixel noise has a std drawn from U(0, image.noise)"}


class SynthesisInterrupted(KeyboardInterrupt):
    """Stopped on request (Ctrl-C, SIGTERM): finished row blocks are kept; rerun to resume."""


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., D), (..., D) -> (...): 2 arcsin^2(|a_hat - b_hat| / 2), in [0, pi^2 / 2]."""
    d = (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).norm(dim=-1)
    return d.div(2).clamp(max=1.0).arcsin().pow(2).mul(2)


def cutout_params(seed: int, row: int, iteration: int, cfg: ImageConfig) -> np.ndarray:
    """(cutouts, 7) float64: crop width and height (fractions of the side), centre x and y (in
    [-1, 1]), flip sign, rotation (radians), noise std; from (seed, row, iteration) alone."""
    rng = np.random.default_rng([seed, row, iteration, 41])
    out = np.zeros((cfg.cutouts, 7))
    log_r = (math.log(cfg.cut_ratio[0]), math.log(cfg.cut_ratio[1]))
    for a in range(cfg.cutouts):
        area = rng.uniform(*cfg.cut_scale)
        ratio = math.exp(rng.uniform(*log_r))
        w, h = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))
        cx = rng.uniform(-(1 - w), 1 - w) + rng.uniform(-1, 1) * 2 * cfg.translate
        cy = rng.uniform(-(1 - h), 1 - h) + rng.uniform(-1, 1) * 2 * cfg.translate
        flip = -1.0 if cfg.flip and rng.uniform() < 0.5 else 1.0
        angle = math.radians(rng.uniform(-cfg.rotate, cfg.rotate))
        out[a] = (w, h, cx, cy, flip, angle, rng.uniform(0, cfg.noise))
    return out


def affine_thetas(params: np.ndarray) -> torch.Tensor:
    """(n, 7) cutout parameters -> (n, 2, 3) float32 ``affine_grid`` matrices (output -> input coordinates)."""
    w, h, cx, cy, flip, ang = (params[:, i] for i in range(6))
    cos, sin = np.cos(ang), np.sin(ang)
    theta = np.stack([np.stack([cos * w * flip, -sin * h, cx], -1), np.stack([sin * w * flip, cos * h, cy], -1)], 1)
    return torch.from_numpy(theta.astype(np.float32))


def augment(images: torch.Tensor, rows: Sequence[int], iteration: int, cfg: ImageConfig, seed: int,
            size: int) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> (B * cutouts, 3, size, size), image b's cutouts at b*cutouts.."""
    b, a = images.shape[0], cfg.cutouts
    params = np.concatenate([cutout_params(seed, int(r), iteration, cfg) for r in rows])
    theta = affine_thetas(params).to(images.device)
    grid = F.affine_grid(theta, [b * a, 3, size, size], align_corners=False)
    out = F.grid_sample(images.repeat_interleave(a, dim=0), grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    if cfg.noise > 0:
        noise = torch.stack([torch.randn(a, 3, size, size, generator=torch.Generator().manual_seed(
            seed_of(seed, int(r), iteration, 43))) for r in rows]).flatten(0, 1).to(images.device)
        std = torch.from_numpy(params[:, 6].astype(np.float32)).to(images.device).view(-1, 1, 1, 1)
        out = out + noise * std
    return out


@dataclass
class Synthesised:
    """images: (B, 3, S, S) float in [0, 1]; loss_start / loss_end: (B,) the loss of each image
    before and after optimisation, on the same augmentations (those of iteration 0)."""
    images: torch.Tensor
    loss_start: np.ndarray
    loss_end: np.ndarray


def image_loss(teacher, images: torch.Tensor, targets: torch.Tensor, rows: Sequence[int], iteration: int,
               cfg: ImageConfig, seed: int, size: int) -> torch.Tensor:
    """(B,) mean over cutouts of the squared spherical distance to each image's target (B, D)."""
    x = normalize(augment(images, rows, iteration, cfg, seed, size), teacher.mean, teacher.std)
    emb = teacher.encode_image_grad(x).view(images.shape[0], cfg.cutouts, -1)
    return spherical_distance(emb, targets.to(emb.device)[:, None, :]).mean(1)


def optimise(teacher, generator, targets: torch.Tensor, rows: Sequence[int], cfg: ImageConfig, size: int,
             should_stop: Callable[[], bool] = lambda: False, progress: bool = False) -> Synthesised:
    """Synthesise images for ``rows`` (their own seeds) towards ``targets`` (B, D): Adam on the
    generator's parameters for ``cfg.iterations`` steps, the loss summed over images."""
    from tqdm.auto import tqdm

    params = generator.init([seed_of(cfg.seed, int(r), 37) for r in rows])
    opt = torch.optim.Adam(params, lr=cfg.lr)
    with torch.no_grad():
        start = image_loss(teacher, generator.render(params), targets, rows, 0, cfg, cfg.seed, size)
    bar = tqdm(range(cfg.iterations), desc=f"synthesise rows {rows[0]}-{rows[-1]}", unit="it", leave=False,
               disable=not progress, dynamic_ncols=True)
    for it in bar:
        if should_stop():
            raise SynthesisInterrupted("interrupted; finished row blocks are kept: rerun the same command to resume")
        loss = image_loss(teacher, generator.render(params), targets, rows, it, cfg, cfg.seed, size)
        grads = torch.autograd.grad(loss.sum(), params)  # the teacher's weights get no gradient
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress and it % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach().mean()):.4f}")
    bar.close()
    with torch.no_grad():
        images = generator.render(params).float()
        end = image_loss(teacher, images, targets, rows, 0, cfg, cfg.seed, size)
    return Synthesised(images.detach(), start.cpu().numpy(), end.cpu().numpy())
