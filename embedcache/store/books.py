"""A store's books of the calls that wrote it: a paid teacher's usage (an entry per extract call, summed), the
calls a kill -9 left open, and each call's history entry (``CallBooks``, a part of ``Store``)."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

# usage entries that are totals at a moment (the shared ledger's), not spending: never summed
USAGE_SNAPSHOTS = ("ledger",)


def is_counter(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plus(total: Any, v: Any, key: str) -> Any:
    """Usage entries summed: counters, and the service's own usage key by key; the ledger's totals
    (a snapshot) and words as the last entry that says any (a later None, e.g. no answered model yet, erases
    nothing)."""
    if is_counter(v):
        return (total if is_counter(total) else 0) + v
    if isinstance(v, dict) and key not in USAGE_SNAPSHOTS:
        total = dict(total) if isinstance(total, dict) else {}
        for k, x in v.items():
            total[k] = _plus(total.get(k), x, k)
        return total
    return total if v is None else v


class CallBooks:
    """The books' part of ``Store`` (its backend ``self.b``)."""

    # --- a paid teacher's books: one entry per extraction call, so every call's spending is counted ---
    def add_usage(self, spent: Dict[str, Any]) -> None:
        self.b.put_blob(f"usage/{time.time_ns():020d}-{os.getpid()}.json", json.dumps(spent, sort_keys=True).encode())
        self.b.flush()

    def usage(self) -> Optional[Dict[str, Any]]:
        """Every entry's counters summed, the service's own usage key by key (``calls``: how many
        extract calls wrote entries), the last entry's other values (protocol, the ledger's totals
        then); None when no call recorded any."""
        entries = self._usage_entries()
        if not entries:
            return None
        calls = {e.get("call") or f"entry-{i}" for i, e in enumerate(entries)}  # older stores: an entry per call
        total: Dict[str, Any] = {}
        for e in entries:
            for k, v in e.items():
                if k != "call":
                    total[k] = _plus(total.get(k), v, k)
        if isinstance(total.get("lost_requests"), dict):  # requests possibly paid, less those settled since
            total["lost_requests"] = {k: n for k, n in total["lost_requests"].items() if n}
        return {"calls": len(calls), **total}

    def answered_models(self) -> List[str]:
        """Every model the entries name as their answers' (``usage()`` keeps the last one's), oldest first."""
        return list(dict.fromkeys(e["answered_model"] for e in self._usage_entries() if e.get("answered_model")))

    def _usage_entries(self) -> List[Dict[str, Any]]:
        return [json.loads(self.b.get_blob(n)) for n in sorted(self.b.list_blobs("usage"))]

    # extract calls that pay a teacher: marked open when they start, closed when they end (stopped,
    # failed or done); one killed with -9 stays open, its spending since its last finished block in no books
    def open_call(self, call: str) -> None:
        self.b.put_blob(f"calls/{call}.json", json.dumps({"open": True, "pid": os.getpid(), "host": socket.gethostname(),
                                                          "start": _started(os.getpid())}).encode())
        self.b.flush()

    def close_call(self, call: str) -> None:
        self.b.put_blob(f"calls/{call}.json", json.dumps({"open": False}).encode())
        self.b.flush()

    def calls_cut_short(self, running: str) -> int:
        """Calls of this store that never closed, other than ``running`` and any still alive on this host."""
        host, out = socket.gethostname(), 0
        for name in self.b.list_blobs("calls"):
            mark = json_or(self.b.get_blob(name), {"open": True})  # unreadable (the machine lost): counted
            if mark.get("open") and name != f"calls/{running}.json" and not (
                    mark.get("host") == host and _alive(mark.get("pid"), mark.get("start"))):
                out += 1
        return out

    # --- the extract calls that wrote the store (``extract/history.py``), one entry each ---
    def record_call(self, name: str, entry: Dict[str, Any]) -> None:
        """``name``: the call's start in nanoseconds, then its id (so the names sort by start)."""
        self.b.put_blob(f"history/{name}.json", json.dumps(entry, sort_keys=True).encode())
        self.b.flush()

    def call_history(self) -> List[Dict[str, Any]]:
        """Every call's entry, oldest first (an unreadable one, from a machine lost mid-write, left out)."""
        entries = [json_or(self.b.get_blob(n), None) for n in self.b.list_blobs("history")]
        return [e for e in entries if isinstance(e, dict)]


def _alive(pid: Any, start: Any = None) -> bool:
    """Process ``pid`` lives, and is the one that started at ``start`` (where known: a container's
    process often has the same number every time)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that number
        pass
    return start is None or _started(pid) in (None, start)


def _started(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot, Linux), or None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def json_or(raw: Optional[bytes], default: Any) -> Any:
    """A small JSON blob, or ``default`` where it is missing or unreadable (cut off by a lost machine)."""
    try:
        return json.loads(raw) if raw else default
    except ValueError:
        return default
