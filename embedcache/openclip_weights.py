"""What open_clip weights need of the architecture that runs them, which open_clip itself lets pass: the
activation a pretrained tag was trained with (OpenAI's QuickGELU), and the image size and context length a
weights file was saved at (open_clip resamples position embeddings to the architecture's without a word)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch


def activation_mismatch(model: str, pretrained: Optional[str]) -> Optional[Tuple[str, str]]:
    """(why, the architecture that runs it) where a built-in architecture would run a pretrained tag's weights with
    another activation than they were trained with; None where it would not, or cannot tell (a file, a folder)."""
    if not pretrained or str(model).startswith(("hf-hub:", "local-dir:")) or Path(pretrained).exists():
        return None
    import open_clip

    tag = open_clip.get_pretrained_cfg(model, pretrained)
    config = open_clip.get_model_config(model) if tag else None
    if not config or bool(tag.get("quick_gelu", False)) == bool(config.get("quick_gelu", False)):
        return None
    quick = bool(tag.get("quick_gelu", False))
    fix = f"{model}-quickgelu" if quick else model.removesuffix("-quickgelu")
    return f"{pretrained!r} was trained with {'QuickGELU' if quick else 'GELU'}, which {model} does not run", fix


def resampled_positions(own: Dict[str, torch.Tensor], path: str) -> str:
    """A position embedding of the weights file at ``path`` whose shape the architecture's (``own``: its state dict)
    differs from, in words ('' where none does, or where the file is not read here: a big_vision .npz)."""
    shapes = _file_shapes(path)
    mine = {k: tuple(v.shape) for k, v in own.items() if k.endswith("positional_embedding")}
    for key, shape in shapes.items():
        theirs = mine.get(key) or mine.get(f"text.{key}")
        if key.endswith("positional_embedding") and theirs is not None and tuple(shape) != theirs:
            return f"its {key} is {tuple(shape)}, the architecture's {theirs}"
    return ""


def _file_shapes(path: str) -> Dict[str, tuple]:
    """Tensor name -> shape of a torch or safetensors weights file, as open_clip reads it (a ``state_dict`` wrapper
    and DataParallel's ``module.`` taken off), without holding its tensors in memory; {} for a file of another
    kind (open_clip converts big_vision .npz files itself)."""
    if Path(path).suffix in (".npz", ".npy"):
        return {}
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a file of torch's older format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return {k.removeprefix("module."): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
