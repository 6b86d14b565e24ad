"""What code made a store or a run: library versions, and the package's own git commit where it runs
from a checkout (its version, 0.1.0, has not moved since the first commit)."""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional

LIBRARIES = ("embedcache", "torch", "torchvision", "open_clip_torch", "timm", "zarr", "h5py", "numpy", "pillow",
             "faiss-cpu", "safetensors", "sentence-transformers", "transformers", "tokenizers")


def library_versions() -> Dict[str, str]:
    """Python's and each installed library's version (those not installed left out), and
    ``embedcache_commit`` where the package runs from a git checkout: looked up once per process (a pack
    of heads records them in every run's summary)."""
    return dict(_looked_up())


@functools.lru_cache(maxsize=1)
def _looked_up() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in LIBRARIES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    commit = source_commit()
    if commit:
        out["embedcache_commit"] = commit
    return out


@functools.lru_cache(maxsize=1)
def source_commit() -> Optional[str]:
    """The checkout's commit (12 hex digits, ``+changes`` when its tracked files differ from it), or None
    outside a checkout or without git."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != here.parent:  # installed inside another repo
            return None
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.returncode == 0 and dirty.stdout.strip() else "")
