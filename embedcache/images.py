"""Decoding an image faithfully into 8-bit RGB: every mode Pillow hands over, and EXIF orientation.

``Image.convert("RGB")`` alone is wrong for several modes: 16-bit and 32-bit integer images are
clipped at 255 (a 16-bit PNG turns almost white), transparent pixels take whatever colour hides
under them (often black), and phone photos keep their sensor orientation (sideways). Here:
- EXIF orientation is applied first (``ImageOps.exif_transpose``), as every viewer does;
- 16-bit samples ("I;16*", and "I": 32-bit integers, which older Pillow versions gave for 16-bit PNG
  and TIFF files, read as 16-bit values) are scaled to 8 bits by /257, so 65535 -> 255; values outside
  0..65535 are refused; a grey image's transparent value (PNG's tRNS) is white, as below;
- float images ("F") are taken as [0, 1] when their maximum is <= 1, else as [0, 255]; values
  outside [0, 255] are refused;
- transparency (RGBA, LA, PA, P or L with a transparent colour) is composited over white, as a
  page shows it;
- "1", "L", "P", "CMYK", "YCbCr", "RGB" convert with Pillow's own conversions.
A refused image raises ``ImageDecodeError``; extraction records it as a failed row with the reason.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255)
# Pillow's own warning for an image past its decompression-bomb limit names no file: ``read_rgb8`` says it
# instead, and keeps Pillow's quiet (set where it reads: a command's ``catch_warnings`` drops a filter set
# inside it once the command ends, so a second command in one process printed both; a review)
BOMB_FILTER = ("ignore", None, Image.DecompressionBombWarning, None, 0)


def _quiet_pillow_bomb() -> None:
    if BOMB_FILTER not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageDecodeError(ValueError):
    pass


def _from_array(gray_or_rgb: np.ndarray) -> Image.Image:
    arr = np.clip(np.rint(gray_or_rgb), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB").convert("RGB")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float single-channel images -> 8-bit RGB, scaled, never clipped silently."""
    arr = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        if not np.isfinite(arr).all():
            raise ImageDecodeError("float image holds NaN or infinite values")
        hi = float(arr.max()) if arr.size else 0.0
        lo = float(arr.min()) if arr.size else 0.0
        if lo < 0 or hi > 255:
            raise ImageDecodeError(f"float image with values in [{lo:g}, {hi:g}], outside [0, 1] and [0, 255]; "
                                   "convert it to 8 or 16 bits")
        return _from_array(arr * 255.0 if hi <= 1.0 else arr)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0 or hi > 65535:
        raise ImageDecodeError(f"integer image with values in [{lo:g}, {hi:g}], outside the 16-bit range; "
                               "convert it to 8 or 16 bits")
    grey = arr / 257.0
    clear = image.info.get("transparency")  # its transparent grey value: over white, as alpha is (it was black)
    if isinstance(clear, int):
        grey[arr == clear] = 255.0
    return _from_array(grey)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL image -> an 8-bit RGB image as it is meant to be seen (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _wide_to_rgb(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        page = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return image.convert("RGB")


def read_rgb8(path) -> Image.Image:
    """The image file at ``path`` as an 8-bit RGB image (``to_rgb8``); raises on a missing, corrupt or
    refused file (an empty one as such: Pillow's "cannot identify image file" said nothing of why)."""
    if os.path.getsize(path) == 0:
        raise OSError("the file is empty (0 bytes)")  # an OSError, as Pillow's unreadable-file errors are
    _quiet_pillow_bomb()
    with Image.open(path) as im:  # past twice the limit: Pillow's DecompressionBombError, a failed row
        _say_large(path, im.size)
        im.load()
        return to_rgb8(im)


def _say_large(path, size) -> None:
    """An image past Pillow's decompression-bomb warning limit, said with its file (Pillow's warning named none)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        warnings.warn(f"{path}: {size[0]}x{size[1]} pixels, past Pillow's decompression-bomb limit of {limit:,}: read "
                      f"and kept (past {2 * limit:,} a file is a failed row; PIL.Image.MAX_IMAGE_PIXELS sets the limit)")
