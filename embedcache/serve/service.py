"""The server's core, without HTTP: decode inputs, check a key's rate and quota, answer a retried
request from the ledger, run the teacher on a request's inputs as one batch, charge the key.

One request is served at a time (one teacher; quotas and the ledger stay consistent). Images whose
side is the teacher's input size go to ``encode_pixels`` exactly as decoded (a PNG view is the
uint8 tensor a local extraction feeds the teacher), all of a request's images as one batch.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..fileio import json_digest
from ..teachers import Teacher
from ..teachers.remote.codec import decode_image
from ..teachers.remote.ratelimit import Bucket
from ..views import canvas_resize, make_canvas
from .config import ServeConfig
from .keys import KeyInfo
from .ledger import ServerLedger


class ServeError(Exception):
    """An HTTP error answer: status, message, error type, extra headers."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def fingerprint(teacher: Teacher) -> str:
    """A stable digest of what makes the served teacher's embeddings what they are (its identity and
    preprocessing), revealing neither its weights nor its architecture."""
    return json_digest({"identity": teacher.identity(), "preprocessing": teacher.preprocessing(),
                        "embed_dim": teacher.embed_dim}, 24)


def _retry_headers(seconds: float) -> Dict[str, str]:
    seconds = max(seconds, 0.001)
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, math.ceil(seconds * 1000)))}


@dataclass
class Images:
    pixels: torch.Tensor     # (N, 3, S, S) uint8
    shas: List[str]          # content hash of each decoded image
    sizes: List[tuple]       # (width, height) as received
    nbytes: int


class Service:
    def __init__(self, teacher: Teacher, cfg: ServeConfig, ledger: ServerLedger, clock: Callable[[], float] = time.time):
        self.teacher, self.cfg, self.ledger, self.clock = teacher, cfg, ledger, clock
        self.fingerprint = fingerprint(teacher)
        self.lock = threading.Lock()
        self.buckets: Dict[str, Bucket] = {}

    # --- what clients may know ------------------------------------------------------------------------
    def describe(self) -> Dict[str, Any]:
        t = self.teacher
        return {"model": self.cfg.model_name, "fingerprint": self.fingerprint, "embed_dim": int(t.embed_dim),
                "input_size": int(t.input_size), "interpolation": t.interpolation,
                "context_length": int(t.context_length), "max_batch": self.cfg.max_batch,
                "max_request_bytes": self.cfg.max_request_bytes, "formats": ["png", "jpeg"],
                "idempotency_header": "Idempotency-Key", "api": "embedcache/1"}

    def check_model(self, model: Optional[str]) -> None:
        if model not in (None, "", self.cfg.model_name):
            raise ServeError(404, f"model {model!r} is not served here; this server serves {self.cfg.model_name!r}",
                             "model_not_found")

    def check_dimensions(self, dimensions: Optional[int]) -> None:
        if dimensions not in (None, int(self.teacher.embed_dim)):
            raise ServeError(400, f"this server embeds in {self.teacher.embed_dim} dimensions, not {dimensions}")

    def check_count(self, n: int) -> None:
        if n == 0:
            raise ServeError(400, "no inputs given")
        if n > self.cfg.max_batch:
            raise ServeError(413, f"batch too large: {n} inputs, at most {self.cfg.max_batch} in one request",
                             "request_too_large")

    # --- inputs ---------------------------------------------------------------------------------------
    def decode_images(self, blobs: Sequence[bytes]) -> Images:
        self.check_count(len(blobs))
        size = int(self.teacher.input_size)
        arrs, shas, sizes = [], [], []
        for i, blob in enumerate(blobs):
            try:
                arr = decode_image(blob, self.cfg.max_image_pixels)
            except ValueError as exc:
                status = 413 if "larger than" in str(exc) else 400
                raise ServeError(status, f"image {i}: {exc}") from None
            sizes.append((arr.shape[1], arr.shape[0]))
            if arr.shape[:2] != (size, size):  # not a rendered view: shorter side to the input size, centre crop
                try:  # an 8000 x 1 PNG of 100 bytes resized to 1.8 G pixels: refused before the resize
                    canvas_resize(arr.shape[1], arr.shape[0], size, self.cfg.max_image_pixels)
                except ValueError as exc:
                    raise ServeError(413, f"image {i}: {exc}", "request_too_large") from None
                arr = make_canvas(Image.fromarray(arr), size)
            arrs.append(arr)
            shas.append(hashlib.sha256(arr.tobytes()).hexdigest())
        pixels = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
        return Images(pixels, shas, sizes, sum(len(b) for b in blobs))

    def check_texts(self, texts: Sequence[str]) -> List[str]:
        self.check_count(len(texts))
        if not all(isinstance(t, str) for t in texts):
            raise ServeError(400, "texts must be strings")
        return [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]

    # --- paying -----------------------------------------------------------------------------------------
    def _rate(self, key: KeyInfo) -> None:
        rpm = key.requests_per_minute or self.cfg.requests_per_minute
        if not rpm:
            return
        bucket = self.buckets.get(key.name)
        if bucket is None:
            bucket = self.buckets[key.name] = Bucket(rpm)
        wait = bucket.take(1)
        if wait > 0:
            raise ServeError(429, f"rate limit: at most {rpm:g} requests a minute for this key", "rate_limit_exceeded",
                             _retry_headers(wait))

    def _quota(self, key: KeyInfo, n: int) -> None:
        quota = key.quota if key.quota is not None else self.cfg.quota
        if quota is None:
            return
        period = self.cfg.quota_period_s
        now = self.clock()
        start = math.floor(now / period) * period if period else 0.0
        used = self.ledger.used(key.name, start)
        if used + n > quota:
            wait = (start + period - now) if period else 86400.0
            renews = (f"it renews at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(start + period))} UTC, in "
                      f"{wait:.0f} s (quota periods count from 1970-01-01 00:00 UTC: 86400 s is each UTC day)"
                      if period else "it does not renew; ask for a larger quota")
            raise ServeError(429, f"quota exceeded: {used} of {quota} queries used and this request needs {n}; {renews}",
                             "quota_exceeded", _retry_headers(wait))

    def run(self, key: KeyInfo, idem: Optional[str], endpoint: str, modality: str, request_sha: str,
            item_shas: Sequence[str], nbytes: int, encode: Callable[[], np.ndarray],
            answer: Callable[[np.ndarray], Dict[str, Any]]) -> tuple:
        """(answer JSON bytes, replayed?) for one paid request."""
        with self.lock:
            self._rate(key)
            if idem:
                found = self.ledger.find(key.name, idem)
                if found is not None:
                    cid, sha, body = found
                    if sha != request_sha:
                        raise ServeError(422, "this Idempotency-Key was used for a different request; "
                                              "use a new key for new inputs", "idempotency_conflict")
                    self.ledger.replayed(cid)
                    return body, True
            self._quota(key, len(item_shas))
            emb = encode()
            body = json.dumps(answer(emb)).encode()
            self.ledger.charge(key.name, idem, request_sha, endpoint, modality, item_shas, nbytes, body)
            return body, False

    def encode_images(self, images: Images) -> np.ndarray:
        with torch.no_grad():
            return self.teacher.encode_pixels(images.pixels).float().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        with torch.no_grad():
            return self.teacher.encode_text(list(texts)).float().numpy()

    def usage(self, key: KeyInfo) -> Dict[str, Any]:
        quota = key.quota if key.quota is not None else self.cfg.quota
        period = self.cfg.quota_period_s
        start = math.floor(self.clock() / period) * period if period else 0.0
        rows = self.ledger.summary(key.name)
        return {"key": key.name, **(rows[0] if rows else {"requests": 0, "queries": 0, "images": 0, "texts": 0,
                                                            "bytes": 0, "free_replays": 0}),
                "quota": quota, "quota_used": self.ledger.used(key.name, start), "quota_period_s": period}


def request_sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
