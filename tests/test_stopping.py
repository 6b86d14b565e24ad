"""Stopping well (issues 18 and 19): a finished run keeps its result, not its resume state; a full disk
anywhere is one line, leaves no partial file and stops a sweep resumably; Ctrl-C and SIGTERM stop a
sweep on every launcher within seconds, leave no process behind, and the same command resumes to the
results an uninterrupted sweep gives."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from embedcache.cli import main
from embedcache.errors import DiskFullError
from embedcache.store import Store
from embedcache.students.config import StudentConfig, TrainConfig
from embedcache.students.train import train

from conftest import quiet

ROOT = Path(__file__).resolve().parents[1]
KEY = ["run", "protocol", "split", "domain", "metric"]


def _cfg(store, out, **kw):
    base = dict(store=str(store), recipe="feat_kd", student=StudentConfig(name="test_resnet", input_size=32), steps=8,
                batch_size=8, eval_every=4, ckpt_every=2, out=str(out), progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_a_second_train_of_the_same_folder_is_refused_while_the_first_runs(synthetic_store, tmp_path):
    """Two `train` with one --out both trained the whole run, the second taking over the first's checkpoint
    while it ran, with exit 0 and a summary timing the contended run (a trial): the second is refused in
    one line while the first holds the folder; once it is free the run trains, and its lock goes with it."""
    from embedcache.errors import TrainingError
    from embedcache.fileio import try_exclusive_lock

    run = tmp_path / "run"
    run.mkdir()
    held = try_exclusive_lock(run / ".train.lock")  # what a live `train` of the folder holds
    try:
        with pytest.raises(TrainingError, match=rf"another `embedcache train` is running in {run}; wait for it") as busy:
            train(_cfg(synthetic_store, run), log=quiet)
        assert busy.value.exit_code == 75
    finally:
        os.close(held)
    assert sorted(p.name for p in run.iterdir()) == [".train.lock"]  # nothing of the refused call
    res = train(_cfg(synthetic_store, run), log=quiet)
    assert (run / "done").exists() and not (run / ".train.lock").exists() and res.steps == 8


def test_a_stop_requested_while_scoring_stops_it_at_once(synthetic_store, tmp_path, monkeypatch):
    """Scoring has no step to checkpoint: a stop request ends it at the next batch, and a sweep
    worker reports the run interrupted with no result written (rerunning scores it)."""
    import embedcache.students.train as train_module
    from embedcache import interrupt
    from embedcache.students.scoring import score_run
    from embedcache.students.sweep.worker import SweepPoint, run_one

    def train_then_stop(*args, **kw):  # the stop arrives once training is over, while the run is scored
        out = train(*args, **kw)
        interrupt.request()
        return out

    monkeypatch.setattr(train_module, "train", train_then_stop)

    class Spec:
        protocol, finetune_steps, finetune_mode, shots, grid, base_seed = "lodo", 0, "shots", 5, {}, 0

    cfg = _cfg(synthetic_store, tmp_path / "r")
    try:
        st = run_one(SweepPoint(cfg, 0), Spec(), str(tmp_path / "sweep"))
        assert st["status"] == "interrupted" and not list((tmp_path / "sweep").rglob("*.parquet"))
        assert (tmp_path / "r" / "done").exists()  # trained; only the scoring was cut short
        with pytest.raises(KeyboardInterrupt, match="stopped while scoring a run"):
            score_run(str(tmp_path / "r"), ["lodo"], str(synthetic_store), "cpu")
    finally:
        interrupt.reset()


def _no_temp_files(folder: Path):
    return [p.name for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


def test_a_finished_run_keeps_its_result_not_its_resume_state(synthetic_store, tmp_path):
    res = train(_cfg(synthetic_store, tmp_path / "lean"), log=quiet)
    files = {p.name for p in Path(res.out).iterdir()}
    assert files == {"config.json", "split.json", "metrics.jsonl", "model.safetensors", "summary.json", "done"}
    size = sum(p.stat().st_size for p in Path(res.out).iterdir())
    weights = (Path(res.out) / "model.safetensors").stat().st_size
    assert size < weights * 1.1  # the run is its weights plus a few kilobytes of text
    kept = train(_cfg(synthetic_store, tmp_path / "kept", keep_checkpoint=True), log=quiet)
    assert (Path(kept.out) / "checkpoint.pt").exists()
    # the half checkpoint of an attempt killed mid-write (kill -9: nothing could remove it) outlived the
    # finished run, 70 to 100 MB of it (a trial)
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / ".checkpoint.pt.8d37cc52.tmp").write_bytes(b"half")
    (dead / ".model.safetensors.0badf00d.tmp").write_bytes(b"half")
    train(_cfg(synthetic_store, dead), log=quiet)
    assert not _no_temp_files(dead) and (dead / "done").exists()


def _full_after(monkeypatch, target, attr, n_ok, match=None, error=None):
    """Make ``target.attr`` raise ENOSPC (or ``error()``) after ``n_ok`` calls (whose first argument
    path contains ``match``)."""
    real = getattr(target, attr)
    calls = []

    def flaky(*args, **kwargs):
        where = str(args[1] if len(args) > 1 else kwargs.get("f", kwargs.get("filename", "")))
        if match is None or match in where:
            calls.append(where)
            if len(calls) > n_ok:
                raise error() if error else OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, flaky)
    return lambda: monkeypatch.setattr(target, attr, real)


# what torch.save and safetensors really raise on a full disk (a trial on a small tmpfs): torch's says
# nothing of the disk, so the free space left is what tells it; safetensors' is no OSError
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 97250304 vs 97250196"
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.mark.parametrize("where, real", [("checkpoint", False), ("weights", False), ("checkpoint", True),
                                         ("weights", True)])
def test_a_full_disk_in_training_is_one_line_and_resumable(synthetic_store, tmp_path, monkeypatch, where, real):
    import safetensors.torch

    import embedcache.fileio as fileio

    reference = train(_cfg(synthetic_store, tmp_path / "ref"), log=quiet)
    if real:  # the disk has no room left while the failed write's half file is there
        monkeypatch.setattr(fileio, "free_bytes", lambda folder: 4096)
    if where == "checkpoint":  # the third checkpoint finds the disk full
        free = _full_after(monkeypatch, torch, "save", 2, error=(lambda: RuntimeError(TORCH_FULL)) if real else None)
    else:
        free = _full_after(monkeypatch, safetensors.torch, "save_file", 0,
                           error=(lambda: safetensors.SafetensorError(SAFETENSORS_FULL)) if real else None)
    run = tmp_path / "full"
    with pytest.raises(DiskFullError, match=f"disk full while writing {run}(/[a-z.]+)?; .* rerun the same command to resume"):
        train(_cfg(synthetic_store, run), log=quiet)  # naming the file where the writer's own error is the one line
    assert not (run / "done").exists() and not _no_temp_files(run)
    assert (run / "checkpoint.pt").exists()  # the last good checkpoint is kept: resumable
    free()
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: 1 << 40)
    again = train(_cfg(synthetic_store, run), log=quiet)
    assert again.resumed_from == (4 if where == "checkpoint" else 8)
    a, b = load_file(f"{reference.out}/model.safetensors"), load_file(f"{again.out}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_while_caching_features_is_one_line_and_rerunnable(synthetic_store, tmp_path, monkeypatch):
    """`features` on a full disk ended in a 60-line traceback, exit 1, where train, extract and sweep say one
    line, exit 75 (a trial on a small tmpfs: zarr's attrs write raised ENOSPC)."""
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(synthetic_store, store)
    free = _full_after(monkeypatch, Store, "put_derived", 0)
    args = ["features", "--store", str(store), "--student", "test_resnet", "--set", "input_size=32", "--no-progress"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 75 and "Traceback" not in res.output, res.output
    assert f"error: disk full while writing {store}; free space on the store's disk" in res.output
    free()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "cached" in res.output, res.output


def _sweep_file(tmp_path, store, steps=6, every=1, **changes):
    spec = {"store": str(store), "protocol": "lodo", "holdout_domains": ["outline"],
            "base": {"student": {"name": "test_resnet", "input_size": 32}, "steps": steps, "batch_size": 8,
                     "eval_every": 3 * every, "ckpt_every": every, "device": "cpu"},
            "grid": {"recipe": ["feat_kd", "ce"], "seed": [0]}, "launcher": "serial"}
    spec.update(changes)
    path = tmp_path / f"sweep-{steps}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_full_disk_at_the_results_table_stops_the_sweep_resumably(synthetic_store, tmp_path, monkeypatch):
    f = _sweep_file(tmp_path, synthetic_store)
    ref = CliRunner().invoke(main, ["sweep", str(f), "--out", str(tmp_path / "ref"), "--no-progress"])
    assert ref.exit_code == 0, ref.output
    free = _full_after(monkeypatch, pd.DataFrame, "to_parquet", 0, match="results")
    out = tmp_path / "full"
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"])
    assert res.exit_code == 75, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: disk full while writing") and "0 of 2 runs finished" in last
    assert not list(out.glob("runs/*/error.txt"))  # not the run's own failure
    assert len(list(out.glob("runs/*/attempts.jsonl"))) == 1  # no new run was started after it
    assert not _no_temp_files(out)
    free()
    again = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"])
    assert again.exit_code == 0, again.output
    a = pd.read_parquet(tmp_path / "ref" / "results.parquet").sort_values(KEY).reset_index(drop=True)
    b = pd.read_parquet(out / "results.parquet").sort_values(KEY).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[KEY + ["value"]], b[KEY + ["value"]])


# --- Ctrl-C and SIGTERM ----------------------------------------------------------------------------
def _session_alive(sid: int) -> list:
    """Processes (other than zombies) whose session is ``sid``: the sweep and everything it started."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session, ...
            alive.append(int(stat.parent.name))
    return alive


def _ray_daemons() -> int:
    n = 0
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes().decode(errors="ignore")
        except OSError:
            continue
        n += ("raylet" in text or "gcs_server" in text)
    return n


# One torch thread in every process that trains (the serial launcher's own, local and Ray workers take
# one each on 2 cores): float reductions split over another number of threads may round differently,
# and the comparison is about stopping and resuming, not thread counts.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(f, out, launcher, extra=()):
    cmd = [sys.executable, "-m", "embedcache.cli", "sweep", str(f), "--out", str(out), "--no-progress",
           "--launcher", launcher, *extra]
    # a process started in the background by a non-interactive shell ignores SIGINT: restore the default
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), env=ONE_THREAD)


def _wait_for_training(out: Path, timeout=240):
    """Until a run has written its split (its training loop starts next), plus a moment."""
    end = time.time() + timeout
    while time.time() < end:
        if list(out.glob("runs/*/split.json")):
            time.sleep(0.5)
            return
        time.sleep(0.1)
    raise AssertionError("no run started training in time")


@pytest.fixture(scope="module")
def slow_sweep(synthetic_store, tmp_path_factory):
    """Runs long enough to be stopped mid-training, and their uninterrupted results."""
    tmp = tmp_path_factory.mktemp("stop")
    f = _sweep_file(tmp, synthetic_store, steps=120, every=20)  # about 2 s of training per run on 2 cores
    # the reference needs no process of its own (the serial launcher trains in the command's process): run here,
    # on one torch thread as _start's commands train (ONE_THREAD), it saves a Python and torch start-up
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = CliRunner().invoke(main, ["sweep", str(f), "--out", str(tmp / "ref"), "--no-progress", "--launcher", "serial"])
    finally:
        torch.set_num_threads(threads)
    assert ref.exit_code == 0, ref.output
    return f, pd.read_parquet(tmp / "ref" / "results.parquet").sort_values(KEY).reset_index(drop=True)


# one pytest-xdist worker takes these and the other tests that start Ray: the Ray case counts Ray's daemons
# machine-wide, and the four share slow_sweep's reference (built once per worker that runs any of them)
@pytest.mark.xdist_group("ray")
@pytest.mark.slow
@pytest.mark.parametrize("launcher,how", [("serial", "SIGINT"), ("local", "SIGINT"), ("local", "SIGTERM"),
                                          ("ray", "SIGINT")])
def test_a_stopped_sweep_exits_in_seconds_leaves_nothing_and_resumes(slow_sweep, tmp_path, launcher, how):
    if launcher == "ray":
        pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]'")
    f, ref = slow_sweep
    out = tmp_path / "sw"
    extra = ["--workers", "2"] if launcher == "local" else []
    proc = _start(f, out, launcher, extra)
    _wait_for_training(out)
    sent = time.time()
    if how == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    else:
        proc.send_signal(signal.SIGTERM)  # what a scheduler does: the sweep's own process
    text = proc.communicate(timeout=120)[0].decode()
    took = time.time() - sent
    assert proc.returncode == (130 if how == "SIGINT" else 143), text  # a scheduler reads SIGTERM's own code
    assert took < 30, f"took {took:.1f} s to stop"
    assert "interrupted:" in text and "runs finished (trained and scored); rerun the same command to resume" in text
    # no "Ctrl-C again" to a scheduler, which follows its SIGTERM with a SIGKILL
    assert ("Ctrl-C again" in text) == (how == "SIGINT") and ("terminated (SIGTERM): stopping" in text) == (how == "SIGTERM")
    deadline = time.time() + 10
    while _session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _session_alive(proc.pid), "a process of the sweep is still running"
    if launcher == "ray":
        assert _ray_daemons() == 0, "the Ray instance the sweep started is still running"
    assert not list(out.glob("runs/*/done")) or len(list(out.glob("results/*.parquet"))) < 2
    again = _start(f, out, launcher, extra)
    text = again.communicate(timeout=600)[0].decode()
    assert again.returncode == 0, text
    got = pd.read_parquet(out / "results.parquet").sort_values(KEY).reset_index(drop=True)
    pd.testing.assert_frame_equal(ref[KEY + ["value"]], got[KEY + ["value"]])


@pytest.mark.slow
def test_a_stopped_sweep_with_many_queued_runs_exits(synthetic_store, tmp_path):
    """More runs than the task pipe holds (64 KB): the runs no worker took must not hold the stopped
    sweep at exit (the queue's feeder thread blocks on the full pipe once the workers are gone)."""
    f = _sweep_file(tmp_path, synthetic_store, steps=400, every=50, launcher="local",
                    grid={"recipe": ["feat_kd", "ce"], "seed": list(range(60))})
    proc = _start(f, tmp_path / "sw", "local", ["--workers", "2"])
    _wait_for_training(tmp_path / "sw")
    os.killpg(proc.pid, signal.SIGINT)
    try:
        text = proc.communicate(timeout=60)[0].decode()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the stopped sweep did not exit within 60 s") from None
    assert proc.returncode == 130, text


def test_one_stop_request_delivered_twice_is_one_request(monkeypatch):
    """`timeout -s INT` signals the child and then its whole process group: the sweep said "stopped at
    once (second interrupt)" after one request. Two signals within ONE_REQUEST_S are one; a later
    one still stops at once."""
    from embedcache import interrupt

    clock = [100.0]
    monkeypatch.setattr(interrupt, "_clock", lambda: clock[0])
    monkeypatch.setattr(interrupt, "_last", [])  # no request before this test's
    asked = []
    with interrupt.graceful(asked.append):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same request, again
        assert interrupt.requested() and asked == [signal.SIGINT]
        clock[0] += interrupt.ONE_REQUEST_S
        with pytest.raises(KeyboardInterrupt, match="second interrupt"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs at the next bytecode boundary
    assert not interrupt.requested()


def test_a_stop_asked_inside_nested_graceful_reaches_the_outer_loop():
    """An inner ``graceful()`` (a helper that guards its own loop) cleared the flag on its exit, so the
    outer loop never saw the request and ran on."""
    from embedcache import interrupt

    with interrupt.graceful():
        with interrupt.graceful():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert interrupt.requested()
        assert interrupt.requested()  # the outer loop stops too
    assert not interrupt.requested()


def test_a_ctrl_c_delivered_twice_unwinds_without_a_traceback(monkeypatch):
    """`timeout` and the terminal both signal the process group: the second SIGINT landed in the
    DataLoader's shutdown (in its iterator's __del__) as a 20-line "Exception ignored" traceback, or in
    the exit, which then died by signal instead of exiting 130."""
    import embedcache.extract
    from embedcache import interrupt

    class Workers:  # stands in for a DataLoader iterator, which shuts its workers down when collected
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the same request, delivered again while unwinding
            time.sleep(0.1)

    def extract(cfg, **kw):
        workers = Workers()  # noqa: F841 (held by the frame the interrupt unwinds)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)

    import gc

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(repr(u.exc_value)))
    monkeypatch.setattr(interrupt, "_clock", lambda: 100.0)
    monkeypatch.setattr(interrupt, "_last", [])  # no request before this test's
    monkeypatch.setattr(embedcache.extract, "extract", extract)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        res = CliRunner().invoke(main, ["extract", "--out", "x.zarr", "--no-progress"])
        assert res.exit_code == 130, res.output
        assert res.output.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
        del res  # what the process's exit does: the frames still held go, and with them the workers
        gc.collect()
    finally:
        signal.signal(signal.SIGINT, old)
    assert unraisable == []  # "Exception ignored in: <function Workers.__del__>": a KeyboardInterrupt


def test_a_request_delivered_again_after_an_inner_context_exits_is_still_one(monkeypatch):
    """Each handler kept its own time of the first signal: the repeat landing after a nested context
    (or graceful() in the CLI) had exited stopped "at once", skipping the outer loop's save (a review)."""
    from embedcache import interrupt

    monkeypatch.setattr(interrupt, "_clock", lambda: 100.0)

    monkeypatch.setattr(interrupt, "_last", [])  # no request before this test's
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupt.one_request_per_signal()
        with interrupt.graceful():
            with interrupt.graceful():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)  # the same request again, now under the outer handler
            time.sleep(0.05)
            assert interrupt.requested()
        os.kill(os.getpid(), signal.SIGINT)  # and again under the CLI's own handler
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, old)


_TERMINATED = """
import os, signal, sys, time
from embedcache import interrupt
interrupt.one_request_per_signal()
child = os.fork()
if child == 0:  # a DataLoader worker, forked after the handler was installed (torch's loop ends on it)
    try:
        os.write(1, b"ready\\n")  # a signal before the fork's end is dropped by Python's child: wait for this
        time.sleep(30)
    except KeyboardInterrupt:
        os._exit(0)
    os._exit(1)
try:  # written inside: a signal right after the line (a loaded machine) lands in the unwinding
    os.write(1, f"{child}\\n".encode())  # one write each: print's two could interleave with the child's line
    time.sleep(30)
except KeyboardInterrupt:  # the CLI's unwinding: books written, then 128 + the signal
    sys.exit(128 + interrupt.stopped_by())
"""


def test_sigterm_unwinds_as_ctrl_c_does_once_per_request():
    """`extract` stopped by SIGTERM died by the signal, so a paid call's books missed the requests of its
    unfinished block, which Ctrl-C kept (a trial: 432 queries against a bill of 448). SIGTERM now raises
    KeyboardInterrupt as Ctrl-C does, once for the signal sent to the whole group, workers included."""
    proc = subprocess.Popen([sys.executable, "-c", _TERMINATED], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    said = {proc.stdout.readline().strip() for _ in range(2)}  # the parent's child pid, the child's "ready"
    child = int((said - {b"ready"}).pop())
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as `timeout` and schedulers do
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 143 and err.decode() == "", err.decode()
    deadline = time.time() + 10
    while Path(f"/proc/{child}").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists()


@pytest.mark.parametrize("group", [False, True])
def test_the_cli_says_why_it_ended_at_sigterm(tmp_path, tiny_clip_dir, group):
    """Through the real command: `extract` of the demo (the tiny CLIP teacher, which loads in a moment),
    SIGTERM once its call is recorded in the store, to its process or to its whole group (`timeout`,
    Slurm) with DataLoader workers: torch's workers die by a SIGTERM their parent did not send, and the
    unwinding command then failed with "DataLoader worker ... killed by signal" (exit 1, a review)."""
    out = tmp_path / "demo.zarr"
    workers = ["--set", "num_workers=2"] if group else []
    proc = subprocess.Popen([sys.executable, "-m", "embedcache.cli", "extract", "--config", "demo", "--out", str(out),
                             "--set", "teacher.name=open_clip", "--set", f"teacher.model=local-dir:{tiny_clip_dir}",
                             "--set", "dataset.per_class=40", *workers, "--no-progress"],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not any((out / "history").glob("*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the extraction ended before it could be stopped"
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    # the pipes close once every process holding them has gone, its forked workers too (seconds; once over
    # 60 s in a full suite, with the line already said)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err.decode()
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("terminated (SIGTERM): ") and last.endswith("rerun the same command to resume"), last
    with Store(str(out)) as st:  # it unwound: the call's history entry says when it ended (one killed says none)
        assert st.call_history()[-1]["ended"] is not None


def test_a_loader_worker_killed_by_the_stop_the_cli_took_is_the_stop():
    """SIGTERM to the whole group while DataLoader workers start: a worker not yet past its init took it
    by torch's handler and died, the command's own KeyboardInterrupt was dropped in an at-fork hook, and
    the DataLoader's "worker exited unexpectedly" became a traceback with exit 1 (one run in three of
    the test above)."""
    from embedcache import interrupt
    from embedcache.extract.parts import loaded

    def dying_loader():
        yield 1
        raise RuntimeError("DataLoader worker (pid(s) 20254) exited unexpectedly")

    assert list(loaded(iter([1, 2]))) == [1, 2]
    with pytest.raises(RuntimeError, match="exited unexpectedly"):  # no stop taken: the failure it is
        list(loaded(dying_loader()))
    interrupt._signalled.set()  # what the CLI's handler notes when its KeyboardInterrupt may be lost
    try:
        with pytest.raises(KeyboardInterrupt, match="rerun the same command to resume"):
            list(loaded(dying_loader()))
    finally:
        interrupt.end_of_command()


def test_a_stop_taken_while_workers_fork_is_raised_once_they_have(monkeypatch):
    """A Ctrl-C or a group's SIGTERM while DataLoader workers fork lands in an at-fork hook (logging's
    lock), in the command and in the workers, which inherit its handler: Python printed "Exception
    ignored in: <function _releaseLock>" with a traceback before the command's one line, and dropped
    the KeyboardInterrupt. Inside ``interrupt.deferred`` the handler only notes it, and raises at the end;
    a worker forked inside ends quietly at its init (torch's loop takes a KeyboardInterrupt as the end)."""
    import torch

    from embedcache import interrupt
    from embedcache.extract.parts import _init_worker

    handlers, threads = {s: signal.getsignal(s) for s in interrupt.SIGNALS}, torch.get_num_threads()
    try:
        for s in interrupt.SIGNALS:
            signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)
        monkeypatch.setattr(interrupt, "_last", [])
        monkeypatch.setattr(interrupt, "_by", [signal.SIGINT])  # this test's SIGTERM is no later command's
        interrupt.one_request_per_signal()
        inside = []
        with pytest.raises(KeyboardInterrupt):
            with interrupt.deferred("forking"):
                os.kill(os.getpid(), signal.SIGTERM)  # held, or noted by the handler: never raised in here
                time.sleep(0.05)
                inside.append("no KeyboardInterrupt inside")
        assert inside and interrupt.stopped_by() == signal.SIGTERM
        interrupt.end_of_command()
        interrupt._signalled.set()  # a worker forked inside, whose inherited handler noted the stop
        with pytest.raises(KeyboardInterrupt):  # its init ends it
            _init_worker(0)
        interrupt.end_of_command()
        _init_worker(0)  # no signal taken: the worker starts
        monkeypatch.setattr(interrupt, "_last", [])
        # a signal past its init is ignored: the command shuts its workers down. Raised in the worker, it
        # could land while the worker held the lock of the DataLoader's done event, which the worker and the
        # command then both waited on for ever (once in a full suite: the test above hung)
        assert {signal.getsignal(s) for s in interrupt.SIGNALS} == {signal.SIG_IGN}
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    finally:
        interrupt.end_of_command()
        torch.set_num_threads(threads)  # the worker's init takes one thread
        for s, h in handlers.items():
            signal.signal(s, h)


def _spawned_worker(sid: int) -> bool:
    for pid in _session_alive(sid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


@pytest.mark.slow
def test_ctrl_c_while_local_workers_start_is_one_line(synthetic_store, tmp_path):
    """Ctrl-C while the local workers were still starting (importing torch) printed each worker's
    multiprocessing traceback ending in KeyboardInterrupt before the sweep's one line (a trial)."""
    f = _sweep_file(tmp_path, synthetic_store, steps=200, every=25, launcher="local")
    proc = _start(f, tmp_path / "sw", "local", ["--workers", "2"])
    end = time.time() + 120
    while not _spawned_worker(proc.pid) and time.time() < end:
        time.sleep(0.02)
    assert not list((tmp_path / "sw").glob("runs/*/split.json")), "a run started before the workers were seen"
    os.killpg(proc.pid, signal.SIGINT)
    text = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "interrupted: 0 of" in text, text


def test_the_free_space_a_failed_write_is_judged_by_is_the_writers_own(monkeypatch):
    """As root, the blocks kept back from other users are still writable: judged by what others may use, a
    disk below its reserve called any failed write "disk full" (a review)."""
    import os
    from types import SimpleNamespace

    import embedcache.fileio as fileio

    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=0, f_bfree=1000, f_frsize=4096))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert fileio.free_bytes("/x") == 4096 * 1000
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert fileio.free_bytes("/x") == 0


def test_a_file_size_limit_is_one_line_and_resumable(tmp_path, tiny_clip_dir):
    """`ulimit -f` (common on shared machines) stopped extraction with a zarr traceback ending in
    ``OSError: [Errno 27] File too large``, exit 1; it is said as the limit it is, exit 75 as a full disk,
    and a rerun without the limit resumes."""
    import resource

    out = tmp_path / "demo.zarr"
    cmd = [sys.executable, "-m", "embedcache.cli", "extract", "--config", "demo", "--out", str(out),
           "--set", "teacher.name=open_clip", "--set", f"teacher.model=local-dir:{tiny_clip_dir}", "--no-progress"]
    limited = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (60 << 10, 60 << 10)))
    assert limited.returncode == 75, limited.stderr
    last = limited.stderr.strip().splitlines()[-1]
    assert "Traceback" not in limited.stderr and "ulimit -f" in last and last.endswith("rerun the same command to resume"), last
    again = CliRunner().invoke(main, cmd[3:])  # without the limit, in this process
    assert again.exit_code == 0, again.output
    with Store(str(out)) as st:
        assert st.complete


def test_a_stop_as_the_store_finishes_says_it_is_complete(tmp_path, tiny_teacher, monkeypatch):
    """Ctrl-C landing just after the store was marked complete said "interrupted; rerun the same command
    to resume" (a trial, 3 of 3), and the call's history entry said it had not finished the store while
    the manifest's calls said it had."""
    from embedcache.config import ExtractConfig, build_config
    from embedcache.extract import extract

    real = Store.finish

    def finish_then_stop(self, **fields):
        real(self, **fields)
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "finish", finish_then_stop)
    out = tmp_path / "s.zarr"
    cfg = build_config(ExtractConfig, {"dataset": {"name": "synthetic", "num_classes": 2, "per_class": 4, "image_size": 32},
                                       "canvas": {"size": 32}, "out": str(out), "progress": False, "num_workers": 0})
    with pytest.raises(KeyboardInterrupt, match=f"{out} is complete") as err:
        extract(cfg, teacher=tiny_teacher, log=quiet)
    assert "resume" not in str(err.value)
    with Store(str(out)) as st:
        assert st.complete and [e["finished"] for e in st.call_history()] == [True]
        assert [c["finished"] for c in st.manifest["calls"]] == [True]


def test_a_file_size_limit_leaves_an_hdf5_store_that_resumes(tmp_path, tiny_clip_dir):
    """An HDF5 write cut short by `ulimit -f` crashed the process as its file closed (exit 139, a trial),
    leaving a file HDF5 could not open again ("damaged or truncated; delete it"): the paid-for blocks were
    lost. The limit is now met before the write, as a full disk is: one line, exit 75, and a rerun resumes."""
    import resource

    out = tmp_path / "demo.h5"
    cmd = [sys.executable, "-m", "embedcache.cli", "extract", "--config", "demo", "--out", str(out), "--set", "block_rows=8",
           "--set", "canvas.size=256",
           "--set", "teacher.name=open_clip", "--set", f"teacher.model=local-dir:{tiny_clip_dir}", "--no-progress"]
    limit = 12 << 20  # past the first blocks and HDF5's reserve, short of the whole store (19 MB)
    limited = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert limited.returncode == 75, limited.stderr
    last = limited.stderr.strip().splitlines()[-1]
    assert "Traceback" not in limited.stderr and "ulimit -f" in last and last.endswith("rerun the same command to resume"), last
    with Store(str(out)) as st:
        assert 0 < st.blocks_done().sum() < st.num_blocks
    again = CliRunner().invoke(main, cmd[3:])  # without the limit, in this process
    assert again.exit_code == 0, again.output
    with Store(str(out)) as st:
        assert st.complete


def test_a_file_size_limit_at_a_checkpoint_is_said_as_the_limit_and_resumes(synthetic_store, tmp_path):
    """torch.save stopped by `ulimit -f` says "unexpected pos", no EFBIG: the run ended in a 67-line traceback,
    exit 1 (a trial). It is the limit, said as one line, exit 75, and a rerun without it resumes."""
    import resource

    cmd = [sys.executable, "-m", "embedcache.cli", "train", "--store", str(synthetic_store), "--recipe", "ce",
           "--student", "test_resnet", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run"),
           "--set", "steps=4", "--set", "batch_size=8", "--set", "eval_every=2", "--set", "ckpt_every=2",
           "--set", "student.input_size=32"]
    limited = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 10, 20 << 10)))
    assert limited.returncode == 75, limited.stderr
    last = limited.stderr.strip().splitlines()[-1]
    assert "Traceback" not in limited.stderr and last.startswith("error: a file reached the file-size limit"), last
    assert "checkpoint.pt; raise it (`ulimit -f unlimited`), then rerun the same command to resume" in last
    again = CliRunner().invoke(main, cmd[3:])  # without the limit, in this process
    assert again.exit_code == 0 and (tmp_path / "run" / "done").exists(), again.output


def test_ctrl_c_while_a_run_sets_up_is_said_at_once_and_trains_no_step(synthetic_store, tmp_path, monkeypatch):
    """Ctrl-C during train's set-up said nothing and stopped only after a whole step and a checkpoint (36 s
    under load, a trial). The request is said at once, and a run asked to stop before its first step
    trains none: a fresh one leaves no folder, a resumed one keeps its checkpoint as it was. It stops at the
    next part of the set-up (its store read, its student built, ...), not once all of it is done (a sweep's
    workers took 15 s to stop under load, a trial)."""
    import embedcache.students.train as training
    from embedcache import interrupt

    real_init = training.Trainer.__init__

    def ctrl_c_while_loading(self, *a, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # the first request: the run goes on setting up
        real_init(self, *a, **kw)

    monkeypatch.setattr(training.Trainer, "__init__", ctrl_c_while_loading)
    args = ["train", "--store", str(synthetic_store), "--recipe", "ce", "--student", "test_resnet", "--device", "cpu",
            "--no-progress", "--set", "steps=4", "--set", "ckpt_every=2", "--set", "eval_every=2",
            "--set", "student.input_size=32", "--set", "batch_size=8"]
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "fresh")])
    assert res.exit_code == 130, res.output
    assert "stopping after this step, its checkpoint saved (Ctrl-C again to stop at once)" in res.output
    assert res.output.strip().splitlines()[-1] == (f"run {tmp_path / 'fresh'} stopped as it set up (its store read); "
                                                   "nothing was trained")
    assert not (tmp_path / "fresh").exists()  # nothing trained: no folder left for nothing
    monkeypatch.setattr(training.Trainer, "__init__", real_init)
    with pytest.raises(KeyboardInterrupt):  # a run stopped at step 3, its checkpoint at step 2
        train(_cfg(synthetic_store, tmp_path / "cut", steps=4), log=quiet,
              on_step=lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3 else None)
    monkeypatch.setattr(training.Trainer, "__init__", ctrl_c_while_loading)
    interrupt.reset()  # another command's request, as in a new process
    before = (tmp_path / "cut" / "checkpoint.pt").read_bytes()
    res = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "cut" / "config.json"), "--out", str(tmp_path / "cut"),
                                    "--no-progress"])
    assert res.exit_code == 130 and "stopped as it set up (its store read); its checkpoint is kept" in res.output, \
        res.output
    assert (tmp_path / "cut" / "checkpoint.pt").read_bytes() == before


def test_a_ctrl_c_while_a_command_imports_its_libraries_is_one_line_once_they_are_in(monkeypatch, tmp_path):
    """Ctrl-C in the first second of `train` or `extract` landed inside numpy's or torch's import: numpy was left
    half-imported (a 50-line ImportError traceback, exit 1) or torch's pybind11 code aborted (exit 134) (a trial).
    The libraries are imported whole first, the stop taken meanwhile raised once they are in."""
    import sys

    import embedcache.cli._app as app
    from embedcache import interrupt

    (tmp_path / "slow_library.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C half-way through the import\n"
        "time.sleep(0.2)\n"
        "COMPLETE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_library", raising=False)
    monkeypatch.setattr(app, "LIBRARIES", ("slow_library",))
    old = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    try:
        res = CliRunner().invoke(main, ["verify", str(tmp_path / "none.zarr")])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert sys.modules["slow_library"].COMPLETE  # imported whole
    assert res.exit_code == 130 and res.output.strip() == "stopped while starting; rerun the same command to resume", \
        res.output


def test_an_ignored_sigint_stays_ignored_by_every_command(monkeypatch):
    """A job a script starts with `&` ignores SIGINT (the shell's rule): extract kept it so, while train, sweep and
    synthesize (``graceful``) put their own handler in and stopped (a trial). SIGTERM still stops them."""
    from embedcache import interrupt

    monkeypatch.setattr(interrupt, "_last", [])
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt.graceful():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert not interrupt.requested()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert interrupt.requested()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        term = signal.getsignal(signal.SIGTERM)
        try:
            interrupt.stop_on_signal()  # a sweep's worker, which inherits its sweep's ignored SIGINT
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) != term
        finally:
            signal.signal(signal.SIGTERM, term)
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_usage_error_imports_no_library_first():
    """The libraries a command needs were imported before its options were parsed: `train -h` (no such option) took
    5 s to say so (a review). They are imported once the options are read."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from embedcache.cli import main; "
            "r = CliRunner().invoke(main, ['train', '-h']); print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr


def test_a_ctrl_c_once_a_command_has_ended_leaves_its_exit_code(monkeypatch):
    """A Ctrl-C in the second or so of teardown after a sweep printed its results killed it by the signal, which a
    scheduler reads as a failed sweep (a trial). Once the command has ended, SIGINT is ignored to the exit."""
    import embedcache.cli as cli

    def finished():
        raise SystemExit(0)

    monkeypatch.setattr(cli, "_group", lambda: finished)
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as ended:
            cli.entry()
        assert ended.value.code == 0 and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
