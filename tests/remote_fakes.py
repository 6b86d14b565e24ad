"""Loopback servers for the remote-teacher tests: uvicorn in a thread on 127.0.0.1 with an
ephemeral port, a fault injector (500s, 429s with each kind of Retry-After, lost answers, dropped
connections, wrong counts and dimensions), and small fakes of the openai (infinity) and cohere-v2
services answering in their published shapes from a local teacher, charging every input."""
from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import json
import random
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from embedcache.teachers.remote.codec import decode_image, floats_b64, parse_data_uri


LOGGERS = ("uvicorn.access", "uvicorn.error", "embedcache.serve", "embedcache.remote", "httpx", "httpcore")


class LiveServer:
    """``with LiveServer(app) as url:`` serves an ASGI app on loopback; stops it on exit."""

    def __init__(self, app, log_file: Optional[Path] = None):
        self.app, self.log_file = app, log_file

    def __enter__(self) -> str:
        import logging

        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=True, timeout_graceful_shutdown=1,
                                lifespan="off")  # (configures uvicorn's loggers: add ours after it)
        self._handler = None
        if self.log_file is not None:  # the server's and the client's logs, to grep for the key
            self._handler = logging.FileHandler(self.log_file)
            self._handler.setLevel(logging.DEBUG)
            self._levels = {name: logging.getLogger(name).level for name in LOGGERS}
            for name in LOGGERS:
                logging.getLogger(name).addHandler(self._handler)
                logging.getLogger(name).setLevel(logging.DEBUG)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("loopback server did not start")
            time.sleep(0.02)
        self._sock = sock
        return self.url

    def __exit__(self, *exc) -> None:
        import logging

        self.server.should_exit = True
        self.thread.join(timeout=10)
        self._sock.close()
        if self._handler is not None:
            for name in LOGGERS:
                logging.getLogger(name).removeHandler(self._handler)
                logging.getLogger(name).setLevel(self._levels[name])
            self._handler.close()


class Faults:
    """ASGI middleware that breaks some POST answers on purpose, from a seeded plan.

    plan: fault name -> probability, among: "500", "503", "413", "429-ms", "429-date", "429-none",
    "429-long" (Retry-After: 3600), "429-credit" (OpenAI's insufficient_quota) (all before the app runs: nothing charged),
    "stall" (never answered, nothing charged: the app never sees it), "lost" (after the app
    answered and charged: the answer is held past the client's timeout), "drop" (after: the
    connection is cut mid-answer), "500-after" (after: a gateway's 502 in place of the answer). ``script`` gives exact faults for the first POSTs (then the plan
    applies); ``delay`` slows every POST answer down (seconds).
    """

    def __init__(self, app, plan: Optional[Dict[str, float]] = None, seed: int = 0, hold: float = 1.5,
                 script: Optional[List[Optional[str]]] = None, delay: float = 0.0):
        self.app, self.plan, self.hold, self.delay = app, dict(plan or {}), hold, delay
        self.rng = random.Random(seed)
        self.script = list(script or [])
        self.count: Dict[str, int] = {}
        self.posts = 0

    def _pick(self) -> Optional[str]:
        if self.script:
            return self.script.pop(0)
        r, acc = self.rng.random(), 0.0
        for name, p in self.plan.items():
            acc += p
            if r < acc:
                return name
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        self.posts += 1
        fault = self._pick()
        if fault:
            self.count[fault] = self.count.get(fault, 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if fault in ("500", "503", "413", "429-ms", "429-date", "429-none", "429-long", "429-credit"):
            while (await receive()).get("more_body"):
                pass
            status = int(fault[:3])
            headers = [(b"content-type", b"application/json")]
            if fault == "429-ms":
                headers.append((b"retry-after-ms", b"30"))
            elif fault == "429-date":
                headers.append((b"retry-after", email.utils.formatdate(time.time() + 1, usegmt=True).encode()))
            elif fault == "429-long":
                headers.append((b"retry-after", b"3600"))
            kind = "insufficient_quota" if fault == "429-credit" else "server_error"  # OpenAI's out-of-credit 429
            body = json.dumps({"error": {"message": "injected", "type": kind, "code": kind}}).encode()
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if fault == "stall":  # the request never reaches the service: held past the client's timeout, then dropped
            await asyncio.sleep(self.hold)
            return
        if fault not in ("lost", "drop", "500-after"):
            return await self.app(scope, receive, send)
        held = []

        async def capture(message):
            held.append(message)

        await self.app(scope, receive, capture)  # the app answers (and charges) in full
        if fault == "500-after":  # a proxy in front of the service lost the answer it charged for (nginx's 502)
            body = json.dumps({"error": {"message": "bad gateway", "type": "server_error"}}).encode()
            await send({"type": "http.response.start", "status": 502,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if fault == "lost":
            await asyncio.sleep(self.hold)  # past the client's timeout: it gives up on this answer
            for m in held:
                await send(m)
            return
        start = next(m for m in held if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start["status"], "headers": headers})
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
        raise RuntimeError("injected: connection dropped mid-answer")


async def _rewritten(app, scope, receive, send, rewrite) -> None:
    """Serve ``scope`` with ``app``, then send its JSON answer as ``rewrite(answer) -> bytes`` makes it."""
    held = []

    async def capture(message):
        held.append(message)

    await app(scope, receive, capture)
    start = next(m for m in held if m["type"] == "http.response.start")
    body = rewrite(json.loads(b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")))
    headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
    await send({"type": "http.response.start", "status": start["status"],
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Tamper:
    """ASGI middleware that spoils the answers of POST /v1/embed/images: "count" drops a row,
    "dim" cuts every vector short, "zero" zeroes one vector, "strings" sends one as a list of
    strings, "notjson" answers 200 with a body that is not JSON (the server has charged each way)."""

    def __init__(self, app, how: str):
        self.app, self.how = app, how

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/images"):
            return await self.app(scope, receive, send)
        await _rewritten(self.app, scope, receive, send, self._spoil)

    def _spoil(self, answer) -> bytes:
        first = np.frombuffer(base64.b64decode(answer["data"][0]["embedding"]), "<f4")
        if self.how == "count":
            answer["data"] = answer["data"][:-1]
        elif self.how == "zero":
            answer["data"][0]["embedding"] = floats_b64(np.zeros_like(first))
        elif self.how == "strings":
            answer["data"][0]["embedding"] = ["x"] * len(first)
        elif self.how == "dim":
            for row in answer["data"]:
                row["embedding"] = floats_b64(np.frombuffer(base64.b64decode(row["embedding"]), "<f4")[:-1])
        return b"<html>502 Bad Gateway</html>" if self.how == "notjson" else json.dumps(answer).encode()


class ModelSwap:
    """ASGI middleware naming another model in every POST answer after the first ``after`` (a vendor
    moving its alias mid-run: the only sign of it in the OpenAI shape is the answer's ``model``)."""

    def __init__(self, app, after: int, model: str = "other-model-v2"):
        self.app, self.after, self.model, self.posts, self.on = app, after, model, 0, True

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        self.posts += 1
        if not self.on or self.posts <= self.after:
            return await self.app(scope, receive, send)
        await _rewritten(self.app, scope, receive, send, lambda answer: json.dumps({**answer, "model": self.model}).encode())


# --- fakes of other people's services ---------------------------------------------------------------
class _Books:
    """What a fake service charged: the content hash of every input, in order."""

    def __init__(self):
        self.items: List[str] = []
        self.requests = 0

    def charge(self, shas: List[str]) -> None:
        self.requests += 1
        self.items.extend(shas)

    def doubles(self) -> int:
        return len(self.items) - len(set(self.items))


def _json(body: dict, status: int = 200, headers=None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def _decode_uris(uris):
    arrs = [decode_image(parse_data_uri(u)[1]) for u in uris]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    return x, [hashlib.sha256(a.tobytes()).hexdigest() for a in arrs]


def _auth(request, key):
    got = request.headers.get("authorization", "")
    if not got:
        return _json({"error": {"message": "no key"}}, 401)
    if got != f"Bearer {key}":
        return _json({"error": {"message": "bad key"}}, 403)
    return None


def openai_app(teacher, key: str, limit: int = 32, tamper: Optional[str] = None, shuffle: bool = True):
    """infinity's shape: POST /embeddings, data URIs with modality image (at most ``limit`` images), base64
    or float answers matched by index (shuffled here, to prove the client reads the index), usage.
    ``tamper``: "count" drops an answer row, "dim" cuts every vector short."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    books = _Books()
    lock = threading.Lock()

    async def models(request):
        return _json({"object": "list", "data": [{"id": "fake-clip", "object": "model", "capabilities": ["embed", "image_embed"]}]})

    async def embeddings(request):
        bad = _auth(request, key)
        if bad:
            return bad
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if body.get("modality") == "image" and len(inputs) > limit:  # infinity caps images, not texts
            return _json({"detail": [{"msg": f"List should have at most {limit} items after validation"}]}, 422)
        with lock:
            if body.get("modality") == "image":
                x, shas = _decode_uris(inputs)
                emb = teacher.encode_pixels(x).numpy()
            else:
                shas = [hashlib.sha256(t.encode()).hexdigest() for t in inputs]
                emb = teacher.encode_text(inputs).numpy()
            books.charge(shas)
        if tamper == "dim":
            emb = emb[:, :-1]
        rows = [{"object": "embedding", "index": i,
                 "embedding": floats_b64(e) if body.get("encoding_format") == "base64" else e.tolist()}
                for i, e in enumerate(emb)]
        if tamper == "count":
            rows = rows[:-1]
        if shuffle:
            random.Random(len(rows)).shuffle(rows)
        return _json({"object": "list", "data": rows, "model": body.get("model"),
                      "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})

    app = Starlette(routes=[Route("/models", models), Route("/embeddings", embeddings, methods=["POST"])])
    app.state.books = books
    return app


def cohere_app(teacher, key: str, tamper: Optional[str] = None, limit: int = 96):
    """Cohere's v2 shape: POST /v2/embed, images as data URIs with input_type image (one a request on
    v3 models, ``limit`` otherwise; 96 texts), floats in embeddings.float, billed units in meta."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    books = _Books()
    lock = threading.Lock()

    async def embed(request):
        bad = _auth(request, key)
        if bad:
            return bad
        body = await request.json()
        model = body.get("model") or ""
        images, texts = body.get("images"), body.get("texts")
        cap = (1 if "-v3" in model else limit) if images else 96
        n = len(images or texts or [])
        if n > cap:
            return _json({"message": f"invalid request: too many images, at most {cap} per call"}, 400)
        with lock:
            if images:
                assert body.get("input_type") == "image"
                x, shas = _decode_uris(images)
                emb = teacher.encode_pixels(x).numpy()
                billed = {"images": n}
            else:
                shas = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
                emb = teacher.encode_text(texts).numpy()
                billed = {"input_tokens": n * 3}
            books.charge(shas)
        vecs = emb.tolist()
        if tamper == "dim":
            vecs = [v[:-1] for v in vecs]
        if tamper == "count":
            vecs = vecs[:-1]
        return _json({"id": "fake", "embeddings": {"float": vecs}, "texts": texts,
                      "meta": {"api_version": {"version": "2"}, "billed_units": billed},
                      "response_type": "embeddings_by_type"})

    async def models(request):
        return _json({"models": []})

    app = Starlette(routes=[Route("/v2/embed", embed, methods=["POST"]), Route("/v1/models", models)])
    app.state.books = books
    return app


def files_containing(folders, needle: bytes) -> List[str]:
    """Every file under ``folders`` whose bytes contain ``needle`` (SQLite WAL files included)."""
    hits = []
    for folder in folders:
        folder = Path(folder)
        paths = [folder] if folder.is_file() else [p for p in folder.rglob("*") if p.is_file()]
        for p in paths:
            if needle in p.read_bytes():
                hits.append(str(p))
    return hits


@contextmanager
def served_remote_teacher(teacher_cfg, teacher, folder: Path, key: str = "sk-served-remote-teacher-KEY"):
    """A ``remote`` teacher talking to ``embedcache serve`` (serving ``teacher``) on loopback."""
    from embedcache.config import TeacherConfig
    from embedcache.serve import ServeConfig, build_app
    from embedcache.serve.keys import KeyInfo, KeyRing, key_digest
    from embedcache.teachers import build_teacher

    app = build_app(ServeConfig(teacher=teacher_cfg, ledger=str(folder / "server.sqlite")), teacher=teacher,
                    keys=KeyRing({key_digest(key): KeyInfo("tests")}))
    (folder / "key.txt").write_text(key)
    with LiveServer(app) as url:
        yield build_teacher(TeacherConfig(name="remote", url=url, api_key_file=str(folder / "key.txt"),
                                          ledger=str(folder / "client.sqlite"), timeout=10))
