"""The extract calls that wrote a store, for its manifest's ``calls``: when each ran, on what device,
how many blocks it encoded, whether it finished the store, and the settings in which it differed from
the call that made the store (the manifest's ``config``). A store resumed with another batch size, on
another device or under other library versions says so in its manifest, not only in a log line.

Each call keeps its entry under ``history/`` in the store, rewritten as its blocks finish, so a call
killed with -9 is still listed (with the blocks it finished and no end time)."""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Dict, List

from ..config import flatten, set_path
from ..fileio import utc_now

# settings that never change what a call writes or pays
_UNRECORDED = ("progress",)


class CallRecord:
    """One extract call's entry in a store's history."""

    def __init__(self, call: str, manifest: Dict[str, Any]):
        """``manifest``: the one this call built (its config, device and versions)."""
        self.store = None
        self.finishing_store = False  # this call went on to finish the store (its tables, then complete)
        self.name = f"{time.time_ns():020d}-{call}"  # sorts by start, finer than the recorded seconds
        self.entry: Dict[str, Any] = {
            "call": call, "began": utc_now(), "ended": None, "blocks": 0, "finished": False,
            "device": manifest["device"], "threads": manifest.get("threads"), "versions": manifest["versions"],
            "config": {k: v for k, v in manifest["config"].items() if k not in _UNRECORDED},
        }

    def open(self, store) -> None:
        self.store = store
        self._write()

    def block_done(self) -> None:
        self.entry["blocks"] += 1
        self._write()

    def finishing(self) -> Dict[str, Any]:
        """This call's entry as it ends by finishing the store (for the manifest written as it does)."""
        return {**self.entry, "ended": utc_now(), "finished": True}

    def close(self, finished: bool = False) -> None:
        """The call's end (``finished``: it wrote the store's tables and completed it)."""
        if self.store is None:
            return
        self.entry["ended"] = utc_now()
        self.entry["finished"] = self.entry["finished"] or finished
        try:
            self._write()
        except OSError:  # on the way out of a failure (a full disk): that failure is what to report
            pass
        self.store = None  # ended: nothing more is written (the store may be closed next)

    def _write(self) -> None:
        if self.store is not None:
            self.store.record_call(self.name, self.entry)


def calls_of(history: List[Dict[str, Any]], manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The manifest's ``calls``: each entry of ``history`` (oldest first) with, instead of its whole
    config and versions, only the settings and versions in which it differs from the manifest's
    (the call that made the store)."""
    made = {k: v for k, v in manifest.get("config", {}).items() if k not in _UNRECORDED}
    versions = manifest.get("versions", {})
    out = []
    for e in history:
        row = {k: e.get(k) for k in ("began", "ended", "device", "threads", "blocks", "finished")}
        config = e.get("config", {})
        row["settings"] = differing(_same_folder(made, config), config)
        row["versions"] = {k: v for k, v in (e.get("versions") or {}).items() if versions.get(k) != v}
        if e.get("decoded_by_pil"):  # decoder=device: files the device decoder rejected, read by PIL
            row["decoded_by_pil"] = e["decoded_by_pil"]
        out.append(row)
    return out


def in_force(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The config the store's last extract call ran with: the manifest's ``config`` (the call that made it)
    with the settings the last of its ``calls`` changed, e.g. a paid teacher's raised teacher.max_queries
    or the URL of the service it was resumed at (its reader and a repair took the first call's)."""
    config = copy.deepcopy(manifest.get("config", {}))
    calls = manifest.get("calls") or [{}]
    for key, value in (calls[-1].get("settings") or {}).items():
        set_path(config, key, value)
    return config


def _same_folder(made: Dict[str, Any], config: Dict[str, Any]) -> Dict[str, Any]:
    """``made`` with its dataset folder spelled as ``config``'s where both name it: calls record it
    absolute since 2026-12-05, and a store made before holds it as it was spelled ("data"), so every
    later call's absolute spelling of that folder read as another setting. Its contents are held to
    the store's key (the dataset's fingerprint) whatever the spelling."""
    path, now = (made.get("dataset") or {}).get("path"), (config.get("dataset") or {}).get("path")
    if not (path and now) or os.path.isabs(path) or not os.path.isabs(now):
        return made
    tail = [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".")]
    if ".." in tail or os.path.normpath(now).split(os.sep)[-len(tail):] != tail:
        return made
    return {**made, "dataset": {**made["dataset"], "path": now}}


def differing(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """``b``'s values, by dotted key (as ``--set`` takes them), where they differ from ``a``'s (None: a
    key ``b`` lacks)."""
    fa, fb = flatten(a), flatten(b)
    return {k: fb.get(k) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
