"""Device names shared by teachers and students ('auto' = CUDA when available, else CPU), and the two
ways small host data reaches a GPU without waiting for the work queued there."""
import functools
import os
from typing import Tuple

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


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor goes to a GPU from pinned memory, asynchronously: a copy from
    ordinary (pageable) memory first waits for everything queued on the device, once per batch or step."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.lru_cache(maxsize=128)
def constant(values: Tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small table of constants (a mean, a lookup table) on ``device``, made once per device and never
    written to: made from a list at each call it was such a waiting copy per batch."""
    return torch.tensor(values, dtype=dtype, device=device)
