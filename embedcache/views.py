"""Canvas and views: the one place that turns an image into what teachers and students see.

Each image is decoded once into a square uint8 canvas (shorter side resized to S, centre crop).
View v of image i is a crop box and a flip on that canvas, drawn from a random generator seeded by
(views.seed, i, v) alone, so it does not depend on batch size, worker count or sharding; with
``views.color_jitter`` / ``views.grayscale`` also a colour jitter and a grayscale draw (DomainBed's
and VL2V-ADiP's augmentation), from a generator of its own so the crops stay those of a store without.
The same ``render_views`` call makes the teacher's input at extraction time and the student's input
at training time, so a student rebuilds exactly the view whose teacher embedding it is matched to.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .device import constant, upload
from .images import to_rgb8

PARAM_FIELDS = ("top", "left", "height", "width", "flip")  # image/view_params[..., k], canvas pixels
# with colour augmentation, image/view_params[..., 5:]: torchvision ColorJitter's factors x COLOR_SCALE
# (brightness, contrast, saturation, hue), the index in ORDERS of the order they are applied in, and a
# grayscale flag (RandomGrayscale, applied after the jitter)
COLOR_FIELDS = ("brightness", "contrast", "saturation", "hue", "order", "gray")
COLOR_SCALE = 10_000
ORDERS = tuple(itertools.permutations(range(4)))  # 24 orders of (brightness, contrast, saturation, hue)
IDENTITY_COLOR = (COLOR_SCALE, COLOR_SCALE, COLOR_SCALE, 0, 0, 0)


def param_fields(color: bool) -> Tuple[str, ...]:
    """The fields of image/view_params[..., k] for a store with or without colour augmentation."""
    return PARAM_FIELDS + COLOR_FIELDS if color else PARAM_FIELDS


# the whole image is resized before the centre crop: past this many pixels (an 8000 x 1 PNG of 24 KB at
# 256 px took 2.75 GB) an image is refused, a failed row, rather than a worker killed for memory
MAX_RESIZED_PIXELS = 32_000_000


def canvas_resize(w: int, h: int, size: int, limit: Optional[int] = None) -> Tuple[int, int]:
    """(width, height) an image of ``w`` x ``h`` is resized to before the centre crop: shorter side
    ``size``; ValueError past ``limit`` pixels (MAX_RESIZED_PIXELS, or a caller's smaller one)."""
    limit = MAX_RESIZED_PIXELS if limit is None else min(limit, MAX_RESIZED_PIXELS)
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if nw * nh > limit:
        raise ValueError(f"{w} x {h} resized to {size} px on its shorter side would be {nw * nh:,} pixels, more than "
                         f"{limit:,}; crop it closer to square")
    return nw, nh


def make_canvas(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: shorter side resized to ``size`` (bicubic), centre crop. The image is
    first decoded faithfully to 8-bit RGB (EXIF orientation, 16-bit and transparent modes)."""
    image = to_rgb8(image)
    nw, nh = canvas_resize(*image.size, size)
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)  # writable


def color_params(seed: int, index: int, view: int, jitter: float, grayscale: float) -> Tuple[int, ...]:
    """One view's colour draw (COLOR_FIELDS) as torchvision's ColorJitter(jitter, jitter, jitter,
    jitter) then RandomGrayscale(grayscale) draw it: factors uniform in [max(0, 1 - j), 1 + j], hue
    in [-j, j], the four in a random order; from the generator of (seed, index, view, 7)."""
    rng = np.random.default_rng([seed, index, view, 7])
    factors = [rng.uniform(max(0.0, 1.0 - jitter), 1.0 + jitter) for _ in range(3)] + [rng.uniform(-jitter, jitter)]
    order = int(rng.integers(0, len(ORDERS)))
    gray = int(rng.uniform() < grayscale)
    return (*(int(round(f * COLOR_SCALE)) for f in factors), order, gray)


def view_params(seed: int, index: int, count: int, canvas: int,
                scale: Sequence[float] = (0.35, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                flip: bool = True, color_jitter: float = 0.0, grayscale: float = 0.0) -> np.ndarray:
    """(count, 5) int32 rows (top, left, height, width, flip); row 0 is the whole canvas unflipped.
    With ``color_jitter`` or ``grayscale``, (count, 11): the colour fields follow (COLOR_FIELDS; row 0
    unchanged colours).

    Random-resized-crop sampling as torchvision does it (10 tries, then the centre crop of the
    nearest allowed ratio), with its own generator per (seed, index, view).
    """
    color = bool(color_jitter or grayscale)
    out = np.zeros((count, len(param_fields(color))), dtype=np.int32)
    out[0, :5] = (0, 0, canvas, canvas, 0)
    if color:
        out[:, 5:] = IDENTITY_COLOR
        for v in range(1, count):
            out[v, 5:] = color_params(seed, index, v, color_jitter, grayscale)
    for v in range(1, count):
        rng = np.random.default_rng([seed, index, v])
        box = _drawn_box(rng, canvas, scale, ratio) or fallback_box(canvas, ratio)
        do_flip = int(flip and rng.uniform() < 0.5)
        out[v, :5] = (*box, do_flip)
    return out


def _drawn_box(rng: np.random.Generator, canvas: int, scale: Sequence[float], ratio: Sequence[float]):
    """(top, left, height, width) of a random-resized crop of the square canvas as torchvision draws one,
    or None when none of its 10 tries fits."""
    area, log_r = canvas * canvas, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= canvas and 0 < h <= canvas:
            top = int(rng.integers(0, canvas - h + 1))
            left = int(rng.integers(0, canvas - w + 1))
            return top, left, h, w
    return None


def fallback_box(canvas: int, ratio: Sequence[float]) -> Tuple[int, int, int, int]:
    """torchvision's crop where its 10 tries missed: the centred crop of the whole canvas at the allowed
    ratio nearest the canvas's own (1: the whole canvas where the range holds it)."""
    h = w = canvas
    if ratio[0] > 1:
        h = max(1, int(round(canvas / ratio[0])))
    elif ratio[1] < 1:
        w = max(1, int(round(canvas * ratio[1])))
    return (canvas - h) // 2, (canvas - w) // 2, h, w


def drawn_share(canvas: int, scale: Sequence[float], ratio: Sequence[float], n: int = 256) -> float:
    """The share of ``n`` views (seeded draws) whose crop fits the canvas in torchvision's 10 tries, the
    rest taking ``fallback_box``."""
    return sum(_drawn_box(np.random.default_rng([0, i]), canvas, scale, ratio) is not None for i in range(n)) / n


# --- colour: torchvision's ColorJitter and RandomGrayscale on float images, batched over views -------------
def _gray(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 1, H, W): ITU-R 601-2 luma, as torchvision's rgb_to_grayscale."""
    return (0.2989 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :])


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns: RGB -> HSV, h + shift (mod 1), HSV -> RGB."""
    r, g, b = x.unbind(-3)
    maxc, minc = x.max(-3).values, x.min(-3).values
    chroma = maxc - minc
    sat = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    div = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0 + 1.0 + shift[..., None, None], 1.0)
    i6 = h * 6.0
    i = torch.floor(i6)
    f, i = i6 - i, i.to(torch.int64) % 6
    v = maxc
    p, q, t = (v * (1.0 - sat)).clamp(0, 1), (v * (1.0 - sat * f)).clamp(0, 1), (v * (1.0 - sat * (1.0 - f))).clamp(0, 1)
    table = torch.stack([torch.stack(c, -3) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return torch.gather(table, 0, i[None, ..., None, :, :].expand(1, *x.shape))[0]


# per order (ORDERS): its three blend adjustments in the order applied, and where the hue rotation falls
_BLENDS = tuple(tuple(k for k in order if k != 3) for order in ORDERS)
_HUE_AT = tuple(order.index(3) for order in ORDERS)


def _adjust(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """One of ColorJitter's blend adjustments per view (op 0 brightness: towards black, 1 contrast:
    towards the mean gray, 2 saturation: towards the gray image), where ``active``; elsewhere the
    factor is 1, which leaves the view exactly as it is."""
    sel = (...,) + (None,) * 3
    f = torch.where(active, factors.gather(-1, op[..., None])[..., 0], torch.ones_like(factors[..., 0]))
    g = _gray(x)
    target = torch.where((op == 2)[sel], g, torch.where((op == 1)[sel], g.mean((-3, -2, -1), keepdim=True), 0.0))
    return _blend(x, target, f[sel])


def _with_color(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Rendered views, coloured where their parameters carry colour fields (a colour-augmented store)."""
    return apply_color(x, upload(params[..., 5:], x.device)) if params.shape[-1] > 5 else x


def apply_color(x: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) float in [0, 1] and (..., 6) int colour fields -> the jittered views: each view's
    four adjustments in its own order, then its grayscale flag. Batched without a loop over views:
    every view takes three blend steps (its adjustments before the hue rotation, the others at factor
    1), the rotation, then three more (those after it); a hue shift of 0 leaves a view as it is."""
    sel = (...,) + (None,) * 3
    factors = color[..., :4].to(x.dtype) / COLOR_SCALE
    order = color[..., 4].long()
    blends = constant(_BLENDS, torch.int64, x.device)[order]  # (..., 3)
    hue_at = constant(_HUE_AT, torch.int64, x.device)[order]  # (...,)
    for j in range(3):
        x = _adjust(x, blends[..., j], factors, j < hue_at)
    shift = factors[..., 3]
    x = torch.where((shift == 0)[sel], x, _hue(x, shift))
    for j in range(3):
        x = _adjust(x, blends[..., j], factors, j >= hue_at)
    gray = color[..., 5].bool()[sel]
    return torch.where(gray, _gray(x).expand_as(x), x)


def render_views(canvas: torch.Tensor, params: torch.Tensor, out_size: int,
                 interpolation: str = "bicubic") -> torch.Tensor:
    """Crop, resize and flip views from canvases.

    canvas: (B, S, S, 3) uint8; params: (B, V, 5) int (see PARAM_FIELDS), or (B, V, 11) with colour.
    Returns (B, V, 3, out_size, out_size) float32 in [0, 1]. Deterministic on a given device.
    """
    if canvas.dim() == 3:
        canvas, params = canvas[None], params[None]
    b, v = params.shape[:2]
    img = canvas.permute(0, 3, 1, 2)  # (B, 3, S, S)
    # on the CPU laid out plane by plane as it becomes float (one pass): torch resizes a channels-last
    # image 1.7x slower there (the same pixels, tested)
    layout = torch.contiguous_format if img.device.type == "cpu" else torch.preserve_format
    img = img.to(torch.float32, memory_format=layout).div_(255.0)
    out = img.new_empty((b, v, 3, out_size, out_size))
    mode = "bicubic" if interpolation == "bicubic" else "bilinear"
    boxes = params[..., :5].tolist()
    for i in range(b):
        for j in range(v):
            top, left, h, w, flip = boxes[i][j]
            crop = img[i:i + 1, :, top:top + h, left:left + w]
            crop = F.interpolate(crop, size=(out_size, out_size), mode=mode, antialias=True, align_corners=False)
            if flip:
                crop = crop.flip(-1)
            out[i, j] = crop[0]
    return _with_color(out.clamp_(0.0, 1.0), params)


def to_uint8(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Float pixels in [0, 1] -> uint8 (rounded). A teacher's input is an 8-bit image, like any
    image file, so a view sent losslessly (PNG) to a remote teacher is exactly what a local one sees.
    ``inplace`` scales ``x`` itself (one pass less, for a caller that drops it)."""
    return (x.mul_(255.0) if inplace else x.mul(255.0)).round_().to(torch.uint8)


def normalize(x: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> torch.Tensor:
    """(..., 3, H, W) float in [0, 1] -> (x - mean) / std per channel."""
    m = constant(tuple(mean), x.dtype, x.device).view(3, 1, 1)
    s = constant(tuple(std), x.dtype, x.device).view(3, 1, 1)
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

    canvas: (B, S, S, 3) uint8; params: (B, V, 5 or 11) int. Returns (B, V, 3, out, out) float32 in [0, 1]."""
    with torch.autocast(canvas.device.type, enabled=False):  # float32 even inside a caller's bf16 autocast:
        return _render_batched(canvas, params, out_size, interpolation)  # the teacher's views were float32


def _render_batched(canvas: torch.Tensor, params: torch.Tensor, out_size: int, interpolation: str) -> torch.Tensor:
    if canvas.dim() == 3:
        canvas, params = canvas[None], params[None]
    s = canvas.shape[1]
    p = upload(params.to(torch.int64), canvas.device)
    top, left, h, w, flip = p[..., :5].unbind(-1)
    wy = resample_weights(top, h, s, out_size, interpolation)          # (B, V, out, S)
    wx = resample_weights(left, w, s, out_size, interpolation)
    wx = torch.where(flip.bool()[..., None, None], wx.flip(-2), wx)
    img = canvas.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)    # (B, 3, S, S)
    rows = torch.matmul(wy[:, :, None], img[:, None])                  # (B, V, 3, out, S)
    return _with_color(torch.matmul(rows, wx[:, :, None].transpose(-1, -2)).clamp_(0.0, 1.0), p)
