"""Launchers (a registry): how the runs of a sweep are executed. Each declares the options it takes,
and refuses any other, so an option meant for another launcher is never silently ignored.

A launcher runs *jobs*: a job is one run, or a pack of head-only runs trained together
(``heads.py``, ``pack_heads: true``). All of them stop on request (Ctrl-C / SIGTERM): no new run
starts, running runs stop at their next step with a checkpoint, and worker processes exit; a second
Ctrl-C stops at once.
"""
from __future__ import annotations

import importlib
import os
import queue
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from embedcache import interrupt
from embedcache.config import away_from_defaults, build_config, to_dict
from embedcache.errors import ConfigError, one_line_warning
from embedcache.registry import Registry

from ..config import TrainConfig
from .worker import SweepPoint, result_path, run_job

LAUNCHERS = Registry("launcher")
STOP_STATUSES = ("interrupted", "disk_full", "store_damaged")  # after one of these, no new run starts


class Progress:
    """One-screen live summary: done, running, failed, skipped and an ETA."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self.counts: Dict[str, int] = {}
        self.total = total
        self.bar = tqdm(total=total, unit="run", desc="sweep", disable=not enabled, dynamic_ncols=True)

    def update(self, status: Dict[str, str], workers: int) -> None:
        self.counts[status["status"]] = self.counts.get(status["status"], 0) + 1
        self.bar.update(1)
        self.bar.set_postfix(**self.postfix(workers))
        if status["status"] == "failed":
            self.bar.write(f"run {status['run']} failed: {status.get('error', '')}")

    def postfix(self, workers: int) -> Dict[str, int]:
        """The counts shown: runs running (no more than the live workers, nor the runs not yet ended:
        a worker lives on a moment after its last run) and runs ended by status."""
        return {"running": max(0, min(workers, self.total - sum(self.counts.values()))), **self.counts}

    def close(self) -> None:
        self.bar.close()


SPEC_SETTINGS = ("workers", "resources")  # sweep-file settings that only some launchers read


def launcher(name: str, options: tuple = (), hooks: tuple = (), reads: tuple = ()):
    """Register a launcher function taking (jobs, spec, sweep_dir, device, progress, **its options);
    ``options`` are what a user may set (command-line flags), ``hooks`` what code may pass (tests),
    ``reads`` which of the sweep file's SPEC_SETTINGS it uses."""
    def deco(fn: Callable) -> Callable:
        fn.options, fn.hooks, fn.reads = tuple(options), tuple(hooks), tuple(reads)
        return LAUNCHERS.register(name)(fn)
    return deco


def unread_settings(name: str, spec, defaults) -> List[str]:
    """The sweep file's launcher settings (``SPEC_SETTINGS``, set away from ``defaults``) that launcher
    ``name`` would not read, as 'key=value'."""
    fn = LAUNCHERS.get(name)
    unread = away_from_defaults(spec, defaults, [k for k in SPEC_SETTINGS if k not in fn.reads])
    return [f"{k}={getattr(spec, k)!r}" for k in unread]


def check_options(name: str, given: Dict) -> None:
    fn = LAUNCHERS.get(name)
    extra = sorted(k for k, v in given.items() if v is not None and k not in fn.options + fn.hooks)
    if extra:
        takes = ", ".join(f"--{o}" for o in fn.options) or "no options"
        raise ConfigError(f"--{extra[0]} does not apply to the {name} launcher (it takes {takes}); "
                          f"leave it out or pick a launcher that uses it")


@launcher("serial", hooks=("on_run", "teacher"))
def serial(jobs: List[List[SweepPoint]], spec, sweep_dir, device="auto", progress=True, on_run=None, teacher=None):
    """In this process, one job after another (tests, debugging; ``teacher`` serves the
    teacher_online target provider of benchmarks)."""
    bar, out = Progress(sum(map(len, jobs)), progress), []
    try:
        for job in jobs:
            for st in run_job(job, spec, sweep_dir, device, teacher=teacher):
                out.append(st)
                bar.update(st, 0)
                if on_run is not None:
                    on_run(st)
            if any(st["status"] in STOP_STATUSES for st in out) or interrupt.requested():
                break
    finally:
        bar.close()
    return out


def _points(items) -> List[SweepPoint]:
    return [SweepPoint(build_config(TrainConfig, cfg), replicate) for cfg, replicate in items]


def _as_items(job: List[SweepPoint]) -> list:
    return [(to_dict(p.cfg), p.replicate) for p in job]


# --- local: a pool of worker processes ------------------------------------------------------------------
RUN_MODULES = ("timm", "..train", "..heads")  # what a worker's runs import (the last two: of this package)


def _worker_main(tasks, results, spec_dict: Dict, sweep_dir: str, device: str, threads: int, sharers: int = 1,
                 ready=None) -> None:
    """A spawned worker: takes runs until told to stop; a signal only sets the stop flag, so the
    run in progress saves a checkpoint at its next step and the worker leaves cleanly. ``sharers``:
    the workers on its device (each run's arrays then take no more than its share of the GPU). ``ready``
    (an event) is set once it has started, its runs' modules imported: before, it holds nothing to save,
    and a stop ends it at once (a stop that came as its first run imported timm waited for the import)."""
    import torch

    from . import SweepSpec
    from ..providers import SHARERS_ENV

    os.environ[SHARERS_ENV] = str(sharers)

    interrupt.stop_on_signal()
    for name in RUN_MODULES:
        try:
            importlib.import_module(name, __package__)
        except ImportError:  # each run says what it lacks (a worker that died here said "rerun": a review)
            pass
    interrupt.let_go()  # held while it started: now the stop flag's
    if ready is not None:
        ready.set()
    warnings.showwarning = one_line_warning  # its runs' warnings as the CLI says them: one line each
    _stop_when_orphaned(os.getppid())
    torch.set_num_threads(threads)
    spec = SweepSpec(**spec_dict)
    _take_runs(tasks, results, spec, sweep_dir, device)


def _take_runs(tasks, results, spec, sweep_dir: str, device: str) -> None:
    while not interrupt.requested():
        try:
            item = tasks.get(timeout=0.2)
        except queue.Empty:
            continue
        if item is None:
            return
        statuses = run_job(_points(item), spec, sweep_dir, device)
        for st in statuses:
            results.put(st)
        if any(st["status"] in STOP_STATUSES for st in statuses):
            return


def _stop_when_orphaned(parent: int, every: float = 1.0) -> None:
    """A worker whose sweep process died (kill -9) stops as on Ctrl-C: its run checkpoints at the next
    step and it takes no other (orphans went through the whole queue while a relaunch counted their
    runs as running elsewhere)."""
    def watch() -> None:
        while not interrupt.requested():
            if os.getppid() != parent:
                interrupt.request()
                return
            time.sleep(every)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _stop_workers(procs, grace: float, ready=None) -> None:
    """SIGTERM every worker (they checkpoint at their next step), wait ``grace`` seconds, then kill. A worker
    still starting (``ready``: its event not set) has nothing to save: killed at once (it took seconds of
    imports under load to see the stop, a trial)."""
    for k, p in enumerate(procs):
        if p.is_alive() and ready is not None and not ready[k].is_set():
            p.kill()
        elif p.is_alive():
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


def worker_devices(device: str, n: int) -> List[str]:
    """The device of each of ``n`` local workers: on a GPU machine workers are spread round-robin over
    the visible GPUs, so more workers than GPUs pack several small runs onto each GPU."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        return [f"cuda:{k % count}" for k in range(n)]
    return [device] * n


def device_sharers(devices: List[str]) -> List[int]:
    """For each worker, how many workers share its device (its runs' arrays take that share of a GPU)."""
    return [devices.count(d) for d in devices]


@launcher("local", options=("workers",), reads=("workers",))
def local(jobs: List[List[SweepPoint]], spec, sweep_dir, device="auto", progress=True, workers=None, grace=30.0):
    """A pool of worker processes on this machine (spawned, so no forked OpenMP state)."""
    import multiprocessing as mp

    from embedcache.config import to_dict as as_dict

    total = sum(map(len, jobs))
    n = max(1, min(workers or spec.workers, len(jobs) or 1))
    threads = max(1, (os.cpu_count() or 1) // n)
    devices = worker_devices(device, n)
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for job in jobs:
        tasks.put(_as_items(job))
    for _ in range(n):
        tasks.put(None)
    sharers = device_sharers(devices)
    ready = [ctx.Event() for _ in range(n)]
    procs = [ctx.Process(target=_worker_main, args=(tasks, results, as_dict(spec), sweep_dir, devices[k], threads,
                                                    sharers[k], ready[k]), daemon=True) for k in range(n)]
    with interrupt.held():  # a worker still importing printed its traceback at a Ctrl-C
        for p in procs:
            p.start()
    bar, out = Progress(total, progress), []
    try:
        while len(out) < total:
            if interrupt.requested():
                break
            try:
                st = results.get(timeout=0.2)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            out.append(st)
            bar.update(st, sum(p.is_alive() for p in procs))
            if st["status"] in STOP_STATUSES:
                interrupt.request()
        _stop_workers(procs, grace if interrupt.requested() else 60.0, ready)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
        _stop_workers(procs, 0.0, ready)
        raise
    finally:
        bar.close()
        while True:  # statuses of runs that ended while we were stopping
            try:
                out.append(results.get_nowait())
            except queue.Empty:
                break
        # runs no worker took are still in the task pipe; without this the queue's feeder thread,
        # blocked on a full pipe that nobody reads any more, would hold the process at exit forever
        tasks.cancel_join_thread()
        tasks.close()
    return out + ([] if interrupt.requested() else _lost_to_dead_workers(jobs, out, procs, sweep_dir))


def _lost_to_dead_workers(jobs: List[List[SweepPoint]], out: List[Dict], procs, sweep_dir: str) -> List[Dict]:
    """A worker killed from outside (the OOM killer, a segfault) sends no status for the run it held,
    and runs still queued may find no worker left: each such run is failed, so the sweep says so and
    exits 1 instead of writing a table short of them (one whose results were written before its worker
    died is done). Rerunning resumes them."""
    died = sorted({p.exitcode for p in procs if p.exitcode not in (0, None)})
    if not died:
        return []
    seen = {st["run"] for st in out}
    why = f"a worker process died (exit code {died[0]}) before this run finished; rerun the same command to resume it"
    lost = [Path(p.cfg.out).name for job in jobs for p in job if Path(p.cfg.out).name not in seen]
    return [{"run": n, "status": "done"} if result_path(sweep_dir, n).exists() else
            {"run": n, "status": "failed", "error": why} for n in lost]


# --- ray ---------------------------------------------------------------------------------------------
DEAD_WORKER = ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "ActorDiedError")  # ray.exceptions


def _ray_statuses(ray, ref, job: List[SweepPoint], sweep_dir: str) -> List[Dict]:
    """A Ray task's run statuses; a task whose worker died (killed, out of memory) fails its runs that
    have no results, as a dead local worker does, and the sweep goes on (it stopped with a traceback)."""
    try:
        return ray.get(ref)
    except Exception as exc:  # the task's own runs catch their errors: this is Ray's
        if type(exc).__name__ in DEAD_WORKER:
            why = (f"its Ray task failed ({type(exc).__name__}: a worker died or was killed) before this run finished; "
                   "rerun the same command to resume it")
        else:  # the task could not run (a folder missing on its node, an import error): its own first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            why = f"its Ray task failed ({type(exc).__name__}: {first[:300]}); see the Ray worker's log"
        names = [Path(p.cfg.out).name for p in job]
        return [{"run": n, "status": "done"} if result_path(sweep_dir, n).exists() else
                {"run": n, "status": "failed", "error": why} for n in names]


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


def _ray_task(items: list, spec_dict: Dict, sweep_dir: str, device: str, threads: int,
              cwd: Optional[str] = None, sharers: int = 1) -> List[Dict[str, str]]:
    import torch

    from . import SweepSpec
    from ..providers import SHARERS_ENV

    os.environ[SHARERS_ENV] = str(sharers)  # tasks asking a fraction of a GPU: that many share it
    if cwd:
        os.chdir(cwd)  # Ray workers start elsewhere; stores and sweep dirs may be relative paths
    torch.set_num_threads(threads)
    warnings.showwarning = one_line_warning
    return run_job(_points(items), SweepSpec(**spec_dict), sweep_dir, device)


def ray_slots(have: Dict[str, float], res: Dict[str, Any]) -> int:
    """How many tasks asking ``res`` a cluster with ``have`` runs at once (the progress bar counted every task
    queued as running: running=11 on 2 CPUs, a trial)."""
    asks = [(have.get(k, 0.0), float(res.get(r) or 0)) for k, r in (("CPU", "num_cpus"), ("GPU", "num_gpus"))]
    fits = [int(got / need + 1e-9) for got, need in asks if need > 0]  # 1.0 // 0.1 is 9
    return max(1, min(fits)) if fits else 1 << 30


def _require_fits(have: Dict[str, float], res: Dict[str, Any], address: Optional[str]) -> None:
    """A run's request more than the Ray cluster has would wait for ever, saying nothing: refused in
    one line (warned, on a cluster at an address: an autoscaling one may add the resources)."""
    asks = (("num_cpus", "CPU", res.get("num_cpus", 1)), ("num_gpus", "GPU", res.get("num_gpus", 0)),
            ("memory", "memory", res.get("memory") or 0))
    for key, name, want in asks:
        if want and want > have.get(name, 0):
            said = (f"resources.{key}={want:g} per run is more than the Ray cluster has ({name}: {have.get(name, 0):g}), "
                    "so no run would ever start; lower it, or give --address of a cluster that has it")
            if address:
                warnings.warn(said + " (an autoscaling cluster may add it; waiting)")
                return
            raise ConfigError(said)


def _require_gpus_used(have: Dict[str, float], res: Dict[str, Any], devices: List[Optional[str]]) -> None:
    """A cluster's GPUs that no run asks for: Ray shows a task that asks for none no GPU at all, so under
    ``auto`` every run trained on a CPU without a word (said), and under ``cuda`` every run failed (refused).
    ``devices``: the sweep's device, or each run's own where the sweep leaves them theirs."""
    gpus = have.get("GPU", 0)
    if res.get("num_gpus") or not gpus or all(d == "cpu" for d in devices):
        return
    cuda = sorted({str(d) for d in devices if d and str(d).startswith("cuda")})
    if cuda:
        raise ConfigError(f"device {cuda[0]} with resources.num_gpus=0: Ray shows a task that asks for no GPU none, so "
                          "every run on it would fail; set resources.num_gpus (0.25 packs 4 runs on a GPU)")
    warnings.warn(f"the Ray cluster has {gpus:g} GPU(s), but resources.num_gpus is 0: Ray shows such tasks no GPU, so "
                  "every run trains on a CPU; set resources.num_gpus (0.25 packs 4 runs on a GPU), or --device cpu "
                  "to train on CPUs on purpose")


@launcher("ray", options=("address",), reads=("resources",))
def ray_launcher(jobs: List[List[SweepPoint]], spec, sweep_dir, device="auto", progress=True, address=None):
    """The same runs as Ray tasks (per-run CPU/GPU request from ``resources``; fractional GPUs pack
    several runs on one GPU) on a cluster at ``address``, or on a local Ray instance started here
    and shut down at the end. Needs ``pip install '.[ray]'``."""
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
                     log_to_driver=False, ignore_reinit_error=True,
                     **({} if address else {"_node_ip_address": "127.0.0.1"}))
    except Exception as exc:
        raise ConfigError(f"cannot reach a Ray cluster at {address!r} ({type(exc).__name__}); check --address "
                          "(ray://host:10001 or host:6379) or leave it out for a local Ray instance") from None
    res = dict(spec.resources)
    try:
        have = ray.cluster_resources()
        _require_fits(have, res, address)
        _require_gpus_used(have, res, [device] if device is not None else sorted({p.cfg.device for j in jobs for p in j}))
    except ConfigError:
        if started:
            ray.shutdown()
        raise
    task = ray.remote(num_cpus=res.get("num_cpus", 1), num_gpus=res.get("num_gpus", 0), max_retries=0,
                      **({"memory": res["memory"]} if res.get("memory") else {}))(_ray_task)
    threads = max(1, int(res.get("num_cpus", 1)))
    gpus = float(res.get("num_gpus") or 0)
    sharers = max(1, int(1 / gpus)) if 0 < gpus < 1 else 1
    job_of = {task.remote(_as_items(job), to_dict(spec), sweep_dir, device, threads, os.getcwd(), sharers): job
              for job in jobs}
    pending = list(job_of)
    slots = ray_slots(have, res)  # tasks running at once: the rest of those pending wait in Ray's queue
    bar, out = Progress(sum(map(len, jobs)), progress), []
    try:
        while pending:
            if interrupt.requested():
                for ref in pending:
                    ray.cancel(ref, force=False)  # pending ones never start; running ones are interrupted
                deadline = time.time() + 20
                while pending and time.time() < deadline:
                    ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
                for ref in pending:
                    ray.cancel(ref, force=True)
                out += [{"run": "?", "status": "interrupted"}]
                break
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in ready:
                for st in _ray_statuses(ray, ref, job_of[ref], sweep_dir):
                    out.append(st)
                    bar.update(st, min(len(pending), slots))
                    if st["status"] in STOP_STATUSES:
                        interrupt.request()
    finally:
        bar.close()
        if started:
            ray.shutdown()
    return out
