"""Device names shared by teachers and students ('auto' = CUDA when available, else CPU), the two
ways small host data reaches a GPU without waiting for the work queued there, and float32 kept float32."""
import contextlib
import functools
import os
from typing import Iterator, Tuple

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


def _tf32_switches() -> list:
    """(owner, attribute, off value) for CUDA matmuls and cuDNN convolutions: torch >= 2.9's
    ``fp32_precision`` where it has it, else the older ``allow_tf32`` flags."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision", "ieee"), (conv, "fp32_precision", "ieee")]
    return [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]


@contextlib.contextmanager
def ieee_fp32(active: bool) -> Iterator[None]:
    """While active, float32 matmuls and convolutions on a GPU are IEEE float32, not TF32: torch lets
    cuDNN convolutions (a ViT's patch embedding) run in TF32 by default, and a caller may have allowed
    it for matmuls, so a teacher asked for fp32 would give embeddings rounded to TF32's 10-bit mantissa,
    differing between GPU generations. The process's own settings are back afterwards."""
    if not active:
        yield
        return
    switches = _tf32_switches()
    before = [getattr(owner, name) for owner, name, _ in switches]
    try:
        for owner, name, off in switches:
            setattr(owner, name, off)
        yield
    finally:
        for (owner, name, _), value in zip(switches, before):
            setattr(owner, name, value)
