"""The HTTP face of ``embedcache serve`` (FastAPI): ``create_app`` takes a loaded teacher, the
settings, the key ring and the ledger, so a test builds it around a tiny model on loopback.

Routes (all but /health need ``Authorization: Bearer KEY``: 401 without one, 403 for a wrong one):
- GET  /health                 liveness, for a reverse proxy
- GET  /v1/describe            embedding dimension, preferred input size, limits, teacher fingerprint
- POST /v1/embed/images        {"images": [base64], "format": "png"|"jpeg"} -> float32 base64 rows
- POST /v1/embed/texts         {"texts": [...]}
- POST /v1/count_tokens        {"texts": [...]} -> {"tokens": [...]} (free)
- GET  /v1/usage               this key's charges and quota
- POST /v1/embeddings, GET /v1/models   the OpenAI shape (images: data URIs with "modality": "image")
- POST /v2/embed               Cohere's v2 embed shape
Paid routes honour ``Idempotency-Key``: a retried request is answered from the ledger, not charged.
Errors are ``{"error": {"message", "type"}}``; 413 for too large, 429 with Retry-After over rate or quota.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Dict, List, Optional

import numpy as np
from fastapi import Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..teachers import Teacher
from ..teachers.remote.codec import MIMETYPES, floats_b64, parse_data_uri, unb64
from .config import ServeConfig
from .keys import KeyInfo, KeyRing
from .ledger import ServerLedger
from .schemas import CohereEmbedRequest, CountTokensRequest, ImagesRequest, OpenAIEmbeddingsRequest, TextsRequest
from .service import ServeError, Service, request_sha

log = logging.getLogger("embedcache.serve")
FORMATS = {v: k for k, v in MIMETYPES.items()}


def _error(status: int, message: str, kind: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413, by its Content-Length or while it streams."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error(413, f"request body larger than {self.limit} bytes; send fewer or smaller images",
                           "request_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await too_large(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(teacher: Teacher, cfg: ServeConfig, keys: KeyRing, ledger: ServerLedger) -> Any:
    service = Service(teacher, cfg, ledger)
    app = FastAPI(title="embedcache serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return _error(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}", "invalid_request_error")

    async def auth(authorization: Optional[str] = Header(None)) -> KeyInfo:
        if not authorization:
            raise ServeError(401, "an API key is required: send 'Authorization: Bearer KEY'", "authentication_error",
                             {"WWW-Authenticate": "Bearer"})
        scheme, _, token = authorization.partition(" ")
        info = keys.match(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if info is None:
            raise ServeError(403, "this API key is not valid", "permission_error")
        return info

    def reply(body: bytes, replayed: bool) -> Response:
        return Response(body, media_type="application/json", headers={"Idempotent-Replayed": "true"} if replayed else None)

    async def paid(key: KeyInfo, idem: Optional[str], endpoint: str, modality: str, sha: str, item_shas, nbytes: int,
                   encode, answer) -> Response:
        body, replayed = await run_in_threadpool(service.run, key, idem, endpoint, modality, sha, item_shas, nbytes,
                                                 encode, answer)
        log.info("%s: %s %d %s input(s) to key %s", endpoint, "replayed (free)" if replayed else "charged",
                 len(item_shas), modality, key.name)
        return reply(body, replayed)

    def rows(emb: np.ndarray, fmt: str = "base64") -> List[Dict[str, Any]]:
        return [{"object": "embedding", "index": i, "embedding": floats_b64(e) if fmt == "base64" else e.tolist()}
                for i, e in enumerate(emb)]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/describe")
    async def describe(key: KeyInfo = Depends(auth)):
        return service.describe()

    @app.get("/v1/usage")
    async def usage(key: KeyInfo = Depends(auth)):
        return await run_in_threadpool(service.usage, key)

    @app.post("/v1/embed/images")
    async def embed_images(req: ImagesRequest, key: KeyInfo = Depends(auth),
                           idempotency_key: Optional[str] = Header(None)):
        service.check_model(req.model)
        service.check_dimensions(req.dimensions)
        blobs = []
        for i, s in enumerate(req.images):
            try:
                blobs.append(unb64(s))
            except ValueError:
                raise ServeError(400, f"image {i} is not valid base64") from None
        images = await run_in_threadpool(service.decode_images, blobs)
        sha = request_sha("images", req.format, images.shas, req.dimensions)
        usage = {"queries": len(blobs), "images": len(blobs), "texts": 0, "bytes": images.nbytes}
        return await paid(key, idempotency_key, "/v1/embed/images", "image", sha, images.shas, images.nbytes,
                          lambda: service.encode_images(images),
                          lambda emb: {"object": "list", "model": cfg.model_name, "fingerprint": service.fingerprint,
                                       "data": rows(emb), "usage": usage})

    @app.post("/v1/embed/texts")
    async def embed_texts(req: TextsRequest, key: KeyInfo = Depends(auth), idempotency_key: Optional[str] = Header(None)):
        service.check_model(req.model)
        service.check_dimensions(req.dimensions)
        shas = service.check_texts(req.texts)
        nbytes = sum(len(t.encode("utf-8")) for t in req.texts)
        usage = {"queries": len(shas), "images": 0, "texts": len(shas), "bytes": nbytes}
        return await paid(key, idempotency_key, "/v1/embed/texts", "text", request_sha("texts", shas, req.dimensions),
                          shas, nbytes, lambda: service.encode_texts(req.texts),
                          lambda emb: {"object": "list", "model": cfg.model_name, "fingerprint": service.fingerprint,
                                       "data": rows(emb), "usage": usage})

    @app.post("/v1/count_tokens")
    async def count_tokens(req: CountTokensRequest, key: KeyInfo = Depends(auth)):
        service.check_count(len(req.texts))
        return {"tokens": [int(n) for n in teacher.count_tokens(list(req.texts))],
                "context_length": int(teacher.context_length)}

    @app.get("/v1/models")
    async def models(key: KeyInfo = Depends(auth)):
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "owned_by": "embedcache",
                                            "capabilities": ["embed", "image_embed"]}]}

    def _data_uris(uris: List[str]):
        blobs = []
        for i, uri in enumerate(uris):
            try:
                mime, blob = parse_data_uri(uri)
            except ValueError as exc:
                raise ServeError(400, f"input {i}: {exc}") from None
            if mime not in FORMATS:
                raise ServeError(400, f"input {i}: {mime} images are not taken; send image/png or image/jpeg")
            blobs.append(blob)
        return blobs

    def _refuse_images_as_text(inputs) -> None:
        """An image's data URI sent without modality "image" (the openai client's default) would be
        embedded, and billed, as the text of its first tokens: every image alike, with status 200."""
        for i, text in enumerate(inputs):
            if text.startswith("data:image/"):
                raise ServeError(400, f"input {i} is an image (a data:image/ URI) sent as text; send images with "
                                      "\"modality\": \"image\" (the openai client: extra_body={\"modality\": \"image\"})")

    @app.post("/v1/embeddings")
    async def openai_embeddings(req: OpenAIEmbeddingsRequest, key: KeyInfo = Depends(auth),
                                idempotency_key: Optional[str] = Header(None)):
        service.check_model(req.model)
        service.check_dimensions(req.dimensions)
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        if req.modality == "image":
            images = await run_in_threadpool(service.decode_images, _data_uris(inputs))
            shas, nbytes, tokens = images.shas, images.nbytes, len(inputs)
            encode = lambda: service.encode_images(images)  # noqa: E731
        else:
            _refuse_images_as_text(inputs)
            shas = service.check_texts(inputs)
            nbytes = sum(len(t.encode("utf-8")) for t in inputs)
            tokens = int(sum(teacher.count_tokens(inputs)))
            encode = lambda: service.encode_texts(inputs)  # noqa: E731
        sha = request_sha("openai", req.modality, shas, req.encoding_format, req.dimensions)
        return await paid(key, idempotency_key, "/v1/embeddings", req.modality, sha, shas, nbytes, encode,
                          lambda emb: {"object": "list", "model": cfg.model_name, "data": rows(emb, req.encoding_format),
                                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v2/embed")
    async def cohere_embed(req: CohereEmbedRequest, key: KeyInfo = Depends(auth),
                           idempotency_key: Optional[str] = Header(None)):
        service.check_model(req.model)
        service.check_dimensions(req.output_dimension)
        if req.inputs:
            raise ServeError(400, "'inputs' (mixed content) is not supported here; send texts or images")
        if set(req.embedding_types) - {"float"}:
            raise ServeError(400, "only embedding_types ['float'] is served here")
        if bool(req.texts) == bool(req.images):
            raise ServeError(400, "send either texts or images")
        if req.images:
            if req.input_type != "image":
                raise ServeError(400, "images need input_type 'image'")
            images = await run_in_threadpool(service.decode_images, _data_uris(req.images))
            shas, nbytes = images.shas, images.nbytes
            encode = lambda: service.encode_images(images)  # noqa: E731
            billed = {"images": len(shas)}
            extra = {"images": [{"width": w, "height": h, "format": "image", "bit_depth": 8} for w, h in images.sizes]}
            modality = "image"
        else:
            shas = service.check_texts(req.texts)
            nbytes = sum(len(t.encode("utf-8")) for t in req.texts)
            encode = lambda: service.encode_texts(req.texts)  # noqa: E731
            billed = {"input_tokens": int(sum(teacher.count_tokens(list(req.texts))))}
            extra = {"texts": list(req.texts)}
            modality = "text"
        sha = request_sha("cohere", modality, req.input_type, shas, req.output_dimension)
        return await paid(key, idempotency_key, "/v2/embed", modality, sha, shas, nbytes, encode,
                          lambda emb: {"id": str(uuid.uuid4()), "embeddings": {"float": emb.tolist()}, **extra,
                                       "meta": {"api_version": {"version": "2"}, "billed_units": billed},
                                       "response_type": "embeddings_by_type"})

    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    return app
