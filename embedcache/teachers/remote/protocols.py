"""Protocols (a registry): how each kind of embedding service is asked and how it answers.

One adapter per protocol declares its batch limits, how images travel (raw base64 or a data URI,
PNG or JPEG, the mimetype), the largest image and request it accepts, the request shapes for images
and texts, and how to read the embeddings and the usage it reports. Everything else (the ledger,
budget, retries, rate limits, cache key) is shared by ``RemoteTeacher``.

- ``embedcache``: this project's ``embedcache serve`` (``/v1/describe``, ``/v1/embed/images``,
  ``/v1/embed/texts``); honours an ``Idempotency-Key``; states its batch limit, input size and a
  fingerprint of the served teacher.
- ``openai``: OpenAI-style ``POST {base}/embeddings`` with ``"modality": "image"`` and data URIs, as
  infinity serves CLIP/SigLIP (at most 32 images a request; 429 when overloaded, without
  Retry-After); text is the same call without ``modality`` (OpenAI, TEI, LiteLLM, vLLM).
- ``cohere-v2``: ``POST {base}/v2/embed`` with ``images`` as data URIs and ``input_type: image``
  (hosted Cohere, vLLM's ``/v2/embed``): one image a request on the v3 models, 96 inputs otherwise,
  5 MB an image, 20 MB a request.
None of the services but ``embedcache`` documents an idempotency key: there, the client's ledger is
all that stands between a retry and a second charge.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...registry import Registry
from .codec import b64, data_uri, floats_from_b64
from .errors import RemoteError

PROTOCOLS = Registry("protocol")

_TOO_LARGE = re.compile(r"too (many|large|long|big)|at most \d+|max(imum)?[ _](batch|number|items|inputs|length)|"
                        r"exceed|batch size", re.I)


class Protocol:
    name = ""
    image_batch = 32                 # most images in one request
    text_batch = 256                 # most texts in one request
    formats: Tuple[str, ...] = ("png", "jpeg")
    data_uri = True                  # images as data URIs (else raw base64 beside a "format" field)
    max_image_bytes: Optional[int] = None   # largest encoded image accepted
    max_request_bytes: Optional[int] = None  # largest sum of encoded images in one request
    idempotency_header: Optional[str] = None
    probe_path: Optional[str] = None  # a GET that shows the server is there (and what it serves)
    reports_usage = True

    def __init__(self, described: Optional[Dict[str, Any]] = None):
        self.described = described or {}

    # --- limits ------------------------------------------------------------------------------------
    def limits(self, model: Optional[str]) -> Dict[str, Optional[int]]:
        return {"image_batch": self.image_batch, "text_batch": self.text_batch,
                "max_image_bytes": self.max_image_bytes, "max_request_bytes": self.max_request_bytes}

    @staticmethod
    def too_large(status: int, text: str) -> bool:
        """A 413, or a 400/422 that says the batch is too large: halve the batch and go on."""
        return status == 413 or (status in (400, 422) and bool(_TOO_LARGE.search(text or "")))

    @staticmethod
    def text_tokens(text: str) -> int:
        """A rough input-token estimate (for tokens-per-minute pacing): ~4 UTF-8 bytes a token."""
        return math.ceil(len(text.encode("utf-8")) / 4) + 2

    @staticmethod
    def image_tokens(size: int) -> int:
        """A rough estimate: one token per 32x32 patch (CLIP ViT-B/32: 49 at 224 px)."""
        return max(1, math.ceil(size / 32) ** 2)

    def auth_headers(self, key: Optional[str]) -> Dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    # --- requests and answers ---------------------------------------------------------------------------
    def image_request(self, model: Optional[str], images: Sequence[bytes], fmt: str,
                      dimensions: Optional[int]) -> Tuple[str, Dict[str, Any]]:
        raise NotImplementedError

    def text_request(self, model: Optional[str], texts: Sequence[str], dimensions: Optional[int]) -> Tuple[str, Dict[str, Any]]:
        raise NotImplementedError

    def parse(self, answer: Any, n: int) -> Tuple[np.ndarray, Dict[str, float]]:
        """The answer -> ((n, D) float32 in request order, usage the service reported)."""
        raise NotImplementedError

    def describe(self, probe: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """What the probe's answer says about the server (for the manifest and the cache key)."""
        return {}

    @staticmethod
    def answered_model(answer: Any) -> Optional[str]:
        """The model an answer says it came from (OpenAI's shape and embedcache serve's ``model``; None
        where the answer names none): a vendor may move an alias to a new model between two requests."""
        model = answer.get("model") if isinstance(answer, dict) else None
        return model if isinstance(model, str) and model else None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RemoteError(msg)


def _indexed(data: Any, n: int, where: str) -> np.ndarray:
    """OpenAI-shaped ``data`` ([{index, embedding}]) -> (n, D) float32, matched by index."""
    _check(isinstance(data, list), f"{where}: the answer has no 'data' list")
    _check(len(data) == n, f"{where}: asked for {n} embeddings, the answer holds {len(data)}; nothing was written")
    rows: List[Optional[np.ndarray]] = [None] * n
    for item in data:
        _check(isinstance(item, dict) and isinstance(item.get("index"), int), f"{where}: an answer item has no index")
        i = item["index"]
        _check(0 <= i < n and rows[i] is None, f"{where}: answer index {i} is out of range or repeated; nothing was written")
        emb = item.get("embedding")
        vec = floats_from_b64(emb) if isinstance(emb, str) else np.asarray(emb, dtype=np.float32)
        _check(vec.ndim == 1 and vec.size > 0, f"{where}: answer item {i} is not a vector")
        rows[i] = vec
    dims = {r.shape[0] for r in rows}
    _check(len(dims) == 1, f"{where}: answer vectors have different dimensions {sorted(dims)}; nothing was written")
    return np.stack(rows).astype(np.float32)


def _numbers(d: Any) -> Dict[str, float]:
    return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)} \
        if isinstance(d, dict) else {}


@PROTOCOLS.register("embedcache")
class EmbedcacheProtocol(Protocol):
    """This project's server: raw base64 images beside a format, float32 base64 answers, idempotent."""
    name = "embedcache"
    data_uri = False
    idempotency_header = "Idempotency-Key"
    probe_path = "/v1/describe"

    def limits(self, model):
        d = self.described
        batch = int(d.get("max_batch", 256))
        return {"image_batch": batch, "text_batch": batch, "max_image_bytes": d.get("max_request_bytes"),
                "max_request_bytes": d.get("max_request_bytes")}

    def image_request(self, model, images, fmt, dimensions):
        return "/v1/embed/images", {"model": model, "format": fmt, "images": [b64(b) for b in images],
                                    "dimensions": dimensions}

    def text_request(self, model, texts, dimensions):
        return "/v1/embed/texts", {"model": model, "texts": list(texts), "dimensions": dimensions}

    def parse(self, answer, n):
        _check(isinstance(answer, dict), "embedcache server: the answer is not a JSON object")
        fp = self.described.get("fingerprint")
        if fp and answer.get("fingerprint") not in (None, fp):
            raise RemoteError(f"embedcache server: its teacher changed during the run (fingerprint "
                              f"{answer.get('fingerprint')}, expected {fp}); start a new store for the new teacher")
        return _indexed(answer.get("data"), n, "embedcache server"), _numbers(answer.get("usage"))

    def describe(self, probe):
        _check(isinstance(probe, dict) and "embed_dim" in probe, "embedcache server: /v1/describe gave no embed_dim")
        return dict(probe)


@PROTOCOLS.register("openai")
class OpenAIProtocol(Protocol):
    """POST {base}/embeddings; images as data URIs with "modality": "image" (infinity's extension)."""
    name = "openai"
    image_batch = 32      # infinity caps image inputs at 32 a request
    text_batch = 2048     # OpenAI's and infinity's cap on text inputs
    probe_path = "/models"

    def image_request(self, model, images, fmt, dimensions):
        body = {"model": model, "input": [data_uri(b, fmt) for b in images], "modality": "image",
                "encoding_format": "base64"}
        if dimensions:
            body["dimensions"] = dimensions
        return "/embeddings", body

    def text_request(self, model, texts, dimensions):
        body = {"model": model, "input": list(texts), "encoding_format": "base64"}
        if dimensions:
            body["dimensions"] = dimensions
        return "/embeddings", body

    def parse(self, answer, n):
        _check(isinstance(answer, dict), "openai-style server: the answer is not a JSON object")
        return _indexed(answer.get("data"), n, "openai-style server"), _numbers(answer.get("usage"))

    def describe(self, probe):
        if isinstance(probe, dict) and isinstance(probe.get("data"), list):
            return {"served_models": sorted(str(m.get("id")) for m in probe["data"] if isinstance(m, dict))}
        return {}


@PROTOCOLS.register("cohere-v2")
class CohereV2Protocol(Protocol):
    """POST {base}/v2/embed with images (data URIs) and input_type "image"; floats in embeddings.float."""
    name = "cohere-v2"
    image_batch = 96
    text_batch = 96
    max_image_bytes = 5 * 1024 * 1024
    max_request_bytes = 20 * 1024 * 1024
    probe_path = "/v1/models"
    text_input_type = "search_query"  # class prompts are the queries a zero-shot classifier asks with

    @staticmethod
    def _v3(model: Optional[str]) -> bool:
        return bool(model and re.search(r"-v3(\.|-|$)", model))

    def limits(self, model):
        out = super().limits(model)
        if self._v3(model):  # Embed v3 models take one image a request
            out.update(image_batch=1, max_request_bytes=self.max_image_bytes)
        return out

    def image_request(self, model, images, fmt, dimensions):
        body = {"model": model, "input_type": "image", "images": [data_uri(b, fmt) for b in images],
                "embedding_types": ["float"]}
        if dimensions:
            body["output_dimension"] = dimensions
        return "/v2/embed", body

    def text_request(self, model, texts, dimensions):
        body = {"model": model, "input_type": self.text_input_type, "texts": list(texts), "embedding_types": ["float"]}
        if dimensions:
            body["output_dimension"] = dimensions
        return "/v2/embed", body

    def parse(self, answer, n):
        where = "cohere-v2 server"
        _check(isinstance(answer, dict) and isinstance(answer.get("embeddings"), dict),
               f"{where}: the answer has no 'embeddings' object")
        vecs = answer["embeddings"].get("float")
        _check(isinstance(vecs, list), f"{where}: the answer has no float embeddings")
        _check(len(vecs) == n, f"{where}: asked for {n} embeddings, the answer holds {len(vecs)}; nothing was written")
        try:
            arr = np.asarray(vecs, dtype=np.float32)
        except ValueError:
            raise RemoteError(f"{where}: answer vectors have different dimensions; nothing was written") from None
        _check(arr.ndim == 2 and arr.shape[1] > 0, f"{where}: answer vectors have different dimensions; nothing was written")
        meta = answer.get("meta") if isinstance(answer.get("meta"), dict) else {}
        return arr, _numbers(meta.get("billed_units"))
