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

# Fixes that changed what an extraction writes for the same inputs and settings, left out of the cache key
# (which would have orphaned every store made before). A store's manifest records how many of these made it
# (``versions["embedcache_store_numbers"]``); a store resumed under another count says which lie between its
# blocks. Each: (what changed, which stores it touches: ``touches(manifest)``). Append; never reorder.
STORE_NUMBER_CHANGES = (
    ("a 16-bit grey PNG's transparent value decodes white (was black)",  # 2026-12-07
     lambda m: "synthesis" not in m),
    ("an fp32 teacher on a GPU embeds in IEEE float32 (its convolutions were TF32)",  # 2026-12-07
     lambda m: str(m.get("device", "")).startswith("cuda") and (m.get("teacher") or {}).get("precision") == "fp32"),
    ("a view whose 10 crop tries all missed is torchvision's centre crop at the allowed ratio nearest 1 (was the whole "
     "canvas; the same where views.ratio holds 1)",  # 2026-12-07
     lambda m: not _holds_one((m.get("views") or {}).get("ratio"))),
)
STORE_NUMBERS = len(STORE_NUMBER_CHANGES)


def _holds_one(ratio) -> bool:
    """Whether a store's views.ratio range (None: the default's) holds 1, the square canvas's own ratio."""
    return ratio is None or float(ratio[0]) <= 1 <= float(ratio[1])


def store_numbers_between(began: Dict, now: Dict) -> list:
    """The changes of ``STORE_NUMBER_CHANGES`` between the version that began a store (manifest ``began``)
    and this one (``now``) that touch it on either side, and those of a later version that began it: [] where
    none. A store that does not say is taken as made before the first (stores made before 2026-12-07)."""
    was = int((began.get("versions") or {}).get("embedcache_store_numbers", 0))
    later = [f"{was - STORE_NUMBERS} change(s) made after this version"] if was > STORE_NUMBERS else []
    return [what for what, touches in STORE_NUMBER_CHANGES[was:] if touches(began) or touches(now)] + later


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
