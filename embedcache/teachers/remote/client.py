"""One retry loop for every request to an embedding service (openai-python's shape): the decisions
live in ``retry.py``; this file sends, classifies what came back, paces, and keeps the books.

Outcomes of an attempt:
- 200: the answer (paid).
- timeout or dropped connection after the request went out, or a 5xx that may come after the charge
  (``perhaps_charged``: a gateway's 502 may; an overloaded service's 503 does not): *lost* (possibly paid;
  it counts against the budget), retried with the same idempotency key.
- connection refused: nothing went out; retried, then a one-line error naming the URL.
- 408/409/429/5xx: retried after the wait the server asks for (or backoff); a wait longer than
  ``max_retry_wait`` (WaitTooLong, exit 75), or an ``embedcache`` server's "quota exceeded" (BudgetError,
  exit 3), stops the run, resumable.
- 413, or a 400/422 saying the batch is too large: ``TooLarge`` (the caller halves the batch).
- 401/403: the key was refused (one line naming where the key came from, never the key).
"""
from __future__ import annotations

import json
import logging
import re
import sqlite3
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import quote

import httpx

from ... import interrupt
from ...errors import WaitTooLong
from .errors import BudgetError, RemoteError, RemoteUnavailableError, UnreadableAnswer
from .ledger import Ledger
from .protocols import Protocol
from .ratelimit import RateLimiter
from .retry import RetryPolicy, TooLongWait, should_retry_status, sleep

log = logging.getLogger("embedcache.remote")


QUOTA_SPENT = ("quota_exceeded", "insufficient_quota")  # embedcache serve's and OpenAI's 429 for a spent quota


# 5xx answers that turn a request away before any work: not implemented, overloaded, HTTP version, network
# authentication, and a gateway that could not reach the service (Cloudflare's 521-523, 525, 526, 530)
TURNED_AWAY = (501, 503, 505, 511, 521, 522, 523, 525, 526, 529, 530)


def perhaps_charged(status: int, headers) -> bool:
    """Whether an error answer may come after the service charged: any 5xx (a gateway's 502, 504 or
    Cloudflare's 520 and 524 once the service behind it had worked, a 500 from a service failing after its
    charge: counted as not charged, a store's books said 24 queries against a bill of 47, a trial), but those
    that turn a request away (``TURNED_AWAY``) and an answer asking for a wait (Retry-After: a refusal to come
    back later; an overloaded service's 503 had claimed the budget again at each retry)."""
    asks_wait = any(h in headers for h in ("retry-after", "retry-after-ms"))
    return status >= 500 and status not in TURNED_AWAY and not asks_wait


class TooLarge(Exception):
    """The service said the request is too large (413, or a 400 naming the batch size)."""


@dataclass
class Stats:
    """This run's books (the manifest's ``teacher_usage``)."""
    requests: int = 0          # answered requests
    queries: int = 0           # inputs in answered requests (paid)
    images: int = 0
    texts: int = 0
    bytes: int = 0             # encoded image and text bytes in answered requests
    attempts: int = 0
    retries: int = 0
    lost_answers: int = 0      # attempts whose answer never arrived (timeouts, dropped connections)
    possibly_paid: int = 0     # inputs in those attempts
    refused: int = 0           # attempts answered with an error status (not paid)
    cache_hits: int = 0        # inputs answered from the ledger
    image_cache_hits: int = 0
    text_cache_hits: int = 0
    deduplicated: int = 0      # repeated inputs within a call, sent once
    replayed_requests: int = 0  # pending requests of an earlier run sent again as they were
    replayed_free: int = 0     # inputs of a request whose answer this run lost, answered again as a free replay
    possibly_paid_twice: int = 0  # inputs of an earlier run's cut-off request sent again in another batch
    # inputs the service answered as free replays of a request no send in this ledger made: another client
    # paid it (another store's ledger under the same key, e.g. the same prompts): free here, not queries
    replayed_elsewhere: int = 0
    # request id -> inputs of its sends whose answers were lost (possibly paid), less those settled by an
    # answer under its idempotency key (in this run or a later one: kept in the store's books by id)
    lost_requests: Dict[str, int] = field(default_factory=dict)
    halvings: int = 0
    rate_limit_wait_s: float = 0.0
    server_usage: Dict[str, float] = field(default_factory=dict)

    def spent(self) -> int:
        return self.queries + self.possibly_paid


KEY_PART = 8  # characters of a key that, found in a message in any case, mask the word holding them
FUZZY_FROM = 16  # a key this long or longer is masked in part too; a shorter one (a local test key) only whole
STARRED = re.compile(r"([\w.-]*)\*{3,}([\w.-]*)")  # a service's own masking of a key: 'sk-pro****M3n4'
SCANNED = 20_000  # characters of a message scanned for the key (an error page may be long)


def one_line(text: str, secret: Optional[str] = None, limit: int = 200) -> str:
    """A service's message in one line, with the key masked: echoed as sent, URL-encoded or in another case (a key
    shorter than FUZZY_FROM only as a word of its own), and, for a key of FUZZY_FROM characters or more, in part: a
    word sharing KEY_PART characters with it, or the service's own masking of it (its first or last characters
    around stars, 'sk-abcde****wxyz'), becomes ***. Masked before it is cut to ``limit``, so no cut leaves a piece
    of it (the last word of a message cut at SCANNED is dropped: it may be a piece of the key)."""
    raw = str(text)
    text = " ".join(raw[:SCANNED].split())
    if len(raw) > SCANNED:
        text = text.rsplit(" ", 1)[0] if " " in text else ""
    if secret:
        if len(secret) >= FUZZY_FROM:  # first: the stars of a key masked below are not the service's
            text = STARRED.sub(lambda m: "***" if _ends_of(secret, m.group(1), m.group(2)) else m.group(), text)
        for form in {secret, quote(secret, safe="")}:  # a short key only as a word of its own: 'test' in 'latest' stays
            pattern = re.escape(form) if len(secret) >= FUZZY_FROM else rf"(?<![\w-]){re.escape(form)}(?![\w-])"
            text = re.sub(pattern, "***", text, flags=re.IGNORECASE)
        if len(secret) >= FUZZY_FROM:
            text = re.sub(r"[^\s*:;,'\"()\[\]{}<>]+", lambda m: "***" if _holds_key_part(m.group(), secret) else m.group(),
                          text)
    return text[:limit]


def _ends_of(secret: str, before: str, after: str) -> bool:
    """Whether the characters around a run of stars are the key's first or last (3 or more of them)."""
    s = secret.lower()
    return (len(before) >= 3 and s.startswith(before.lower())) or (len(after) >= 3 and s.endswith(after.lower()))


def _holds_key_part(word: str, secret: str) -> bool:
    word, secret = word.lower(), secret.lower()
    return any(secret[i:i + KEY_PART] in word for i in range(len(secret) - KEY_PART + 1))


class Transport:
    def __init__(self, base_url: str, protocol: Protocol, key: Optional[str], key_source: str, ledger: Ledger,
                 policy: RetryPolicy, limiter: RateLimiter, timeout: float, max_queries: Optional[int]):
        self.base_url, self.protocol, self._key, self.key_source = base_url, protocol, key, key_source
        self.ledger, self.policy, self.limiter, self.max_queries = ledger, policy, limiter, max_queries
        self.http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), follow_redirects=False)
        self.headers = {"User-Agent": "embedcache-remote", **protocol.auth_headers(key)}
        self.stats = Stats()
        # set by an extraction: claims each request's inputs against the store's budget before they are sent
        self.claimer: Optional[Callable[[int], None]] = None
        self.last_replayed = False  # whether the last answer was a free replay (Idempotent-Replayed) of a lost one
        self.replayed_unlost = False  # whether it was a free replay of a charge this run did not lose
        self._lost_here: Dict[str, int] = {}  # request id -> inputs of its attempts whose answer this run lost
        # (counted as possibly paid), or an earlier call of the store did (``inherit_lost``)
        self.inherited: set = set()  # request ids an earlier call counted as possibly paid
        self.said_apart = False  # whether the teacher warned of inputs of a cut-off request sent apart

    def close(self) -> None:
        self.http.close()

    def __repr__(self) -> str:  # never show the key
        return f"Transport({self.base_url!r}, {self.protocol.name!r})"

    # --- messages ------------------------------------------------------------------------------------
    def _refused(self, status: int) -> RemoteError:
        if not self._key:
            return RemoteError(f"the server at {self.base_url} wants an API key ({status}) and none was given; "
                               f"put it in $EMBEDCACHE_API_KEY, or name its variable or file with "
                               f"teacher.api_key_env / teacher.api_key_file")
        return RemoteError(f"the server at {self.base_url} refused the API key from {self.key_source} ({status}); "
                           f"check that key")

    def _unreachable(self, exc: BaseException) -> RemoteUnavailableError:
        return RemoteUnavailableError(f"cannot reach the embedding server at {self.base_url} ({type(exc).__name__}); "
                                      f"check teacher.url and that the server is running, then rerun the command")

    @staticmethod
    def _error_text(resp: httpx.Response) -> str:
        try:
            body = resp.json()
        except ValueError:
            return resp.text
        if isinstance(body, dict):
            err = body.get("error", body.get("detail", body.get("message", body)))
            if isinstance(err, dict):
                err = err.get("message", err)
            return err if isinstance(err, str) else json.dumps(err)
        return json.dumps(body)

    @staticmethod
    def _error_code(resp: httpx.Response) -> str:
        try:
            body = resp.json()
        except ValueError:
            return ""
        err = body.get("error") if isinstance(body, dict) else None
        return str(err.get("type") or err.get("code") or "") if isinstance(err, dict) else ""

    # --- requests ------------------------------------------------------------------------------------
    def get_json(self, path: str, required: bool) -> Optional[Any]:
        """A probe (describe, model list): free. Unreachable -> one-line error; an HTTP error is an
        error only where ``required`` (a refused key always is)."""
        url = self.base_url + path
        for attempt in range(3):
            try:
                resp = self.http.get(url, headers=self.headers)
            except httpx.ConnectError as exc:
                raise self._unreachable(exc) from None
            except httpx.TransportError as exc:
                if attempt == 2:
                    raise self._unreachable(exc) from None
                sleep(self.policy.initial)
                continue
            if resp.status_code in (401, 403):
                raise self._refused(resp.status_code)
            if resp.status_code == 200:
                try:
                    return resp.json()
                except ValueError:
                    return None
            if should_retry_status(resp.status_code, resp.headers) and attempt < 2:
                sleep(min(self.policy.wait(attempt, resp.headers), 5.0))
                continue
            if required:
                raise RemoteError(f"the server at {self.base_url} answered {resp.status_code} to GET {path}: "
                                  f"{one_line(self._error_text(resp), self._key)}")
            return None
        return None

    def claim(self, n: int) -> None:
        """Before ``n`` inputs are sent: claimed against the store's budget (``claimer``: every call and
        shard of the store), or, for a teacher used on its own, checked against this object's spending."""
        if self.claimer is not None and self.max_queries is not None:
            self.claimer(n)
        else:
            self.check_budget(n)

    def check_budget(self, n: int) -> None:
        if self.max_queries is not None and self.stats.spent() + n > self.max_queries:
            s = self.stats
            lost = f" ({s.possibly_paid} more possibly paid: answers lost)" if s.possibly_paid else ""
            raise BudgetError(f"query budget reached: paid {s.queries} of teacher.max_queries={self.max_queries}"
                              f"{lost} and the next request needs {n}")

    def post(self, request_id: str, path: str, body: Dict[str, Any], n: int, tokens: float = 0.0) -> Any:
        """Send one logical request until answered; returns the answer's JSON. Every attempt reuses
        ``request_id`` as the idempotency key and is logged in the ledger's ``sends``. A send that may be
        charged is claimed against the budget just before it goes out, after the rate limiter's wait; a
        claim no charge used (a stop in a wait, a refusal, nothing reached the service) is given back."""
        url = self.base_url + path
        self.last_replayed = self.replayed_unlost = False
        headers = dict(self.headers)
        if self.protocol.idempotency_header:
            headers[self.protocol.idempotency_header] = request_id
        content = json.dumps(body).encode()
        held = [0]  # inputs claimed for a send no charge has used yet
        try:
            return self._sends(request_id, url, path, content, headers, n, tokens, held)
        except BaseException:
            self._give_back(held[0], "a request that was never charged")
            raise

    def _sends(self, request_id: str, url: str, path: str, content: bytes, headers: Dict[str, str], n: int,
               tokens: float, held: List[int]) -> Any:
        # a request an earlier call's books hold as possibly paid: its first send here is a resend too
        last, lost, reclaimed = "", request_id in self._lost_here, 0
        for attempt in range(self.policy.max_retries + 1):
            if interrupt.requested():
                raise KeyboardInterrupt("interrupted; rerun the same command to resume (paid answers are in the ledger)")
            before = self.limiter.waited
            self.limiter.acquire(tokens)
            self.stats.rate_limit_wait_s += self.limiter.waited - before
            if not held[0]:  # a resend after a lost answer may be charged again: claimed again
                self.claim(n)
                held[0], reclaimed = n, reclaimed + (n if lost else 0)
            lost = False
            row = self.ledger.sent(request_id, attempt)
            self.stats.attempts += 1
            if attempt:
                self.stats.retries += 1
            headers_now = None
            try:
                held[0] = 0  # out now: its claim holds whatever it is charged, unless the outcome says nothing was
                resp = self._post(row, request_id, n, url, content, {**headers, "Content-Type": "application/json"})
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                held[0] = n  # nothing went out, nothing paid: the claim waits for the next attempt (or is given back)
                self.ledger.outcome(row, request_id, "unreachable")
                last = f"{type(exc).__name__}"
                if attempt == 0 and self.stats.requests == 0:
                    raise self._unreachable(exc) from None
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                self._lost(row, request_id, n, type(exc).__name__)
                lost = True  # its claim holds the charge it may have made
                last = f"answer lost ({type(exc).__name__})"
            else:
                status = resp.status_code
                if status == 200:  # charged: its claim holds it
                    try:
                        answer = resp.json()
                    except ValueError:
                        self.ledger.outcome(row, request_id, "bad-json")
                        raise UnreadableAnswer(f"the server at {self.base_url} answered 200 with something that is not JSON; "
                                          f"nothing was written") from None
                    self.ledger.outcome(row, request_id, "ok")
                    # a replay of a charge this run counted as possibly paid (its lost answer) is free; one of a
                    # request an earlier, killed run sent was never counted there: paid, counted now
                    replayed = resp.headers.get("Idempotent-Replayed", "").lower() == "true"
                    self.last_replayed = replayed and request_id in self._lost_here
                    self.replayed_unlost = replayed and request_id not in self._lost_here
                    if request_id in self._lost_here and (self.last_replayed or self.protocol.idempotency_header):
                        self._charged_once(request_id, reclaimed)  # answered afresh: its lost sends were never charged
                    return answer
                if perhaps_charged(status, resp.headers):
                    self._lost(row, request_id, n, f"http:{status}")
                    lost = True  # its claim holds the charge it may have made (counted as not charged: a trial)
                else:
                    held[0] = n  # refused, not charged: the claim waits for the next attempt (or is given back)
                    self.ledger.outcome(row, request_id, f"http:{status}")
                    self.stats.refused += 1
                text = self._error_text(resp)
                if status in (401, 403):
                    raise self._refused(status)
                if self.protocol.too_large(status, text):
                    raise TooLarge(one_line(text, self._key))
                if status == 429 and self._error_code(resp) in QUOTA_SPENT:
                    raise BudgetError(f"the server at {self.base_url} says this key's quota is spent "
                                      f"({one_line(text, self._key)}): have the service raise it, then rerun the same "
                                      "command to resume")
                if not should_retry_status(status, resp.headers):
                    # (not where the service said which model it lacks: the path was right, a trial)
                    hint = (" (is teacher.url the API's base, e.g. ending in /v1, and teacher.protocol its protocol?)"
                            if status in (404, 405) and "model" not in text.lower() else "")
                    raise RemoteError(f"the server at {self.base_url} refused the request to POST {path} ({status}): "
                                      f"{one_line(text, self._key)}{hint}")
                last = f"{status} {one_line(text, self._key, 80)}"
                headers_now = resp.headers
            if attempt == self.policy.max_retries:
                break
            try:
                wait = self.policy.wait(attempt, headers_now)
            except TooLongWait as exc:
                raise WaitTooLong(f"the server at {self.base_url} asks to wait {exc.seconds:.0f} s ({last}), longer than "
                                  f"teacher.max_retry_wait={self.policy.max_wait:g} s; rerun the same command later "
                                  f"to resume") from None
            log.info("retrying %s in %.2f s (%s)", path, wait, last)
            sleep(wait)
        raise RemoteUnavailableError(f"the server at {self.base_url} still failed after {self.policy.max_retries} "
                                     f"retries (last: {last}); rerun the same command to resume")

    def _post(self, row: int, request_id: str, n: int, url: str, content: bytes, headers: Dict[str, str]):
        """One send; a stop (Ctrl-C) while it is out leaves it possibly paid, as a lost answer is: the
        service may have charged it (the store's books said less than the bill until a resume)."""
        try:
            return self.http.post(url, content=content, headers=headers)
        except KeyboardInterrupt:
            self._lost(row, request_id, n, "stopped")
            raise

    def _lost(self, row: int, request_id: str, n: int, why: str) -> None:
        """A send that went out and whose answer was lost: it may have been paid."""
        self.ledger.outcome(row, request_id, f"lost:{why}", lost=True)
        self._lost_here[request_id] = self._lost_here.get(request_id, 0) + n
        self.stats.lost_requests[request_id] = self.stats.lost_requests.get(request_id, 0) + n
        self.stats.lost_answers += 1
        self.stats.possibly_paid += n

    def inherit_lost(self, lost: Dict[str, int]) -> None:
        """Requests an earlier call of the same store counted as possibly paid (its books' ``lost_requests``,
        those still pending): an answer under their idempotency key settles them here, moving their
        inputs from possibly paid to paid in this call's books, and gives back this call's claim."""
        for request_id, n in lost.items():
            self._lost_here.setdefault(request_id, n)
            self.inherited.add(request_id)

    def _charged_once(self, request_id: str, reclaimed: int) -> None:
        """An answer under ``request_id``'s idempotency key settles its lost attempts: a service that
        takes the key charges it once, so a free replay proves the one charge, and an answer charged afresh
        proves the lost sends never were. They are no longer possibly paid (``count`` counts the charge as
        paid), and the budget's claims for its resends (``reclaimed`` inputs) are given back."""
        n = self._lost_here.pop(request_id)
        self.stats.possibly_paid -= n
        self.stats.lost_requests[request_id] = self.stats.lost_requests.get(request_id, 0) - n
        self._give_back(reclaimed, "free replays")

    def _give_back(self, n: int, what: str) -> None:
        """``n`` inputs' claims against the store's budget given back (claims of ``what``)."""
        release = getattr(self.claimer, "release", None)
        if n and release is not None and self.max_queries is not None:
            try:
                release(n)
            except (OSError, sqlite3.Error) as exc:  # the budget only stays higher than the bill
                why = getattr(exc, "strerror", None) or exc
                warnings.warn(f"could not give back {n} budget claim(s) of {what} ({why}); the store's count of sent "
                              "queries stays that much above the bill")

    def replayed_from_elsewhere(self, n: int) -> None:
        """An answer the service replayed free of a charge no send of this ledger made (another client's,
        under the same key): not paid here, and its claim against the store's budget is given back."""
        self.stats.replayed_elsewhere += n
        self._give_back(n, "replays of a charge another client made")

    def count(self, modality: str, n: int, nbytes: int, free: bool = False) -> None:
        """An answered request of ``n`` inputs; ``free``: a replay of a charge whose answer this run lost
        (counted as paid now, and as ``replayed_free``)."""
        s = self.stats
        s.requests += 1
        if free:
            s.replayed_free += n
        s.queries += n
        s.bytes += nbytes
        if modality == "image":
            s.images += n
        else:
            s.texts += n

    def add_usage(self, usage: Dict[str, float]) -> None:
        for k, v in usage.items():
            self.stats.server_usage[k] = self.stats.server_usage.get(k, 0) + v
