"""Frozen, validated configuration for every stage, loaded from YAML and overridden by dotted keys.

``load_config(ExtractConfig, "demo", ["views.count=2"])`` reads a config file (a path, or the name
of a config shipped in the package), applies ``key=value`` overrides (values parsed as YAML), then
applies typed values (CLI options, never parsed as YAML), and builds the dataclass. Every field is
checked when the config is built, before any store is opened or model loaded: its type (from the
annotation) and its range or choices (from ``setting(...)`` metadata). Errors are one line naming
the key, the value and what is allowed; an unknown key lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from .errors import ConfigError
from .limits import SEED_MAX

_NO_DEFAULT = dataclasses.MISSING


def setting(default: Any = _NO_DEFAULT, *, factory: Optional[Callable[[], Any]] = None, min: Optional[float] = None,
            max: Optional[float] = None, gt: Optional[float] = None, choices: Any = None) -> Any:
    """A dataclass field with validation rules: ``min``/``max`` (inclusive), ``gt`` (exclusive lower
    bound), ``choices`` (a tuple, a Registry, or a callable returning the allowed names)."""
    meta = {k: v for k, v in (("min", min), ("max", max), ("gt", gt), ("choices", choices)) if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def seed_setting(default: int = 0) -> Any:
    """A seed: a whole number from 0 to SEED_MAX."""
    return setting(default, min=0, max=SEED_MAX)


def lazy_registry(module: str, name: str) -> Callable[[], Any]:
    """For ``setting(choices=...)``: the registry ``module.name``, imported only when a value is
    checked (config modules sit below the modules that define registries)."""
    def get():
        import importlib

        return getattr(importlib.import_module(module), name)
    return get


def named_twice(values: Sequence[Any]) -> Any:
    """The first value ``values`` lists a second time, or None."""
    return next((v for i, v in enumerate(values) if v in values[:i]), None)


def away_from_defaults(section: Any, defaults: Any, names: Sequence[str]) -> List[str]:
    """Those of ``names`` whose value in ``section`` (a config dataclass) differs from ``defaults``."""
    return [n for n in names if getattr(section, n) != getattr(defaults, n)]


def only_read(section: Dict[str, Any], reads: Optional[Sequence[str]]) -> Dict[str, Any]:
    """A config section (a dict) less the settings outside ``reads`` (None: a component registered
    elsewhere, whose section is kept whole): a store made before they were refused still repairs."""
    return section if reads is None else {k: v for k, v in section.items() if k in reads}


def set_but_unread(section: Any, defaults: Any, reads: Sequence[str]) -> List[str]:
    """The settings of ``section`` outside ``reads`` that are away from ``defaults``: what a teacher,
    dataset or method would ignore, refused rather than ignored."""
    return away_from_defaults(section, defaults, [f.name for f in fields(section) if f.name not in reads])


# --- the extraction stage ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetConfig:
    name: str = setting("synthetic", choices=lazy_registry("embedcache.datasets", "DATASETS"))
    path: Optional[str] = None       # root folder or CSV file, relative to the working folder
    max_per_class: Optional[int] = setting(None, min=1)  # keep the first k images of each (domain, class)
    # a CSV (label,name) or JSON ({label: name}) naming each label (folder name, CSV label, id): the
    # names the prompts use, in the file's order (the labels' indices)
    class_names: Optional[str] = None
    # synthetic only (SYNTHETIC_ONLY): set on another dataset, they are refused rather than ignored
    num_classes: int = setting(4, min=1)
    num_domains: int = setting(3, min=1)
    per_class: int = setting(8, min=1, max=100_000)   # images per (domain, class)
    image_size: int = setting(64, min=8, max=4096)
    seed: int = seed_setting()

    def unread(self) -> List[str]:
        """The settings this dataset would ignore: ``path`` on the seeded shapes, the shapes' own
        settings away from their defaults on any other dataset."""
        return away_from_defaults(self, DatasetConfig(name=self.name), ignored_by(self.name))

    def check(self) -> None:
        unread = self.unread()
        if unread and self.name == "synthetic":  # its only unread setting: path
            raise ConfigError("dataset.path is not read by dataset.name=synthetic (seeded shapes made in memory); "
                              "remove it, or set dataset.name to domainbed, folder or csv to read it")
        if unread:
            k = unread[0]
            raise ConfigError(f"dataset.{k}={getattr(self, k)} applies to dataset.name=synthetic only, and "
                              f"dataset.name={self.name} would ignore it; remove it (dataset.max_per_class=k keeps "
                              "the first k images of each domain and class)")


SYNTHETIC_ONLY = ("num_classes", "num_domains", "per_class", "image_size", "seed")


def ignored_by(name: str) -> Tuple[str, ...]:
    """The dataset settings dataset ``name`` does not read."""
    return ("path",) if name == "synthetic" else SYNTHETIC_ONLY


def without_unread(dataset: Dict[str, Any]) -> Dict[str, Any]:
    """A dataset section with the settings its dataset ignores taken out: a store made before they were
    refused still repairs (its cache key never held them)."""
    drop = ignored_by(dataset.get("name", "synthetic"))
    return {k: v for k, v in dataset.items() if k not in drop}


@dataclass(frozen=True)
class TeacherConfig:
    name: str = setting("conse", choices=lazy_registry("embedcache.teachers", "TEACHERS"))
    model: Optional[str] = None      # open_clip name, 'hf-hub:org/repo' or 'local-dir:/path'; conse: classifier
    pretrained: Optional[str] = None  # tag or local weights file (None: seeded random weights)
    model_config: Optional[str] = None    # a JSON architecture file registered before creating
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))
    device: str = "auto"             # auto | cpu | cuda | cuda:1 ...
    topk: Optional[int] = setting(None, min=1, max=1000)  # conse: ImageNet classes mixed per image (None = all 1000)
    # remote: an embedding service (teachers/remote). teacher.model is the model name sent to it. The key
    # is read from the environment variable or file named here, never written in a config or manifest.
    protocol: str = setting("embedcache", choices=lazy_registry("embedcache.teachers.remote", "PROTOCOLS"))
    url: Optional[str] = None        # base URL: http://host:8000 (embedcache), http://host:7997 (infinity)
    api_key_env: Optional[str] = None  # variable holding the key (None: EMBEDCACHE_API_KEY, if set)
    api_key_file: Optional[str] = None  # or a file holding it
    image_format: str = setting("png", choices=("png", "jpeg"))  # png is lossless; jpeg changes the pixels
    jpeg_quality: int = setting(95, min=50, max=100)
    input_size: Optional[int] = setting(None, min=8)  # views rendered at this size (None: the server's, else 224)
    interpolation: Optional[str] = setting(None, choices=("bicubic", "bilinear"))  # None: the server's, else bicubic
    dimensions: Optional[int] = setting(None, min=1)  # embedding size asked of the service (None: its own)
    max_queries: Optional[int] = setting(None, min=0)  # inputs the store may pay for over every extract call (lost answers count too)
    request_batch: Optional[int] = setting(None, min=1)  # inputs per request (None: the protocol's limit)
    timeout: float = setting(60.0, gt=0)  # seconds per request
    max_retries: int = setting(8, min=0)
    retry_backoff: float = setting(0.5, min=0)  # first backoff in seconds, doubled per retry up to 8 s
    max_retry_wait: float = setting(120.0, min=0)  # a server asking to wait longer stops the run (resumable)
    requests_per_minute: Optional[float] = setting(None, gt=0)
    tokens_per_minute: Optional[float] = setting(None, gt=0)  # estimated input tokens (text and images)
    ledger: Optional[str] = None     # SQLite ledger of paid answers (None: $EMBEDCACHE_LEDGER or ~/.cache/embedcache)

    def check(self) -> None:
        """A setting the chosen teacher does not read is refused, as the dataset's are: it was saved
        with the store (precision: fp16 beside a manifest saying fp32) and some entered its key."""
        reads = teacher_reads(self.name, self.image_format)
        if reads is None:  # a teacher registered elsewhere: what it reads is its own business
            return
        for name in set_but_unread(self, TeacherConfig(name=self.name), ("name", "model") + reads):
            why = " (it reads jpeg_quality with image_format=jpeg)" if name == "jpeg_quality" else ""
            raise ConfigError(f"teacher.{name}={getattr(self, name)} is not read by teacher.name={self.name}"
                              f"{why}; remove it (that teacher reads {', '.join(('model',) + reads)})")
        if self.name == "open_clip":
            require_open_clip_weights_fit("teacher", self.model, self.pretrained)


def require_open_clip_weights_fit(section: str, model: Optional[str], pretrained: Optional[str]) -> None:
    """An open_clip model's weights as they run: a local-dir: folder gives its own (a pretrained beside it was
    named in the records and never read, a trial), and a tag's activation is the architecture's (OpenAI's
    QuickGELU: ViT-B-16 with openai ran GELU, open_clip only warning). Checked for new stores and runs."""
    from .openclip_weights import activation_mismatch

    if str(model or "").startswith("local-dir:") and pretrained is not None:
        raise ConfigError(f"{section}.pretrained={pretrained} is not read with {section}.model={model}, whose folder "
                          "gives the weights; remove it")
    mismatch = activation_mismatch(str(model or ""), pretrained) if model else None
    if mismatch:
        raise ConfigError(f"{section}.pretrained={mismatch[0]}: set {section}.model={mismatch[1]}")


def teacher_reads(name: str, image_format: Optional[str]) -> Optional[Tuple[str, ...]]:
    """What teacher ``name`` reads besides name and model (None: a teacher registered elsewhere)."""
    reads = TEACHER_READS.get(name)
    if reads is None:
        return None
    return reads + (("jpeg_quality",) if name == "remote" and image_format == "jpeg" else ())


def teacher_without_unread(teacher: Dict[str, Any]) -> Dict[str, Any]:
    """A teacher section with the settings its teacher ignores taken out (a store made before they
    were refused still repairs)."""
    reads = teacher_reads(teacher.get("name", TeacherConfig.name), teacher.get("image_format"))
    return only_read(teacher, None if reads is None else ("name", "model") + reads)


# what each teacher of the package reads besides name and model (the rest is refused when set)
TEACHER_READS = {
    "conse": ("device", "topk"),
    "open_clip": ("pretrained", "model_config", "precision", "device"),
    "remote": ("protocol", "url", "api_key_env", "api_key_file", "image_format", "input_size", "interpolation",
               "dimensions", "max_queries", "request_batch", "timeout", "max_retries", "retry_backoff",
               "max_retry_wait", "requests_per_minute", "tokens_per_minute", "ledger"),
}


# teacher settings that change how a paid service is called and paid for, never what it answers
TEACHER_CALL_SETTINGS = ("api_key_env", "api_key_file", "max_queries", "request_batch", "timeout", "max_retries",
                         "retry_backoff", "max_retry_wait", "requests_per_minute", "tokens_per_minute", "ledger")


@dataclass(frozen=True)
class ViewsConfig:
    count: int = setting(4, min=1, max=1024)   # views per image; view 0 is the plain centre (whole canvas)
    scale: Tuple[float, float] = setting((0.35, 1.0), gt=0.0, max=1.0)  # random-resized-crop area fraction
    ratio: Tuple[float, float] = setting((3 / 4, 4 / 3), gt=0.0)
    flip: bool = True
    seed: int = seed_setting()
    # colour augmentation of views 1..V-1 (DomainBed / VL2V-ADiP: 0.3 and 0.1): ColorJitter(j, j, j, j)
    # then RandomGrayscale(p), drawn per view and stored with the crop, so teacher and student see it alike
    color_jitter: float = setting(0.0, min=0.0, max=0.5)
    grayscale: float = setting(0.0, min=0.0, max=1.0)

    @property
    def color(self) -> bool:
        return bool(self.color_jitter or self.grayscale)

    def key(self) -> dict:
        """What of the views goes into the cache key: the colour settings only when in use, so the
        keys of stores made before they existed still match (both, when either is on)."""
        d = to_dict(self)
        if not self.color:
            d.pop("color_jitter"), d.pop("grayscale")
        return d

    def unread(self) -> List[str]:
        """The settings one view (``count=1``: the whole canvas) would ignore, set away from their defaults (in
        the key all the same, as in stores made before they were said)."""
        if self.count > 1:
            return []
        return away_from_defaults(self, ViewsConfig(count=1), [f.name for f in fields(self) if f.name != "count"])

    def check(self) -> None:
        for name, (lo, hi) in (("scale", self.scale), ("ratio", self.ratio)):
            if lo > hi:
                raise ConfigError(f"views.{name}={[lo, hi]} is not valid: the first value must not exceed the second")


CANVAS_MAX = 5656  # px: the side of the 32 M pixels an image may be resized to (views.MAX_RESIZED_PIXELS)


@dataclass(frozen=True)
class CanvasConfig:
    # images are decoded once into a size x size uint8 canvas; at most 5656 px, the side of the 32 M pixels
    # an image may be resized to (views.MAX_RESIZED_PIXELS): past it every image failed, blamed on its shape
    size: int = setting(256, min=8, max=CANVAS_MAX)
    store: bool = True               # keep the canvas in the store (students need no JPEG decode)


@dataclass(frozen=True)
class TextConfig:
    sources: Tuple[str, ...] = setting(("name", "templates"), choices=lazy_registry("embedcache.text", "TEXT_SOURCES"))
    templates: str = "short7"        # bundled set (openai80 | short7) or a text file, one per line
    attributes: Optional[str] = None  # bundled set (pacs | synthetic) or a JSON file class -> [str]

    def check(self) -> None:
        if not self.sources:
            raise ConfigError("text.sources=[] is not valid: a store needs at least one text source (its class "
                              "embeddings are what students are scored against); e.g. text.sources=[name]")
        twice = named_twice(self.sources)
        if twice is not None:  # the store encoded it once; the manifest and its key kept it twice (a trial)
            raise ConfigError(f"text.sources names {twice!r} twice; list each once")


@dataclass(frozen=True)
class ExtractConfig:
    dataset: DatasetConfig = setting(factory=DatasetConfig)
    teacher: TeacherConfig = setting(factory=TeacherConfig)
    views: ViewsConfig = setting(factory=ViewsConfig)
    canvas: CanvasConfig = setting(factory=CanvasConfig)
    text: TextConfig = setting(factory=TextConfig)
    out: Optional[str] = None        # store path; .h5/.hdf5 picks HDF5, else Zarr (a backend against the suffix is refused)
    backend: Optional[str] = setting(None, choices=("zarr", "hdf5"))
    # auto: JPEGs decoded and views rendered on the device when the teacher is on a GPU, else PIL.
    # The pipeline changes pixels slightly, so it is part of the cache key (recorded as `pipeline`).
    decoder: str = setting("auto", choices=("auto", "pil", "device"))
    # settings below never change the data, so they stay out of the cache key
    batch_size: int = setting(32, min=1)
    # image-reading worker processes; unset: extract.reader_workers picks (none for a CPU teacher on 2 cores)
    num_workers: Optional[int] = setting(None, min=0, max=1024)
    block_rows: int = setting(256, min=1)  # rows written and marked done together (resume granularity)
    shard: Optional[int] = setting(None, min=0)
    num_shards: Optional[int] = setting(None, min=1)
    progress: bool = True

    def check(self) -> None:
        if self.decoder == "device" and not self.canvas.store:
            raise ConfigError("decoder=device with canvas.store=false: students rebuild the canvases from the files "
                              "with PIL, whose pixels differ from the device decoder's; set canvas.store=true or decoder=pil")
        if self.dataset.name == "synthetic" and not self.canvas.store:
            raise ConfigError("canvas.store=false on the synthetic dataset: its images are drawn in memory, so no "
                              "student could re-decode them and the store would train none; keep canvas.store=true")


# --- building and checking ------------------------------------------------------------------------
def to_dict(cfg: Any) -> Dict[str, Any]:
    """A JSON-ready nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def without_defaults(d: Dict[str, Any], added: Dict[str, Any]) -> Dict[str, Any]:
    """``d`` less the settings of ``added`` (name -> default; a dotted name for a nested one) while they
    hold their default: settings added after hashes of ``d`` were first taken (a cache key, a run's name,
    a sweep's seed) stay out of them until used, so what was hashed before them keeps its hash."""
    out = {k: v for k, v in d.items() if not (k in added and v == added[k])}
    for name, default in added.items():
        head, _, rest = name.partition(".")
        if rest and isinstance(out.get(head), dict):
            out[head] = without_defaults(out[head], {rest: default})
    return out


def flatten(d: Dict[str, Any], prefix: str = "", keep_empty: bool = False) -> Dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: the dotted keys ``--set`` takes (``keep_empty``: an empty
    dict kept as a value of its own key, not dropped)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and (v or not keep_empty):
            out.update(flatten(v, f"{prefix}{k}.", keep_empty))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plural(tp) -> str:
    """'numbers', 'strings': the elements of a list of ``tp``."""
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans (true or false)"}.get(
        tp, f"values of type {_type_name(tp)}")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    if origin in (list, List) and typing.get_args(tp):
        return f"a list of {_plural(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


_WHOLE = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: str.isdigit() takes '²', which int() refuses


def _coerce(value: Any, tp, key: str) -> Any:
    """``value`` as type ``tp`` (the field's annotation), or a one-line ConfigError."""
    def bad() -> ConfigError:  # YAML's spelling of None, as it was written
        return ConfigError(f"{key}={'null' if value is None else repr(value)} is not valid: expected {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if origin in (tuple, Tuple):
        return _as_tuple(value, typing.get_args(tp), key, bad)
    if origin in (dict, Dict) or tp in (dict, Dict):
        if not isinstance(value, dict):
            raise bad()
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = typing.get_args(tp)  # a bad item is named by its place, as in a tuple's
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    scalar = _SCALARS.get(tp)
    return value if scalar is None else scalar(value, key, bad)  # Any, and types read as given


def _as_tuple(value: Any, args: tuple, key: str, bad) -> tuple:
    if isinstance(value, str):  # "a, b" as a list; one of spaces named nothing, read as [] (a fuzzing trial)
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise ConfigError(f"{key}={value!r} names nothing; give a list, [] for none")
        value = items
    if not isinstance(value, (list, tuple)):
        raise bad()
    if len(args) == 2 and args[1] is Ellipsis:  # a bad item is named by its place: classes[2]=True
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise bad()
    return tuple(_coerce(v, a, key) for v, a in zip(value, args))


def _as_bool(value: Any, key: str, bad) -> bool:
    if isinstance(value, bool):
        return value
    raise bad()


def _as_int(value: Any, key: str, bad) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
        return int(value)
    raise bad()


def _as_float(value: Any, key: str, bad) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            raise bad() from None
    else:
        raise bad()
    if not math.isfinite(out):
        raise bad()
    return out


def _as_str(value: Any, key: str, bad) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, bool):  # YAML reads true, false, yes, no, on, off as booleans
        raise ConfigError(f"{key}={value!r} is not valid: expected a string; quote it ('{str(value).lower()}') "
                          "where a word is meant")
    raise bad()


_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _resolve(choices):
    return choices() if callable(choices) and not hasattr(choices, "names") else choices


def _check_rules(value: Any, meta: Dict[str, Any], key: str) -> None:
    if value is None or not meta:
        return
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if "choices" in meta and isinstance(v, str):
            choices = _resolve(meta["choices"])
            ok = choices.accepts(v) if hasattr(choices, "accepts") else v in choices
            if not ok:
                allowed = ", ".join(choices.names() if hasattr(choices, "names") else choices)
                hint = f", {choices.hint}" if getattr(choices, "hint", "") else ""
                raise ConfigError(f"{key}={v!r} is not valid: choose one of {allowed}{hint}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if "min" in meta and v < meta["min"]:
                raise ConfigError(f"{key}={value!r} is not valid: must be at least {meta['min']}")
            if "max" in meta and v > meta["max"]:
                raise ConfigError(f"{key}={value!r} is not valid: must be at most {meta['max']}")
            if "gt" in meta and not v > meta["gt"]:
                raise ConfigError(f"{key}={value!r} is not valid: must be greater than {meta['gt']}")


def _refuse_unknown(unknown: set, known: Iterable[str], prefix: str) -> None:
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{min(unknown)}; valid keys under {prefix.rstrip('.') or 'the top level'}: "
                          f"{', '.join(sorted(known))}")


def require_known_keys(cls, data: Dict[str, Any], prefix: str) -> None:
    """Every key of ``data`` (nested, or dotted at its top) is a setting of ``cls``; an unknown one is refused naming
    it where it was written (``prefix``: a sweep's ``base.``), not where the config built from it would put it."""
    hints = typing.get_type_hints(cls)
    nested: Dict[str, Any] = {}
    for key, value in data.items():  # a grid's keys are dotted: optim.lr
        head, _, rest = str(key).partition(".")
        before = nested.get(head)
        if not rest:
            nested[head] = {**before, **value} if isinstance(before, dict) and isinstance(value, dict) else value
        elif before is None or isinstance(before, dict):
            nested[head] = {**(before or {}), rest: value}
        # else a section given a value and a dotted key both (grid optim: [...] beside optim.lr): refused where
        # the settings are built, as before
    known = {f.name for f in fields(cls)}
    _refuse_unknown(set(nested) - known, known, prefix)
    for name, value in nested.items():
        if is_dataclass(hints[name]) and isinstance(value, dict):
            require_known_keys(hints[name], value, f"{prefix}{name}.")


def build_config(cls, data: Dict[str, Any], prefix: str = ""):
    """A frozen dataclass from a nested dict: unknown keys, wrong types and out-of-range values are
    refused with one line naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    _refuse_unknown(set(data) - set(known), known, prefix)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        f, key = known[name], f"{prefix}{name}"
        tp = hints[name]
        if is_dataclass(tp):  # a section left empty (None) takes its defaults; `views: 0` or `[]` is refused
            kwargs[name] = build_config(tp, {} if value is None else value, f"{key}.")
            continue
        value = _coerce(value, tp, key)
        _check_rules(value, dict(f.metadata), key)
        kwargs[name] = value
    for name, f in known.items():  # defaults obey the rules too, but are not re-checked against registries
        if name not in kwargs and f.default is _NO_DEFAULT and f.default_factory is _NO_DEFAULT:
            raise ConfigError(f"config key {prefix}{name} is required")
    cfg = cls(**kwargs)
    check = getattr(cfg, "check", None)
    if callable(check):
        check()  # cross-field rules (a ConfigError naming the keys)
    return cfg


class _Loader(yaml.SafeLoader):
    """YAML as people write settings: a key given twice is refused (the last one silently won), and
    numbers are read as written (below)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# numbers as people write them: an integer is decimal digits without a leading zero (YAML 1.1 read seed=0042
# as octal 34 and 1:10 as base-60 70: such forms, 0x and 0b too, are words here, which a number setting refuses
# and a name keeps as written: a domain named 08), a float has a point or an exponent (1.1 asked ``1.0e-3``
# and read ``1e-3`` as a word)
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


def _numbers_as_written(cls) -> None:
    cls.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in rs if tag not in (_INT, _FLOAT)]
                                   for first, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    cls.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9]*(?:_[0-9]+)*)$"), list("-+0123456789"))
    cls.add_implicit_resolver(_FLOAT, re.compile(r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
                                                 r"|[-+]?[0-9]+[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
                              list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Saved settings (a sweep's sweep.yaml) read back as written: a word _Loader reads as a number is quoted."""


_numbers_as_written(_Loader)
_numbers_as_written(_Dumper)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=True)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except ValueError as exc:  # an explicit tag it cannot take (`!!int 0x1F`)
        raise ConfigError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{pos}: {problem}") from None


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict; values are parsed as YAML scalars/lists."""
    data = json.loads(json.dumps(data))
    given: Dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value; write e.g. --set views.count=4")
        key, raw = item.split("=", 1)
        if not key.strip() or "" in key.strip().split("."):
            raise ConfigError(f"--set {item!r} names no setting before '='; write e.g. --set views.count=4")
        if key.strip() in given:  # the last one wins, as wrappers adding their defaults first expect: said
            warnings.warn(f"--set {key.strip()} is given twice ({given[key.strip()]!r}, then {raw.strip()!r}): the last "
                          "one is used")
        given[key.strip()] = raw.strip()
        value = _parse_set_value(raw, item) if raw.strip() else None
        set_path(data, key.strip(), value)
    return data


def _parse_set_value(raw: str, item: str) -> Any:
    """A --set value as YAML; where YAML reads a word otherwise than meant (`*` an alias, `timm:` a
    mapping), the line says to quote it."""
    quote = f"quote it: --set \"{item.split('=', 1)[0]}='{raw.strip()}'\""
    inside = raw.strip().startswith(("[", "{", "'", '"'))  # quoting the whole would make a list or quote one string
    per_item = "quote the item that holds it, inside the brackets: e.g. ['art #2', photo]"
    try:
        value = parse_yaml(raw, f"--set {item!r}")
    except ConfigError as exc:
        if inside and " #" in raw:  # `[art #2, photo]`: the comment took the closing bracket
            raise ConfigError(f"--set {item!r}: YAML reads what follows ' #' as a comment, closing bracket and all; "
                              f"{per_item}") from None
        raise ConfigError(f"{exc}; if a word is meant, {quote}") from None
    if isinstance(value, dict) and raw.strip().endswith(":") and list(value.values()) == [None]:
        raise ConfigError(f"--set {item!r}: YAML reads {raw.strip()!r} as a mapping; if a word is meant, {quote}")
    comment = _yaml_comment(raw)
    if comment:  # `holdout_domains=art #2` held out `art` (a trial)
        fix = per_item if inside else quote
        raise ConfigError(f"--set {item!r}: YAML reads {comment!r} as a comment and drops it; if it is part of the "
                          f"value, {fix}")
    return value


def _yaml_comment(raw: str) -> str:
    """The comment YAML drops from a one-line value ('' where none): what follows the value's node."""
    node = yaml.compose(raw, Loader=_Loader)
    rest = raw[node.end_mark.index:] if node is not None else raw
    return rest.strip() if rest.strip().startswith("#") else ""


def set_path(data: Dict[str, Any], key: str, value: Any) -> None:
    """data["a"]["b"] = value for key "a.b", creating sections as needed."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:  # absent, or a section left empty in YAML (`teacher:`)
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p} is not a section")
    node[parts[-1]] = value


# --- config files: a path, or a config shipped in the package ------------------------------------------
KINDS = ("extract", "train", "sweep", "synthesize", "serve")


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def packaged_configs(kind: str) -> Dict[str, str]:
    """name -> first comment line, for the configs of one kind shipped inside the package."""
    folder = resources.files("embedcache.configs").joinpath(kind)
    out = {}
    if folder.is_dir():
        for f in sorted(folder.iterdir(), key=lambda p: p.name):
            if f.name.endswith(".yaml"):
                first = next((ln for ln in f.read_text().splitlines() if ln.startswith("#")), "#")
                out[f.name[:-5]] = first.lstrip("# ").strip()
    return out


def packaged_maker(store_path: str) -> Optional[str]:
    """The command that makes this store from a packaged config (an extract or synthesize config whose
    ``out`` is this path), or None."""
    want = Path(store_path).expanduser().absolute()
    for kind in ("extract", "synthesize"):
        for name in packaged_configs(kind):
            try:  # the packaged file itself (a file of that name in the working folder is not it)
                data = yaml.safe_load(resources.files("embedcache.configs").joinpath(kind, f"{name}.yaml").read_text())
                out = data.get("out") if isinstance(data, dict) else None
            except Exception:  # a message helper: never the error
                continue
            if out and Path(out).expanduser().absolute() == want:
                return f"embedcache {kind} --config {name}"
    return None


def config_text(kind: str, name_or_path: str) -> Tuple[str, str]:
    """(text, where it came from): a file at that path wins, else a packaged config of that name."""
    p = Path(name_or_path)
    if p.is_file():
        try:
            return p.read_text(encoding="utf-8"), str(p)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config {p} is not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML") from None
    if p.is_dir():
        raise ConfigError(f"config {p} is a folder; pass a YAML file in it (or a packaged config's name)")
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    res = resources.files("embedcache.configs").joinpath(kind, f"{name}.yaml")
    if res.is_file() and (p.parent == Path(".") or p.parent == Path("configs") / kind):
        return res.read_text(), f"{kind} config {name!r} (packaged)"
    names = ", ".join(packaged_configs(kind)) or "none"
    other = [k for k in KINDS if k != kind and name in packaged_configs(k)]
    hint = "".join(f"; {name} is a packaged {k} config (`embedcache {k} {'' if k == 'sweep' else '--config '}{name}`)"
                   for k in other)
    raise ConfigError(f"config {name_or_path} not found: no such file, and no packaged {kind} config of that name "
                      f"(packaged: {names}; `embedcache configs` lists them){hint}")


def read_config_file(kind: str, name_or_path: str) -> Tuple[Dict[str, Any], str]:
    """(the settings of a config file or packaged config, where they came from)."""
    text, where = config_text(kind, name_or_path)
    data = parse_yaml(text, where)
    if data is None:  # ran every default without a word; `{}` says that is meant
        raise ConfigError(f"{where} holds no settings (empty, or comments only), so every setting would be its "
                          "default; write its settings (`{}` for every default), or give another file")
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of settings, not {type(data).__name__}")
    return data, where


def load_config(cls, path: Optional[str] = None, overrides: Sequence[str] = (), kind: str = "extract",
                values: Optional[Dict[str, Any]] = None, adapt: Optional[Callable[[Dict], Dict]] = None):
    """Any stage's config: YAML file or packaged name (optional; ``adapt`` turns what the file holds
    into settings) + ``key=value`` overrides + typed ``values`` (dotted keys, applied as given) ->
    frozen, validated dataclass."""
    data: Dict[str, Any] = read_config_file(kind, path)[0] if path is not None else {}
    if adapt is not None:
        data = adapt(data)
    data = apply_overrides(data, overrides)
    for key, value in (values or {}).items():
        if value is not None:
            _refuse_set_twice(key, value, data, overrides)
            set_path(data, key, value)
    try:
        return build_config(cls, data)
    except ConfigError as exc:
        other = next((k for k in Path(str(path or "")).parent.parts[::-1] if k in KINDS), kind)
        if str(exc).startswith("unknown config key") and other != kind:  # configs/train/x.yaml given to extract
            raise ConfigError(f"{exc} ({path} sits in {_a(other)} {other} folder: is it {_a(other)} {other} config? "
                              f"this command reads {kind} configs)") from None
        raise


def _refuse_set_twice(key: str, value: Any, data: Dict[str, Any], overrides: Sequence[str]) -> None:
    """A setting given by its own option (--student) and by --set (student.name=...): the option won
    without a word (a trial)."""
    if not any(item.split("=", 1)[0].strip() == key for item in overrides):
        return
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node != value:
        raise ConfigError(f"{key} is given twice: {value!r} by its option and {node!r} by --set {key}; give one")


def load_extract_config(path: Optional[str] = None, overrides: Sequence[str] = (), values=None) -> ExtractConfig:
    return load_config(ExtractConfig, path, overrides, "extract", values)


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)
