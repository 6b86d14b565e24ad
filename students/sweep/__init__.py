"""Sweeps: a grid of student runs over one store, each trained then scored, resumable.

A sweep directory holds ``sweep.yaml`` (the resolved spec), ``runs/<name>/`` (one training run
each, named by the hash of its resolved config), ``results/<name>.parquet`` (that run's tidy result
rows, written atomically and last) and, once finished, ``results.parquet`` and ``report/``.
Relaunching skips runs whose results exist and resumes unfinished ones from their checkpoints. A
run is claimed with a kernel lock (``claim.py``), so concurrent workers never run the same run
twice. The training seed of each run is derived from (base seed, the run's identity), so adding a
variant to the grid changes no other run's seed or name. Every run's config is built and
validated before the first run starts. The tables of a sweep's results, and the notes on what they
leave out, are in ``tables.py``.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pandas as pd

from embedcache import interrupt, open_store
from embedcache.config import (apply_overrides, away_from_defaults, build_config, dump_yaml, flatten, parse_yaml,
                               read_config_file, require_known_keys, seed_setting, setting, to_dict)
from embedcache.errors import ConfigError, DiskFullError, StoreDamagedError
from embedcache.evaluate.protocols import DEFAULT_SHOTS, fewest_images, seeded_class_split
from embedcache.device import resolve_device
from embedcache.fileio import atomic_write_text, one_line_when_full, read_json
from embedcache.limits import WORKERS_MAX

from ..config import TrainConfig, check_trainable, ignored_training, unread_training
from ..data import StoreData, check_views_used
from ..features import missing_features
from ..finetune import MODES as FINETUNE_MODES, mixed_on_transfer
from ..recipes import RECIPES, definition_change, text_source_of
from ..rundir import RunDir, embeddings_differ, images_differ, require_folder_for
from ..identity import NAMED_WHEN_SET, STORE_KEY, UNIDENTIFYING, by_store_key, run_name, settings_identity
from ..notes import frozen_random_note, schedule_spans_stages
from ..train import ONE_VALIDATION, check_fresh_run, selection_rule
from .claim import Launch, launch_running
from .launchers import LAUNCHERS, check_options, unread_settings
from .tables import (RUNS_EVER, collect, grid_runs, left_out_note, outside_note, partial_note, read_listed, unscored,
                     write_outputs)
from .worker import SweepPoint, result_path, run_one, sweep_tags, variant

__all__ = ["SweepSpec", "SweepPoint", "SweepInterrupted", "load_sweep", "expand", "run_sweep", "collect",
           "unscored", "partial_note", "left_out_note", "outside_note", "LAUNCHERS", "run_one", "variant", "derive_seed",
           "sweep_device", "crowded_note", "stage_schedule_sweep_note"]
PROTOCOLS_TRAINED = ("lodo", "open_vocab", "few_shot")


# each run's split setting that the protocol sets (a lodo sweep may hold classes out in base, and a
# class-split sweep domains)
SET_BY_THE_SWEEP = {"lodo": ("holdout_domains",), "open_vocab": ("train_classes",), "few_shot": ("train_classes",)}
RESOURCES = ("num_cpus", "num_gpus", "memory")  # Ray's per-task requests (memory in bytes)
FEW_SHOT_SETTINGS = ("finetune_steps", "finetune_mode", "shots")
# each protocol's sweep settings that a sweep of another does not read (refused there; an older sweep.yaml
# may hold them, ignored then: a relaunch is not compared on them)
UNREAD_BY = {"lodo": FEW_SHOT_SETTINGS + ("unseen_fraction", "split_seed"), "open_vocab": FEW_SHOT_SETTINGS + ("holdout_domains",),
             "few_shot": ("holdout_domains",)}


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped on request; the message says how far it got and how to resume."""


@dataclass(frozen=True)
class SweepSpec:
    store: str
    protocol: str = setting("lodo", choices=PROTOCOLS_TRAINED)  # lodo: one run per held-out domain
    base: Dict[str, Any] = field(default_factory=dict)   # TrainConfig settings shared by every run
    grid: Dict[str, Any] = field(default_factory=dict)  # dotted TrainConfig key -> values to cross
    per_recipe: Dict[str, Any] = field(default_factory=dict)  # recipe -> settings for its runs only (e.g. features)
    holdout_domains: Optional[List[str]] = None  # lodo: default every domain of the store ([] with transfer: none)
    # stores of the same teacher and classes every run is also scored on, as `evaluate --transfer` scores (a
    # student distilled on synthesised images, scored on real ones)
    transfer: List[str] = field(default_factory=list)
    unseen_fraction: float = setting(0.5, gt=0.0, max=0.99)  # open_vocab / few_shot: share of classes held out
    split_seed: int = seed_setting()
    base_seed: int = seed_setting()
    finetune_steps: int = setting(0, min=0)  # few_shot: also fine-tune the student on the shots
    finetune_mode: str = setting("shots", choices=FINETUNE_MODES)  # mixed: Li et al.'s (shots in training batches)
    shots: int = setting(DEFAULT_SHOTS, min=1)  # few_shot: labelled images per unseen class (Li et al.'s 5)
    launcher: str = setting("local", choices=LAUNCHERS)
    workers: int = setting(1, min=1, max=WORKERS_MAX)
    pack_heads: bool = False                 # head-only runs differing only in seed/lr/weight decay train as one pack
    resources: Dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})

    def check(self) -> None:
        """What the sweep sets itself is not also taken from ``base`` (it was silently overridden),
        ``resources`` are Ray's per-run requests, numbers >= 0 (a typo ran every run without its GPU), and
        the few-shot settings are set only on a few_shot sweep (other protocols ignored them)."""
        for name, settings in self.per_recipe.items():
            if settings is not None and not isinstance(settings, dict):
                raise ConfigError(f"per_recipe.{name}={settings!r} is not valid: expected a mapping of the settings of "
                                  f"{name}'s runs (e.g. per_recipe: {{{name}: {{steps: 100}}}})")
        for where, settings in [("base.", self.base), ("grid.", self.grid),  # named where the sweep file has them
                                *((f"per_recipe.{n}.", s or {}) for n, s in self.per_recipe.items())]:
            require_known_keys(TrainConfig, settings, where)
        for key in away_from_defaults(self, SweepSpec, [k for k in UNREAD_BY[self.protocol] if k != "holdout_domains"]):
            raise ConfigError(_unread_by(key, getattr(self, key), self.protocol))
        if self.finetune_steps == 0 and self.finetune_mode != SweepSpec.finetune_mode:
            raise ConfigError(f"finetune_mode={self.finetune_mode!r} sets how runs are fine-tuned, and finetune_steps=0 "
                              "fine-tunes none: set finetune_steps, or leave finetune_mode out")
        if self.transfer and self.finetune_steps and self.finetune_mode == "mixed":
            raise ConfigError(mixed_on_transfer("finetune_mode="))
        if self.protocol != "lodo" and self.holdout_domains is not None:
            raise ConfigError(f"holdout_domains sets the runs of a lodo sweep; protocol {self.protocol} holds classes "
                              "out, not domains: leave it out, or hold domains out of every run with "
                              "base.split.holdout_domains")
        for where in (self.base, *(p or {} for p in self.per_recipe.values()), self.grid):
            for key in ("store", "out"):  # the base's were overridden without a word (a trial)
                if key in where:
                    raise ConfigError(f"{key} in a sweep's base, per_recipe or grid is set by the sweep itself: its "
                                      "runs train on the sweep file's top-level store, and their folders are the "
                                      "sweep's runs/ (--out names the sweep's folder); leave it out")
            for key in SET_BY_THE_SWEEP[self.protocol]:
                if key in (where.get("split") or {}) or f"split.{key}" in where:
                    raise ConfigError(f"split.{key} in a sweep's base, per_recipe or grid is set by the sweep itself; use the "
                                      "top-level holdout_domains: (lodo) or unseen_fraction / split_seed (open_vocab, few_shot)")
        for key, value in self.resources.items():
            if key not in RESOURCES:
                raise ConfigError(f"resources.{key} is not a per-run request; use {', '.join(RESOURCES)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"resources.{key}={value!r} is not valid: expected a number >= 0 (fractions of a GPU "
                                  "pack runs on it)")


def _unread_by(key: str, value: Any, protocol: str) -> str:
    """The line refusing a sweep setting that a ``protocol`` sweep does not read."""
    what = ("sets few-shot scoring, which a {} sweep does not do; leave it out, or use protocol: few_shot"
            if key in FEW_SHOT_SETTINGS else
            "sets the class split of open_vocab and few_shot sweeps, which a {} sweep does not make; leave "
            "it out, or use one of those protocols (a class held out of a lodo sweep: base.split.train_classes)")
    return f"{key}={value!r} " + what.format(protocol)


def load_sweep(path: str, overrides=()) -> SweepSpec:
    data, where = read_config_file("sweep", path)
    if isinstance(data.get("base"), dict):  # base: {optim.lr: 0.01} was refused as unknown "under the top level";
        data["base"] = _nested(data["base"], "base.")  # nested before --set, which wins over it (a review)
    data = apply_overrides(data, overrides)
    if isinstance(data.get("grid"), dict):  # `--set grid.optim.lr=[...]` nests: the grid's keys are dotted
        data["grid"] = flatten(data["grid"])
    if "store" not in data:
        raise ConfigError(f"{where} needs `store:` (a store made by `embedcache extract`)")
    _refuse_run_settings_on_top(data)
    spec = build_config(SweepSpec, data)
    for item in overrides:  # `--set` of an unread setting, even at its default (a saved sweep.yaml holds them all)
        key = item.split("=", 1)[0].strip()
        if key in UNREAD_BY[spec.protocol] and key != "holdout_domains":
            raise ConfigError("--set " + _unread_by(key, getattr(spec, key), spec.protocol))
    return spec


def _nested(settings: Dict, where: str) -> Dict:
    """Settings given with dotted keys (optim.lr: 0.01) nested as runs are built from them, merged with a section
    given whole (optim: {name: sgd})."""
    out = copy.deepcopy({k: v for k, v in settings.items() if "." not in str(k)})
    for key, value in settings.items():
        if "." not in str(key):
            continue
        *path, last = str(key).split(".")
        node = out
        for i, part in enumerate(path):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}{'.'.join(path[:i + 1])} is given a value and {where}{key} a setting under "
                                  "it; give one of them")
        node[last] = _merged(node[last], value, f"{where}{key}") if last in node else value
    return out


def _merged(before: Any, value: Any, key: str) -> Any:
    """A section given in two parts (loss_args.vlalign: {...} beside loss_args.vlalign.k), merged; one setting given
    twice (optim: {lr: 0.02} beside optim.lr: 0.03) kept one without a word (a review): refused."""
    if not (isinstance(before, dict) and isinstance(value, dict)):
        raise ConfigError(f"{key} is given twice, dotted and in its section; give it once")
    out = dict(before)
    for k, v in value.items():
        out[k] = _merged(out[k], v, f"{key}.{k}") if k in out else v
    return out


def _refuse_run_settings_on_top(data: Dict) -> None:
    """A run's setting given at the sweep's top level (``--set steps=30``): refused naming where it goes."""
    own, run = {f.name for f in fields(SweepSpec)}, {f.name for f in fields(TrainConfig)}
    stray = sorted(k for k in data if k not in own and k in run)
    if stray:
        raise ConfigError(f"unknown config key {stray[0]}: a sweep's runs take it under base (base.{stray[0]}), or "
                          f"grid.{stray[0]} to cross its values")


# settings added after sweeps derived seeds from a run's identity: left out of it while at their
# default, so a sweep started before them keeps its runs' seeds and names. The run name's list, but for
# batch_per_domain, part of the identity from the day it was added (so it stays in)
SEEDED_WHEN_SET = {k: v for k, v in NAMED_WHEN_SET.items() if k != "batch_per_domain"}


def seed_identity(cfg: TrainConfig) -> Dict:
    """What a sweep run's training seed is derived from: its settings, output and display excluded."""
    return settings_identity(cfg, ("out", "progress"), SEEDED_WHEN_SET)


def derive_seed(base_seed: int, identity: Dict) -> int:
    """A run's training seed from (base seed, its config with the replicate index as `seed`)."""
    blob = json.dumps({"base_seed": base_seed, **identity}, sort_keys=True)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) % (2**31 - 1)


def _splits(spec: SweepSpec, reader) -> List[Dict]:
    if spec.protocol == "lodo":
        if spec.holdout_domains is not None and len(set(spec.holdout_domains)) != len(spec.holdout_domains):
            raise ConfigError(f"holdout_domains={list(spec.holdout_domains)} names a domain twice; list each once")
        if spec.holdout_domains is not None and not spec.holdout_domains:
            if spec.transfer:  # one run per grid point on every domain, scored on the transfer stores
                return [{"holdout_domains": []}]
            raise ConfigError("holdout_domains=[] holds no domain out, and a lodo sweep trains one run per held-out "
                              "domain; leave holdout_domains out for every domain of the store, or list some; or give "
                              "transfer: stores to score runs trained on every domain on (a synthesised store's runs "
                              "on real images)")
        domains = spec.holdout_domains or reader.domains
        unknown = sorted(set(domains) - set(reader.domains))
        if unknown:
            raise ConfigError(f"holdout domain {unknown[0]!r} is not in the store; domains: {', '.join(reader.domains)}")
        return [{"holdout_domains": [d]} for d in domains]
    seen = seeded_class_split(len(reader.classes), spec.unseen_fraction, spec.split_seed)
    return [{"train_classes": [reader.classes[i] for i in seen]}]


def expand(spec: SweepSpec, sweep_dir: str) -> List[SweepPoint]:
    """Every run of the grid, each config built and validated (types, ranges, registry names, text
    source), before anything runs; an incomplete or damaged store is refused here too."""
    from ..recipes import RECIPES

    # replicates outermost: a sweep stopped early has every variant of its first replicates, not
    # every replicate of its first variants
    keys = sorted(spec.grid, key=lambda k: (k != "seed", k))
    for name in spec.per_recipe:
        if name not in RECIPES:
            raise ConfigError(f"per_recipe: {RECIPES.unknown(name)}")
        crossed = sorted(set(flatten(spec.per_recipe[name] or {})) & set(spec.grid))
        if crossed:  # the grid's values of it never ran for that recipe (two of them made one run, refused below)
            raise ConfigError(f"per_recipe.{name}.{crossed[0]} overrides the grid's {crossed[0]} for the runs of {name}, "
                              f"so the grid's values of it never run for them; set it in one place: the grid, or "
                              f"per_recipe (with {crossed[0]} out of the grid)")
    for k in keys:
        if not isinstance(spec.grid[k], list) or not spec.grid[k]:
            raise ConfigError(f"sweep grid entry {k!r} must be a non-empty list of values")
        if any(isinstance(v, dict) for v in spec.grid[k]):  # a run's variant names flat keys
            raise ConfigError(f"sweep grid entry {k!r} lists mappings; grid over their entries instead "
                              f"({k}.<key>: [values])")
    with open_store(spec.store) as reader:  # refuses an incomplete store
        out = _points(spec, sweep_dir, keys, reader, _named_as(sweep_dir, spec.store, reader.key))
        _require_used(spec.per_recipe, sorted({p.cfg.recipe for p in out}))
        _require_transferable(spec.transfer, reader, sorted({text_source_of(p.cfg) for p in out}))
        _require_episodes(spec, reader, out, sweep_dir)
        _require_unseen_classes(spec, reader, out)
        # head-only runs' cached features, before any run (runs with results need none)
        missing = missing_features(reader, [p.cfg for p in out
                                            if not result_path(sweep_dir, Path(p.cfg.out).name).exists()])
    if missing:
        raise ConfigError(missing)
    return out


def _require_transferable(stores: List[str], reader, sources: List[str]) -> None:
    """Each transfer store is one the runs can be scored on (the checks of `evaluate --transfer`), before
    any run trains, and another store than the runs' own and each other (by key: the sweep's own store
    listed twice wrote every row three times into results.parquet, a fuzzing trial)."""
    from ..scoring import transfer_differences

    seen = {reader.key: "the sweep's own store"}
    for path in stores:
        with open_store(path) as other:  # refuses an incomplete store
            if other.key in seen:
                raise ConfigError(f"transfer store {path} is the same store as {seen[other.key]} (key {other.key}): "
                                  "its rows would be scored twice; list each other store once in transfer")
            seen[other.key] = f"transfer store {path}"
            for src in sources:
                differ = transfer_differences(reader.scoring_facts(src), other, src)
                if differ:
                    what, fix = differ[0]
                    raise ConfigError(f"transfer store {path}: {what}; {fix}")


def _require_episodes(spec: SweepSpec, reader, points: List[SweepPoint], sweep_dir: str) -> None:
    """A few_shot sweep's episodes can be drawn on every store it scores (its own, each transfer store):
    found only once a run had trained, as its scoring's error (a trial: a synthesised store of 2 images per
    class under 5 shots)."""
    if spec.protocol != "few_shot":
        return
    seen_sets = _class_splits(points)
    for path in [spec.store, *spec.transfer]:
        with (contextlib.nullcontext(reader) if path == spec.store else open_store(path)) as r:
            labels = r.meta["label"].to_numpy()
            for seen in seen_sets:
                c, n = fewest_images(labels, r.ok, [i for i, name in enumerate(r.classes) if name not in seen])
                if n > spec.shots:
                    continue
                which = "the sweep's store" if path == spec.store else "transfer store"
                fewer = f"set shots: {n - 1} or fewer, or " if n > 1 else ""
                alone = (f"; a transfer store's episodes with more shots: `embedcache evaluate {sweep_dir}/runs --store "
                         f"{spec.transfer[0]} --transfer --protocol few_shot --shots K` once the sweep ran"
                         if path == spec.store and spec.transfer else "")
                raise ConfigError(f"few_shot: class {r.classes[c]!r} has {n} usable images in {which} {path}, "
                                  f"fewer than shots={spec.shots} + 1 to test; {fewer}hold out other classes "
                                  f"(unseen_fraction, split_seed){alone}")


def _require_unseen_classes(spec: SweepSpec, reader, points: List[SweepPoint]) -> None:
    """An open_vocab sweep holds two or more classes out: with one, unseen_zero_shot (among the unseen
    labels only) is 100% by construction; the table and report.md showed 100.0 ± 0.0, the runs' warnings
    lost amid the progress bars (a trial)."""
    if spec.protocol != "open_vocab":
        return
    for seen in _class_splits(points):
        unseen = [c for c in reader.classes if c not in seen]
        if seen and len(unseen) == 1:
            raise ConfigError(f"open_vocab: the class split holds out one class ({unseen[0]!r}), so unseen_zero_shot, "
                              "among the unseen labels only, would be 100% by construction; set unseen_fraction so "
                              f"that two or more of the store's {len(reader.classes)} classes are held out")


def _class_splits(points: List[SweepPoint]) -> List[tuple]:
    """The seen classes of each class split the sweep's runs train on (the sweep sets them; () for none)."""
    return sorted({tuple(p.cfg.split.train_classes or ()) for p in points})


def _require_used(per_recipe: Dict[str, Any], trained: List[str]) -> None:
    """A per_recipe block sets the runs of its recipe: one for a recipe the grid does not train was
    ignored without a word. A block set to null (`--set per_recipe.NAME=null`) is no block."""
    for name, block in per_recipe.items():
        if block is not None and name not in trained:
            raise ConfigError(f"per_recipe.{name} sets runs of a recipe the grid does not train (it trains "
                              f"{', '.join(trained)}); add {name} to grid.recipe, or remove its block (`--set "
                              f"per_recipe.{name}=null`; `--set per_recipe={{}}` drops every block)")


def _points(spec: SweepSpec, sweep_dir: str, keys: List[str], reader, named_as: str) -> List[SweepPoint]:
    """Each grid point x split as a validated run config, checked against the store (``reader``).
    Runs are named and seeded with the store spelled ``named_as`` (as the sweep first named it), so
    the same store by another path (relative, absolute, a copy) is the same sweep."""
    splits, sources = _splits(spec, reader), set(reader.text_sources)
    out, made_by, unread_by_all, split_rows, by_recipe = [], {}, None, {}, {}
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        for split in splits:
            data = apply_overrides({**spec.base, "store": spec.store}, [])
            data.setdefault("split", {}).update(split)
            data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in zip(keys, values)])
            extra = spec.per_recipe.get(data.get("recipe", TrainConfig.recipe)) or {}
            data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in flatten(extra).items()])
            data["progress"] = False
            where = ", ".join(f"{k}={v}" for k, v in zip(keys, values)) or "base"
            try:
                cfg = build_config(TrainConfig, data)
                check_views_used(cfg.views_used, reader.views, spec.store, cfg.skip_plain_view, cfg.plain_targets)
            except ConfigError as exc:
                raise ConfigError(f"sweep run ({where}): {exc}") from None
            unread = {k for k, _, _ in unread_training(cfg)}  # a base setting is for the runs that read it
            unread_by_all = unread if unread_by_all is None else unread_by_all & unread
            by_recipe[cfg.recipe] = unread if cfg.recipe not in by_recipe else by_recipe[cfg.recipe] & unread
            src = text_source_of(cfg)
            if src not in sources:
                raise ConfigError(f"sweep run ({where}): text source {src!r} is not in {spec.store} "
                                  f"(it has {', '.join(sorted(sources))})")
            replicate = cfg.seed
            seed = derive_seed(spec.base_seed, seed_identity(_as_named(cfg, named_as)))
            cfg = build_config(TrainConfig, {**data, "seed": seed})
            name = run_name(_as_named(cfg, named_as))
            if name in made_by:
                unnamed = [k for k in UNIDENTIFYING if k in spec.grid]
                why = (f"{' and '.join(unnamed)} change no result, so no run's name or seed: sweep each in a sweep "
                       "folder of its own" if unnamed else "the grid repeats a value; list each once")
                raise ConfigError(f"grid points ({made_by[name]}) and ({where}) resolve to the same run: {why}")
            made_by[name] = where
            cfg = build_config(TrainConfig, {**to_dict(cfg), "out": str(Path(sweep_dir) / "runs" / name)})
            if not (result_path(sweep_dir, name).exists() or RunDir(cfg.out).done):  # finished runs stay as made
                try:
                    check_trainable(cfg)
                except ConfigError as exc:
                    raise ConfigError(f"sweep run ({where}): {exc}") from None
                if not RunDir(cfg.out).file("checkpoint.pt").exists():  # a started run resumes as it began
                    _fresh_run_checks(cfg, _split_rows(reader, src, cfg.split, split_rows), where,
                                      "grid.batch_size" if "batch_size" in spec.grid else "base.batch_size")
            out.append(SweepPoint(cfg, replicate))
    if not _begun_with(sweep_dir, spec):  # a relaunch keeps the settings it was begun with
        _refuse_unread(spec, unread_by_all or set(), by_recipe, out)
        if not read_listed(sweep_dir, RUNS_EVER):  # a folder begun before the check grows as it began
            _refuse_variants_of_one_method(spec, out)
    return out


def _refuse_variants_of_one_method(spec: SweepSpec, points: List[SweepPoint]) -> None:
    """A grid setting of several values that some runs do not read (optim.momentum beside adamw runs) made as many
    variants of those runs: one method, in as many rows as values, apart only by their seeds (a trial: momentum
    0.5 'beat' 0.9 by 5.5 points with adamw). A setting no run reads is ``_refuse_unread``'s."""
    for key, values in spec.grid.items():
        if len(values) < 2:
            continue
        ignoring = [(p.cfg, reader) for p in points for k, reader in ignored_training(p.cfg) if k == key]
        if ignoring:
            cfg, reader = ignoring[0]
            setting = reader.split("=", 1)[0]
            raise ConfigError(f"grid.{key}={list(values)} is read only with {reader}, which {len(ignoring)} of the "
                              f"sweep's {len(points)} runs do not use ({setting}={flatten(to_dict(cfg))[setting]}): they "
                              f"would be {len(values)} variants of one method, apart only by their seeds; sweep {key} "
                              "over the runs that read it, in a sweep of their own")


def _begun_with(sweep_dir: str, spec: SweepSpec) -> bool:
    """Whether the sweep in ``sweep_dir`` was launched with exactly ``spec`` (its sweep.yaml)."""
    f = Path(sweep_dir) / "sweep.yaml"
    return f.is_file() and f.read_text() == dump_yaml(to_dict(spec))


def _refuse_unread(spec: SweepSpec, by_all: set, by_recipe: Dict[str, set], points: List[SweepPoint]) -> None:
    """A setting that no run of the sweep reads (swad.* with no swad run), or that a per_recipe block sets
    for runs of which none reads it, was ignored without a word."""
    def reader_of(key: str, recipe: Optional[str] = None) -> str:
        return next(r for p in points if recipe in (None, p.cfg.recipe) for k, _, r in unread_training(p.cfg) if k == key)

    for name, unread in sorted(by_recipe.items()):
        block = flatten(spec.per_recipe.get(name) or {})
        in_block = sorted(unread & set(block))
        if in_block:
            key = in_block[0]
            raise ConfigError(f"per_recipe.{name}.{key}={block[key]} is read only with {reader_of(key, name)}, which "
                              f"no {name} run of the sweep uses; remove it")
    if by_all:
        key = sorted(by_all)[0]
        given = f"grid.{key}={spec.grid[key]}" if key in spec.grid else f"base.{key}={flatten(spec.base).get(key)}"
        raise ConfigError(f"{given} is read only with {reader_of(key)}, which no run of the sweep uses; remove it")


def _fresh_run_checks(cfg: TrainConfig, rows: StoreData, where: str, key: str) -> None:
    """check_fresh_run, said for a sweep: which run (its held-out domains), and the sweep's ``key`` to lower
    for a batch too large."""
    try:
        check_fresh_run(cfg, rows)
    except ConfigError as exc:
        held = f", holding out {', '.join(cfg.split.holdout_domains)}" if cfg.split.holdout_domains else ""
        raise ConfigError(f"sweep run ({where}{held}): {str(exc).replace('use batch_size', f'use {key}')}") \
            from None


def _split_rows(reader, source: str, split, made: Dict) -> StoreData:
    """A run's rows under ``split`` (``made`` keeps each split's, for the next run of it); its warnings
    are the run's to give when it trains."""
    key = (source, json.dumps(to_dict(split), sort_keys=True))
    if key not in made:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made[key] = StoreData(reader, source, split)
    return made[key]


def make_jobs(points: List[SweepPoint], pack_heads: bool = False,
              backbones: Optional[List[Optional[str]]] = None) -> List[List[SweepPoint]]:
    """One job per run; with ``pack_heads``, head-only runs that differ only in seed, learning rate
    and weight decay form one job each (a pack trained as one vectorised model). ``backbones``: each
    point's backbone (``features.backbones``): a pack's heads share one, so a student the seed builds
    differently (random weights) packs only runs of one seed."""
    if not pack_heads:
        return [[p] for p in points]
    from ..heads import can_pack, pack_key

    packs: Dict[str, List[SweepPoint]] = {}
    jobs: List[List[SweepPoint]] = []
    for i, p in enumerate(points):
        if can_pack(p.cfg):
            key = pack_key(p.cfg) + (f"/{backbones[i]}" if backbones is not None else "")
            if key not in packs:
                packs[key] = []
                jobs.append(packs[key])
            packs[key].append(p)
        else:
            jobs.append([p])
    return jobs


def _why_no_pack(points: List[SweepPoint]) -> str:
    from ..heads import FREE, can_pack, pack_differences

    packable = [p.cfg for p in points if can_pack(p.cfg)]
    what = "a pack takes head-only runs on cached features (features=true), with no averaging and one stage"
    if len(packable) < 2:
        return what + (", and one run of this sweep is one" if packable else "")
    differ = pack_differences(packable)
    if differ:  # the split of a lodo sweep's runs, say: a note naming the backbone misled (a review)
        return (f"runs of a pack differ only in {', '.join(FREE)}, and these differ in {', '.join(differ[:3])}"
                f"{' and more' if len(differ) > 3 else ''}")
    return (f"runs of a pack differ only in {', '.join(FREE)} and share one frozen backbone (a student with random "
            "weights, no student.pretrained, is another backbone under every seed)")


def _backbones(spec: SweepSpec, points: List[SweepPoint]) -> List[Optional[str]]:
    from ..features import backbones

    with open_store(spec.store) as reader:
        return backbones(reader.dim, [p.cfg for p in points])


def _require_one_store(sweep_dir: str, store: str, write: bool = True) -> None:
    """A sweep directory holds the runs of one store (store.json names it): relaunched on another
    store, its results table would pool two stores' runs. The first launch creates store.json
    exclusively, so of two launches racing on a fresh directory one wins and the other compares.
    ``write``: False for a dry run, which compares with a store.json there is and writes none."""
    with open_store(store) as reader:
        key, contents, numbers = reader.key, reader.store.contents_digest(), reader.store.embeddings_digest()
    f = Path(sweep_dir) / "store.json"
    if not f.is_file() and not write:
        return
    if not f.is_file():
        # a sweep made before store.json: its results name the store they scored
        seen = {k for r in Path(sweep_dir).glob("results/*.parquet")
                for k in pd.read_parquet(r, columns=["store_key"]).store_key}
        first = {"store_key": sorted(seen)[0] if seen else key, "store": "(named in its results)" if seen else store,
                 "named_as": _named_as(sweep_dir, store, key), "store_contents": None if seen else contents,
                 "store_embeddings": None if seen else numbers}
        tmp = f.with_name(f"store.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(first))
        try:
            os.link(tmp, f)  # atomic and exclusive: a complete file, or FileExistsError
        except FileExistsError:
            pass  # another launch wrote it first: compare with that one
        finally:
            tmp.unlink()
    first = _store_record(f)
    if first["store_key"] != key:
        raise ConfigError(f"sweep {sweep_dir} holds the runs of store {first['store']} (key {first['store_key']}), "
                          f"not of {store} (key {key}); use another --out for a sweep over {store}")
    differ = images_differ(first.get("store_contents"), contents, "the sweep's store's")
    if differ:
        raise ConfigError(f"sweep {sweep_dir} holds the runs of another store of key {key}: {store}'s images differ "
                          f"({differ}); use another --out for a sweep over {store}")
    differ = embeddings_differ(first.get("store_embeddings"), numbers, "the sweep's store's")
    if differ:  # its runs, named by the key, would pool both stores' numbers in one table
        raise ConfigError(f"sweep {sweep_dir} holds the runs of another store of key {key} and its images: {store}'s "
                          f"embeddings differ ({differ}); use the store the sweep began on, or another --out for a "
                          f"sweep over {store}")


_REWRITE_STORE_RECORD = ("delete it: the sweep's next launch writes it again from the store it is given (each run "
                         "checks its own store's record)")


def _store_record(f: Path) -> Dict[str, Any]:
    """A sweep folder's store.json, which its first launch wrote."""
    first = read_json(f, dict, _REWRITE_STORE_RECORD)
    if "store_key" not in first or "store" not in first:
        raise ConfigError(f"{f} is damaged (it names no store); {_REWRITE_STORE_RECORD}")
    return first


def _named_as(sweep_dir: str, store: str, key: Optional[str] = None) -> str:
    """The store as the sweep's runs' names and seeds are derived from it: store.json's (the first launch
    wrote it), else a run's config (a sweep made before store.json kept it), else, for a new folder, the
    store's key (``STORE_KEY``; ``key`` when the caller has it, else the store is opened for it): the path as
    spelled (``./stores/x.zarr``, an absolute path, a copy) gave another folder of the same sweep other seeds.
    Folders begun before keep the spelling they began with."""
    f = Path(sweep_dir) / "store.json"
    if f.is_file():
        first = _store_record(f)
        if first.get("named_as") or first["store"] != "(named in its results)":
            return first.get("named_as") or first["store"]
    for cfg in sorted(Path(sweep_dir).glob("runs/*/config.json")):
        return _run_named_as(RunDir(cfg.parent))
    if f.is_file():  # begun before store.json, its runs deleted since: named as spelled, as they were
        return store
    if key is None:
        with open_store(store) as reader:
            key = reader.key
    return STORE_KEY + key


def _run_named_as(run: RunDir) -> str:
    """The store as ``run``'s name was derived: by its key (a folder begun since 2026-12-06, whose store.json was
    deleted since) or as its config spells it (a folder begun before store.json)."""
    keyed = STORE_KEY + run.config["store_key"]
    return keyed if run_name(_as_named(run.train_config, keyed)) == run.name else run.config["store"]


def _as_named(cfg: TrainConfig, named_as: str) -> TrainConfig:
    """A run's config as its name and seed are derived: by the store's key in a folder begun since
    2026-12-06 (``by_store_key``), else with the store as the folder first spelled it."""
    if named_as.startswith(STORE_KEY):
        return by_store_key(cfg, named_as[len(STORE_KEY):])
    return replace(cfg, store=named_as)


# sweep settings a relaunch may change: its grid and held-out domains (the table holds the current
# grid's runs), how runs are launched, and the store's path (store.json pins the store by its key)
RELAUNCH_MAY_CHANGE = ("grid", "holdout_domains", "launcher", "workers", "resources", "pack_heads", "store")


def _same_value(a: Any, b: Any) -> bool:
    """Equal, or the same number written two ways (YAML reads 1e-3 as a string and 0.001 as a float;
    the runs' configs read both as 0.001)."""
    if a == b:
        return True

    def number(v):
        try:
            return None if isinstance(v, bool) else float(v)
        except (TypeError, ValueError):
            return None

    return number(a) is not None and number(a) == number(b)


def _require_same_spec(sweep_dir: str, spec: SweepSpec, others_live: bool = False) -> None:
    """A sweep folder holds the runs of one spec: relaunched with other base settings its table pooled
    the old and new runs as replicates, and scoring settings (finetune_steps) changed nothing of runs
    already scored while sweep.yaml claimed them. ``others_live``: another launch is running, so its
    settings hold even before any run of it finished (two launches scored into one table)."""
    f = Path(sweep_dir) / "sweep.yaml"
    if not f.is_file() or not (others_live or any(Path(sweep_dir).glob("results/*.parquet"))):
        return  # nothing finished and nothing running: nothing a changed spec could be pooled with
    raw = parse_yaml(f.read_text(), str(f)) or {}
    defaults = flatten(to_dict(SweepSpec(store="")))  # settings added since that sweep.yaml was written
    old = {**defaults, **flatten(raw)}
    new = flatten(to_dict(spec))
    unread = UNREAD_BY.get(raw.get("protocol", spec.protocol), ())  # an older sweep.yaml may hold them, unread
    # a base setting left out is at its default: written out at that value the runs are the same (it was
    # refused, "base.optim.lr: None -> 0.001", a trial)
    unset = {f"base.{k}": v for k, v in flatten(to_dict(TrainConfig())).items()}
    old_grid, new_grid = {f"base.{k}" for k in raw.get("grid") or {}}, {f"base.{k}" for k in spec.grid}

    def before(k):  # a key the grid sets: the grid's values, none in the base
        return old.get(k, None if k in old_grid else unset.get(k))

    def after(k):
        return new.get(k, None if k in new_grid else unset.get(k))

    # what no run reads or is named by: base settings that change no result (device), and a base value the grid
    # overrides both times (a trial: each refused a relaunch that changes no run)
    idle = {f"base.{k}" for k in UNIDENTIFYING} | (old_grid & new_grid)
    changed = [k for k in sorted(set(old) | set(new)) if k.split(".")[0] not in RELAUNCH_MAY_CHANGE + unread
               and k not in idle and not _same_value(before(k), after(k)) and not _same_runs(k, old, new, raw, spec)]
    if changed:
        shown = "; ".join(f"{k}: {before(k)!r} -> {after(k)!r}" for k in changed[:3])
        moved = any(k.startswith("base.") and new.get(k) is None and k[len("base."):] in spec.grid for k in changed)
        hint = " (a base setting moved into the grid keeps its base value among the grid's)" if moved else ""
        if others_live:
            raise ConfigError(f"another launch of sweep {sweep_dir} is running with other settings ({shown}){hint}; "
                              "wait for it to end, or use another --out for these")
        raise ConfigError(f"sweep {sweep_dir} was launched with other settings ({shown}){hint}; relaunch it with "
                          f"its own (its sweep.yaml), or use another --out for these")


def _same_runs(key: str, old: Dict, new: Dict, raw: Dict, spec: SweepSpec) -> bool:
    """A spec change that leaves the runs already made as they are: settings of a recipe the sweep did
    not have (added to the grid with its per_recipe entry) or no longer has (dropped from the grid with
    it), and a base setting moved into the grid with its value among the grid's (or out of it, keeping
    one of the grid's values)."""
    if key.startswith("per_recipe."):
        def recipes(grid: Dict, base: Dict) -> List[str]:
            return (grid or {}).get("recipe") or [(base or {}).get("recipe", TrainConfig.recipe)]

        name = key.split(".")[1]
        return name not in recipes(raw.get("grid"), raw.get("base")) or name not in recipes(spec.grid, spec.base)
    if key.startswith("base."):
        name, before, after = key[len("base."):], old.get(key), new.get(key)
        if after is None and any(_same_value(before, v) for v in spec.grid.get(name) or []):
            return True
        return before is None and any(_same_value(after, v) for v in (raw.get("grid") or {}).get(name) or [])
    return False


def _require_current_recipes(sweep_dir: str, points: List[SweepPoint]) -> None:
    """Runs (finished or not) trained under an earlier definition of their recipe (an older version
    of this package) would share the sweep's table with runs of the recipe as it is now, or fail one
    by one when resumed."""
    stale = []
    for p in points:
        run = RunDir(p.cfg.out)
        if run.file("config.json").is_file():
            changed = definition_change(p.cfg, run.config.get("recipe_definition"))
            if changed:
                stale.append((run.name, p.cfg.recipe, changed))
    if stale:
        name, recipe, changed = stale[0]
        raise ConfigError(f"sweep {sweep_dir}: {len(stale)} run(s) ({name} first) were trained under another "
                          f"definition of recipe {recipe} ({changed}); launch the sweep with another --out, or delete "
                          "those runs' folders under runs/ and their results/<run>.parquet to train them again here")


def selection_note(points: List[SweepPoint]) -> Optional[str]:
    """A line when the runs keep their weights by different rules (select: auto follows each recipe:
    li_iccv23 keeps its last weights, the others their best validation checkpoint), else None. A run
    whose split leaves no validation rows keeps its last weights (the store's rows decide: a
    dataset's own val rows are validation rows whatever split.val_fraction is)."""
    has_val = _validation_rows(points)
    rules: Dict[str, set] = {}
    once = set()  # recipes that keep their last weights for want of a second validation to choose among
    for p in points:
        rule, why = selection_rule(p.cfg, RECIPES.get(p.cfg.recipe), has_val=has_val[_split_key(p)])
        rules.setdefault(rule, set()).add(p.cfg.recipe)
        if why.startswith(ONE_VALIDATION):
            once.add(p.cfg.recipe)
    if len(rules) < 2:
        return None
    if all(p.cfg.select != "auto" for p in points) and once == rules.get("last"):  # base.select is set already
        return (f"note: {', '.join(sorted(once))} validate(s) once where they choose their weights (a recipe of "
                "several stages: in its last) at these settings, so they keep their last weights while the others keep "
                "their best validation checkpoint; lower base.eval_every for a choice among several")
    said = "; ".join(f"{rule}: {', '.join(sorted(recipes))}" for rule, recipes in sorted(rules.items()))
    return (f"note: the runs keep their weights by different rules ({said}), so the table compares model selection "
            "along with the losses; set base.select (best_val or last) to compare the losses alone")


def stage_schedule_sweep_note(points: List[SweepPoint]) -> Optional[str]:
    """A line when runs train a recipe of several stages under one decaying schedule across them (their
    last stage, which the kept model comes from, trains at its tail), else None."""
    spans = sorted({(p.cfg.recipe, p.cfg.optim.schedule) for p in points if schedule_spans_stages(p.cfg)})
    if not spans:
        return None
    said = ", ".join(f"{recipe} under {schedule}" for recipe, schedule in spans)
    return (f"note: {said}: one schedule runs across the recipe's stages, so its last stage (the kept model's) trains "
            "at the schedule's tail; base.optim.schedule: constant trains every stage at optim.lr")


def frozen_random_sweep_note(points: List[SweepPoint]) -> Optional[str]:
    """``frozen_random_note`` once for a sweep: the recipes whose heads train on a random frozen backbone."""
    said = sorted({(p.cfg.recipe, p.cfg.student.name) for p in points if frozen_random_note(p.cfg)})
    if not said:
        return None
    return (f"note: {', '.join(f'{r} on {s}' for r, s in said)}: a head trains on a frozen backbone of random weights "
            "(student.pretrained unset or scratch), so these rows say nothing of the recipes' methods; set "
            "base.student.pretrained or use a pretrained student")


def _split_key(p: SweepPoint) -> str:
    return repr((p.cfg.store, sorted(to_dict(p.cfg.split).items())))


def _validation_rows(points: List[SweepPoint]) -> Dict[str, bool]:
    """Whether each run's split of its store leaves validation rows, once per distinct split."""
    readers: Dict[str, Any] = {}
    out: Dict[str, bool] = {}
    try:
        for p in points:
            key = _split_key(p)
            if key not in out:
                if p.cfg.store not in readers:
                    readers[p.cfg.store] = open_store(p.cfg.store)
                reader = readers[p.cfg.store]
                out[key] = len(StoreData(reader, reader.text_sources[0], p.cfg.split, training=False).val_idx) > 0
    finally:
        for reader in readers.values():
            reader.close()
    return out


def run_sweep(spec: SweepSpec, sweep_dir: str, launcher: Optional[str] = None, device: Optional[str] = None,
              progress: bool = True, log: Callable[[str], None] = print, dry_run: bool = False,
              **launcher_args) -> Dict[str, Any]:
    """Validate and expand the grid, run what is not finished, then write results.parquet and the report.
    Stops on request (Ctrl-C / SIGTERM) with ``SweepInterrupted``; on a full disk with ``DiskFullError``.
    ``dry_run``: the checks of the settings, the grid and the folder's store (and of a launch running into it), then
    {"runs", "finished", "running"}, with nothing trained or written."""
    name = launcher or spec.launcher
    launcher_args = {k: v for k, v in launcher_args.items() if v is not None}
    check_options(name, launcher_args)
    unread = unread_settings(name, spec, SweepSpec(store=""))
    if unread and launcher is None:
        raise ConfigError(f"{', '.join(unread)} (in the sweep file or --set) does not apply to its launcher {name}; leave it out, "
                          "or choose the launcher that reads it (workers: local, resources: ray; --launcher NAME runs "
                          "another launcher for one launch)")
    if unread:
        log(f"note: {', '.join(unread)} (in the sweep file or --set) does not apply to the {name} launcher, which runs "
            "without it")
    require_folder_for(sweep_dir, "sweep")
    _require_same_spec(sweep_dir, spec)  # before expanding: a clearer line than what the changed grid fails on
    points = expand(spec, sweep_dir)
    device = sweep_device(device, points)
    if not launcher_args.get("address"):  # runs on this machine (a Ray cluster's workers find their own devices)
        for d in [device] if device is not None else sorted({p.cfg.device for p in points}):
            resolve_device(d)
    for line in overridden_by_grid(spec):
        log(f"note: {line}")
    _require_current_recipes(sweep_dir, points)
    if dry_run:  # a grid of thousands started at once, its size said only after launch (a trial)
        _require_one_store(sweep_dir, spec.store, write=False)
        running = launch_running(sweep_dir)
        if running:  # its settings are the folder's, finished runs or not: a launch of these would be refused
            _require_same_spec(sweep_dir, spec, others_live=True)
        return {"runs": len(points), "finished": sum(RunDir(p.cfg.out).done for p in points), "running": running}
    with one_line_when_full(sweep_dir):
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        with Launch(sweep_dir) as launch:
            points = _settle(spec, sweep_dir, points, launch.others_live)
            _set_aside_orphaned_results(sweep_dir, log)  # once the launch is let through: a refused one moves nothing
            launch.settle()
            return _launch(spec, sweep_dir, points, name, device, progress, log, launcher_args)


def _set_aside_orphaned_results(sweep_dir: str, log: Callable[[str], None]) -> None:
    """Result rows of a run whose folder is gone or no longer done (deleted to train it again, as a damaged
    split.json's message says) are moved to results/orphaned/, and the run trains again: they stood in the
    table as the run's (a relaunch said it "already finished"), where `evaluate runs/` no longer had it. A run's
    rows are written only after its done marker, so no live worker's rows are taken for these. Rows set aside
    before are kept beside (a run orphaned twice)."""
    results = Path(sweep_dir) / "results"
    orphaned = [f for f in sorted(results.glob("*.parquet")) if not RunDir(Path(sweep_dir) / "runs" / f.stem).done]
    if not orphaned:
        return
    aside = results / "orphaned"
    aside.mkdir(exist_ok=True)
    for f in orphaned:
        to, n = aside / f.name, 1
        while to.exists():
            to, n = aside / f"{f.stem}.{n}.parquet", n + 1
        os.replace(f, to)
    shown = ", ".join(f.stem for f in orphaned[:3]) + (f" and {len(orphaned) - 3} more" if len(orphaned) > 3 else "")
    log(f"note: {len(orphaned)} run(s) of {sweep_dir} had result rows but no finished run folder ({shown}: deleted, or "
        f"its done marker removed); their rows are moved to {aside} and the runs still in the grid train again")


def sweep_device(device: Optional[str], points: List[SweepPoint]) -> Optional[str]:
    """The device a sweep's runs train and are scored on: ``--device`` when given (auto too: it overrides a
    ``base.device``), else the one their configs name (``base.device``; auto when none does), which a local
    launcher spreads over a machine's GPUs; None where their configs name several (per recipe or in the
    grid): each its own."""
    if device is not None:
        return device
    named = {p.cfg.device for p in points}
    return named.pop() if len(named) == 1 else None


def crowded_note(workers: int, jobs: int, device: Optional[str], cores: int) -> str:
    """A note when local workers on the CPU outnumber its cores (each then gets one thread, and the runs
    slow each other down), saying how many start ('' when they fit, or they use GPUs)."""
    import torch

    on_gpu = device not in (None, "cpu") and (str(device).startswith("cuda") or torch.cuda.is_available())
    n = max(1, min(workers, jobs))
    if on_gpu or n <= cores:
        return ""
    started = f"{n} local workers" + (f" (--workers {workers}, one per job)" if n < workers else "")
    return (f"note: {started} share {cores} CPU cores, a thread each: the runs slow each other down; --workers "
            f"{cores} runs as many at once as this machine has cores for")


def overridden_by_grid(spec: SweepSpec) -> List[str]:
    """A line for each base setting the grid also sets: the grid's values run, the base's never does."""
    base = flatten(spec.base or {})
    return [f"the grid sets {k} in every run, so base.{k}={base[k]!r} is not used" for k in sorted(set(base) & set(spec.grid))]


def _settle(spec: SweepSpec, sweep_dir: str, points: List[SweepPoint], others_live: bool) -> List[SweepPoint]:
    """Behind the launch gate: the folder's store and settings are checked, then this launch's grid
    written (sweep.yaml, runs.json, tags). Returns the points, named as the folder names its store."""
    named_as = _named_as(sweep_dir, spec.store)
    _require_one_store(sweep_dir, spec.store)
    _require_same_spec(sweep_dir, spec, others_live)
    if _named_as(sweep_dir, spec.store) != named_as:  # another launch created store.json first
        points = expand(spec, sweep_dir)
    atomic_write_text(Path(sweep_dir) / "sweep.yaml", dump_yaml(to_dict(spec)))
    ever = set(grid_runs(sweep_dir) or []) | set(read_listed(sweep_dir, RUNS_EVER))  # before runs.json is rewritten
    names = sorted(Path(p.cfg.out).name for p in points)
    atomic_write_text(Path(sweep_dir) / RUNS_EVER, json.dumps(sorted(ever | set(names))))
    atomic_write_text(Path(sweep_dir) / "runs.json", json.dumps(names))
    tags = {Path(p.cfg.out).name: sweep_tags(spec, p) for p in points}
    named = {Path(p.cfg.out).name: {"recipe": p.cfg.recipe, "student": p.cfg.student.name,
                                    "held": sorted(p.cfg.split.holdout_domains)} for p in points}
    atomic_write_text(Path(sweep_dir) / "tags.json",  # this launch's grid, and each run's method (for the notes)
                      json.dumps({n: {**t, **named[n]} for n, t in tags.items()}, sort_keys=True))
    for p in points:  # runs made under an earlier grid (or version) carry today's tags, for `evaluate runs/`
        run = RunDir(p.cfg.out)
        if run.file("sweep.json").is_file() and run.sweep_tags != tags[run.name]:
            run.write_sweep_tags(tags[run.name])
    return points


def _launch(spec: SweepSpec, sweep_dir: str, points: List[SweepPoint], name: str, device: str, progress: bool,
            log: Callable[[str], None], launcher_args: Dict) -> Dict[str, Any]:
    """Run the jobs not finished, then write the table and report of this launch's grid."""
    finished = sum(result_path(sweep_dir, Path(p.cfg.out).name).exists() for p in points)
    log(f"sweep {sweep_dir}: {len(points)} runs ({spec.protocol}), {finished} already finished, launcher {name}")
    for note in (selection_note(points), stage_schedule_sweep_note(points), frozen_random_sweep_note(points)):
        if note:
            log(note)
    jobs = make_jobs(points, spec.pack_heads, _backbones(spec, points) if spec.pack_heads else None)
    packs = any(len(job) > 1 for job in jobs)
    if spec.pack_heads and not packs and len(points) > 1:
        log(f"note: pack_heads is set, but no two runs pack: {_why_no_pack(points)}; each trains alone")
    if name == "local":
        crowd = crowded_note(launcher_args.get("workers") or spec.workers, len(jobs), device, os.cpu_count() or 1)
        if crowd:
            log(crowd)
    what = ("stopping: no new run starts; running runs save a checkpoint" +
            (" (a head pack has none: it trains again whole)" if packs else ""))
    ended = [j for j in jobs if all(result_path(sweep_dir, Path(p.cfg.out).name).exists() for p in j)]
    statuses = [{"run": Path(p.cfg.out).name, "status": "skipped"} for j in ended for p in j]
    todo = [j for j in jobs if j not in ended]  # no workers start for finished runs (each said "running")
    with interrupt.graceful(lambda signum: log(interrupt.stop_notice(signum, what))):
        if todo:
            statuses += LAUNCHERS.get(name)(todo, spec, sweep_dir, device=device, progress=progress, **launcher_args)
        stopped = interrupt.requested()
    counts = {s: sum(1 for x in statuses if x["status"] == s)
              for s in ("done", "skipped", "failed", "busy", "interrupted", "disk_full", "store_damaged")}
    for x in statuses:
        if x["status"] == "failed":
            where = Path(sweep_dir) / "runs" / x["run"] / "error.txt"
            # its error was said as it failed (the progress line): here its name, and where the traceback is
            log(f"failed: {x['run']}" + (f" (its error in {where})" if where.exists() else f": {x.get('error', '')}"))
    finished = sum(result_path(sweep_dir, Path(p.cfg.out).name).exists() for p in points)
    if counts["disk_full"]:
        raise DiskFullError(f"disk full while writing {sweep_dir}: {finished} of {len(points)} runs finished, the "
                            "rest are resumable; free space, then rerun the same command to resume")
    damaged = [x["error"] for x in statuses if x["status"] == "store_damaged"]
    if damaged:
        raise StoreDamagedError(f"{damaged[0]} (the sweep stopped at the first run that met it: {finished} of "
                                f"{len(points)} runs finished, the rest resume once it is mended)")
    if stopped or counts["interrupted"]:
        raise SweepInterrupted(f"interrupted: {finished} of {len(points)} runs finished (trained and scored); rerun "
                               "the same command to resume")
    results, wrote = write_outputs(sweep_dir, points, log)
    return {"runs": len(points), **counts, "results": results, "run_dirs": [p.cfg.out for p in points], "wrote": wrote}
