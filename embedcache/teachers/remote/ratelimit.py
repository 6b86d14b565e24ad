"""Token buckets per minute: the client paces its requests (and estimated input tokens) under a
service's published limits; the server uses the same bucket to refuse a key that goes faster."""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional


class Bucket:
    """``rate`` units per minute, bursts up to ``rate`` (one minute's worth). A cost larger than the
    bucket is allowed once the bucket is full (it then runs into debt), so nothing waits forever."""

    def __init__(self, rate_per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate_per_minute) / 60.0  # units per second
        self.capacity = float(rate_per_minute)
        self.level = self.capacity
        self.clock = clock
        self.stamp = clock()
        self.lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, cost: float = 1.0) -> float:
        """Seconds until ``cost`` units may be spent (0 if now)."""
        with self.lock:
            self._refill()
            need = min(cost, self.capacity)
            return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float = 1.0) -> float:
        """Spend ``cost`` now if possible (returns 0), else spend nothing and return the wait."""
        with self.lock:
            self._refill()
            need = min(cost, self.capacity)
            if self.level >= need:
                self.level -= cost
                return 0.0
            return (need - self.level) / self.rate


class RateLimiter:
    """Requests per minute and input tokens per minute (either may be None: no limit)."""

    def __init__(self, requests_per_minute: Optional[float] = None, tokens_per_minute: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Optional[Callable[[float], None]] = None):
        self.requests = Bucket(requests_per_minute, clock) if requests_per_minute else None
        self.tokens = Bucket(tokens_per_minute, clock) if tokens_per_minute else None
        if sleep is None:
            from .retry import sleep as _sleep
            sleep = _sleep
        self.sleep = sleep
        self.waited = 0.0  # seconds spent waiting, for the usage report

    def acquire(self, tokens: float = 0.0) -> None:
        """Block until one request carrying ``tokens`` estimated input tokens may go out."""
        while True:
            wait = max(self.requests.wait_time(1) if self.requests else 0.0,
                       self.tokens.wait_time(tokens) if self.tokens and tokens else 0.0)
            if wait <= 0:
                if self.requests:
                    self.requests.take(1)
                if self.tokens and tokens:
                    self.tokens.take(tokens)
                return
            self.waited += wait
            self.sleep(wait)
