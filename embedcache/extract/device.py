"""The device reader: JPEGs decoded on the teacher's device in batches, canvases resized there.

DataLoader workers only read file bytes (and decode what the device decoder cannot take as PIL
would: PNG and other formats, CMYK JPEGs, JPEGs with an EXIF rotation, which torchvision applies on
the CPU only, JPEGs of RGB samples marked by an Adobe segment, files that do not end where a JPEG
ends, files it rejects; the header alone tells),
so on a GPU the pipeline is no longer bound by PIL
(measured on an H100 host: PIL in 15 workers 1,500 images/s, ``torchvision.io.decode_jpeg`` on the
GPU in batches 19,500). A batch's JPEGs go to one ``decode_jpeg`` call; if the call rejects the
batch, each file is retried alone and the ones it still rejects fall back to PIL, where a truly
corrupt file is recorded as a failed row, as with the PIL reader. Canvases are made on the device:
shorter side resized to S with torch's antialiased bicubic (PIL's kernel), centre crop, rounded to
uint8. The pixels differ slightly from PIL's (another JPEG decoder and float resampling), so the
decoder is part of the store's cache key (``pipeline``); a store resumes byte-identically with the
same decoder, and is refused, in one line, with another.

The reader decodes a small JPEG on its device before it starts, and a batch whose every JPEG the
device rejects while PIL reads them all stops the extraction: a decoder that does not work is said,
not replaced by PIL file by file under the device decoder's name.

The decoder is injected (``device``), so the same code runs on the CPU in tests.
"""
from __future__ import annotations

import io
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..datasets import ImageDataset
from ..device import upload
from ..errors import ConfigError
from ..views import canvas_resize, make_canvas
from .parts import Batch, ViewPolicy, _init_worker, loaded

JPEG_MAGIC, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
EXIF_ORIENTATION = 0x0112


def device_pipeline(device: torch.device) -> dict:
    """The pipeline a store's key holds. On a GPU also the decoder's hardware and torchvision's version:
    nvJPEG decodes on a hardware engine on some GPUs (A100, H100) and in CUDA code on others, and
    versions differ, so the same file gives other pixels on another GPU (a review)."""
    out = {"decoder": f"torchvision-decode_jpeg-{device.type}+pil-for-cmyk-adobe-rgb-exif-unended",
           "canvas": "torch-antialias-bicubic-shorter-side-centre-crop", "views": "batched-resample-uint8"}
    if device.type == "cuda" and torch.cuda.is_available():  # (a manifest's decoder named on a machine without one)
        import torchvision

        out["decoder_device"] = f"{torch.cuda.get_device_name(device)}, torchvision {torchvision.__version__}"
    return out


class _Files(torch.utils.data.Dataset):
    """Item i -> (i, JPEG bytes or None, a PIL canvas for everything else or None, error or '')."""

    def __init__(self, dataset: ImageDataset, policy: ViewPolicy):
        self.dataset, self.policy = dataset, policy

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            if self.dataset.has_files:
                data = self.dataset.source_path(i).read_bytes()
                if device_decodes(data):
                    return i, np.frombuffer(data, np.uint8).copy(), None, ""
            return i, None, make_canvas(self.dataset.load(i), self.policy.canvas), ""
        except Exception as exc:
            return i, None, None, self.dataset.failure(i, exc)


def device_decodes(data: bytes) -> bool:
    """Whether the device decoder gives this file's pixels as PIL does, from its header: a JPEG in
    grey or YCbCr (not CMYK, nor RGB samples an Adobe segment marks), without an EXIF rotation
    (torchvision applies it on the CPU only), that ends where a JPEG ends (nvJPEG may leave a cut-off
    file's rows unwritten instead of failing)."""
    from PIL import Image

    if data[:3] != JPEG_MAGIC or not data.rstrip(b"\x00\r\n ").endswith(JPEG_END):
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            adobe_rgb = im.mode == "RGB" and im.info.get("adobe_transform") == 0  # how nvJPEG reads it is not known
            return im.mode in ("L", "RGB") and not adobe_rgb and im.getexif().get(EXIF_ORIENTATION, 1) == 1
    except Exception:  # PIL will say what is wrong with it
        return False


def canvas_from_decoded(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (size, size, 3) uint8 on the same device: shorter side to ``size``
    (antialiased bicubic), centre crop; the same geometry as ``views.make_canvas``."""
    _, h, w = img.shape
    nw, nh = canvas_resize(w, h, size)
    x = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[0, :, top:top + size, left:left + size].clamp_(0, 255).round_()
    return x.to(torch.uint8).permute(1, 2, 0)


class DeviceDecodeReader:
    """A reader (see ``parts.Reader``) whose JPEG decoding and canvas resizing run on ``device``."""

    def __init__(self, dataset: ImageDataset, policy: ViewPolicy, device: torch.device, num_workers: int = 1):
        self.files, self.policy, self.device, self.num_workers = _Files(dataset, policy), policy, device, num_workers
        self.pipeline = device_pipeline(device)
        self.decoded_by_pil: List[int] = []  # rows of JPEGs the device decoder rejected and PIL read (PIL's pixels)
        self.last_error = ""  # why the device decoder last rejected a file, for a decoder that does not work

    def _probe(self) -> None:
        """Decode a small JPEG on the device: a decoder that does not work here is one line, before any file."""
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (16, 12), (200, 30, 90)).save(buf, "JPEG", quality=95)
        got = self._decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)])[0]
        if got is None or tuple(got.shape) != (3, 12, 16):
            raise ConfigError(f"decoder=device: torchvision's decode_jpeg does not decode JPEGs on {self.device} here; "
                              f"set decoder=pil (it said: {self.last_error or 'a wrong image'})")

    def batches(self, batches: List[List[int]]) -> Iterator[Batch]:
        self._probe()
        loader = DataLoader(self.files, batch_sampler=batches, collate_fn=list, num_workers=self.num_workers,
                            prefetch_factor=4 if self.num_workers > 0 else None, worker_init_fn=_init_worker)
        for items in loaded(loader):
            yield self._batch(items)

    def _decode(self, blobs: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """The decoded images (None where the decoder rejects a file). On a GPU the decoder's outputs are
        allocated on a stream of their own: torchvision allocates them on the current stream and nvJPEG
        writes them without waiting for it, so memory just freed there (the previous batch's images, which
        its queued resizes still read) came back as outputs and was overwritten before it was read
        (pytorch/vision#9606: wrong canvases, exit 0). A block of the side stream is reused only once the
        work recorded on it (``record_stream``) has run."""
        if self.device.type != "cuda" or not blobs:
            return self._decode_here(blobs)
        side = getattr(self, "_side", None)
        if side is None:  # made once, at the first batch
            side = self._side = torch.cuda.Stream(self.device)
        with torch.cuda.stream(side):
            out = self._decode_here(blobs)
        now = torch.cuda.current_stream(self.device)
        now.wait_stream(side)
        for img in out:
            if img is not None:
                img.record_stream(now)
        return out

    def _decode_here(self, blobs: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if not blobs:
            return []
        try:
            return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True))
        except Exception:  # one bad file spoils the batched call: find it
            out = []
            for b in blobs:
                try:
                    out.append(decode_jpeg(b, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True))
                except Exception as exc:
                    self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    out.append(None)
            return out

    def _batch(self, items: List[Tuple]) -> Batch:
        s = self.policy.canvas
        rows = np.array([it[0] for it in items], dtype=np.int64)
        canvas = torch.zeros((len(items), s, s, 3), dtype=torch.uint8, device=self.device)
        errors = [it[3] for it in items]
        jpeg = [k for k, it in enumerate(items) if it[1] is not None]
        decoded = self._decode([torch.from_numpy(items[k][1]) for k in jpeg])
        rescued = 0
        for k, img in zip(jpeg, decoded):
            if img is not None:
                try:
                    canvas[k] = canvas_from_decoded(img, s)
                except ValueError as exc:  # decoded, but too elongated for a canvas
                    errors[k] = self.files.dataset.failure(int(rows[k]), exc)
                continue
            try:  # rejected by the device decoder: PIL decides whether the file is really corrupt
                canvas[k] = upload(torch.from_numpy(make_canvas(self.files.dataset.load(int(rows[k])), s)), self.device)
                rescued += 1
                self.decoded_by_pil.append(int(rows[k]))
            except Exception as exc:
                errors[k] = self.files.dataset.failure(int(rows[k]), exc)
        if len(jpeg) > 1 and rescued == len(jpeg):
            raise ConfigError(f"decoder=device rejected all {len(jpeg)} JPEGs of a batch that PIL reads (the device's "
                              f"decoder is failing here, e.g. out of memory: {self.last_error}); set decoder=pil, or a "
                              "smaller batch_size")
        for k, it in enumerate(items):
            if it[2] is not None:
                canvas[k] = upload(torch.from_numpy(it[2]), self.device)  # (a PNG, a CMYK JPEG: PIL read it)
        params = torch.from_numpy(np.stack([self.policy.params(int(i)) for i in rows]))
        return Batch(rows=rows, canvas=canvas, params=params, errors=errors)
