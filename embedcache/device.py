"""Device names shared by teachers and students ('auto' = CUDA when available, else CPU), the two
ways small host data reaches a GPU without waiting for the work queued there, and float32 kept float32."""
import contextlib
import functools
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

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


def host_memory_available() -> Optional[int]:
    """Bytes of memory this process can be given without swapping: Linux's MemAvailable, or less where a cgroup
    (a container's memory limit) allows less; None where neither says."""
    said = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(said) if said else None


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """A cgroup's memory limit less its use (v2's memory.max, v1's memory.limit_in_bytes); None without one."""
    for limit, used in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            cap = Path(root, limit).read_text().strip()
            if cap == "max" or int(cap) >= 1 << 60:  # no limit (v1 writes a huge number)
                return None
            return max(0, int(cap) - int(Path(root, used).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


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


def _conv_switch() -> Tuple[Any, str, Any]:
    """(owner, attribute, off value) of cuDNN convolutions' TF32: torch >= 2.9's ``fp32_precision``, else
    the older ``allow_tf32``. Convolutions read it by their own name, so it never mixes with the RNNs'."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        return conv, "fp32_precision", "ieee"
    return torch.backends.cudnn, "allow_tf32", False


def _matmul_settings() -> Tuple[Optional[str], Optional[str]]:
    """The process's float32 matmul settings: the older API's precision ('highest', 'high'; None where a mix
    of torch's two APIs makes it unreadable) and torch >= 2.9's ``fp32_precision`` (None before it)."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
    return legacy, getattr(torch.backends.cuda.matmul, "fp32_precision", None)


def tf32_settings() -> Dict[str, Any]:
    """What decides TF32 for float32 matmuls and convolutions now (printed by bench/gpu_checks.py)."""
    legacy, new = _matmul_settings()
    owner, name, _ = _conv_switch()
    return {"float32_matmul_precision": legacy, "matmul_fp32_precision": new, f"conv_{name}": getattr(owner, name)}


@contextlib.contextmanager
def ieee_fp32(active: bool) -> Iterator[None]:
    """While active, float32 matmuls and convolutions on a GPU are IEEE float32, not TF32: torch lets
    cuDNN convolutions (a ViT's patch embedding) run in TF32 by default, and a caller may have allowed
    it for matmuls, so a teacher asked for fp32 would give embeddings rounded to TF32's 10-bit mantissa,
    differing between GPU generations. Matmuls are set through the older API, which sets both of torch's:
    cuBLAS refuses to run where the two disagree (a caller's set_float32_matmul_precision('high') beside
    the newer switch set alone: a review). The process's own settings are back afterwards."""
    if not active:
        yield
        return
    owner, name, off = _conv_switch()
    conv_before, (legacy, new) = getattr(owner, name), _matmul_settings()
    try:
        torch.set_float32_matmul_precision("highest")
        setattr(owner, name, off)
        yield
    finally:
        setattr(owner, name, conv_before)
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        if new is not None and torch.backends.cuda.matmul.fp32_precision != new:
            torch.backends.cuda.matmul.fp32_precision = new
