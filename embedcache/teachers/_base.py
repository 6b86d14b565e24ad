"""What every teacher provides: image and text encoders into one L2-normalised space."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from ..device import resolve_device  # noqa: F401  (re-exported for the teachers)
from ..fileio import file_sha256  # noqa: F401  (re-exported for the teachers)
from ..registry import Registry
from ..views import normalize

TEACHERS = Registry("teacher")


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

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) uint8 views at ``input_size``. Returns (B, D) float32, L2-normalised, CPU.
        Extraction calls this: the teacher's input is an 8-bit image (a remote teacher sends it as
        PNG, losslessly), normalised here with the teacher's own mean and std."""
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        return self.encode_image(normalize(x, self.mean, self.std))

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
