"""A paid teacher's budget (teacher.max_queries) kept in the store it fills, over every call and shard."""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from ..errors import BudgetError
from ..fileio import exclusive_lock
from ..store import Store


class StoreBudget:
    """teacher.max_queries over every extract call and shard of a store: each request's inputs are
    claimed in the store, under a lock, before they are sent, so shards running together share one
    count and a call killed with -9 has its requests counted (the books, written per finished block,
    had neither). Claims count what was sent, answered or not: never less than the bill. The books
    count too (a store from before the claims, a call run without a budget): the larger of the two is
    what was sent. ``sent``: the count as this process last saw it (messages after the store is
    closed). A resend whose request the service then answers as a free replay is given back
    (``release``): the replay proves one charge, which the first send's claim holds."""
    BLOB = "budget/claimed.json"

    def __init__(self, store: Store, limit: int):
        self.store, self.limit = store, int(limit)
        self._lock = Path(store.path) / ".budget.lock" if store.b.multi_writer else None
        books = store.usage() or {}  # read once: earlier calls' books; this call's claims cover its own
        self._books = int(books.get("queries", 0)) + int(books.get("possibly_paid", 0))
        self.sent = self.claimed()

    def claimed(self) -> int:
        raw = self.store.b.get_blob(self.BLOB)
        return max(self._books, int(json.loads(raw)["claimed"]) if raw is not None else 0)

    def __call__(self, n: int) -> None:
        with exclusive_lock(self._lock) if self._lock is not None else nullcontext():
            claimed = self.sent = self.claimed()
            if claimed + n > self.limit:
                raise BudgetError(f"query budget reached: this store has sent {claimed} queries of "
                                  f"teacher.max_queries={self.limit} (every extract call and shard, answered or not) "
                                  f"and the next request needs {n}")
            self._write(claimed + n)

    def release(self, n: int) -> None:
        """Give back ``n`` inputs claimed for resends that turned out free (never refused by the limit)."""
        with exclusive_lock(self._lock) if self._lock is not None else nullcontext():
            self._write(max(self._books, self.claimed() - n))

    def _write(self, claimed: int) -> None:
        self.store.b.put_blob(self.BLOB, json.dumps({"claimed": claimed}).encode())
        self.store.b.flush()
        self.sent = claimed


class ReaderBudget:
    """A finished store's teacher.max_queries over the text queries of readers that reload its paid teacher: held
    within what the store's extraction left, counted in the teacher's ledger (``ledger``) under the store's key, so
    every reader of that ledger, in any process, shares one count (a reader writes nothing into the store; a count
    kept per reader let each new one pay the whole remainder again: a review)."""

    def __init__(self, store: Store, limit: int, ledger):
        self.path, self.key, self.limit, self.ledger = store.path, store.key, int(limit), ledger
        self.by_extraction = StoreBudget(store, limit).claimed()
        self.sent = self.by_extraction + ledger.store_queries(self.key)

    def __call__(self, n: int) -> None:
        room = max(0, self.limit - self.by_extraction)
        total = self.ledger.claim_store_queries(self.key, n, room)
        if total > room:
            raise BudgetError(f"query budget reached: {self.path} has sent {self.by_extraction} queries of "
                              f"teacher.max_queries={self.limit} and its text queries {total - n} (ledger "
                              f"{self.ledger.path}), and the next request needs {n}; query with an embedding, or pass "
                              "a teacher yourself (teacher=) to pay past the store's budget")
        self.sent = self.by_extraction + total

    def release(self, n: int) -> None:
        self.ledger.release_store_queries(self.key, n)
        self.sent = self.by_extraction + self.ledger.store_queries(self.key)

    def left(self) -> int:
        return max(0, self.limit - self.sent)
