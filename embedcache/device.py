"""Device names shared by teachers and students ('auto' = CUDA when available, else CPU)."""
import os

import torch

from .errors import ConfigError


def resolve_device(device: str = "auto", fix: str = "--device cpu") -> torch.device:
    """'auto': CUDA when available (under torchrun, the process's own GPU, cuda:LOCAL_RANK), else CPU.
    ``fix``: how the caller's user sets it (a teacher's: --set teacher.device=cpu)."""
    if device in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = os.environ.get("LOCAL_RANK", "")
        return torch.device(f"cuda:{int(local) % torch.cuda.device_count()}" if local.isdigit() else "cuda")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA device is visible; set it to auto or cpu "
                          f"({fix})")
    return dev


def device_name(device: torch.device) -> str:
    """'cpu', or 'cuda (NVIDIA H200)': the kind of device whose float rounding a store's numbers have."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
