"""When to retry a request and how long to wait, as the OpenAI Python client decides it.

- Retry 408 (request timeout), 409 (lock timeout), 429 (rate limit), every 5xx, timeouts and
  dropped connections; a server's ``x-should-retry: true|false`` wins over the status.
- Wait what the server asks: ``retry-after-ms``, then ``Retry-After`` in seconds, then as an HTTP
  date; where it says nothing, back off exponentially (``initial * 2**retry``, at most 8 s) with up
  to 25% jitter off.
- A server asking for a wait longer than ``max_wait`` (default 120 s) is not slept through: the run
  stops cleanly and is resumed later (``TooLongWait``).
- Sleeps wake up for Ctrl-C/SIGTERM (``embedcache.interrupt``).
"""
from __future__ import annotations

import email.utils
import math
import random
import time
from dataclasses import dataclass
from typing import Mapping, Optional

from ... import interrupt

RETRY_STATUSES = frozenset({408, 409, 429})
MAX_BACKOFF = 8.0


class TooLongWait(Exception):
    """The server asked for a wait longer than the client is allowed to sleep."""

    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.seconds = seconds


def _get(headers: Optional[Mapping[str, str]], name: str) -> Optional[str]:
    if headers is None:
        return None
    value = headers.get(name)
    if value is None and hasattr(headers, "items"):  # a plain dict with other capitalisation
        low = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == low), None)
    return value


def retry_after(headers: Optional[Mapping[str, str]], now: Optional[float] = None) -> Optional[float]:
    """Seconds the server asks to wait, or None where it says nothing usable."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = _get(headers, name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if math.isnan(seconds):
            continue
        return seconds
    value = _get(headers, "retry-after")
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        when = email.utils.mktime_tz(parsed)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return float(when - (time.time() if now is None else now))


def should_retry_status(status: int, headers: Optional[Mapping[str, str]] = None) -> bool:
    flag = (_get(headers, "x-should-retry") or "").lower()
    if flag in ("true", "false"):
        return flag == "true"
    return status in RETRY_STATUSES or status >= 500


@dataclass
class RetryPolicy:
    max_retries: int = 8
    initial: float = 0.5          # first backoff (seconds)
    max_wait: float = 120.0       # longest server-requested wait slept through

    def wait(self, retry: int, headers: Optional[Mapping[str, str]] = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based). Raises TooLongWait."""
        asked = retry_after(headers)
        if asked is not None and math.isfinite(asked) and asked > self.max_wait:
            raise TooLongWait(asked)
        if asked is not None and math.isinf(asked) and asked > 0:
            raise TooLongWait(asked)
        if asked is not None and 0 < asked <= self.max_wait:
            return asked
        backoff = min(self.initial * 2.0 ** min(retry, 60), MAX_BACKOFF)
        return backoff * (1.0 - 0.25 * random.random())


def sleep(seconds: float, step: float = 0.1) -> None:
    """time.sleep that wakes up for a stop request (raises KeyboardInterrupt with a one-line reason)."""
    end = time.monotonic() + max(0.0, seconds)
    while True:
        if interrupt.requested():
            raise KeyboardInterrupt("interrupted while waiting to retry a request; rerun the same command to resume")
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(step, left))
