"""One run of a sweep: claim it, train or resume it, score it, write its result rows (atomically, last).

Statuses: done (trained and scored now), skipped (its results already exist), busy (another worker
holds it), failed (its own error, recorded in error.txt; the others go on), interrupted (a stop was
requested: it saved a checkpoint and is resumable), disk_full and store_damaged (it is resumable; the
sweep stops scheduling and says so).
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional


from embedcache import interrupt
from embedcache.config import flatten, replace, to_dict
from embedcache.errors import StoreDamagedError
from embedcache.fileio import atomic_write, is_disk_full

from ..config import TrainConfig
from ..rundir import RunDir
from .claim import Claim


@dataclass(frozen=True)
class SweepPoint:
    """One run of the grid: its resolved config and its replicate index (the grid's `seed` value,
    from which the training seed was derived)."""
    cfg: TrainConfig
    replicate: int


def variant(cfg: TrainConfig, grid_keys) -> str:
    """The grid values of a run other than its replicate seed, e.g. 'optim.lr=0.001'."""
    flat = flatten(to_dict(cfg))
    parts = [f"{k}={flat[k]}" for k in sorted(grid_keys) if k not in ("seed", "recipe", "student.name")]
    return ", ".join(parts) or "-"


# Replicates of two sweeps with other base seeds are other replicates: a replicate is numbered by the
# grid's seed value, plus base_seed x REPLICATES_PER_BASE_SEED when base_seed is not 0 (so sweeps of the
# default base seed keep their numbers).
REPLICATES_PER_BASE_SEED = 1_000_000


def sweep_tags(spec, point: SweepPoint) -> Dict:
    """What a sweep's run is in its tables: its variant (grid values but the seed) and its replicate."""
    return {"variant": variant(point.cfg, spec.grid),
            "replicate": spec.base_seed * REPLICATES_PER_BASE_SEED + point.replicate}


def result_path(sweep_dir: str, run_name: str) -> Path:
    return Path(sweep_dir) / "results" / f"{run_name}.parquet"


def _score(run: RunDir, spec, point: SweepPoint):
    """A finished run's result rows under the sweep's protocol (one place for sweeps and packs): on its
    own store, unless it trained on every image there (a lodo run holding no domain out and keeping no
    validation rows), and on each transfer store."""
    import pandas as pd

    from ..scoring import score_run

    how = dict(options={"few_shot": {"shots": spec.shots}}, finetune_steps=spec.finetune_steps,
               finetune_mode=spec.finetune_mode)
    split = run.split
    own = spec.protocol != "lodo" or split.get("holdout_domains") or split.get("val_idx")
    device = point.cfg.device  # where it trained (the worker's)
    frames = [score_run(run, [spec.protocol], point.cfg.store, device, **how)] if own else []
    frames += [score_run(run, [spec.protocol], store, device, transfer=True, **how) for store in spec.transfer]
    return pd.concat(frames, ignore_index=True)


def _start(run: RunDir, spec, point: SweepPoint, **attempt) -> None:
    """Before a run of the sweep trains: its tags (sweep.json, which scoring reads) and an attempt record,
    but for a run trained already and only scored now (stopped between the two: a second record read as a
    retry that never happened, a trial)."""
    run.write_sweep_tags(sweep_tags(spec, point))
    if run.done:
        return
    with open(run.file("attempts.jsonl"), "a") as fh:
        fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), **attempt}) + "\n")


def _claim(stack, run: RunDir, sweep_dir: str):
    """None when this worker now holds ``run`` and it still needs work; else the run's status
    (the claim is held by ``stack`` until it closes)."""
    result = result_path(sweep_dir, run.name)
    if result.exists():
        return "skipped"
    if interrupt.requested():
        return "interrupted"
    if not stack.enter_context(Claim(run.path)):
        return "busy"
    if result.exists():  # finished by another worker between our check and the claim
        return "skipped"
    return None


def _finish(run: RunDir, spec, point: SweepPoint, sweep_dir: str) -> Dict[str, str]:
    """Score a trained run, write its result rows (atomically, last) and clear an old failure record."""
    df = _score(run, spec, point)
    atomic_write(result_path(sweep_dir, run.name), lambda tmp: df.to_parquet(tmp, index=False))
    run.file("error.txt").unlink(missing_ok=True)
    return {"run": run.name, "status": "done"}


def _failure(run: RunDir, exc: BaseException) -> Dict[str, str]:
    """A run's failure: a full disk or a damaged store (resumable, the sweep stops scheduling), or its own
    error, recorded in error.txt (the other runs go on)."""
    if is_disk_full(exc):
        return {"run": run.name, "status": "disk_full", "error": str(exc)}
    if isinstance(exc, StoreDamagedError):  # every run reads the store: each one failed on it (a trial)
        return {"run": run.name, "status": "store_damaged", "error": str(exc)}
    run.record_failure("".join(traceback.format_exception(exc)))
    return {"run": run.name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def run_one(point: SweepPoint, spec, sweep_dir: str, teacher=None) -> Dict[str, str]:
    """Train (or resume) and score one run, on its config's device; returns {"run", "status", "error"}."""
    from ..train import train

    run = RunDir(point.cfg.out)
    with ExitStack() as stack:
        status = _claim(stack, run, sweep_dir)
        if status is not None:
            return {"run": run.name, "status": status}
        try:
            _start(run, spec, point)
            train(point.cfg, log=lambda _m: None, should_stop=interrupt.requested, teacher=teacher, unread_ok=True)
            return _finish(run, spec, point, sweep_dir)
        except KeyboardInterrupt:
            return {"run": run.name, "status": "interrupted"}
        except Exception as exc:  # a failed run is recorded and does not stop the others
            return _failure(run, exc)


def on_device(point: SweepPoint, device: Optional[str]) -> SweepPoint:
    """The run as its worker runs it: trained and scored on the worker's device (the sweep's, a local
    worker's own GPU of a machine's), or on its own config's where the sweep leaves each run its own
    (``None``: ``sweep_device``)."""
    return point if device is None else SweepPoint(replace(point.cfg, device=device), point.replicate)


def run_job(job, spec, sweep_dir: str, device: Optional[str] = "auto", teacher=None):
    """A job: one run, or a pack of head-only runs trained together (their statuses, one per run)."""
    job = [on_device(p, device) for p in job]
    if len(job) == 1:
        return [run_one(job[0], spec, sweep_dir, teacher=teacher)]
    return run_pack(job, spec, sweep_dir)


def run_pack(points, spec, sweep_dir: str):
    """Claim the runs of a pack, train the unfinished ones together (``heads.train_heads``), then
    score each and write its results, as ``run_one`` does for one run."""
    from ..heads import train_heads

    out, todo = [], []
    with ExitStack() as stack:
        for p in points:
            run = RunDir(p.cfg.out)
            status = _claim(stack, run, sweep_dir)
            if status is None:
                todo.append(p)
            else:
                out.append({"run": run.name, "status": status})
        try:
            for p in todo:
                _start(RunDir(p.cfg.out), spec, p, pack=len(todo))
            training = [p for p in todo if not RunDir(p.cfg.out).done]
            ended = train_heads([p.cfg for p in training], log=lambda _m: None, should_stop=interrupt.requested)
            diverged = {p.cfg.out: r for p, r in zip(training, ended) if isinstance(r, Exception)}
            for p in todo:  # a head that diverged fails alone
                run = RunDir(p.cfg.out)
                out.append(_failure(run, diverged[p.cfg.out]) if p.cfg.out in diverged else
                           _finish(run, spec, p, sweep_dir))
        except KeyboardInterrupt:
            out += [{"run": RunDir(p.cfg.out).name, "status": "interrupted"} for p in todo
                    if not result_path(sweep_dir, RunDir(p.cfg.out).name).exists()]
        except Exception as exc:
            out += [_failure(RunDir(p.cfg.out), exc) for p in todo
                    if not result_path(sweep_dir, RunDir(p.cfg.out).name).exists()]
    return out
