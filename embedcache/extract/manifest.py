"""The manifest of a store: what made it (teacher, dataset, views, canvas, text, pipeline,
library versions) and the cache key, the hash of the parts of it that change the data."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import TEACHER_CALL_SETTINGS, ExtractConfig, flatten, to_dict
from ..datasets import ImageDataset
from ..device import device_name
from ..fileio import json_digest, utc_now
from ..store import SCHEMA_VERSION, cache_key
from ..store.store import teacher_model
from ..text import prompts_digest
from ..versions import STORE_NUMBERS, library_versions
from ..views import param_fields

# How pixels reach the teacher. Part of the cache key: another decoder or renderer changes pixels.
PIPELINE = {"decoder": "pil", "canvas": "bicubic-shorter-side-centre-crop", "views": "render_views-antialias-uint8"}


def build_manifest(cfg: ExtractConfig, dataset: ImageDataset, teacher, prompts,
                   pipeline: Dict[str, Any] = PIPELINE, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``extra``: sections another producer adds (synthesis settings): recorded and part of the key."""
    extra = extra or {}
    own = getattr(teacher, "config", None)
    if own is not None and own != cfg.teacher:  # a teacher passed in: record how *it* was built
        cfg = dataclasses.replace(cfg, teacher=own)
    key_parts = {
        "teacher": teacher.identity(), "preprocessing": teacher.preprocessing(),
        "dataset": dataset.fingerprint(), "views": cfg.views.key(), "canvas": to_dict(cfg.canvas),
        "text": {"sources": list(cfg.text.sources), "prompts": prompts_digest(prompts)},
        "pipeline": pipeline, **extra,
    }
    return {
        "schema": SCHEMA_VERSION, "key": cache_key(key_parts), "complete": False,
        # a digest of each part of the key, so a store made from other inputs can say which differ
        "key_parts": {name: json_digest(part, 12) for name, part in key_parts.items()},
        "teacher": teacher.describe(),
        "dataset": {"name": dataset.name, "root": str(Path(dataset.root).absolute()) if dataset.root else None,
                    "fingerprint": dataset.fingerprint(), "n": len(dataset), "classes": dataset.classes,
                    "domains": dataset.domains, "hidden_images_left_out": dataset.hidden_images},
        "views": {**to_dict(cfg.views), "params": list(param_fields(cfg.views.color)), "view0": "whole canvas"},
        "canvas": to_dict(cfg.canvas),
        "text": {"sources": list(cfg.text.sources), "templates": cfg.text.templates, "attributes": cfg.text.attributes},
        "pipeline": pipeline, **extra,
        "config": _recorded_config(cfg, extra), "device": device_name(teacher.device),
        "versions": {**library_versions(), "embedcache_store_numbers": str(STORE_NUMBERS)},
        "threads": torch.get_num_threads(),  # CPU float reductions round by how they are split
        "created": utc_now(),
    }


def _recorded_config(cfg, extra: Dict[str, Any]) -> Dict[str, Any]:
    """The resolved config the manifest records; a synthesis's reads no dataset section (its rows are class
    names), so it records none of the extraction's unread defaults (the shapes dataset's counts)."""
    config = absolute_paths(to_dict(cfg))
    if "synthesis" in extra:
        config["dataset"] = {"name": "synthesis", "rows": "class names: the manifest's synthesis section"}
    return config


# the settings that name files or folders (a relative one is taken from the working folder of the call),
# and what each must be there to count as one: a model is a folder only as local-dir:, a pretrained tag
# ('openai') is a name unless a file of it exists, a bundled template set is a name unless a file is
PATH_SETTINGS = {("dataset", "path"): "exists", ("dataset", "class_names"): "file", ("teacher", "model"): "local-dir",
                 ("teacher", "pretrained"): "file", ("teacher", "model_config"): "file",
                 ("teacher", "api_key_file"): "file", ("teacher", "ledger"): "file", ("text", "templates"): "file",
                 ("text", "attributes"): "file"}


def absolute_paths(config: Dict[str, Any]) -> Dict[str, Any]:
    """``config`` (a resolved extraction config, as a dict) with each relative path it names made
    absolute: a store read, repaired or asked for its teacher from another folder finds them. Names (a
    model, a pretrained tag, a bundled template set) stay as given, whatever folders the working folder
    holds."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for (section, key), kind in PATH_SETTINGS.items():
        value = out.get(section, {}).get(key)
        if not isinstance(value, str) or not value:
            continue
        prefix = "local-dir:" if kind == "local-dir" else ""
        if not value.startswith(prefix):
            continue
        path = Path(value[len(prefix):]).expanduser()
        there = path.is_file() if kind == "file" else path.exists()
        if not path.is_absolute() and there:
            out[section][key] = prefix + str(path.absolute())
    return out


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
