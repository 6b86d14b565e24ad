"""Frozen configuration of the extraction stage, loaded from YAML and overridden by dotted keys.

``load_extract_config("configs/extract/demo.yaml", ["views.count=2", "teacher.name=conse"])``
Keys follow the dataclass structure; an unknown key is an error that lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "synthetic"          # registry name: domainbed | folder | csv | synthetic
    path: Optional[str] = None       # root folder or CSV file
    max_per_class: Optional[int] = None  # keep the first k images of each (domain, class): quick runs
    # synthetic only
    num_classes: int = 4
    num_domains: int = 3
    per_class: int = 8               # images per (domain, class)
    image_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class TeacherConfig:
    name: str = "conse"              # registry name: open_clip | conse
    model: Optional[str] = None      # open_clip name, 'hf-hub:org/repo' or 'local-dir:/path'
    pretrained: Optional[str] = None  # tag or local weights file (None: seeded random weights)
    model_config: Optional[str] = None    # a JSON architecture file registered before creating
    precision: str = "fp32"          # fp32 | bf16 | fp16
    device: str = "auto"             # auto | cpu | cuda | cuda:1 ...
    topk: Optional[int] = None       # conse: ImageNet classes mixed per image (None = all)


@dataclass(frozen=True)
class ViewsConfig:
    count: int = 4                   # views per image; view 0 is the plain centre (whole canvas)
    scale: Tuple[float, float] = (0.35, 1.0)   # random-resized-crop area fraction
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    seed: int = 0


@dataclass(frozen=True)
class CanvasConfig:
    size: int = 256                  # images are decoded once into a size x size uint8 canvas
    store: bool = True               # keep the canvas in the store (students need no JPEG decode)


@dataclass(frozen=True)
class TextConfig:
    sources: Tuple[str, ...] = ("name", "templates")
    templates: str = "short7"        # bundled set (openai80 | short7) or a text file, one per line
    attributes: Optional[str] = None  # bundled set (pacs | synthetic) or a JSON file class -> [str]


@dataclass(frozen=True)
class ExtractConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    canvas: CanvasConfig = field(default_factory=CanvasConfig)
    text: TextConfig = field(default_factory=TextConfig)
    out: Optional[str] = None        # store path; .h5/.hdf5 picks HDF5 unless backend says otherwise
    backend: Optional[str] = None    # zarr | hdf5 (default: from the suffix of out, else zarr)
    # settings below never change the data, so they stay out of the cache key
    batch_size: int = 32
    num_workers: int = 1
    block_rows: int = 256            # rows written and marked done together (resume granularity)
    shard: Optional[int] = None
    num_shards: Optional[int] = None
    progress: bool = True


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A JSON-ready nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def build_config(cls, data: Dict[str, Any], prefix: str = ""):
    """A frozen dataclass from a nested dict; unknown keys are refused with the valid ones listed."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys under {prefix or 'the top level'}: "
            f"{', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if is_dataclass(default):
            kwargs[name] = build_config(type(default), value or {}, f"{prefix}{name}.")
        elif isinstance(default, tuple) and isinstance(value, (list, tuple)):
            kwargs[name] = tuple(value)
        elif isinstance(default, tuple) and isinstance(value, str):
            kwargs[name] = tuple(v.strip() for v in value.split(",") if v.strip())
        else:
            kwargs[name] = value
    return cls(**kwargs)


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict; values are parsed as YAML scalars/lists."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. --set views.count=4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_config(cls, path: Optional[str] = None, overrides: Sequence[str] = (), where: str = "configs/"):
    """Any stage's config: YAML file (optional) + ``key=value`` overrides -> frozen dataclass."""
    data: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found; pick one under {where}")
        data = yaml.safe_load(p.read_text()) or {}
    return build_config(cls, apply_overrides(data, overrides))


def load_extract_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> ExtractConfig:
    return load_config(ExtractConfig, path, overrides, "configs/extract/")


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)
