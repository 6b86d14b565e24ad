"""The manifest of a store: what made it (teacher, dataset, views, canvas, text, pipeline,
library versions) and the cache key, the hash of the parts of it that change the data."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..config import ExtractConfig, to_dict
from ..datasets import ImageDataset
from ..device import device_name
from ..fileio import json_digest, utc_now
from ..store import SCHEMA_VERSION, cache_key
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
