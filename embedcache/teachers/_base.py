"""What every teacher provides: image and text encoders into one L2-normalised space."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from .._device import resolve_device  # noqa: F401  (re-exported for the teachers)
from .._registry import Registry

TEACHERS = Registry("teacher")


def file_sha256(path: Path, _cache: Dict[Tuple[str, int, float], str] = {}) -> str:
    """Content hash of a weights file (16 hex chars). Keys use contents, not paths, so moving a
    checkpoint keeps its stores valid. Memoised per (path, size, mtime) within a process."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime)
    if memo not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _cache[memo] = h.hexdigest()[:16]
    return _cache[memo]


class Teacher:
    """Base class. Subclasses set the attributes below in ``__init__``.

    embed_dim: D. input_size: square side the image encoder takes. mean/std: per-channel
    normalisation applied to [0, 1] pixels. interpolation: 'bicubic' or 'bilinear'.
    context_length: most tokens the text encoder reads; longer prompts are truncated.
    """

    registry_name: str = ""
    embed_dim: int
    input_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str = "bicubic"
    context_length: int
    device: torch.device

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float, already normalised. Returns (B, D) float32, L2-normalised, CPU."""
        raise NotImplementedError

    def encode_text(self, texts: List[str]) -> torch.Tensor:
        """Returns (T, D) float32, L2-normalised, CPU."""
        raise NotImplementedError

    def count_tokens(self, texts: List[str]) -> List[int]:
        """Tokens each text needs (special tokens included), before any truncation."""
        raise NotImplementedError

    def identity(self) -> Dict[str, Any]:
        """What makes this teacher's outputs what they are: goes into the cache key."""
        raise NotImplementedError

    def preprocessing(self) -> Dict[str, Any]:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    def describe(self) -> Dict[str, Any]:
        """Manifest entry: identity, embedding dimension, preprocessing and how to reload it."""
        return {**self.identity(), "embed_dim": self.embed_dim, "preprocessing": self.preprocessing(),
                "context_length": self.context_length}
