"""What a training step consumes (registries): input providers give the student's input for a batch
of (image, view) pairs, target providers give the teacher's embedding of exactly those views.

Inputs: ``canvas`` rebuilds each view from the stored canvas with the same ``render_views`` that
made the teacher's input (at the student's own size); ``features`` reads cached frozen-backbone
features (head-only recipes). Targets: ``store`` reads the stored embeddings (the point of the
cache); ``teacher_online`` renders the view at the teacher's size and runs a teacher that the
caller passes in (what a cache-less run pays; benchmarks use it). Students never build a teacher.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from embedcache.errors import ConfigError
from embedcache.registry import Registry
from embedcache.views import normalize, render_views, to_uint8

from .data import StoreData

INPUTS = Registry("input provider")
TARGETS = Registry("target provider")


def student_views(data: StoreData, idx: np.ndarray, views: np.ndarray, size: int, mean, std,
                  device: torch.device) -> torch.Tensor:
    """(B, 3, size, size) normalised student input: view ``views[b]`` of image ``idx[b]``."""
    canvas = torch.from_numpy(data.pixels[idx]).to(device)
    params = torch.from_numpy(data.params[idx, views][:, None])
    return normalize(render_views(canvas, params, size)[:, 0], mean, std)


@INPUTS.register("canvas")
class CanvasInputs:
    """Student views rendered from the stored canvases."""
    kind = "images"

    def __init__(self, data: StoreData, model, device: torch.device):
        self.data, self.model, self.device = data, model, device

    def __call__(self, idx: np.ndarray, views: np.ndarray) -> torch.Tensor:
        m = self.model
        return student_views(self.data, idx, views, m.input_size, m.mean, m.std, self.device)


@INPUTS.register("features")
class FeatureInputs:
    """Cached features of this exact frozen backbone (``embedcache features``), (B, F) float32."""
    kind = "features"

    def __init__(self, data: StoreData, model, device: torch.device):
        from .features import load_features

        self.feats, self.device = load_features(data.reader.store, model), device

    def __call__(self, idx: np.ndarray, views: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.feats[idx, views]).to(self.device)


@TARGETS.register("store")
class StoredTargets:
    """The stored teacher embedding of each (image, view), (B, D) float32, and the class target (B,)."""

    def __init__(self, data: StoreData, device: torch.device, teacher=None):
        self.data, self.device = data, device
        self.labels = torch.from_numpy(data.targets).to(device)

    def embeddings(self, idx: np.ndarray, views: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.data.emb[idx, views].astype(np.float32)).to(self.device)

    def __call__(self, idx: np.ndarray, views: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.embeddings(idx, views), self.labels[torch.from_numpy(idx).to(self.device)]


@TARGETS.register("teacher_online")
class TeacherOnlineTargets(StoredTargets):
    """The teacher re-encodes each step's views: the targets a cache-less run computes every step
    (equal to the stored ones up to float16 rounding)."""

    def __init__(self, data: StoreData, device: torch.device, teacher=None):
        if teacher is None:
            raise ConfigError("targets=teacher_online needs a loaded teacher passed to train(teacher=...); "
                              "a student run never builds a teacher itself")
        super().__init__(data, device)
        self.teacher = teacher

    @torch.no_grad()
    def embeddings(self, idx: np.ndarray, views: np.ndarray) -> torch.Tensor:
        t = self.teacher
        canvas = torch.from_numpy(self.data.pixels[idx]).to(t.device)
        params = torch.from_numpy(self.data.params[idx, views][:, None])
        x = to_uint8(render_views(canvas, params, t.input_size, t.interpolation)[:, 0])
        return t.encode_pixels(x).to(self.device)
