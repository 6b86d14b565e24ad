"""Views as image files, and back: what goes over the wire to an embedding service.

PNG is lossless: the server decodes exactly the uint8 pixels the client rendered, so a remote
teacher sees what a local one would. JPEG (quality >= 50) is smaller and changes the pixels, so the
format and quality are part of the remote teacher's identity (the store's cache key).
"""
from __future__ import annotations

import base64
import binascii
import io
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

MIMETYPES = {"png": "image/png", "jpeg": "image/jpeg"}
# PNG compression level: fixed, because the bytes sent are hashed into the ledger key
PNG_LEVEL = 1


def encode_views(x: torch.Tensor, fmt: str = "png", quality: int = 95) -> List[bytes]:
    """x: (N, 3, H, W) uint8 -> N encoded images (deterministic bytes for equal pixels)."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) uint8 views, got {tuple(x.shape)} {x.dtype}")
    arr = x.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    out = []
    for img in arr:
        buf = io.BytesIO()
        if fmt == "png":
            Image.fromarray(img, "RGB").save(buf, "PNG", compress_level=PNG_LEVEL)
        elif fmt == "jpeg":
            Image.fromarray(img, "RGB").save(buf, "JPEG", quality=int(quality), subsampling=0, optimize=False)
        else:
            raise ValueError(f"unknown image format {fmt!r}; use png or jpeg")
        out.append(buf.getvalue())
    return out


def decode_image(data: bytes, max_pixels: int = 4096 * 4096) -> np.ndarray:
    """An encoded image -> (H, W, 3) uint8. Raises ValueError for anything that is not a readable
    RGB/grey image or is larger than ``max_pixels`` (a decompression bomb)."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise ValueError(f"image of {img.width}x{img.height} pixels is larger than the {max_pixels} allowed")
        img.load()
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types for a corrupt file
        raise ValueError(f"not a readable image ({type(exc).__name__})") from None
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


def data_uri(data: bytes, fmt: str) -> str:
    return f"data:{MIMETYPES[fmt]};base64,{b64(data)}"


def parse_data_uri(uri: str) -> Tuple[str, bytes]:
    """'data:image/png;base64,...' -> (mimetype, bytes); ValueError for anything else (URLs included:
    a server that fetched URLs would let any client make it reach any host)."""
    if not isinstance(uri, str) or not uri.startswith("data:"):
        raise ValueError("images must be data URIs (data:image/png;base64,...)")
    head, sep, payload = uri[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise ValueError("images must be base64 data URIs (data:image/png;base64,...)")
    return head[: -len(";base64")], unb64(payload)


def floats_b64(emb: np.ndarray) -> str:
    """(D,) or (N, D) float32 -> base64 of little-endian float32 (OpenAI's encoding_format=base64)."""
    return b64(np.ascontiguousarray(emb, dtype="<f4").tobytes())


def floats_from_b64(text: str) -> np.ndarray:
    return np.frombuffer(unb64(text), dtype="<f4").astype(np.float32)
