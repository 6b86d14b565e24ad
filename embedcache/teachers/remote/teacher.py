"""The ``remote`` teacher: a black-box teacher behind an embedding service, paid per query.

Views are rendered on the canvas exactly as for a local teacher, quantised to uint8, and sent as
PNG (lossless: the service sees the very pixels a local teacher would) or high-quality JPEG. Each
input is looked up in the ledger first (keyed by what is sent and where), identical inputs in a
call are sent once, and the rest go out in batches at the protocol's limit with retries, pacing and
a query budget. Texts (the class prompts) go through the same client and ledger.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import torch

from ... import interrupt
from ...config import TeacherConfig
from ...errors import BudgetError, ConfigError, TeacherLoadError
from ...fileio import json_digest
from ...views import to_uint8
from .._base import TEACHERS, Teacher
from .client import TooLarge, Transport
from .codec import encode_views
from .errors import BadAnswer, RemoteError, UnreadableAnswer
from .ledger import Ledger
from .protocols import PROTOCOLS, Protocol
from .ratelimit import RateLimiter
from .retry import RetryPolicy

WAIT_POLL_S = 0.2  # how often answers another process is fetching are looked for

DEFAULT_KEY_ENV = "EMBEDCACHE_API_KEY"
DIM_PROBE = "a photo."  # one text embedded once per service to learn its dimension (then kept in the ledger)


def clean_url(url: str) -> str:
    """The base URL without a trailing slash; URLs carrying credentials are refused."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"teacher.url={url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000")
    if parts.username or parts.password:
        raise ConfigError("teacher.url must not carry credentials; put the key in an environment variable "
                          "(teacher.api_key_env) or a file (teacher.api_key_file)")
    if parts.query or parts.fragment:  # not echoed: a key is often put there
        raise ConfigError("teacher.url must not carry a query or fragment (the API paths are appended to it); give "
                          "the base URL, and a key by teacher.api_key_env or teacher.api_key_file")
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


def read_key(cfg: TeacherConfig) -> Tuple[Optional[str], str]:
    """(key or None, where it came from: '$VAR' or 'file PATH', never the key itself)."""
    key, where = _key_and_source(cfg)
    if key is not None and not (key.isascii() and key.isprintable() and not any(c.isspace() for c in key)):
        raise TeacherLoadError(f"the API key in {where} is not one printable ASCII token (a second line, a space, "
                               "or a non-ASCII character); keep only the key there")
    return key, where


def _variable_like(name: str) -> bool:
    """Shaped like an API key's variable (OPENAI_API_KEY, TOKEN), not like a key: upper case, and words
    joined by _ where it holds digits (AKIAIOSFODNN7EXAMPLE is a key)."""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", name)) and ("_" in name or not any(c.isdigit() for c in name))


def _key_and_source(cfg: TeacherConfig) -> Tuple[Optional[str], str]:
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        if not path.is_file() and "/" not in cfg.api_key_file and not cfg.api_key_file.startswith("~"):
            raise TeacherLoadError("teacher.api_key_file names no file (not shown: with no / in it, it may be the key "
                                   "itself); give the path of the file holding the API key, e.g. ./key.txt, and never "
                                   "the key in a config or command line")
        if not path.is_file():
            raise TeacherLoadError(f"teacher.api_key_file {path} not found; give the file holding the API key")
        key = path.read_text().strip()
        if not key:
            raise TeacherLoadError(f"teacher.api_key_file {path} is empty")
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:  # as ssh says of a private key others may read
            warnings.warn(f"the API key file {path} can be read by other users (mode {mode:o}); chmod 600 {path}")
        return key, f"file {path}"
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key and not _variable_like(cfg.api_key_env):  # never echo what may be the key itself
            raise TeacherLoadError("teacher.api_key_env is not a variable name (not shown: it may be the key itself); "
                                   "give the name of the variable holding the key, e.g. teacher.api_key_env=OPENAI_API_KEY, "
                                   "and never the key in a config or command line")
        if not key:
            raise TeacherLoadError(f"the API key variable ${cfg.api_key_env} (teacher.api_key_env) is not set; "
                                   f"export it, or use teacher.api_key_file")
        return key, f"${cfg.api_key_env}"
    key = os.environ.get(DEFAULT_KEY_ENV, "").strip()
    return (key or None), f"${DEFAULT_KEY_ENV}"


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def queries_in(cost: Dict[str, int]) -> int:
    """The paid queries of a dry run's ``cost`` (its views and prompts to pay for; the ledger's are free)."""
    return cost.get("images", 0) + cost.get("text_texts", 0)


def replay_note(cost: Dict[str, int]) -> str:
    """' (N if ...)': what a dry run's ``cost`` comes to when the service answers the requests a stopped
    call sent as free replays ('' when there are none)."""
    free = cost.get("replayable", 0) + cost.get("text_replayable", 0)
    return (f" ({queries_in(cost) - free:,} if the service answers the {free:,} a stopped call sent as free replays, as "
            "it does for those it charged while it keeps them)") if free else ""


@TEACHERS.register("remote")
class RemoteTeacher(Teacher):
    registry_name = "remote"
    computes_here = False  # the service computes; this machine waits on the network
    # The service normalises. Here "normalised" input is [0, 1] pixels: encode_image(x) sends to_uint8(x).
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)
    asks_dim = True  # a service that does not say its dimension is asked one paid text (``build_teacher``)

    def __init__(self, cfg: TeacherConfig, embed_dim: Optional[int] = None):
        """``embed_dim``: what a store made by this teacher records, asked of no service (its answers are
        still held to it)."""
        if not cfg.url:
            raise ConfigError("the remote teacher needs teacher.url (e.g. --set teacher.url=http://127.0.0.1:8000)")
        self.cfg = cfg
        self.protocol_name = PROTOCOLS.check(cfg.protocol)
        self.url = clean_url(cfg.url)
        if cfg.image_format not in PROTOCOLS.get(cfg.protocol).formats:
            raise ConfigError(f"protocol {cfg.protocol} does not take {cfg.image_format} images")
        key, key_source = read_key(cfg)
        self.device = torch.device("cpu")
        self.ledger = Ledger(cfg.ledger)
        proto: Protocol = PROTOCOLS.get(cfg.protocol)()
        self.transport = Transport(self.url, proto, key, key_source, self.ledger,
                                   RetryPolicy(cfg.max_retries, cfg.retry_backoff, cfg.max_retry_wait),
                                   RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute), cfg.timeout, cfg.max_queries)
        probe = self.transport.get_json(proto.probe_path, required=cfg.protocol == "embedcache") if proto.probe_path else None
        proto.described = self.server = proto.describe(probe)
        self.protocol = proto
        self.fingerprint = self.server.get("fingerprint")
        self.model = cfg.model or self.server.get("model")  # embedcache serve names its model when not asked
        served = self.server.get("served_models")
        if served and self.model not in served:
            raise ConfigError(f"teacher.model={self.model!r} is not served at {self.url}; it serves: {', '.join(served)}")
        self.input_size = int(cfg.input_size or self.server.get("input_size") or 224)
        self.interpolation = cfg.interpolation or self.server.get("interpolation") or "bicubic"
        self.context_length = int(self.server.get("context_length") or 1_000_000)
        self.limits = proto.limits(self.model)
        for k in ("image_batch", "text_batch"):
            if cfg.request_batch:
                self.limits[k] = min(self.limits[k], cfg.request_batch)
        self._ctx: Dict[str, str] = {}
        self._answered: Optional[str] = None  # the model the store's answers named (``expect_model``), or this call's first
        self._texts_paid: set = set()  # ledger keys of the texts this teacher sent (``_embed``)
        self._sizes: Dict[str, Tuple[int, Callable[[bytes], int]]] = {}  # _body_size's, per modality
        for modality in ("image", "text"):
            spec = self._context_spec(modality)
            self._ctx[modality] = json_digest(spec, 32)
            self.ledger.add_context(self._ctx[modality], spec)
        self.begin_plan()
        self._say_small_request_limit()
        self.embed_dim = int(cfg.dimensions or self.server.get("embed_dim") or self.ledger.any_dim(self._ctx["text"])
                             or embed_dim or self._probe_dim())
        if self.server.get("embed_dim") and cfg.dimensions and int(self.server["embed_dim"]) != cfg.dimensions:
            raise ConfigError(f"teacher.dimensions={cfg.dimensions} but the server at {self.url} embeds in "
                              f"{self.server['embed_dim']} dimensions")

    # --- identity -------------------------------------------------------------------------------------
    def _context_spec(self, modality: str) -> Dict[str, Any]:
        """What an answer depends on, for the ledger key: the URL is in it (the ledger never trusts
        another server's answer), the key is not."""
        spec = {"protocol": self.protocol_name, "url": self.url, "model": self.model, "server": self.fingerprint,
                "modality": modality, "dimensions": self.cfg.dimensions}
        if modality == "image":
            spec.update(format=self.cfg.image_format, quality=self.cfg.jpeg_quality if self.cfg.image_format == "jpeg" else None,
                        input_size=self.input_size, interpolation=self.interpolation, codec="png-pixels-v1")
        elif self.protocol_name == "cohere-v2":
            spec["input_type"] = self.protocol.text_input_type
        return spec

    def identity(self) -> Dict[str, Any]:
        """The store's cache key: protocol, model, the server's teacher fingerprint (embedcache),
        dimensions, image format and quality. Not the URL: a location is not an identity (a server
        that moves, or sits behind a proxy, still gives the same embeddings)."""
        return {"name": "remote", "protocol": self.protocol_name, "model": self.model, "server": self.fingerprint,
                "dimensions": self.embed_dim, "image_format": self.cfg.image_format,
                "jpeg_quality": self.cfg.jpeg_quality if self.cfg.image_format == "jpeg" else None}

    def preprocessing(self) -> Dict[str, Any]:
        transport = "png (lossless)" if self.cfg.image_format == "png" else f"jpeg q{self.cfg.jpeg_quality}"
        return {"input_size": self.input_size, "interpolation": self.interpolation, "transport": transport,
                "normalisation": "by the service"}

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "url": self.url, "server": self.server, "limits": self.limits,
                "ledger": str(self.ledger.path)}

    # --- encoding -------------------------------------------------------------------------------------
    def _image_inputs(self, x: torch.Tensor) -> Tuple[List[str], List[bytes]]:
        payloads = encode_views(x, self.cfg.image_format, self.cfg.jpeg_quality)
        ctx = self._ctx["image"].encode()
        if self.cfg.image_format == "png":  # lossless: the pixels are what is sent, whatever zlib made of them
            arr = x.contiguous().cpu().numpy()
            keys = [_sha(ctx, str(a.shape).encode(), a.tobytes()) for a in arr]
        else:
            keys = [_sha(ctx, p) for p in payloads]
        return keys, payloads

    def _text_inputs(self, texts: Sequence[str]) -> Tuple[List[str], List[bytes]]:
        ctx = self._ctx["text"].encode()
        payloads = [t.encode("utf-8") for t in texts]
        return [_sha(ctx, p) for p in payloads], payloads

    @torch.no_grad()
    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, input_size, input_size) uint8 -> (B, D) float32, L2-normalised, CPU."""
        keys, payloads = self._image_inputs(x)
        return torch.from_numpy(self._embed("image", keys, payloads, list(payloads)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float pixels in [0, 1] (mean 0, std 1), sent as the 8-bit image they round to."""
        return self.encode_pixels(to_uint8(x.detach().float().clamp(0, 1).cpu()))

    def encode_text(self, texts: List[str]) -> torch.Tensor:
        keys, payloads = self._text_inputs(texts)
        return torch.from_numpy(self._embed("text", keys, payloads, list(texts)))

    def count_tokens(self, texts: List[str]) -> List[int]:
        """Each text's tokens: embedcache serve counts them with the served teacher's tokenizer (free),
        in requests of its batch (it refuses a longer list); other services by this client's estimate
        (~4 UTF-8 bytes a token), as is a count the server did not give (said)."""
        if self.protocol_name == "embedcache" and texts:
            step, counted = self.limits["text_batch"], []
            for i in range(0, len(texts), step):
                part, failed = self._count_tokens_remote(texts[i:i + step])
                if part is None:
                    warnings.warn(f"the server at {self.url} did not count the tokens ({failed}): n_tokens of these "
                                  f"{len(texts)} prompts are this client's estimate, and their `truncated` may be wrong")
                    break
                counted += part
            else:
                return counted
        return [self.protocol.text_tokens(t) for t in texts]

    def _count_tokens_remote(self, texts: List[str]) -> Tuple[Optional[List[int]], str]:
        """(the server's counts, or None and why not)."""
        try:
            resp = self.transport.http.post(self.url + "/v1/count_tokens", json={"texts": list(texts)},
                                            headers=self.transport.headers)
            tokens = resp.json().get("tokens") if resp.status_code == 200 else None
        except (ValueError, AttributeError, OSError, httpx.HTTPError) as exc:
            return None, type(exc).__name__
        if not (isinstance(tokens, list) and len(tokens) == len(texts)):
            return None, f"HTTP {resp.status_code}" if resp.status_code != 200 else "its answer was not a count"
        return [int(t) for t in tokens], ""

    def _probe_dim(self) -> int:
        return int(self.encode_text([DIM_PROBE]).shape[1])

    def _embed(self, modality: str, keys: List[str], payloads: List[bytes], wire: List[Any]) -> np.ndarray:
        """Answers for every input, from the ledger or the service; (N, D) float32."""
        t = self.transport
        found = self.ledger.lookup(keys)
        self._hold_ledger_models(list(found), modality)  # answers an earlier call (or store) paid for
        # a prompt this teacher paid for already (the name prompt is also a template) is a repeat, as a dry
        # run counts it, not an answer the ledger held (views repeat too rarely to remember them all)
        again = sum(k in found and k in self._texts_paid for k in keys) if modality == "text" else 0
        hits = sum(k in found for k in keys) - again
        t.stats.cache_hits += hits
        setattr(t.stats, f"{modality}_cache_hits", getattr(t.stats, f"{modality}_cache_hits") + hits)
        todo: Dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in found and k not in todo:
                todo[k] = i
        t.stats.deduplicated += sum(k not in found for k in keys) - len(todo) + again
        if modality == "text":
            self._texts_paid.update(todo)
        for group, rid in self._batches(modality, list(todo)):
            self._send(modality, group, {k: (payloads[todo[k]], wire[todo[k]]) for k in group}, rid)
        found.update(self.ledger.lookup(list(todo)))
        self._hold_ledger_models(list(todo), modality)  # answered meanwhile by another process sharing the ledger
        missing = [k for k in keys if k not in found]
        if missing:  # cannot happen unless the ledger file was changed under us
            raise RemoteError(f"{len(missing)} answers are missing from the ledger {self.ledger.path}; rerun to resume")
        return np.stack([found[k] for k in keys]).astype(np.float32)

    def _replayable(self, rid: str) -> bool:
        """An earlier run's request, still pending, a send of which may have been charged."""
        return self.ledger.request_status(rid) == "pending" and self.ledger.may_be_charged(rid)

    def _count_replay(self, replay: bool, n: int, rid: str) -> None:
        """An earlier run's possibly charged request that went out again from here: counted (and, to a
        service without idempotency keys, possibly paid twice, unless an earlier call of the store
        counted it as possibly paid already)."""
        if replay:
            self.transport.stats.replayed_requests += 1
            if not self.protocol.idempotency_header and rid not in self.transport.inherited:
                self._replayed_without_key(n)

    def inherit_lost(self, lost: Dict[str, int]) -> None:
        """The store's requests an earlier call counted as possibly paid (``lost_requests`` of its books):
        those still pending in the ledger are settled by this call's answer to them (``Transport.inherit_lost``)."""
        self.transport.inherit_lost({rid: n for rid, n in lost.items()
                                     if n > 0 and self.ledger.request_status(rid) == "pending"})

    def _fresh_id(self, rid: str) -> str:
        """``rid``, or when a request of that id was answered unusably ('bad': paid, nothing kept), the
        next id of a deterministic chain: its inputs go out anew (a service would replay the bad answer
        to the same idempotency key) and the paid request keeps its books."""
        while self.ledger.request_status(rid) == "bad":
            rid = _sha(rid.encode(), b"sent again after an unusable answer")[:40]
        return rid

    def _release(self, rid: str) -> None:
        """A request this process stops fetching: refused at every attempt or never sent, it is closed
        (nothing was paid); else left pending (it may have been charged) but not as this live process's,
        so another process replays it rather than waiting for an answer this one no longer fetches."""
        if not self.ledger.close_if_uncharged(rid):
            self.ledger.disown(rid)

    def _wait_for_others(self, keys: List[str], waited: Sequence[str] = ()) -> Tuple[Dict[str, np.ndarray], List[str]]:
        """Answers to ``keys`` that another live process (another store's extraction, sharing this
        ledger) has pending: waited for, not sent again and paid twice; and the keys still pending
        there when the wait, bounded by the time its request may take (retries included), ran out
        (with ``waited``, keys an earlier wait ran out on, not waited for again): those go out from here."""
        got = self.ledger.lookup(keys)  # answered meanwhile (found taken when this request was written)
        waiting = set(self.ledger.held_elsewhere([k for k in keys if k not in got])) - set(waited)
        deadline = time.monotonic() + max(60.0, 4 * self.cfg.timeout * (self.cfg.max_retries + 1))
        while waiting and time.monotonic() < deadline:
            if interrupt.requested():
                raise KeyboardInterrupt("interrupted; rerun the same command to resume (paid answers are in the ledger)")
            time.sleep(WAIT_POLL_S)
            got.update(self.ledger.lookup(list(waiting)))
            waiting = set(self.ledger.held_elsewhere([k for k in waiting if k not in got]))
        return got, sorted(waiting | set(waited))

    def _batches(self, modality: str, todo: List[str]):
        """(keys, request id or None) in sending order: requests an earlier run sent without
        getting their answer are replayed as they were (same idempotency key), the rest chunked."""
        left = dict.fromkeys(todo)
        out = []
        for rid, items in self.ledger.pending_requests(todo):
            if items and all(k in left for k in items):
                out.append((items, rid))
                for k in items:
                    left.pop(k)
            elif self.ledger.may_be_charged(rid):
                # its inputs come in other batches now (batch_size changed): sent under a new key (inputs
                # another live process is sending are waited for, not sent)
                held = set(self.ledger.held_elsewhere(items))
                self._resent_apart(sum(k in left and k not in held for k in items), rid)
        rest = list(left)
        limit = self.limits[f"{modality}_batch"]
        out += [(rest[i:i + limit], None) for i in range(0, len(rest), limit)]
        return out

    def _resent_apart(self, n: int, rid: Optional[str] = None) -> None:
        """Inputs of a request an earlier run sent without getting its answer, going out again in
        another request (another batch size, a request split, some of its inputs answered elsewhere
        meanwhile): the service cannot tell it has answered them, so they may be paid twice. (Of
        request ``rid`` an earlier call of the store counted as possibly paid: said, not counted again.)"""
        if not n:
            return
        counted = rid is not None and rid in self.transport.inherited
        if not self.transport.said_apart:
            warnings.warn("inputs of a request cut off in an earlier run go out again in other requests (was batch_size "
                          "changed?): they may be paid twice (counted as "
                          f"{'possibly paid by the call cut off' if counted else 'possibly_paid_twice'}); resume with "
                          "the batch size it had to have such requests replayed free")
            self.transport.said_apart = True
        if not counted:
            self.transport.stats.possibly_paid_twice += n

    def _replayed_without_key(self, n: int) -> None:
        """A request an earlier run sent without storing its answer goes out again to a service that
        takes no idempotency key (OpenAI's and Cohere's APIs): if it was charged, it is charged again."""
        if not self.transport.stats.possibly_paid_twice:
            warnings.warn(f"a request cut off in an earlier run goes out again, and the {self.protocol_name} protocol "
                          "takes no idempotency key: if the service charged it then, its inputs may be paid twice "
                          "(counted as possibly_paid_twice)")
        self.transport.stats.possibly_paid_twice += n

    def _request_id(self, modality: str, keys: Sequence[str]) -> str:
        # deterministic: the same batch after a kill gets the same idempotency key
        return _sha(self._ctx[modality].encode(), "\n".join(keys).encode())[:40]

    def _body_size(self, modality: str) -> Tuple[int, Callable[[bytes], int]]:
        """Exactly what ``Transport.post`` sends, in bytes: the JSON body of an empty request of this
        modality, and what one input's payload adds to it (base64 or data URI, or the text; quoted and
        its separator included). A body limit (embedcache serve's max_request_bytes) is one of these:
        counting the payloads alone had put base64's third more into requests the service refused."""
        if modality not in self._sizes:
            def body(payloads) -> int:
                if modality == "image":
                    _, req = self.protocol.image_request(self.model, payloads, self.cfg.image_format, self.cfg.dimensions)
                else:
                    _, req = self.protocol.text_request(self.model, [p.decode("utf-8") for p in payloads],
                                                        self.cfg.dimensions)
                return len(json.dumps(req).encode())

            empty, quoted = body([]), body([b""]) - body([]) + 2  # an empty input: its quotes, prefix and ", "
            if modality == "image":
                self._sizes[modality] = (empty - 2, lambda p: quoted + 4 * math.ceil(len(p) / 3))
            else:
                self._sizes[modality] = (empty - 2, lambda p: len(json.dumps(p.decode("utf-8")).encode()) + 2)
        return self._sizes[modality]

    def _say_small_request_limit(self) -> None:
        """A request limit below what one view may take (a PNG of noisy pixels hardly compresses) stops an
        extraction at the first view past it, after paying for the views before: said before anything is
        sent, with the dry run that checks every view first."""
        cap = self.limits.get("max_request_bytes")
        if not cap:
            return
        s = self.input_size
        raw = s * (3 * s + 1)  # PNG scanlines, stored uncompressed at worst (+ zlib's and the chunks' few bytes)
        start, adds = self._body_size("image")
        worst = start + adds(bytes(raw + 5 * math.ceil(raw / 65535) + 256))
        if worst > cap:
            warnings.warn(f"the service at {self.url} takes requests of at most {cap:,} bytes, and one {s} px view sent as "
                          f"{self.cfg.image_format.upper()} can take up to {worst:,} (pixels that compress little): a "
                          "larger view stops the extraction after what it paid for; `extract --dry-run` checks every "
                          "view first (teacher.image_format=jpeg or a smaller teacher.input_size makes views smaller)")

    def _split_by_bytes(self, modality: str, keys: List[str], payload: Callable[[str], bytes]) -> List[List[str]]:
        """``keys`` in order, in groups whose request bodies fit the service's byte limits."""
        cap_one, cap_all = self.limits.get("max_image_bytes"), self.limits.get("max_request_bytes")
        start, adds = self._body_size(modality) if cap_all else (0, len)  # (no body limit: no need to count it)
        groups, cur, size = [], [], start
        for k in keys:
            raw = payload(k)
            n, add = len(raw), adds(raw)
            if modality == "image" and cap_one and n > cap_one:
                raise RemoteError(f"an encoded input of {n:,} bytes is larger than the {cap_one:,} bytes the service at "
                                  f"{self.url} accepts for one image; use teacher.image_format=jpeg or a smaller "
                                  "teacher.input_size")
            if cap_all and start + add > cap_all:
                fix = ("use teacher.image_format=jpeg or a smaller teacher.input_size" if modality == "image" else
                       "shorten that prompt")
                raise RemoteError(f"one {modality} makes a request of {start + add:,} bytes, more than the {cap_all:,} "
                                  f"the service at {self.url} accepts in one request; {fix}")
            if cur and cap_all and size + add > cap_all:
                groups.append(cur)
                cur, size = [], start
            cur.append(k)
            size += add
        return groups + ([cur] if cur else [])

    def _send(self, modality: str, keys: List[str], items: Dict[str, Tuple[bytes, Any]], rid: Optional[str],
              waited: Sequence[str] = (), from_replay: bool = False) -> None:
        """Send ``keys`` as one request (``rid``: an earlier run's, replayed) and store the answer.
        ``waited``: keys already waited for in vain (not waited for again); ``from_replay``: ``keys`` are
        inputs of an earlier run's possibly charged request, going out apart from it."""
        t = self.transport
        charged = from_replay or (rid is not None and self._replayable(rid))
        groups = self._split_by_bytes(modality, keys, lambda k: items[k][0])
        if len(groups) > 1:  # each under an id of its own
            self._resent_apart(len(keys) if charged else 0)
            for g in groups:
                self._send(modality, g, items, None, waited)
            return
        arrived, waited_out = self._wait_for_others(keys, waited)  # inputs another live process is sending now
        if arrived:
            t.stats.cache_hits += len(arrived)
            setattr(t.stats, f"{modality}_cache_hits", getattr(t.stats, f"{modality}_cache_hits") + len(arrived))
            keys, rid = [k for k in keys if k not in arrived], None  # what is left is a request of its own
            if not keys:
                return
            self._resent_apart(len(keys) if charged else 0)
            charged = False
        n = len(keys)
        rid = self._fresh_id(rid or self._request_id(modality, keys))
        replay = self._replayable(rid)
        nbytes = sum(len(items[k][0]) for k in keys)
        if modality == "image":
            path, body = self.protocol.image_request(self.model, [items[k][1] for k in keys], self.cfg.image_format,
                                                     self.cfg.dimensions)
            tokens = n * self.protocol.image_tokens(self.input_size)
        else:
            path, body = self.protocol.text_request(self.model, [items[k][1] for k in keys], self.cfg.dimensions)
            tokens = sum(self.protocol.text_tokens(items[k][1]) for k in keys)
        if self.ledger.begin(rid, self._ctx[modality], modality, [(k, len(items[k][0])) for k in keys], waited_out):
            # another process began (or answered) some of these since the wait above: wait for them, send the rest
            self._send(modality, keys, items, None, waited_out, from_replay=charged or replay)
            return
        sends = t.stats.attempts
        try:
            answer = t.post(rid, path, body, n, tokens)  # claimed there, as it goes out (pending here first)
        except UnreadableAnswer:
            self._count_replay(replay, n, rid)
            self._paid_for_nothing(rid, modality, n, nbytes)
            raise
        except TooLarge as exc:
            self._release(rid)
            if n == 1:
                raise RemoteError(f"the server at {self.url} refuses even a single input as too large ({exc}); "
                                  f"use teacher.image_format=jpeg or a smaller teacher.input_size") from None
            half = max(1, n // 2)
            self.limits[f"{modality}_batch"] = min(self.limits[f"{modality}_batch"], half)
            t.stats.halvings += 1
            self._resent_apart(n if charged or replay else 0)  # the halves go under ids of their own
            self._send(modality, keys[:half], items, None, waited_out)
            self._send(modality, keys[half:], items, None, waited_out)
            return
        except (KeyboardInterrupt, BudgetError, RemoteError, OSError):
            self._release(rid)
            self._count_replay(replay and t.stats.attempts > sends, n, rid)  # only if it went out again
            raise
        self._count_replay(replay, n, rid)
        try:
            emb, usage, model = self._usable(answer, n, modality)
        except RemoteError:
            self._paid_for_nothing(rid, modality, n, nbytes)
            raise
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        if np.abs(norms - 1.0).max() > 1e-4:  # a service that does not normalise; normalised answers keep their bits
            emb = emb / norms
        elsewhere = t.replayed_unlost and not replay  # no send of this ledger made the charge it replays: another client did
        self.ledger.finish(rid, keys, emb, usage, model, replayed_elsewhere=elsewhere)
        if elsewhere:
            t.replayed_from_elsewhere(n)
            return
        t.count(modality, n, nbytes, free=t.last_replayed)
        t.add_usage(usage)  # a free replay's is the usage of the charge whose answer was lost: counted once, now

    def _usable(self, answer: Any, n: int, modality: str) -> Tuple[np.ndarray, Dict[str, float], Optional[str]]:
        """The answer's (n, D) embeddings, usage and the model it names, or a BadAnswer saying why they
        cannot be kept: unreadable, of another dimension, not finite, all zero (no direction to
        normalise), or from another model than the store's other answers."""
        try:
            emb, usage = self.protocol.parse(answer, n)
        except BadAnswer:
            raise
        except RemoteError as exc:  # the protocol's own checks: a wrong count, a changed fingerprint, ...
            raise BadAnswer(str(exc)) from None
        except (ValueError, TypeError) as exc:  # e.g. a vector of strings, bad base64
            raise BadAnswer(f"the server at {self.url} answered embeddings that cannot be read ({type(exc).__name__}); "
                            "nothing was written") from None
        if getattr(self, "embed_dim", None) and emb.shape[1] != self.embed_dim:
            raise BadAnswer(f"the server at {self.url} answered {emb.shape[1]}-dimensional embeddings, "
                            f"expected {self.embed_dim}; nothing was written")
        if not np.isfinite(emb).all():
            raise BadAnswer(f"the server at {self.url} answered non-finite embeddings; nothing was written")
        zero = np.flatnonzero(np.linalg.norm(emb, axis=1) < 1e-6)
        if len(zero):
            raise BadAnswer(f"the server at {self.url} answered {len(zero)} all-zero embedding(s); nothing was written")
        model = self.protocol.answered_model(answer)
        if model is not None:
            self._hold_model(model, f"the server at {self.url} answered these {modality}s")
        return emb, usage, model

    def _hold_ledger_models(self, keys: List[str], modality: str) -> None:
        for model in self.ledger.models_of(keys):
            self._hold_model(model, f"the ledger {self.ledger.path} holds answers to some of these {modality}s",
                             from_ledger=True)

    def check_ledger(self, texts: Sequence[str]) -> None:
        """The ledger's answers to a store's prompts held to the store's model before any view is paid
        for (found only as the prompts are encoded, at the end, every view had been paid under a model
        the prompts' answers were not of)."""
        self._hold_ledger_models(self._text_inputs(list(texts))[0], "text")

    def _hold_model(self, model: str, source: str, from_ledger: bool = False) -> None:
        """Every answer of a store, images and texts, from one model: the one its first answer named (a
        store resumed: the one its books recorded). Under the OpenAI shape the answer's name is the only
        sign that a vendor moved an alias to a new model; a store of both would mix two embedding spaces
        (class texts of one, images of the other, or images of both)."""
        if self._answered is None:
            self._answered = model
        if model != self._answered:
            asked = f"teacher.model={self.model}" if self.model else "the service's default model"
            fix = ("rerun this store with another teacher.ledger, which reuses no old answer (its finished blocks "
                   "are kept)" if from_ledger else "start a new store asking for a model name that does not move")
            raise BadAnswer(f"{source} from model {model!r}, where this store's other answers came from "
                            f"{self._answered!r}: the two would mix in one store, so nothing was written. The service "
                            f"moved the model behind {asked}: {fix}")

    def expect_model(self, model: Optional[str]) -> None:
        """The model a store's earlier answers named (its books' ``answered_model``): held to (an answer
        this call had already, its dimension probe's, to it as well)."""
        if isinstance(model, str) and model:
            said, self._answered = self._answered, model
            if said is not None:
                self._hold_model(said, f"the server at {self.url} answered this call's first text")

    def _paid_for_nothing(self, rid: str, modality: str, n: int, nbytes: int) -> None:
        """An answer that came (so was paid) but gave nothing to keep: counted, its request closed."""
        self.ledger.close_request(rid, "bad")
        self.transport.count(modality, n, nbytes, free=self.transport.last_replayed)

    # --- cost (dry runs) and usage (manifest) --------------------------------------------------------
    def _cost(self, modality: str, keys: List[str], payloads: List[bytes]) -> Dict[str, int]:
        found = self.ledger.lookup(keys)
        self._hold_ledger_models(list(found), modality)  # free only where the run would take them
        # prompts an earlier call of this dry run costs: in the ledger by the time extraction asks again
        # (views are not remembered: a dataset's worth of keys, for the rare repeated image)
        planned = self._planned_texts if modality == "text" else set()
        free = {k for k in keys if k in found}
        counted = {k for k in keys if k in planned and k not in free}  # the same prompt in two text sources
        todo: Dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in free and k not in counted and k not in todo:
                todo[k] = i
        planned.update(todo)
        replayable, apart, without_key = self._replays(todo)
        limit = self.limits[f"{modality}_batch"]
        first = modality not in self._limit_said
        self._limit_said.add(modality)
        unit = "images" if modality == "image" else "texts"
        order = list(todo)
        requests = sum(len(self._split_by_bytes(modality, order[j:j + limit], lambda k: payloads[todo[k]]))
                       for j in range(0, len(order), limit))
        return {"requests": requests, unit: len(todo),
                # each input once: a prompt repeated (the name prompt is also a template) is paid or answered once
                "bytes": sum(len(payloads[i]) for i in todo.values()),
                "ledger_hits": len(free),
                "replayable": replayable, "resent_apart": apart, "resent_without_key": without_key,
                "duplicates": len(keys) - len(set(keys)) + len(counted),
                # summed over calls these give the requests of every input packed at the limits, and the limit itself
                "requests_at_batch_limit": self._pack(modality, [payloads[i] for i in todo.values()], limit),
                "batch_limit": limit if first else 0}

    def _replays(self, todo: Dict[str, int]) -> Tuple[int, int, int]:
        """Of the inputs to pay for, those in requests a stopped call sent and the service may have charged
        (priced all the same), as ``_batches`` will send them: (replayed whole under their idempotency key,
        which the service answers free while it holds the answer; going out in other requests, as after a
        change of batch_size; going to a service that takes no idempotency key). The last two are paid
        twice if the service charged them then, unless a live process has them in flight (waited for)."""
        free = apart = without_key = 0
        for rid, items in self.ledger.pending_requests(list(todo)):
            if not self._replayable(rid):
                continue
            whole = bool(items) and all(k in todo for k in items)
            n = len(set(items)) if whole else sum(k in todo for k in set(items))
            if whole and self.protocol.idempotency_header:
                free += n
            elif self.ledger.held_elsewhere(items):
                continue
            elif not self.protocol.idempotency_header:
                without_key += n
            else:
                apart += n
        return free, apart, without_key

    def _pack(self, modality: str, payloads: List[bytes], limit: int) -> int:
        """Requests these inputs open when every input the plan has met is packed into requests at the
        service's limits (``limit`` inputs, and its body's bytes), continuing the plan's open request."""
        cap = self.limits.get("max_request_bytes")
        start, adds = self._body_size(modality) if cap else (0, len)
        opened, (count, size) = 0, self._packed[modality]
        for p in payloads:
            add = adds(p)
            if not count or count == limit or (cap and size + add > cap):
                opened, count, size = opened + 1, 0, start
            count, size = count + 1, size + add
        self._packed[modality] = (count, size)
        return opened

    def begin_plan(self) -> None:
        """Start a dry run's count afresh (what an earlier dry run planned was never sent)."""
        self._packed = {"image": (0, 0), "text": (0, 0)}  # the plan's open request at the limits: (inputs, bytes)
        self._planned_texts: set = set()     # prompts planned so far (free when asked again)
        self._limit_said: set = set()        # modalities whose batch limit the plan has said

    def cost(self, x: torch.Tensor) -> Dict[str, int]:
        """What encoding these (B, 3, H, W) uint8 views would cost: requests, images and bytes sent
        after the ledger's hits (a dry run sums it over every view still to encode)."""
        keys, payloads = self._image_inputs(x)
        return self._cost("image", keys, payloads)

    def text_cost(self, texts: List[str]) -> Dict[str, int]:
        keys, payloads = self._text_inputs(texts)
        return self._cost("text", keys, payloads)

    def service_quota(self) -> Optional[Tuple[int, int]]:
        """(queries used this period, the quota) of this key, where the service says them (embedcache
        serve's GET /v1/usage, free); None where it sets no quota or does not say."""
        if self.protocol_name != "embedcache":
            return None
        got = self.transport.get_json("/v1/usage", required=False)
        if not isinstance(got, dict) or got.get("quota") is None:
            return None
        return int(got.get("quota_used") or 0), int(got["quota"])

    def budget_from(self, claimer) -> None:
        """teacher.max_queries as a store's budget: ``claimer(n)`` claims each request's inputs in the
        store before they are sent (``claimer.claimed()``: the store's total), or raises BudgetError."""
        self.transport.claimer = claimer

    def budget_message(self, cost: Dict[str, int], shards: int = 1) -> str:
        """What a stopped extraction still needs (``cost``: a dry run over what is left; of one of
        ``shards`` workers' blocks when there are several), and the limit that finishes it when
        teacher.max_queries stopped it (other stops, such as the service's quota, say their own fix)."""
        n = queries_in(cost)
        req = cost.get("requests", 0) + cost.get("text_requests", 0)
        claimer = self.transport.claimer
        total = (claimer.sent if claimer is not None else self.transport.stats.spent()) + n
        short = self.cfg.max_queries is not None and total > self.cfg.max_queries
        if shards > 1:
            need = (f"finishing this shard needs {n:,} more queries ({req:,} requests, the ledger's answers free), the "
                    f"other {shards - 1} shard(s)' not counted (`extract --dry-run --num-shards 1` prices the whole store)")
            return need + (f"; rerun the same command with teacher.max_queries >= {total} to finish this shard"
                           if short else "")
        need = f"finishing the store needs {n:,} more queries{replay_note(cost)} ({req:,} requests, the ledger's answers free)"
        return need + (f"; rerun the same command with teacher.max_queries >= {total} to resume" if short else "")

    def usage(self) -> Dict[str, Any]:
        """This run's books, for the manifest (never the key)."""
        s = self.transport.stats
        out = {k: v for k, v in vars(s).items() if k not in ("server_usage", "lost_requests")}
        out["lost_requests"] = dict(s.lost_requests)  # a copy: the books subtract the last one they wrote
        out["rate_limit_wait_s"] = round(s.rate_limit_wait_s, 3)
        out.update(protocol=self.protocol_name, server_reported=dict(s.server_usage), answered_model=self._answered,
                   ledger=self.ledger.totals(self._ctx["image"], replays_free=bool(self.protocol.idempotency_header)))
        return out
