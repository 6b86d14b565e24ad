"""How two stores' manifests say they were made otherwise: the parts of their keys that differ, with the
settings apart in each (a resume refused, a run scored on another store). Pure dictionary work: a student
run that asks imports no teacher."""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Tuple

from ..config import TEACHER_CALL_SETTINGS, flatten
from .store import teacher_model


def differing_parts(stored: Dict[str, Any], wanted: Dict[str, Any], said: Tuple[str, str] = ("store", "this call")) -> str:
    """'its teacher differs', 'its dataset and views differ': the parts of the key in which a store's
    manifest and the one asked for disagree ('' for a store made before manifests named them), with the
    settings apart, each side ``said`` so."""
    a, b = stored.get("key_parts"), wanted.get("key_parts")
    if not a or not b:
        return ""
    names = [n for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
    if not names:
        return ""
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"its {joined} {'differs' if len(names) == 1 and names[0] != 'views' else 'differ'}" + _settings_apart(
        _settings(stored, names), _settings(wanted, names), names, said)


def _settings(manifest: Dict[str, Any], parts: List[str]) -> Dict[str, Any]:
    """The settings a manifest was made with: its extraction config, and the sections another producer
    added to the key (``build_manifest``'s ``extra``: a synthesis's settings) among ``parts``."""
    config = manifest.get("config") or {}
    added = {n: manifest[n] for n in parts if n not in config and isinstance(manifest.get(n), dict)}
    return {**_resolved_model(config, manifest.get("teacher") or {}), **added}


def _resolved_model(config: Dict[str, Any], teacher: Dict[str, Any]) -> Dict[str, Any]:
    """``config`` with a teacher.model left unset (the teacher's default) given as the model it resolved to."""
    given = config.get("teacher")
    resolved = teacher_model(teacher) or teacher.get("classifier")
    if not isinstance(given, dict) or given.get("model") is not None or not resolved:
        return config
    return {**config, "teacher": {**given, "model": resolved}}


# settings a store may be resumed with other values of (no part of its key): naming one as the difference
# would name the wrong cause (another model behind the same url, the dataset's files changed)
FREE_TO_CHANGE = {"teacher.url", "teacher.device", "dataset.path", *(f"teacher.{k}" for k in TEACHER_CALL_SETTINGS)}


# key parts made from settings of another config section: the teacher's input (its preprocessing)
PART_SETTINGS = {"preprocessing": ("teacher.input_size", "teacher.interpolation", "teacher.image_format",
                                   "teacher.jpeg_quality")}


def _settings_apart(stored: Dict[str, Any], wanted: Dict[str, Any], parts: List[str], said: Tuple[str, str],
                    most: int = 4) -> str:
    """' (store: views.count=2; this call: views.count=3)': the settings of the differing parts in which
    the config that made a store and this call's disagree, so the one to restore is named ('' where none
    does: the same dataset folder whose files changed)."""
    a, b = flatten(stored), flatten(wanted)
    part_of = {k: p for p in parts for k in PART_SETTINGS.get(p, ())}
    apart: Dict[str, List[str]] = {}  # each differing part's settings apart, so each part is named before any twice
    for k in sorted(set(a) | set(b)):
        part = part_of.get(k, k.split(".")[0])
        if part in parts and k not in FREE_TO_CHANGE and a.get(k) != b.get(k):
            apart.setdefault(part, []).append(k)
    keys = sorted([k for row in itertools.zip_longest(*apart.values()) for k in row if k][:most])
    if not keys:
        return ""
    more = sum(map(len, apart.values())) - len(keys)
    return (f" ({said[0]}: {', '.join(f'{k}={a.get(k)!r}' for k in keys)}{f', and {more} more' if more else ''}; "
            f"{said[1]}: {', '.join(f'{k}={b.get(k)!r}' for k in keys)})")
