"""The client's ledger (SQLite): every answer a service was paid for, keyed by what was sent.

An entry's key is the sha256 of its *context* (protocol, URL, model, server fingerprint, modality,
dimensions, image format and quality, the client's rendering) and of the content sent (the pixels of
a lossless PNG view, the bytes of a JPEG, the UTF-8 of a text). The same view is therefore paid for
once: within a run, across a resumed run, and across stores that share images and views.

It assumes the server forgives nothing. Before a request goes out, the request and its entries are
written *pending* in one transaction; an answer is written with the entries' embeddings in one
transaction. A request whose answer was lost (a timeout, a dropped connection, a kill) stays pending
and its inputs count as possibly paid; each attempt is logged in ``sends``, so an audit can show
that no input was sent again after its answer arrived. The API key is never stored.

Tables: contexts(id, spec); entries(key, context, modality, nbytes, status, request, dim, emb,
created, answered); requests(id, context, modality, n, nbytes, status, attempts, lost, usage,
created, finished, owner, model: the model the answer named, where it named one); request_items(request,
pos, key); sends(request, attempt, sent, outcome).
"""
from __future__ import annotations

import atexit
import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Collection, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ...fileio import try_exclusive_lock

SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (id TEXT PRIMARY KEY, spec TEXT NOT NULL, created REAL);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, context TEXT NOT NULL, modality TEXT NOT NULL, nbytes INTEGER NOT NULL,
    status TEXT NOT NULL, request TEXT, dim INTEGER, emb BLOB, created REAL, answered REAL);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, context TEXT NOT NULL, modality TEXT NOT NULL, n INTEGER NOT NULL,
    nbytes INTEGER NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0, usage TEXT, created REAL, finished REAL);
CREATE TABLE IF NOT EXISTS request_items (request TEXT NOT NULL, pos INTEGER NOT NULL, key TEXT NOT NULL,
    PRIMARY KEY (request, pos));
CREATE INDEX IF NOT EXISTS request_items_key ON request_items (key);
CREATE TABLE IF NOT EXISTS sends (request TEXT NOT NULL, attempt INTEGER NOT NULL, sent REAL NOT NULL,
    outcome TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS store_queries (store TEXT PRIMARY KEY, claimed INTEGER NOT NULL);
"""


def default_path() -> Path:
    env = os.environ.get("EMBEDCACHE_LEDGER")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "embedcache" / "remote-ledger.sqlite"


# a request's owner is the process that sent it: its pending requests are another live process's while
# that process holds its owner file's lock (released when it exits or is killed), an earlier run's after
_OWNERS: Dict[int, str] = {}  # pid -> that process's owner id
_PROCESS_LOCKS: Dict[str, Tuple[int, Optional[int]]] = {}  # owner file -> (pid, the fd holding it for its lifetime)


def process_owner() -> str:
    """This process's owner id; a forked child gets its own (its requests are not its parent's)."""
    return _OWNERS.setdefault(os.getpid(), uuid.uuid4().hex[:16])


def _parts(keys: Sequence[str], n: int = 500) -> List[List[str]]:
    """``keys`` in parts small enough for one SQL ``IN (...)`` list."""
    keys = list(keys)
    return [keys[i:i + n] for i in range(0, len(keys), n)]


def _marks(part: Sequence[str]) -> str:
    return ",".join("?" * len(part))


def _drop_inherited_locks() -> None:
    """In a forked child: its copies of the parent's owner-file descriptors closed. A flock is held
    while any copy of its descriptor is open: kept, a parent killed while its child lives looked alive
    (its requests waited for to the deadline). Closing a copy leaves the parent's own lock held."""
    for path, (pid, fd) in list(_PROCESS_LOCKS.items()):
        if pid != os.getpid():
            if fd is not None:
                os.close(fd)
            del _PROCESS_LOCKS[path]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


@atexit.register
def _release_owner_files() -> None:
    """On a normal exit the owner files go (a killed process's stay until another finds them unlocked)."""
    for path, (pid, fd) in list(_PROCESS_LOCKS.items()):
        if pid == os.getpid():  # a forked child leaves its parent's
            if fd is not None:
                os.close(fd)
                Path(path).unlink(missing_ok=True)
            del _PROCESS_LOCKS[path]


class Ledger:
    def __init__(self, path: Optional[os.PathLike] = None, owner: Optional[str] = None):
        """``owner``: another id than this process's (tests standing in for another process)."""
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one connection, used under a lock; other processes share the file through WAL and retries
        self.db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
        self.lock = threading.RLock()
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            # ledgers from before owners, answers' models, and replays of other clients' charges
            for column in ("owner", "model", "replayed_elsewhere"):
                if column not in {row[1] for row in self.db.execute("PRAGMA table_info(requests)")}:
                    try:
                        self.db.execute(f"ALTER TABLE requests ADD COLUMN {column} TEXT")
                    except sqlite3.OperationalError as exc:  # another process added it first
                        if "duplicate column" not in str(exc):
                            raise
        # the owner's lock file: another process tells a pending request of a live owner (wait for its
        # answer) from one cut off by a kill (replay it)
        self.owners = self.path.with_name(self.path.name + ".owners")
        self.owners.mkdir(exist_ok=True)
        self.owner, self._owner_fd = owner or process_owner(), None
        held = str(self.owners / self.owner)
        if owner is not None:
            self._owner_fd = try_exclusive_lock(held)
        elif held not in _PROCESS_LOCKS:
            _PROCESS_LOCKS[held] = (os.getpid(), try_exclusive_lock(held))

    def close(self) -> None:
        with self.lock:
            self.db.close()
            if self._owner_fd is not None:  # an owner of its own (the process's stays held while it lives)
                os.close(self._owner_fd)
                self._owner_fd = None
                (self.owners / self.owner).unlink(missing_ok=True)

    def _alive(self, owner: str) -> bool:
        """Whether the ledger ``owner`` is open in a live process (its lock file held)."""
        path = self.owners / owner
        if not path.exists():
            return False
        fd = try_exclusive_lock(path)
        if fd is None:
            return True
        os.close(fd)
        path.unlink(missing_ok=True)  # its process died (kill -9): the kernel released the lock
        return False

    def held_elsewhere(self, keys: Sequence[str]) -> List[str]:
        """Those of ``keys`` pending in a request of another live process (another store's extraction
        sending the same inputs now): their answers are coming, sending them again would pay twice."""
        keys = list(dict.fromkeys(keys))
        owners: Dict[str, List[str]] = {}
        with self.lock:
            for part in _parts(keys):
                for key, owner in self.db.execute(
                        f"SELECT DISTINCT i.key, r.owner FROM request_items i JOIN requests r ON r.id = i.request "
                        f"WHERE r.status='pending' AND r.owner IS NOT NULL AND r.owner != ? "
                        f"AND i.key IN ({_marks(part)})", [self.owner, *part]):
                    owners.setdefault(owner, []).append(key)
        return [k for owner, ks in owners.items() if self._alive(owner) for k in ks]

    def _taken(self, keys: Sequence[str], waited_out: Collection[str]) -> List[str]:
        """Those of ``keys`` answered already, or pending in another live process's request and not
        among ``waited_out`` (waited for as long as its request may take: sent from here after all)."""
        done = [k for part in _parts(keys)
                for (k,) in self.db.execute(f"SELECT key FROM entries WHERE status='done' AND key IN ({_marks(part)})", part)]
        held = set(self.held_elsewhere(keys)) - set(waited_out)
        return sorted(set(done) | held)

    # --- transactions ----------------------------------------------------------------------------
    def _tx(self):
        ledger = self

        class _Tx:
            def __enter__(self):
                ledger.lock.acquire()
                ledger.db.execute("BEGIN IMMEDIATE")
                return ledger.db

            def __exit__(self, exc_type, *_):
                try:
                    ledger.db.execute("ROLLBACK" if exc_type else "COMMIT")
                finally:
                    ledger.lock.release()

        return _Tx()

    # --- a finished store's text queries (``extract.budget.ReaderBudget``) ------------------------------
    def store_queries(self, store_key: str) -> int:
        """Inputs claimed for text queries of the finished store ``store_key``, over every reader of this ledger."""
        with self.lock:
            row = self.db.execute("SELECT claimed FROM store_queries WHERE store = ?", (store_key,)).fetchone()
        return int(row[0]) if row else 0

    def claim_store_queries(self, store_key: str, n: int, room: int) -> int:
        """Claim ``n`` more inputs for the store's text queries if they fit within ``room`` (what its budget left
        after its extraction); returns the store's claimed total either way (over ``room`` when refused, unchanged)."""
        with self._tx() as db:
            row = db.execute("SELECT claimed FROM store_queries WHERE store = ?", (store_key,)).fetchone()
            claimed = int(row[0]) if row else 0
            if claimed + n > room:
                return claimed + n
            db.execute("INSERT INTO store_queries VALUES (?, ?) ON CONFLICT(store) DO UPDATE SET claimed = ?",
                       (store_key, claimed + n, claimed + n))
            return claimed + n

    def release_store_queries(self, store_key: str, n: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE store_queries SET claimed = MAX(0, claimed - ?) WHERE store = ?", (n, store_key))

    def add_context(self, context_id: str, spec: Dict) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO contexts VALUES (?, ?, ?)",
                       (context_id, json.dumps(spec, sort_keys=True), time.time()))

    # --- reads ---------------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[str]) -> Dict[str, np.ndarray]:
        """key -> (D,) float32 for the keys answered already."""
        out: Dict[str, np.ndarray] = {}
        uniq = list(dict.fromkeys(keys))
        with self.lock:
            for part in _parts(uniq):
                rows = self.db.execute(f"SELECT key, emb FROM entries WHERE status='done' AND key IN ({_marks(part)})", part)
                for key, emb in rows:
                    out[key] = np.frombuffer(emb, dtype="<f4").astype(np.float32)
        return out

    def models_of(self, keys: Sequence[str]) -> List[str]:
        """The models named by the answers that hold these keys (answers that named none left out)."""
        found: set = set()
        with self.lock:
            for part in _parts(list(dict.fromkeys(keys))):
                found.update(m for (m,) in self.db.execute(
                    f"SELECT DISTINCT r.model FROM entries e JOIN requests r ON r.id = e.request WHERE e.status='done' "
                    f"AND r.model IS NOT NULL AND e.key IN ({_marks(part)})", part))
        return sorted(found)

    def any_dim(self, context_id: str) -> Optional[int]:
        with self.lock:
            row = self.db.execute("SELECT dim FROM entries WHERE context=? AND status='done' LIMIT 1",
                                  (context_id,)).fetchone()
        return int(row[0]) if row else None

    def pending_requests(self, keys: Iterable[str]) -> List[Tuple[str, List[str]]]:
        """Requests still pending (sent, answer never stored) that carry any of ``keys``: (id, keys in order)."""
        keys = list(dict.fromkeys(keys))
        found: Dict[str, None] = {}
        with self.lock:
            for part in _parts(keys):
                for (rid,) in self.db.execute(
                        f"SELECT DISTINCT r.id FROM request_items i JOIN requests r ON r.id = i.request "
                        f"WHERE r.status='pending' AND i.key IN ({_marks(part)})", part):
                    found[rid] = None
            out = []
            for rid in found:
                items = [k for (k,) in self.db.execute("SELECT key FROM request_items WHERE request=? ORDER BY pos", (rid,))]
                out.append((rid, items))
        return out

    def request_status(self, request_id: str) -> Optional[str]:
        with self.lock:
            row = self.db.execute("SELECT status FROM requests WHERE id=?", (request_id,)).fetchone()
        return row[0] if row else None

    # --- writes --------------------------------------------------------------------------------------
    def begin(self, request_id: str, context_id: str, modality: str, items: Sequence[Tuple[str, int]],
              waited_out: Collection[str] = ()) -> List[str]:
        """Write the request and its entries *pending*, before it goes out; returns []. When another live
        process has begun (or answered) some of its inputs since the caller checked, nothing is written
        and those keys are returned: checked and written in one transaction, two processes never both
        send the same inputs (``waited_out``: keys the caller waited for in vain, taken over)."""
        now = time.time()
        with self._tx() as db:
            taken = self._taken([k for k, _ in items], waited_out)
            if taken:
                return taken
            row = db.execute("SELECT status FROM requests WHERE id=?", (request_id,)).fetchone()
            if row is None:
                db.execute("INSERT INTO requests (id, context, modality, n, nbytes, status, created, owner) "
                           "VALUES (?,?,?,?,?,?,?,?)", (request_id, context_id, modality, len(items),
                                                        sum(n for _, n in items), "pending", now, self.owner))
                db.executemany("INSERT INTO request_items VALUES (?, ?, ?)",
                               [(request_id, i, k) for i, (k, _) in enumerate(items)])
            elif row[0] != "done":
                db.execute("UPDATE requests SET status='pending', owner=? WHERE id=?", (self.owner, request_id))
            for key, nbytes in items:
                db.execute("INSERT INTO entries (key, context, modality, nbytes, status, request, created) "
                           "VALUES (?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET request=excluded.request "
                           "WHERE entries.status != 'done'",
                           (key, context_id, modality, nbytes, "pending", request_id, now))
        return []

    def sent(self, request_id: str, attempt: int) -> int:
        """Log an attempt going out; returns its row id (its outcome is set by ``outcome``)."""
        with self._tx() as db:
            db.execute("UPDATE requests SET attempts = attempts + 1 WHERE id=?", (request_id,))
            cur = db.execute("INSERT INTO sends VALUES (?, ?, ?, ?)", (request_id, attempt, time.time(), "sent"))
            return int(cur.lastrowid)

    def outcome(self, send_row: int, request_id: str, outcome: str, lost: bool = False) -> None:
        with self._tx() as db:
            db.execute("UPDATE sends SET outcome=? WHERE rowid=?", (outcome, send_row))
            if lost:
                db.execute("UPDATE requests SET lost = lost + 1 WHERE id=?", (request_id,))

    def finish(self, request_id: str, keys: Sequence[str], emb: np.ndarray, usage: Optional[Dict] = None,
               model: Optional[str] = None, replayed_elsewhere: bool = False) -> None:
        """Store an answer: the entries' embeddings (N, D) and the request done (with the model the answer
        named), in one transaction. ``replayed_elsewhere``: answered free, as a replay of a charge another
        client made (no send of this ledger's paid for it)."""
        now = time.time()
        emb = np.ascontiguousarray(emb, dtype="<f4")
        with self._tx() as db:
            db.executemany("UPDATE entries SET status='done', dim=?, emb=?, answered=?, request=? WHERE key=? AND status != 'done'",
                           [(emb.shape[1], emb[i].tobytes(), now, request_id, k) for i, k in enumerate(keys)])
            db.execute("UPDATE requests SET status='done', usage=?, finished=?, model=?, replayed_elsewhere=? WHERE id=?",
                       (json.dumps(usage or {}, sort_keys=True), now, model, "1" if replayed_elsewhere else None,
                        request_id))

    def disown(self, request_id: str) -> None:
        """A pending request this process stopped fetching (it failed or was interrupted mid-request):
        no live owner, so another process replays it instead of waiting for it."""
        with self._tx() as db:  # only while it is this process's: another may have taken it over since
            db.execute("UPDATE requests SET owner=NULL WHERE id=? AND status='pending' AND owner=?", (request_id, self.owner))

    def may_be_charged(self, request_id: str) -> bool:
        """Whether a send of this request, in any run, went out and may have been charged: answered,
        its answer lost, or cut off before its outcome was written (not: unreachable, an HTTP error)."""
        with self.lock:
            outcomes = [o for (o,) in self.db.execute("SELECT outcome FROM sends WHERE request=?", (request_id,))]
        return any(o in ("sent", "ok", "bad-json") or o.startswith("lost:") for o in outcomes)

    def close_if_uncharged(self, request_id: str) -> bool:
        """A pending request none of whose sends, in any run, can have been charged (never sent, or every
        attempt unreachable or answered with an HTTP error) is closed 'failed': the next run sends its
        inputs afresh rather than replaying it as possibly paid. True if it was closed. Only this
        process's own: one another process has taken over since is its to close."""
        with self._tx() as db:
            if self.may_be_charged(request_id):
                return False
            cur = db.execute("UPDATE requests SET status='failed', finished=? WHERE id=? AND status='pending' AND owner=?",
                             (time.time(), request_id, self.owner))
            return cur.rowcount > 0

    def close_request(self, request_id: str, status: str) -> None:
        """'failed': refused by the service, nothing paid; 'bad': answered but unusable (paid, nothing stored)."""
        with self._tx() as db:  # only while it is this process's (another may have taken it over since)
            db.execute("UPDATE requests SET status=?, finished=? WHERE id=? AND owner=?",
                       (status, time.time(), request_id, self.owner))

    # --- reports -------------------------------------------------------------------------------------
    def totals(self, context_id: Optional[str] = None, replays_free: bool = False) -> Dict[str, int]:
        """Answers held, requests, inputs paid, inputs answered free as replays of other clients' charges (not
        paid here: they were counted as paid, a trial), and inputs possibly paid beside them: those of sends whose
        answers were lost. With ``replays_free`` (a protocol whose idempotency key the service honours)
        a lost send of a request answered since was charged once at most, in ``paid_inputs``: only the
        unanswered ones' count."""
        where, args = ("WHERE context=?", (context_id,)) if context_id else ("", ())
        unsettled = "status NOT IN ('done','bad')" if replays_free else "1"
        with self.lock:
            answered, = self.db.execute(f"SELECT COUNT(*) FROM entries {where}{' AND' if where else 'WHERE'} status='done'", args).fetchone()
            elsewhere = "COALESCE(replayed_elsewhere, '') = '1'"
            n_req, paid, free, possibly = self.db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(CASE WHEN status IN ('done','bad') AND NOT {elsewhere} THEN n END), 0), "
                f"COALESCE(SUM(CASE WHEN status = 'done' AND {elsewhere} THEN n END), 0), "
                f"COALESCE(SUM(CASE WHEN {unsettled} THEN n * lost END), 0) FROM requests {where}", args).fetchone()
        return {"entries": int(answered), "requests": int(n_req), "paid_inputs": int(paid),
                "replayed_elsewhere_inputs": int(free), "possibly_paid_inputs": int(possibly)}
