"""Canvas and views: the one place that turns an image into what teachers and students see.

Each image is decoded once into a square uint8 canvas (shorter side resized to S, centre crop).
View v of image i is a crop box and a flip on that canvas, drawn from a random generator seeded by
(views.seed, i, v) alone, so it does not depend on batch size, worker count or sharding. The same
``render_views`` call makes the teacher's input at extraction time and the student's input at
training time, so a student rebuilds exactly the crop whose teacher embedding it is matched to.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import to_rgb8

PARAM_FIELDS = ("top", "left", "height", "width", "flip")  # image/view_params[..., k], canvas pixels


def make_canvas(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: shorter side resized to ``size`` (bicubic), centre crop. The image is
    first decoded faithfully to 8-bit RGB (EXIF orientation, 16-bit and transparent modes)."""
    image = to_rgb8(image)
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)  # writable


def view_params(seed: int, index: int, count: int, canvas: int,
                scale: Sequence[float] = (0.35, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                flip: bool = True) -> np.ndarray:
    """(count, 5) int32 rows (top, left, height, width, flip); row 0 is the whole canvas unflipped.

    Random-resized-crop sampling as torchvision does it (10 tries, then the centre crop of the
    nearest allowed ratio), with its own generator per (seed, index, view).
    """
    out = np.zeros((count, 5), dtype=np.int32)
    out[0] = (0, 0, canvas, canvas, 0)
    area = canvas * canvas
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for v in range(1, count):
        rng = np.random.default_rng([seed, index, v])
        box = None
        for _ in range(10):
            target = area * rng.uniform(scale[0], scale[1])
            ar = math.exp(rng.uniform(*log_r))
            w = int(round(math.sqrt(target * ar)))
            h = int(round(math.sqrt(target / ar)))
            if 0 < w <= canvas and 0 < h <= canvas:
                top = int(rng.integers(0, canvas - h + 1))
                left = int(rng.integers(0, canvas - w + 1))
                box = (top, left, h, w)
                break
        if box is None:  # fallback: largest centred box within the ratio range
            w = h = canvas
            box = ((canvas - h) // 2, (canvas - w) // 2, h, w)
        do_flip = int(flip and rng.uniform() < 0.5)
        out[v] = (*box, do_flip)
    return out


def render_views(canvas: torch.Tensor, params: torch.Tensor, out_size: int,
                 interpolation: str = "bicubic") -> torch.Tensor:
    """Crop, resize and flip views from canvases.

    canvas: (B, S, S, 3) uint8; params: (B, V, 5) int (see PARAM_FIELDS).
    Returns (B, V, 3, out_size, out_size) float32 in [0, 1]. Deterministic on a given device.
    """
    if canvas.dim() == 3:
        canvas, params = canvas[None], params[None]
    b, v = params.shape[:2]
    img = canvas.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S)
    out = img.new_empty((b, v, 3, out_size, out_size))
    mode = "bicubic" if interpolation == "bicubic" else "bilinear"
    for i in range(b):
        for j in range(v):
            top, left, h, w, flip = (int(x) for x in params[i, j])
            crop = img[i:i + 1, :, top:top + h, left:left + w]
            crop = F.interpolate(crop, size=(out_size, out_size), mode=mode, antialias=True, align_corners=False)
            if flip:
                crop = crop.flip(-1)
            out[i, j] = crop[0]
    return out.clamp_(0.0, 1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] -> uint8 (rounded). A teacher's input is an 8-bit image, like any
    image file, so a view sent losslessly (PNG) to a remote teacher is exactly what a local one sees."""
    return x.mul(255.0).round_().to(torch.uint8)


def normalize(x: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> torch.Tensor:
    """(..., 3, H, W) float in [0, 1] -> (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


# --- the batched renderer: every view of a batch in one operation (GPU extraction, student crops) ---------
def _aa_filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """The kernels of torch's antialiased resize (PIL's): triangle, or cubic with a = -0.5."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, size: int, out: int, interpolation: str) -> torch.Tensor:
    """(..., out, size) float32 weights that resize the span [start, start + length) of an axis of
    ``size`` pixels to ``out`` pixels exactly as ``F.interpolate(crop, antialias=True)`` does: the
    same kernel, support, centres and edge clamping, each row normalised to sum 1."""
    support_half = 1.0 if interpolation == "bilinear" else 2.0
    length = length.to(torch.float64)
    scale = length / out                                              # (...,)
    support = torch.where(scale >= 1, support_half * scale, torch.full_like(scale, support_half))
    invscale = torch.where(scale >= 1, 1.0 / scale, torch.ones_like(scale))
    i = torch.arange(out, dtype=torch.float64, device=start.device)
    center = scale[..., None] * (i + 0.5)                              # (..., out), relative to the span
    xmin = torch.clamp(torch.trunc(center - support[..., None] + 0.5), min=0)
    xmax = torch.minimum(torch.trunc(center + support[..., None] + 0.5), length[..., None])
    j = torch.arange(size, dtype=torch.float64, device=start.device)
    rel = j - start.to(torch.float64)[..., None, None]                 # (..., 1, size): pixel index in the span
    inside = (rel >= xmin[..., None]) & (rel < xmax[..., None])
    w = _aa_filter((rel - center[..., None] + 0.5) * invscale[..., None, None], interpolation) * inside
    return (w / w.sum(-1, keepdim=True).clamp(min=1e-12)).to(torch.float32)


def render_views_batched(canvas: torch.Tensor, params: torch.Tensor, out_size: int,
                         interpolation: str = "bicubic") -> torch.Tensor:
    """``render_views`` as two batched matrix products per view, with no Python loop over views:
    out[b, v] = Wy[b, v] @ canvas[b] @ Wx[b, v]^T per channel, the weights reproducing torch's
    antialiased crop-resize (``resample_weights``), flips as reversed rows of Wx. Runs on the
    canvas's device. Equal to ``render_views`` to float32 rounding (max |diff| < 1e-4 on [0, 1],
    tested), so a student's crop is the view whose teacher embedding it is matched to.

    canvas: (B, S, S, 3) uint8; params: (B, V, 5) int. Returns (B, V, 3, out, out) float32 in [0, 1]."""
    if canvas.dim() == 3:
        canvas, params = canvas[None], params[None]
    s = canvas.shape[1]
    p = params.to(canvas.device, torch.int64)
    top, left, h, w, flip = p.unbind(-1)
    wy = resample_weights(top, h, s, out_size, interpolation)          # (B, V, out, S)
    wx = resample_weights(left, w, s, out_size, interpolation)
    wx = torch.where(flip.bool()[..., None, None], wx.flip(-2), wx)
    img = canvas.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)    # (B, 3, S, S)
    rows = torch.matmul(wy[:, :, None], img[:, None])                  # (B, V, 3, out, S)
    return torch.matmul(rows, wx[:, :, None].transpose(-1, -2)).clamp_(0.0, 1.0)
