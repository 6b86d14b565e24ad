"""Head-only mode: frozen student backbone features per view, cached once in the store.

``cache_features`` renders every view of every image at the student's input size, runs the
frozen backbone (eval mode) and writes ``student/<key>/feat`` (N, V, F) float32, where the key
hashes the backbone's actual weights and input size: features of other weights never match.
Recipes that train only the head (VL2V-ADiP's align step, linear probes) then read these
arrays and run thousands of steps per second on a CPU.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch

from embedcache import open_store
from embedcache._device import resolve_device
from embedcache.errors import StoreError
from embedcache.store import Store

from .models import Student, StudentConfig, build_student


def features_key(model: Student) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"{model.name.replace('/', '_')}-{model.input_size}px-{h.hexdigest()[:12]}"


@torch.no_grad()
def cache_features(store: str, cfg: StudentConfig, seed: int = 0, batch_size: int = 64, device: str = "auto",
                   progress: bool = True, log: Callable[[str], None] = print) -> str:
    """Write the features of ``cfg``'s backbone (built under ``seed``) into the store; returns the array path."""
    from tqdm.auto import tqdm

    from .data import SplitConfig, StoreData

    reader = open_store(store)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = build_student(cfg, int(reader.layout["dim"])).to(dev).eval()
    key = features_key(model)
    path = f"student/{key}/feat"
    st = Store(store, "a")
    try:
        if (st.b.get_attr("student_features") or {}).get(key, {}).get("complete"):
            log(f"features {key} already cached in {store}")
            return path
        data = StoreData(store, reader.text_sources[0], SplitConfig(val_fraction=0.0))
        n, v = len(data.labels), data.views
        if not st.b.has(path):
            rows = max(1, min(n, (8 << 20) // max(1, v * model.feat_dim * 4)))
            st.b.create_array(path, (n, v, model.feat_dim), "float32", (rows, v, model.feat_dim))
        out = np.zeros((n, v, model.feat_dim), np.float32)
        for i in tqdm(range(0, n, batch_size), desc=f"features {key}", disable=not progress, unit="batch"):
            idx = np.arange(i, min(n, i + batch_size))
            for view in range(v):
                x = data.inputs(idx, np.full(len(idx), view), model.input_size, model.mean, model.std, dev)
                out[idx, view] = model.features(x).float().cpu().numpy()
        st.b.write(path, 0, out)
        meta = st.b.get_attr("student_features") or {}
        meta[key] = {"student": cfg.name, "input_size": model.input_size, "feat_dim": model.feat_dim,
                     "pretrained": cfg.pretrained, "complete": True}
        st.b.set_attr("student_features", meta)
        st.b.flush()
        log(f"cached {n} x {v} features of {key} in {store}")
        return path
    finally:
        st.close()


def load_features(store: str, cfg: StudentConfig, model: Student) -> np.ndarray:
    """(N, V, F) float32 features of exactly this backbone, or a one-line error saying how to make them."""
    key = features_key(model)
    st = Store(store)
    try:
        if not (st.b.get_attr("student_features") or {}).get(key, {}).get("complete"):
            raise StoreError(f"store {store} has no cached features for this {cfg.name} backbone ({key}); run "
                             f"`embedcache features --store {store} --student {cfg.name}` with the same student settings and seed")
        return st.b.read(f"student/{key}/feat")
    finally:
        st.close()
