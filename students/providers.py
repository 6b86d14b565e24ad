"""What a training step consumes (registries): input providers give the student's input for a batch
of (image, view) pairs, target providers give the teacher's embedding of exactly those views.

Inputs: ``canvas`` rebuilds each view from the stored canvas with the batched renderer, which
equals the ``render_views`` that made the teacher's input to float32 rounding (at the student's own
size); ``features`` reads cached frozen-backbone features (head-only recipes). Targets: ``store``
reads the stored embeddings (the point of the cache); ``teacher_online`` renders the view at the
teacher's size and runs a teacher that the caller passes in (what a cache-less run pays; benchmarks
use it). Students never build a teacher.

On a GPU the arrays a run reads live on the device: canvases as uint8 when they fit in free memory
(PACS at 256 px is 2 GB), else in pinned host memory gathered per batch; view parameters, teacher
embeddings, labels and cached features too. A step then gathers, crops and resizes a whole batch
on the device with no host synchronisation.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch

from embedcache.device import upload
from embedcache.errors import ConfigError
from embedcache.registry import Registry
from embedcache.views import normalize, render_views, render_views_batched, to_uint8

from .data import StoreData

INPUTS = Registry("input provider")
TARGETS = Registry("target provider")
UPLOAD_ROWS = 1024  # canvases are copied to the device in slices, never doubled in host memory


# how many runs a launcher packs onto this process's GPU (set in each worker; 1 when unset)
SHARERS_ENV = "EMBEDCACHE_RUNS_PER_DEVICE"


def fits_on_device(nbytes: int, free: int, total: int, sharers: int = 1) -> bool:
    """Whether an array of ``nbytes`` goes on the device: within 0.6 of its free memory, and of this run's
    share of it where ``sharers`` runs are packed on it (they start together, each seeing it all free:
    four runs each taking 0.6 of it ran out of memory; a review)."""
    return nbytes < 0.6 * min(free, total / max(1, sharers))


def to_device_array(arr: np.ndarray, device: torch.device, pinned_fallback: bool = False) -> torch.Tensor:
    """A read-only numpy array as a tensor on ``device`` (copied in row slices). With
    ``pinned_fallback``, an array that does not fit in the device's free memory (``fits_on_device``)
    goes to pinned host memory."""
    on_device = device.type == "cuda"
    if on_device and pinned_fallback:
        free, total = torch.cuda.mem_get_info(device)
        on_device = fits_on_device(arr.nbytes, free, total, int(os.environ.get(SHARERS_ENV, "1") or 1))
    out = torch.empty(arr.shape, dtype=torch.from_numpy(arr[:0].copy()).dtype,
                      device=device if on_device else "cpu", pin_memory=not on_device and device.type == "cuda")
    for i in range(0, len(arr), UPLOAD_ROWS):
        out[i:i + UPLOAD_ROWS].copy_(torch.from_numpy(np.array(arr[i:i + UPLOAD_ROWS])), non_blocking=False)
    return out


def _index(idx: np.ndarray, device: torch.device) -> torch.Tensor:
    return upload(torch.from_numpy(np.asarray(idx, dtype=np.int64)), device)


def student_views(data: StoreData, idx: np.ndarray, views: np.ndarray, size: int, mean, std,
                  device: torch.device) -> torch.Tensor:
    """(B, 3, size, size) normalised student input: view ``views[b]`` of image ``idx[b]`` (CPU arrays)."""
    canvas = upload(torch.from_numpy(data.pixels[idx]), device)
    params = torch.from_numpy(data.params[idx, views][:, None])
    return normalize(render_views_batched(canvas, params, size, data.interpolation)[:, 0], mean, std)


@INPUTS.register("canvas")
class CanvasInputs:
    """Student views rendered from the stored canvases, a whole batch in one batched operation.
    ``mode``: ``arrays`` renders from the store's arrays (a CPU run); ``device`` gathers from canvases
    held as a tensor on the run's device; ``host`` gathers from canvases in (pinned) host memory and
    copies the batch over. Default: ``arrays`` on a CPU; on a GPU ``device`` when the canvases fit in
    its free memory, else ``host``. Tests run the tensor modes on a CPU."""
    kind = "images"
    MODES = ("arrays", "device", "host")

    def __init__(self, data: StoreData, model, device: torch.device, mode: Optional[str] = None):
        if mode not in (None, *self.MODES):
            raise ConfigError(f"canvas input mode {mode!r}: choose one of {', '.join(self.MODES)}")
        self.data, self.device = data, device
        self.size = model.input_size
        self.mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(model.std, device=device).view(1, 3, 1, 1)
        self.channels_last = device.type == "cuda"
        self.mode = mode or ("arrays" if device.type != "cuda" else None)
        if self.mode != "arrays":
            if self.mode == "host":
                self.canvas = to_device_array(data.pixels, torch.device("cpu"))
            else:  # on the device; a GPU's falls back to pinned host memory when they do not fit
                self.canvas = to_device_array(data.pixels, device, pinned_fallback=self.mode is None)
            self.mode = self.mode or ("device" if self.canvas.device.type == device.type else "host")
            self.params = to_device_array(data.params, device)

    def __call__(self, idx: np.ndarray, views: np.ndarray) -> torch.Tensor:
        if self.mode == "arrays":
            return student_views(self.data, idx, views, self.size, tuple(self.mean.flatten().tolist()),
                                 tuple(self.std.flatten().tolist()), self.device)
        i, v = _index(idx, self.device), _index(views, self.device)
        if self.mode == "device":
            canvas = self.canvas.index_select(0, i)
        else:  # host canvases: gathered on the host, the batch copied asynchronously from pinned memory
            canvas = self.canvas.index_select(0, torch.from_numpy(np.asarray(idx, dtype=np.int64)))
            if self.device.type == "cuda":
                canvas = canvas.pin_memory().to(self.device, non_blocking=True)
        x = render_views_batched(canvas, self.params[i, v][:, None], self.size, self.data.interpolation)[:, 0]
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@INPUTS.register("features")
class FeatureInputs:
    """Cached features of this exact frozen backbone (``embedcache features``), (B, F) float32;
    ``key`` names them (it hashes the backbone's weights and input size)."""
    kind = "features"

    def __init__(self, data: StoreData, model, device: torch.device):
        from .features import features_key, load_features

        self.key = features_key(model)
        feats = load_features(data.reader.store, model, self.key)
        self.device = device
        self.feats = to_device_array(feats, device) if device.type == "cuda" else feats

    def __call__(self, idx: np.ndarray, views: np.ndarray) -> torch.Tensor:
        if isinstance(self.feats, torch.Tensor):
            return self.feats[_index(idx, self.device), _index(views, self.device)]
        return torch.from_numpy(self.feats[idx, views]).to(self.device)


@TARGETS.register("store")
class StoredTargets:
    """The stored teacher embedding of each (image, view), (B, D) float32, and the class target (B,)."""

    def __init__(self, data: StoreData, device: torch.device, teacher=None):
        self.data, self.device = data, device
        self.labels = torch.from_numpy(data.targets).to(device)
        self.emb = to_device_array(data.emb, device) if device.type == "cuda" else None

    def embeddings(self, idx: np.ndarray, views: np.ndarray) -> torch.Tensor:
        if self.emb is not None:
            return self.emb[_index(idx, self.device), _index(views, self.device)].float()
        return torch.from_numpy(self.data.emb[idx, views]).to(self.device).float()  # torch's half->float is vectorised, numpy's is not

    def __call__(self, idx: np.ndarray, views: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.embeddings(idx, views), self.labels[_index(idx, self.device)]


@TARGETS.register("teacher_online")
class TeacherOnlineTargets(StoredTargets):
    """The teacher re-encodes each step's views: the targets a cache-less run computes every step
    (equal to the stored ones up to float16 rounding)."""

    def __init__(self, data: StoreData, device: torch.device, teacher=None):
        if teacher is None:
            raise ConfigError("targets=teacher_online needs a loaded teacher passed to train(teacher=...); "
                              "a student run never builds a teacher itself")
        super().__init__(data, device)
        self.teacher = data.reader.require_teacher(teacher, "online targets must come from the store's own teacher")

    @torch.no_grad()
    def embeddings(self, idx: np.ndarray, views: np.ndarray) -> torch.Tensor:
        """On a GPU as a fast cache-less pipeline would: the batch's views rendered in one batched call
        and encoded with the result left on the device (no host round trip); on the CPU crop by crop,
        as the store's own views were rendered there."""
        t = self.teacher  # canvases up from pinned memory: a pageable copy waited for the GPU every step (a review)
        canvas = upload(torch.from_numpy(self.data.pixels[idx]), t.device)
        params = torch.from_numpy(self.data.params[idx, views][:, None])
        if t.device.type == "cuda":
            x = to_uint8(render_views_batched(canvas, params, t.input_size, t.interpolation)[:, 0])
            return getattr(t, "embed_views", t.encode_pixels)(x).to(self.device)
        x = to_uint8(render_views(canvas, params, t.input_size, t.interpolation)[:, 0])
        return t.encode_pixels(x).to(self.device)
