"""Image generators (a registry): what the synthesis optimiser changes, and how it becomes pixels.

A generator is built for one store (``factory(cfg: ImageConfig, size, device)``) and then, per batch,
makes each image's trainable parameters from that image's own seed (``init``) and renders them
(``render``). The optimiser, augmentations and loss (``image.py``) never look inside it, so a real
generator plugs in here without changing the rest:

    @GENERATORS.register("my_gan")
    class MyGenerator:
        def __init__(self, cfg, size, device): ...            # load weights (local files, no hub)
        def init(self, seeds: List[int]) -> List[torch.Tensor]: ...  # per-image latents, batch first
        def render(self, params) -> torch.Tensor: ...           # (B, 3, size, size) in [0, 1], differentiable
        def identity(self) -> dict: ...                         # what changes the images: in the cache key

The default, ``fourier``, needs no weights: Lucid-style decorrelated Fourier-space coefficients
with colour decorrelation (Olah et al., Distill 2017). ``diffusers_vae`` decodes latents with a
local diffusers autoencoder (``AutoencoderKL`` or ``VQModel``, VQGAN's decoder in diffusers) when
such weights exist.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from ..errors import ConfigError
from ..fileio import file_sha256, json_kind
from ..registry import Registry
from .config import ImageConfig

GENERATORS = Registry("generator")

# Lucid's square root of the ImageNet colour correlation matrix (its SVD), columns normalised.
_COLOR_SVD_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32)
COLOR_CORRELATION = _COLOR_SVD_SQRT / np.max(np.linalg.norm(_COLOR_SVD_SQRT, axis=0))


def seed_of(*parts: int) -> int:
    """A 63-bit torch seed from integer parts (seed, row, ...): independent streams per image."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@GENERATORS.register("fourier")
class FourierGenerator:
    """Per image: a (3, S, S//2+1) complex spectrum; pixels = sigmoid(colour-decorrelate(irfft2(
    spectrum / max(f, 1/S)^decay) / 4)). Low frequencies get large steps and high ones small, so plain
    gradient steps make natural-looking images instead of adversarial high-frequency noise."""

    def __init__(self, cfg: ImageConfig, size: int, device: torch.device):
        self.size, self.cfg, self.device = size, cfg, device
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        freq = torch.sqrt(fx * fx + fy * fy)
        self.scale = (1.0 / torch.clamp(freq, min=1.0 / size) ** cfg.decay).to(device)  # (S, S//2+1)
        self.color = torch.from_numpy(COLOR_CORRELATION).to(device)

    def init(self, seeds: List[int]) -> List[torch.Tensor]:
        s = self.size
        spec = torch.stack([torch.randn(3, s, s // 2 + 1, 2, generator=torch.Generator().manual_seed(sd))
                            for sd in seeds]) * self.cfg.init_std
        return [spec.to(self.device).requires_grad_(True)]

    def render(self, params: List[torch.Tensor]) -> torch.Tensor:
        spec = torch.view_as_complex(params[0]) * self.scale
        img = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho") / 4.0  # (B, 3, S, S)
        if self.cfg.decorrelate:
            img = torch.einsum("bchw,dc->bdhw", img, self.color)
        return torch.sigmoid(img)

    def identity(self) -> Dict[str, Any]:
        return {"name": "fourier", "decay": self.cfg.decay, "decorrelate": self.cfg.decorrelate,
                "init_std": self.cfg.init_std, "colour_matrix": "lucid-imagenet-svd-sqrt", "output": "sigmoid",
                "size": self.size}


@GENERATORS.register("diffusers_vae")
class DiffusersVAEGenerator:
    """Latents decoded by a local diffusers autoencoder (``image.model``: a folder with config.json
    and weights, or a pipeline folder with a ``vae/`` subfolder): VQGAN-CLIP's setting where such
    weights exist. Latents start ~ N(0, 1) at the autoencoder's downsampling of the canvas size."""

    def __init__(self, cfg: ImageConfig, size: int, device: torch.device):
        if not cfg.model:
            raise ConfigError("image.generator=diffusers_vae needs image.model=/path/to/a/diffusers/autoencoder")
        folder = Path(cfg.model)
        folder = folder / "vae" if (folder / "vae" / "config.json").is_file() else folder
        if not (folder / "config.json").is_file():
            raise ConfigError(f"image.model={cfg.model}: no diffusers config.json there (or in its vae/ subfolder)")
        import json

        try:
            said = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"image.model={cfg.model}: its config.json is not JSON ({type(exc).__name__}); give a "
                              "diffusers autoencoder folder") from None
        kind = said.get("_class_name", "AutoencoderKL") if isinstance(said, dict) else f"JSON {json_kind(said)}"
        if kind not in ("AutoencoderKL", "VQModel"):
            raise ConfigError(f"image.model={cfg.model} holds a {kind}; diffusers_vae takes AutoencoderKL or VQModel")
        try:
            import diffusers
        except ImportError:
            raise ConfigError("image.generator=diffusers_vae needs diffusers: pip install diffusers") from None
        self.vae = getattr(diffusers, kind).from_pretrained(str(folder), local_files_only=True).to(device).eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.kind, self.folder, self.size, self.device = kind, folder, size, device
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if size % down:
            raise ConfigError(f"canvas.size={size} must be a multiple of the autoencoder's downsampling {down}")
        self.latent_shape = (int(self.vae.config.latent_channels), size // down, size // down)
        self.scaling = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    def init(self, seeds: List[int]) -> List[torch.Tensor]:
        z = torch.stack([torch.randn(*self.latent_shape, generator=torch.Generator().manual_seed(sd)) for sd in seeds])
        return [z.to(self.device).requires_grad_(True)]

    def render(self, params: List[torch.Tensor]) -> torch.Tensor:
        out = self.vae.decode(params[0] / self.scaling).sample  # (B, 3, S, S) in about [-1, 1]
        return (out.float() * 0.5 + 0.5).clamp(0.0, 1.0)

    def identity(self) -> Dict[str, Any]:
        weights = sorted(p for p in self.folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
        return {"name": "diffusers_vae", "class": self.kind, "files": {p.name: file_sha256(p) for p in weights},
                "size": self.size, "latent": list(self.latent_shape)}


def build_generator(cfg: ImageConfig, size: int, device: torch.device):
    return GENERATORS.get(cfg.generator)(cfg, size, device)
