"""The server's ledger (SQLite): what each key was charged, one row per paid request, with the
content hash of every input it charged (an audit can show no input charged twice) and the answer,
kept so that a retried request (same key, same ``Idempotency-Key``) is answered again for free.

Tables: charges(id, key_name, idem, request_sha, endpoint, modality, n, bytes, created, replays,
response); charged_items(charge, pos, sha). Keys appear by name only.
"""
from __future__ import annotations

import sqlite3
import threading
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY, key_name TEXT NOT NULL, idem TEXT, request_sha TEXT NOT NULL, endpoint TEXT NOT NULL,
    modality TEXT NOT NULL, n INTEGER NOT NULL, bytes INTEGER NOT NULL, created REAL NOT NULL,
    replays INTEGER NOT NULL DEFAULT 0, response BLOB);
CREATE UNIQUE INDEX IF NOT EXISTS charges_idem ON charges (key_name, idem) WHERE idem IS NOT NULL;
CREATE INDEX IF NOT EXISTS charges_key_time ON charges (key_name, created);
CREATE TABLE IF NOT EXISTS charged_items (charge INTEGER NOT NULL, pos INTEGER NOT NULL, sha TEXT NOT NULL);
"""


class ServerLedger:
    def __init__(self, path: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
        self.lock = threading.RLock()
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def find(self, key_name: str, idem: str) -> Optional[Tuple[int, str, bytes]]:
        """(charge id, request sha, answer) of an earlier request with this idempotency key."""
        with self.lock:
            row = self.db.execute("SELECT id, request_sha, response FROM charges WHERE key_name=? AND idem=?",
                                  (key_name, idem)).fetchone()
        return None if row is None else (int(row[0]), row[1], zlib.decompress(row[2]))

    def replayed(self, charge_id: int) -> None:
        with self.lock:
            self.db.execute("UPDATE charges SET replays = replays + 1 WHERE id=?", (charge_id,))

    def used(self, key_name: str, since: float = 0.0) -> int:
        with self.lock:
            (n,) = self.db.execute("SELECT COALESCE(SUM(n), 0) FROM charges WHERE key_name=? AND created >= ?",
                                   (key_name, since)).fetchone()
        return int(n)

    def charge(self, key_name: str, idem: Optional[str], request_sha: str, endpoint: str, modality: str,
               item_shas: Sequence[str], nbytes: int, response: bytes) -> int:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                cur = self.db.execute(
                    "INSERT INTO charges (key_name, idem, request_sha, endpoint, modality, n, bytes, created, response) "
                    "VALUES (?,?,?,?,?,?,?,?,?)", (key_name, idem, request_sha, endpoint, modality, len(item_shas), nbytes,
                                                   time.time(), zlib.compress(response, 1)))
                cid = int(cur.lastrowid)
                self.db.executemany("INSERT INTO charged_items VALUES (?,?,?)",
                                    [(cid, i, s) for i, s in enumerate(item_shas)])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return cid

    def summary(self, key_name: Optional[str] = None) -> List[Dict]:
        """Per key: requests, queries (inputs charged), images, texts, bytes, replays answered free."""
        where, args = ("WHERE key_name=?", (key_name,)) if key_name else ("", ())
        with self.lock:
            rows = self.db.execute(
                f"SELECT key_name, COUNT(*), SUM(n), SUM(CASE WHEN modality='image' THEN n ELSE 0 END), "
                f"SUM(CASE WHEN modality='text' THEN n ELSE 0 END), SUM(bytes), SUM(replays) FROM charges {where} "
                f"GROUP BY key_name ORDER BY key_name", args).fetchall()
        return [{"key": r[0], "requests": r[1], "queries": r[2], "images": r[3], "texts": r[4], "bytes": r[5],
                 "free_replays": r[6]} for r in rows]

    def double_charges(self) -> int:
        """Inputs charged more than once to the same key (0 is what idempotency promises)."""
        with self.lock:
            (n,) = self.db.execute(
                "SELECT COUNT(*) FROM (SELECT c.key_name, i.sha FROM charged_items i JOIN charges c ON c.id = i.charge "
                "GROUP BY c.key_name, i.sha HAVING COUNT(*) > 1)").fetchone()
        return int(n)
