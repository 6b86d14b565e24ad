"""Head-only mode: frozen student backbone features per view, cached once in the store.

``cache_features`` renders every view of every image at the student's input size, runs the
frozen backbone (eval mode) and writes the derived array ``student-<key>`` (N, V, F) float32
through the store's derived-array API (its own completeness flag and checksum), where the key
hashes the backbone's actual weights and input size: features of other weights never match. The
array records how its views were resampled; features rendered otherwise than the store's views
(cached by an embedcache that always resampled bicubic) are refused and remade.
Recipes that train only the head (VL2V-ADiP's align step, linear probes) then read these arrays
and run thousands of steps per second on a CPU. One store handle is opened, in write mode, so
HDF5 stores (one writer, no reader beside it) work too.
"""
from __future__ import annotations

import hashlib
import os
import shlex
from contextlib import contextmanager
from typing import Callable, Iterable, List, Optional

import numpy as np
import torch

from embedcache.api import StoreReader
from embedcache.config import to_dict
from embedcache.device import resolve_device
from embedcache.errors import ConfigError, StoreBusyError, StoreError
from embedcache.fileio import one_line_when_full, try_exclusive_lock
from embedcache.store import Store

from .config import SplitConfig, StudentConfig
from .data import StoreData, store_interpolation
from .models import Student, build_seeded
from .providers import student_views


def features_key(model: Student) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"student-{model.name.replace('/', '_').replace(':', '_')}-{model.input_size}px-{h.hexdigest()[:12]}"


@torch.no_grad()
def cache_features(store: str, cfg: StudentConfig, seed: int = 0, batch_size: int = 64, device: str = "auto",
                   progress: bool = True, log: Callable[[str], None] = print) -> str:
    """Write the features of ``cfg``'s backbone (built under ``seed``) into the store; returns the derived name."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} is not valid: give 1 or more (--batch-size 64)")
    dev = resolve_device(device)
    with Store(store, "a") as st, _one_features_call(st):
        reader = StoreReader(st)
        model = build_seeded(cfg, reader.dim, 0, seed).to(dev).eval()
        key = features_key(model)
        if has_features(st, key):
            log(f"features {key} already cached in {store}")
            return key
        data = StoreData(reader, reader.text_sources[0], SplitConfig(val_fraction=0.0), training=False)
        data.say_if_upscaled(model.input_size)
        n, v = len(data.labels), data.views
        out = np.zeros((n, v, model.feat_dim), np.float32)
        for i in tqdm(range(0, n, batch_size), desc=f"features {key}", disable=not progress, unit="batch"):
            idx = np.arange(i, min(n, i + batch_size))
            for view in range(v):
                x = student_views(data, idx, np.full(len(idx), view), model.input_size, model.mean, model.std, dev)
                out[idx, view] = model.features(x).float().cpu().numpy()
        with one_line_when_full(store, "free space on the store's disk (backbones already cached stay)"):
            st.put_derived(key, out, {"kind": "student_features", "student": cfg.name, "input_size": model.input_size,
                                      "feat_dim": model.feat_dim, "pretrained": cfg.pretrained, "seed": seed,
                                      "interpolation": data.interpolation})
        log(f"cached {n} x {v} features of {key} in {store}")
        return key


@contextmanager
def _one_features_call(st: Store):
    """The store held for one `embedcache features` call at a time: a second, started beside the first,
    computed the same features again, and the later of two calls for other backbones wrote the store's list
    of derived arrays without the earlier's. An HDF5 store is held by its one writer already."""
    if not os.path.isdir(st.path):
        yield
        return
    fd = try_exclusive_lock(os.path.join(st.path, ".features.lock"))
    if fd is None:
        raise StoreBusyError(f"another `embedcache features` is computing features in {st.path} now; wait for it to "
                             "finish, then rerun (features it cached are found there)")
    try:
        yield
    finally:
        os.close(fd)


def has_features(store: Store, key: str) -> bool:
    """Features of this key are cached complete (their array there) and rendered as the store's views are now."""
    info = store.derived().get(key, {})
    return (bool(info.get("complete")) and _rendered(info) == store_interpolation(store.manifest)
            and store.has(f"derived/{key}"))


def _rendered(info: dict) -> str:
    """How cached features' views were resampled: embedcache before it recorded this always bicubic."""
    return info.get("interpolation", "bicubic")


def backbones(dim: int, cfgs) -> List[Optional[str]]:
    """Each head-only run's backbone (``features_key``; None for other runs), built as its run will
    build it (its student settings, under its seed); once two seeds give one key, the seed does not
    touch the weights and the rest are not built."""
    out: List[Optional[str]] = []
    for cfg in cfgs:
        if not cfg.features:
            out.append(None)
            continue
        seen = _KEYS.setdefault((repr(sorted(to_dict(cfg.student).items())), _file_state(cfg.student.pretrained), dim), {})
        if cfg.seed not in seen:
            fixed = len(seen) > 1 and len(set(seen.values())) == 1
            seen[cfg.seed] = next(iter(seen.values())) if fixed else features_key(build_seeded(cfg.student, dim, 0, cfg.seed))
        out.append(seen[cfg.seed])
    return out


# (student settings, its weights file's state, dim) -> {seed: key}: a launch asks twice (missing
# features, then packs); a student is built once per process (its weights are a function of these and the seed)
_KEYS: dict = {}


def _file_state(path: Optional[str]):
    try:
        st = os.stat(path)
    except (TypeError, OSError):  # no file (from scratch, a hub tag): its building tells
        return None
    return st.st_mtime_ns, st.st_size


def missing_features(reader: StoreReader, cfgs) -> Optional[str]:
    """Before a sweep's first run: the backbones of head-only runs (``features=true``) that have no
    cached features in the store, as a one-line fix naming every command it needs; None when every
    such run has them."""
    cfgs = list(cfgs)
    missing: dict = {}  # key -> the first run that needs it
    for cfg, key in zip(cfgs, backbones(reader.dim, cfgs)):
        if key is not None and key not in missing and not has_features(reader.store, key):
            missing[key] = cfg
    if not missing:
        return None
    seeds: dict = {}  # one command per student's settings, naming the seeds that move its weights
    for cfg in missing.values():
        model = build_seeded(cfg.student, reader.dim, 0, cfg.seed)
        seeds.setdefault(features_command(reader.path, model, seeds=()), set()).add(weights_seed(model))
    commands = " && ".join(f"`{words}{_seed_options(found)}`" for words, found in seeds.items())
    seeded = any(len(found) > 1 for found in seeds.values())  # random backbones: one per seed, seed 0 one of them
    why = (" (each run's seed builds its own random backbone: a pretrained student (student.pretrained) shares one set "
           "of features, and its heads can pack)") if seeded else ""
    return (f"store {reader.path} has no cached features for {len(missing)} {model.name} backbone(s) of the head-only "
            f"runs ({', '.join(missing)}); run {commands} first{why}")


def load_features(store: Store, model: Student, key: Optional[str] = None) -> np.ndarray:
    """(N, V, F) float32 features of exactly this backbone (``key``: its ``features_key``, when known),
    or a one-line error saying how to make them."""
    key = key or features_key(model)
    info, want = store.derived().get(key, {}), store_interpolation(store.manifest)
    if info.get("complete") and _rendered(info) != want:
        how = (f"were rendered {info['interpolation']}" if "interpolation" in info else
               "do not record how their views were resampled (an older embedcache, which may have rendered bicubic)")
        raise StoreError(f"store {store.path}: the cached features {key} {how}, the store's views are {want}; run "
                         f"`{features_command(store.path, model)}` to remake them")
    if not has_features(store, key):
        raise StoreError(f"store {store.path} has no cached features for this {model.name} backbone ({key}); run "
                         f"`{features_command(store.path, model)}` first")
    return store.read_derived(key)


def features_command(store_path, model: Student, seeds: Optional[Iterable[int]] = None) -> str:
    """The `embedcache features` command that caches this backbone's features: its student settings
    (``build_seeded`` records them), spelled as that command takes them, and ``seeds`` (default: the
    seed it was built under, named only where it moves the backbone's weights: ``weights_seed``)."""
    cfg = getattr(model, "made_from", (None, 0))[0]
    q = shlex.quote
    words = ["embedcache features", f"--store {q(str(store_path))}", f"--student {q(cfg.name if cfg else model.name)}",
             f"--set input_size={model.input_size}"]
    words += [f"--set {q(f'{k}={getattr(cfg, k)}')}" for k in ("pretrained", "model") if cfg and getattr(cfg, k) is not None]
    return " ".join(words) + _seed_options({weights_seed(model)} if seeds is None else set(seeds))


def weights_seed(model: Student) -> int:
    """The seed a features command must name for this backbone: the one it was built under, or 0
    where that seed builds the same weights as seed 0 does (a pretrained backbone: its file's)."""
    cfg, seed = getattr(model, "made_from", (None, 0))
    if not seed or cfg is None:
        return seed
    same = features_key(build_seeded(cfg, model.embed_dim, 0, 0)) == features_key(model)
    return 0 if same else seed


def _seed_options(seeds: set) -> str:
    """`` --seed 1 --seed 2``; nothing for seed 0 alone (the command's default)."""
    return "" if seeds <= {0} else "".join(f" --seed {s}" for s in sorted(seeds))
