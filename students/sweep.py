"""Sweeps: a grid of student runs over one store, each trained then evaluated, resumable.

A sweep directory holds ``sweep.yaml`` (the resolved spec), ``runs/<name>/`` (one training run
each, named by the hash of its resolved config), ``results/<name>.parquet`` (that run's tidy
evaluation rows, written atomically and last) and, once finished, ``results.parquet`` and
``report/``. Relaunching skips runs whose results exist and resumes unfinished ones from their
checkpoints. A run is claimed with an exclusive lock file, so concurrent workers never run the
same run twice. The training seed of each run is derived from (base seed, the run's identity), so
adding a variant to the grid changes no other run's seed or name.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pandas as pd
import yaml

from embedcache import open_store
from embedcache._registry import Registry
from embedcache.config import apply_overrides, build_config, to_dict
from embedcache.errors import ConfigError
from evaluate.protocols import seeded_class_split

from .models import STUDENTS
from .recipes import RECIPES
from .train import TrainConfig, run_name

LAUNCHERS = Registry("launcher")
PROTOCOLS_TRAINED = ("lodo", "open_vocab", "few_shot")


@dataclass(frozen=True)
class SweepSpec:
    store: str
    protocol: str = "lodo"                    # lodo (one run per held-out domain) | open_vocab | few_shot
    base: Dict[str, Any] = field(default_factory=dict)   # TrainConfig settings shared by every run
    grid: Dict[str, List[Any]] = field(default_factory=dict)  # dotted TrainConfig key -> values to cross
    holdout_domains: Optional[List[str]] = None  # lodo: default every domain of the store
    unseen_fraction: float = 0.5             # open_vocab / few_shot: share of classes held out (seeded)
    split_seed: int = 0
    base_seed: int = 0
    finetune_steps: int = 0                  # few_shot: also fine-tune the student on the shots
    launcher: str = "local"
    workers: int = 1
    resources: Dict[str, float] = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})


def load_sweep(path: str, overrides=()) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {path} not found; pick one under configs/sweep/")
    data = apply_overrides(yaml.safe_load(p.read_text()) or {}, overrides)
    known = set(SweepSpec.__dataclass_fields__)
    bad = sorted(set(data) - known)
    if bad:
        raise ConfigError(f"unknown sweep key {bad[0]!r}; valid keys: {', '.join(sorted(known))}")
    if "store" not in data:
        raise ConfigError("a sweep needs `store:` (a store made by `embedcache extract`)")
    return SweepSpec(**data)


def derive_seed(base_seed: int, identity: Dict) -> int:
    """A run's training seed from (base seed, its config with the replicate index as `seed`)."""
    blob = json.dumps({"base_seed": base_seed, **identity}, sort_keys=True)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) % (2**31 - 1)


@dataclass(frozen=True)
class SweepPoint:
    """One run of the grid: its resolved config and its replicate index (the grid's `seed` value,
    from which the training seed was derived)."""
    cfg: TrainConfig
    replicate: int


def expand(spec: SweepSpec, sweep_dir: str) -> List[SweepPoint]:
    """Every run of the grid, validated. Raises before anything runs if a key, recipe, student,
    protocol or domain is unknown, or the store is incomplete."""
    if spec.protocol not in PROTOCOLS_TRAINED:
        raise ConfigError(f"unknown sweep protocol {spec.protocol!r}; use one of {', '.join(PROTOCOLS_TRAINED)}")
    LAUNCHERS.get(spec.launcher)
    reader = open_store(spec.store)  # refuses an incomplete store
    keys = sorted(spec.grid)
    for k in keys:
        if not isinstance(spec.grid[k], list) or not spec.grid[k]:
            raise ConfigError(f"sweep grid entry {k!r} must be a non-empty list of values")
    if spec.protocol == "lodo":
        domains = spec.holdout_domains or reader.domains
        unknown = sorted(set(domains) - set(reader.domains))
        if unknown:
            raise ConfigError(f"holdout domain {unknown[0]!r} is not in the store; domains: {', '.join(reader.domains)}")
        splits = [{"split": {"holdout_domains": [d]}} for d in domains]
    else:
        seen = seeded_class_split(len(reader.classes), spec.unseen_fraction, spec.split_seed)
        splits = [{"split": {"train_classes": [reader.classes[i] for i in seen]}}]
    out = []
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        for extra in splits:
            data = apply_overrides({**spec.base, "store": spec.store}, [])
            data.setdefault("split", {}).update(extra["split"])
            data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in zip(keys, values)])
            data["progress"] = False
            cfg = build_config(TrainConfig, data)  # unknown keys are refused here, listing valid ones
            RECIPES.get(cfg.recipe)
            if not cfg.student.name.startswith("timm:"):
                STUDENTS.get(cfg.student.name)
            ident = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "progress")}
            replicate = cfg.seed
            cfg = build_config(TrainConfig, {**data, "seed": derive_seed(spec.base_seed, ident)})
            cfg = build_config(TrainConfig, {**to_dict(cfg), "out": str(Path(sweep_dir) / "runs" / run_name(cfg))})
            out.append(SweepPoint(cfg, replicate))
    names = [Path(p.cfg.out).name for p in out]
    if len(set(names)) != len(names):
        raise ConfigError("two grid points resolve to the same run; remove the duplicate values from the grid")
    return out


def variant(cfg: TrainConfig, spec: SweepSpec) -> str:
    """The grid values of a run other than its replicate seed, e.g. 'optim.lr=0.001'."""
    flat = pd.json_normalize(to_dict(cfg), sep=".").iloc[0].to_dict()
    parts = [f"{k}={flat[k]}" for k in sorted(spec.grid) if k not in ("seed", "recipe", "student.name")]
    return ", ".join(parts) or "-"


# --- one run ------------------------------------------------------------------------------------
class Claim:
    """An exclusive lock file in the run directory; a lock left by a dead process is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.held = False

    def __enter__(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, me.encode())
                os.close(fd)
                self.held = True
                return True
            except FileExistsError:
                if not self._stale():
                    return False
                self.path.unlink(missing_ok=True)
        return False

    def _stale(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return False  # another machine's worker: trust it
        try:
            os.kill(int(pid), 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def run_one(point: SweepPoint, spec: SweepSpec, sweep_dir: str, device: str = "cpu") -> Dict[str, str]:
    """Train (or resume) and evaluate one run; returns {"run", "status": done|skipped|busy|failed, "error"}."""
    from evaluate.store_eval import evaluate_run

    from .embed import embed_store
    from .finetune import few_shot_finetune
    from .train import train

    cfg = point.cfg
    run = Path(cfg.out)
    result = Path(sweep_dir) / "results" / f"{run.name}.parquet"
    if result.exists():
        return {"run": run.name, "status": "skipped"}
    with Claim(run) as mine:
        if not mine:
            return {"run": run.name, "status": "busy"}
        if result.exists():  # finished by another worker between our check and the claim
            return {"run": run.name, "status": "skipped"}
        with open(run / "attempts.jsonl", "a") as fh:
            fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}) + "\n")
        try:
            train(cfg, log=lambda _m: None)
            df = evaluate_run(str(run), [spec.protocol], cfg.store, embed_store(str(run), cfg.store, device))
            if spec.protocol == "few_shot" and spec.finetune_steps > 0:
                ft = few_shot_finetune(str(run), cfg.store, steps=spec.finetune_steps, device=device)
                df = pd.concat([df, ft.assign(protocol="few_shot", **df.iloc[0][["run", "recipe", "student", "seed", "source"]])],
                               ignore_index=True)
            df["variant"] = variant(cfg, spec)
            df["replicate"] = point.replicate
            df["holdout"] = ",".join(cfg.split.holdout_domains) or "-"
            _atomic_parquet(df, result)
            (run / "error.txt").unlink(missing_ok=True)
            return {"run": run.name, "status": "done"}
        except Exception as exc:  # a failed run is recorded and does not stop the others
            (run / "error.txt").write_text("".join(traceback.format_exception(exc)))
            return {"run": run.name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _run_one_in_worker(cfg_dict: Dict, replicate: int, spec_dict: Dict, sweep_dir: str, device: str, threads: int,
                       cwd: Optional[str] = None) -> Dict[str, str]:
    import torch

    if cwd:
        os.chdir(cwd)  # Ray workers start elsewhere; stores and sweep dirs may be relative paths
    torch.set_num_threads(threads)
    return run_one(SweepPoint(build_config(TrainConfig, cfg_dict), replicate), SweepSpec(**spec_dict), sweep_dir, device)


# --- launchers ----------------------------------------------------------------------------------
class Progress:
    """One-screen live summary: done, running, failed, skipped and an ETA."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self.counts = {"done": 0, "skipped": 0, "failed": 0, "busy": 0}
        self.bar = tqdm(total=total, unit="run", desc="sweep", disable=not enabled, dynamic_ncols=True)

    def update(self, status: Dict[str, str], running: int) -> None:
        self.counts[status["status"]] += 1
        self.bar.update(1)
        self.bar.set_postfix(running=running, **self.counts)
        if status["status"] == "failed":
            self.bar.write(f"run {status['run']} failed: {status.get('error', '')}")

    def close(self) -> None:
        self.bar.close()


@LAUNCHERS.register("serial")
def serial(cfgs, spec, sweep_dir, device="cpu", progress=True, on_run=None, **_):
    """In this process, one run after another (tests, debugging)."""
    bar, out = Progress(len(cfgs), progress), []
    try:
        for c in cfgs:
            st = run_one(c, spec, sweep_dir, device)
            out.append(st)
            bar.update(st, 0)
            if on_run is not None:
                on_run(st)
    finally:
        bar.close()
    return out


@LAUNCHERS.register("local")
def local(cfgs, spec, sweep_dir, device="cpu", progress=True, workers=None, **_):
    """A pool of worker processes on this machine (spawned, so no forked OpenMP state)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    n = max(1, workers or spec.workers)
    threads = max(1, (os.cpu_count() or 1) // n)
    bar, out = Progress(len(cfgs), progress), []
    with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as pool:
        futs = [pool.submit(_run_one_in_worker, to_dict(c.cfg), c.replicate, to_dict(spec), sweep_dir, device, threads)
                for c in cfgs]
        for i, f in enumerate(as_completed(futs)):
            st = f.result()
            out.append(st)
            bar.update(st, min(n, len(futs) - i - 1))
    bar.close()
    return out


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, in one line, when nothing listens at a Ray address (ray.init itself waits
    minutes). Accepts host:port, ray://host:port (client, default port 10001) and 'auto'."""
    if address == "auto":
        return
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "10001" if client else "6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        raise ConfigError(f"cannot reach a Ray cluster at {address!r}; check --address (ray://host:10001 or "
                          "host:6379) or leave it out for a local Ray instance") from None


@LAUNCHERS.register("ray")
def ray_launcher(cfgs, spec, sweep_dir, device="cpu", progress=True, address=None, **_):
    """The same runs as Ray tasks (per-run CPU/GPU request from ``resources``) on a cluster at
    ``address``, or on a local Ray instance when no address is given. Needs ``pip install '.[ray]'``."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray launcher needs Ray: pip install 'embedcache[ray]'") from None
    started = not ray.is_initialized()
    if address:
        _check_reachable(address)
    try:
        if started:
            ray.init(address=address, num_cpus=None if address else os.cpu_count(), include_dashboard=False,
                     log_to_driver=False, ignore_reinit_error=True)
    except Exception as exc:
        raise ConfigError(f"cannot reach a Ray cluster at {address!r} ({type(exc).__name__}); check --address "
                          "(ray://host:10001 or host:6379) or leave it out for a local Ray instance") from None
    res = dict(spec.resources)
    task = ray.remote(num_cpus=res.get("num_cpus", 1), num_gpus=res.get("num_gpus", 0))(_run_one_in_worker)
    threads = max(1, int(res.get("num_cpus", 1)))
    pending = [task.remote(to_dict(c.cfg), c.replicate, to_dict(spec), sweep_dir, device, threads, os.getcwd())
               for c in cfgs]
    bar, out = Progress(len(cfgs), progress), []
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            st = ray.get(ready[0])
            out.append(st)
            bar.update(st, len(pending))
    finally:
        bar.close()
        if started:
            ray.shutdown()
    return out


# --- the sweep ----------------------------------------------------------------------------------
def collect(sweep_dir: str) -> pd.DataFrame:
    files = sorted((Path(sweep_dir) / "results").glob("*.parquet"))
    if not files:
        raise ConfigError(f"no results in {sweep_dir}/results yet; run the sweep first")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def run_sweep(spec: SweepSpec, sweep_dir: str, launcher: Optional[str] = None, device: str = "cpu",
              progress: bool = True, log: Callable[[str], None] = print, **launcher_args) -> Dict[str, Any]:
    """Validate and expand the grid, run what is not finished, then write results.parquet and the report."""
    from evaluate.report import write_report

    cfgs = expand(spec, sweep_dir)
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    (Path(sweep_dir) / "sweep.yaml").write_text(yaml.safe_dump(to_dict(spec), sort_keys=True))
    name = launcher or spec.launcher
    log(f"sweep {sweep_dir}: {len(cfgs)} runs ({spec.protocol}), launcher {name}")
    statuses = LAUNCHERS.get(name)(cfgs, spec, sweep_dir, device=device, progress=progress, **launcher_args)
    counts = {s: sum(1 for x in statuses if x["status"] == s) for s in ("done", "skipped", "failed", "busy")}
    failed = [x for x in statuses if x["status"] == "failed"]
    for x in failed:
        log(f"failed: {x['run']}: {x.get('error', '')} (traceback in runs/{x['run']}/error.txt)")
    results = collect(sweep_dir) if any((Path(sweep_dir) / "results").glob("*.parquet")) else None
    if results is not None:
        results.to_parquet(Path(sweep_dir) / "results.parquet", index=False)
        write_report(results, str(Path(sweep_dir) / "report"))
    return {"runs": len(cfgs), **counts, "results": results}
