"""Sweeps: end to end through the CLI, kill and relaunch, concurrent workers, Ray, seed stability."""
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

import embedcache
from embedcache.cli import main
from embedcache.config import replace, to_dict
from embedcache.errors import ConfigError
from embedcache.students.sweep import LAUNCHERS, expand, load_sweep, run_sweep

from conftest import quiet

ROOT = Path(__file__).resolve().parents[1]


def _sweep_file(tmp_path, store, **changes):
    spec = {"store": str(store), "protocol": "lodo",
            "base": {"student": {"name": "test_resnet", "input_size": 32}, "steps": 4, "batch_size": 8,
                     "eval_every": 2, "ckpt_every": 2, "device": "cpu"},
            "grid": {"recipe": ["feat_kd", "ce"], "seed": [0, 1]}, "launcher": "serial"}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_results_of_grid_points_taken_out_of_a_sweep_are_said_to_be_outside_its_tables(synthetic_store, tmp_path):
    """A grid trimmed between launches dropped the runs of the values taken out from the table and report without a
    word, their results still in the folder (a trial)."""
    out = tmp_path / "sw"
    both = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["feat_kd", "ce"], "seed": [0]})
    assert CliRunner().invoke(main, ["sweep", str(both), "--out", str(out), "--no-progress"]).exit_code == 0
    trimmed = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["ce"], "seed": [0]})
    res = CliRunner().invoke(main, ["sweep", str(trimmed), "--out", str(out), "--no-progress"])
    said = (f"2 run(s) of {out} with results are of grid points this sweep no longer lists, so they are not in these "
            f"tables (`embedcache evaluate {out / 'runs'}` scores every run)")
    assert res.exit_code == 0 and f"warning: {said}" in res.output, res.output
    assert set(pd.read_parquet(out / "results.parquet").recipe) == {"ce"}
    assert said in (out / "report" / "report.md").read_text()


def test_a_dry_run_checks_and_counts_a_sweep_and_writes_nothing(synthetic_store, tmp_path):
    """A grid of thousands of runs started at once, its size said only after the launch (a trial)."""
    f = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["feat_kd", "ce"], "seed": [0]})
    out = tmp_path / "sw"
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress", "--dry-run"])
    assert res.exit_code == 0 and res.output.splitlines()[-1] == (
        f"dry run: 4 runs in {out}, 0 already finished, 4 to train; nothing was trained or written"), res.output
    assert not out.exists()
    bad = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--dry-run", "--set", "grid.batch_size=[1000]"])
    assert bad.exit_code == 2 and "batch_size=1000 is more than" in bad.output  # checked as a launch checks it
    assert CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"]).exit_code == 0
    more = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["feat_kd", "ce"], "seed": [0, 1]})
    res = CliRunner().invoke(main, ["sweep", str(more), "--out", str(out), "--no-progress", "--dry-run"])
    assert res.output.splitlines()[-1].startswith("dry run: 8 runs") and "4 already finished, 4 to train" in res.output
    assert len(list((out / "runs").iterdir())) == 4
    # a folder of another store's runs: refused as the launch refuses it (a review: it said "0 to train")
    first = json.loads((out / "store.json").read_text())
    (out / "store.json").write_text(json.dumps({**first, "store_key": "0" * 16}))
    res = CliRunner().invoke(main, ["sweep", str(more), "--out", str(out), "--no-progress", "--dry-run"])
    assert res.exit_code == 2 and "holds the runs of store" in res.output, res.output


def test_a_dry_run_beside_a_running_launch_says_so_and_is_held_to_its_settings(synthetic_store, tmp_path):
    """A dry run did not look for a launch running into the folder: it said "4 to train" of runs that launch was
    training, and passed settings the launch would have refused while no run of it had finished yet."""
    from embedcache.students.sweep import _settle, expand, load_sweep
    from embedcache.students.sweep.claim import Launch

    f = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["feat_kd", "ce"], "seed": [0]})
    out = tmp_path / "sw"
    out.mkdir()
    dry = ["sweep", str(f), "--out", str(out), "--no-progress", "--dry-run"]
    spec = load_sweep(str(f))
    with Launch(out) as launch:  # a launch past its checks, training: what `embedcache sweep` holds while it runs
        _settle(spec, str(out), expand(spec, str(out)), launch.others_live)
        launch.settle()
        res = CliRunner().invoke(main, dry)
        assert res.exit_code == 0 and res.output.splitlines()[-1] == (
            f"dry run: 4 runs in {out}, 0 already finished, 4 to train, by this launch and the one running into "
            f"{out} now; nothing was trained or written"), res.output
        changed = CliRunner().invoke(main, dry + ["--set", "base.steps=6"])
        assert changed.exit_code == 2 and f"another launch of sweep {out} is running with other settings" in \
            changed.output, changed.output
    res = CliRunner().invoke(main, dry + ["--set", "base.steps=6"])  # that launch ended with nothing finished
    assert res.exit_code == 0 and res.output.splitlines()[-1].endswith("4 to train; nothing was trained or written")


def test_a_dry_runs_look_for_a_launch_never_waits_on_the_gate_and_finds_one_without_it(tmp_path):
    """The look waited on the launch gate with no limit (a launch stopped with Ctrl-Z held a dry run for good), and
    said no launch was running once .launch.lock was deleted under a live one (a review)."""
    import time

    from embedcache.students.sweep.claim import GATE_WAIT_S, Launch, launch_running

    assert not launch_running(tmp_path)  # no launch ever came
    launch = Launch(tmp_path).__enter__()  # holds the gate, as a launch deciding its settings does
    began = time.monotonic()
    assert launch_running(tmp_path) and time.monotonic() - began < GATE_WAIT_S + 2
    launch.settle()
    assert launch_running(tmp_path)  # past its settings, training
    (tmp_path / ".launch.lock").unlink()
    assert launch_running(tmp_path)
    launch.__exit__(None, None, None)
    assert not launch_running(tmp_path)


@pytest.mark.parametrize("launcher", ["serial", "local"])
def test_a_store_damaged_inside_a_chunk_stops_the_sweep_in_one_line_and_it_resumes_once_mended(synthetic_store, tmp_path,
                                                                                                launcher):
    """Damage found as runs read the store (a flipped byte in an embedding chunk): every run failed on it, each with
    a traceback in its error.txt, and the sweep ended "some runs failed", exit 1 (a trial). It stops at the first,
    in one line naming the damage and the fix, exit 2; mended, the same command finishes the sweep."""
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(synthetic_store, store)
    chunk = sorted(p for p in (store / "image" / "emb").rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    good = chunk.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    f = _sweep_file(tmp_path, store, grid={"recipe": ["feat_kd", "ce"], "seed": [0]}, launcher=launcher)
    out = tmp_path / "sw"
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"])
    last = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2 and last.startswith("error: ") and "embedcache verify" in last, res.output
    assert "(the sweep stopped at the first run that met it: 0 of 4 runs finished, the rest resume once it is " \
        "mended)" in last, last
    assert not list(out.glob("runs/*/error.txt"))  # no run's own failure
    chunk.write_bytes(good)
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0 and "4 runs: 4 done now" in res.output, res.output


def test_runs_scored_before_weights_were_recorded_stay_one_method_with_later_ones(synthetic_store, tmp_path):
    """Runs from a student.pretrained file scored before runs recorded its hash carry a settings digest without it;
    a relaunch adding a seed made the new run a method of its own (a review)."""
    import torch
    from safetensors.torch import save_file

    from embedcache.students.models import StudentConfig, build_student
    from embedcache.students.rundir import RunDir
    from embedcache.students.identity import settings_digest

    torch.manual_seed(1)
    weights = tmp_path / "w.safetensors"
    own = build_student(StudentConfig(name="test_resnet"), 32).backbone.state_dict()
    save_file({k: v.contiguous() for k, v in own.items()}, str(weights))
    base = {"student": {"name": "test_resnet", "input_size": 32, "pretrained": str(weights)}, "steps": 4,
            "batch_size": 8, "eval_every": 2, "ckpt_every": 2, "device": "cpu"}
    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], base=base, grid={"recipe": ["ce"], "seed": [0]})
    out = tmp_path / "sw"
    assert CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"]).exit_code == 0
    (run,) = list((out / "runs").iterdir())  # made and scored as a version before the record did
    config = json.loads((run / "config.json").read_text())
    config.pop("student_weights")
    (run / "config.json").write_text(json.dumps(config))
    rows = pd.read_parquet(out / "results" / f"{run.name}.parquet")
    rows["settings"] = settings_digest(RunDir(run).train_config, config.get("recipe_definition"))
    rows.to_parquet(out / "results" / f"{run.name}.parquet")
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress", "--set", "grid.seed=[0,1]"])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out / "results.parquet")
    assert df.run.nunique() == 2 and df.settings.nunique() == 1


def _attempts(sweep_dir):
    return {p.parent.name: len(p.read_text().splitlines()) for p in Path(sweep_dir).glob("runs/*/attempts.jsonl")}


def test_tiny_sweep_end_to_end(synthetic_store, tmp_path):
    f = _sweep_file(tmp_path, synthetic_store)
    out = tmp_path / "sw"
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "8 runs: 8 done now" in res.output  # 2 recipes x 2 seeds x 2 held-out domains
    assert res.output.splitlines()[-1] == f"results: {out}/results.parquet; report: {out}/report/report.md"
    df = pd.read_parquet(out / "results.parquet")
    assert df.run.nunique() == 8 and set(df.holdout) == {"outline", "solid"} and set(df.replicate) == {0, 1}
    ood = df[(df.split == "out_of_domain") & (df.metric == "top1")]
    cells = ood.groupby(["recipe", "domain"]).size()
    assert {(r, d) for r in ("ce", "feat_kd") for d in ("outline", "solid", "avg")} <= set(cells.index)
    from embedcache.evaluate.store_eval import summary_table

    # the avg cell: each replicate's mean over held-out domains, then mean ± std over replicates
    ce = df[(df.split == "out_of_domain") & (df.metric == "top1") & (df.domain != "avg") & (df.recipe == "ce")]
    per_rep = ce.groupby("replicate").value.mean()
    cell = summary_table(df, "out_of_domain").loc[("ce", "test_resnet", "name", "-", "out_of_domain"), "avg"]
    assert cell == f"{100 * per_rep.mean():.1f} ± {100 * per_rep.std():.1f}"
    report = (out / "report" / "report.md").read_text()
    for word in ("ce", "feat_kd", "outline", "solid", "avg", "±"):
        assert word in report
    assert "| ce |" in res.output and "| feat_kd |" in res.output  # the table printed at the end
    again = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"])
    assert again.exit_code == 0 and "8 already done" in again.output
    assert set(_attempts(out).values()) == {1}
    damaged = sorted((out / "results").glob("*.parquet"))[0]
    damaged.write_bytes(b"PAR1 not a table")  # a run's results damaged: one line, and the way back
    seen = CliRunner().invoke(main, ["report", str(out)])
    assert seen.exit_code == 2 and f"{damaged} is damaged" in seen.output and "delete it and relaunch" in seen.output, \
        seen.output
    damaged.unlink()
    again = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"])
    assert again.exit_code == 0 and "7 already done" in again.output, again.output
    assert pd.read_parquet(out / "results.parquet").run.nunique() == 8
    assert set(_attempts(out).values()) == {1}  # scored again, not trained: no retry recorded (a trial)
    report, relaunch = ["report", str(out)], ["sweep", str(f), "--out", str(out), "--no-progress"]
    for name, damage, readers in (("runs.json", b"[\"cut", (report, relaunch)), ("tags.json", b"[]", (report,)),
                                  ("runs_ever.json", b"\xff", (report, relaunch)),
                                  ("store.json", b"{\"store\": 1}", (relaunch,))):  # the folder's records, damaged
        (out / name).write_bytes(damage)
        for args in readers:
            seen = CliRunner().invoke(main, args)
            said = seen.output.strip().splitlines()
            assert seen.exit_code == 2 and len(said) == 1 and f"{out / name} is damaged" in said[0], (name, seen.output)
            assert "delete it: the sweep's next launch writes it again" in said[0]
        if relaunch in readers:
            (out / name).unlink()
        again = CliRunner().invoke(main, relaunch)  # tags.json: a launch writes its grid's before reading them
        assert again.exit_code == 0 and "8 already done" in again.output, again.output
        assert CliRunner().invoke(main, report).exit_code == 0
    assert set(_attempts(out).values()) == {1}


def test_killed_sweep_completes_each_run_exactly_once(synthetic_store, tmp_path, monkeypatch):
    spec = load_sweep(str(_sweep_file(tmp_path, synthetic_store)))
    out = str(tmp_path / "kill")
    seen = []

    def stop(status):
        seen.append(status)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, progress=False, log=lambda m: None, on_run=stop)
    assert len(list(Path(out).glob("results/*.parquet"))) == 3
    res = run_sweep(spec, out, progress=False, log=lambda m: None)
    assert res["skipped"] == 3 and res["done"] == 5
    assert len(_attempts(out)) == 8 and set(_attempts(out).values()) == {1}
    # the teacher's rows and the runs' per_class rows scored into the sweep's results.parquet outlive a
    # relaunch with nothing to run (it erased them)
    for args in (["--store", str(synthetic_store)], [f"{out}/runs", "--protocol", "per_class"]):
        scored = CliRunner().invoke(main, ["evaluate", *args, "--out", f"{out}/results.parquet"])
        assert scored.exit_code == 0, scored.output
    n = len(pd.read_parquet(f"{out}/results.parquet"))

    def no_workers(*a, **k):  # a relaunch with nothing to run started workers that each said "running"
        raise AssertionError("the launcher was started with every run finished")

    real = LAUNCHERS.get(spec.launcher)
    no_workers.options, no_workers.hooks, no_workers.reads = real.options, real.hooks, real.reads
    monkeypatch.setitem(LAUNCHERS._items, spec.launcher, no_workers)
    assert run_sweep(spec, out, progress=False, log=lambda m: None)["skipped"] == 8
    again = pd.read_parquet(f"{out}/results.parquet")
    assert len(again) == n and (again["recipe"] == "teacher").any() and (again["split"] == "per_class").any()


def test_two_workers_on_one_sweep_lose_nothing_and_duplicate_nothing(synthetic_store, tmp_path):
    f = _sweep_file(tmp_path, synthetic_store)
    out = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "embedcache.cli", "sweep", str(f), "--out", str(out), "--no-progress"]
    procs = [subprocess.Popen(cmd + ["--launcher", "local", "--workers", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
             subprocess.Popen(cmd + ["--launcher", "serial"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    said = [line for line in outs[0].splitlines() if "warning" in line.lower()]  # the workers' runs' warnings:
    # one line each, not Python's warning text (and the closing table's notes: collapses, and a table partial
    # while the other launch still trains its last runs)
    assert all(line.startswith(("warning: run ", "warning: collapsed: ", "warning: partial: ")) for line in said), said
    assert "UserWarning" not in outs[0] and "warnings.warn" not in outs[0], outs[0]
    att = _attempts(out)
    assert len(att) == 8 and set(att.values()) == {1}, att  # nobody ran a run twice
    assert len(list(out.glob("results/*.parquet"))) == 8  # and no result was lost


def test_an_empty_grid_runs_the_base_settings_alone_once_per_held_out_domain(synthetic_store, tmp_path):
    """As the README says of `grid: {}` (a review found it unsaid)."""
    spec = load_sweep(str(_sweep_file(tmp_path, synthetic_store, grid={}, base={"recipe": "ce", "steps": 4, "batch_size": 8,
                                                                               "eval_every": 2, "device": "cpu",
                                                                               "student": {"name": "test_resnet", "input_size": 32}})))
    points = expand(spec, str(tmp_path / "x"))
    with embedcache.open_store(str(synthetic_store)) as s:
        domains = sorted(s.domains)
    assert sorted(tuple(p.cfg.split.holdout_domains) for p in points) == [(d,) for d in domains] and len(domains) == 2
    assert {(p.cfg.recipe, p.cfg.steps) for p in points} == {("ce", 4)}


def test_seeds_and_names_are_stable_when_a_variant_is_added(synthetic_store, tmp_path):
    a = load_sweep(str(_sweep_file(tmp_path, synthetic_store)))
    b = load_sweep(str(_sweep_file(tmp_path, synthetic_store, grid={"recipe": ["feat_kd", "li_iccv23", "ce"], "seed": [0, 1]})))
    ra = {Path(p.cfg.out).name: p.cfg.seed for p in expand(a, str(tmp_path / "x"))}
    rb = {Path(p.cfg.out).name: p.cfg.seed for p in expand(b, str(tmp_path / "x"))}
    assert len(rb) == 12 and all(rb[n] == s for n, s in ra.items())
    assert len(set(ra.values())) == 8  # replicates and held-out domains get distinct seeds
    c = load_sweep(str(_sweep_file(tmp_path, synthetic_store, base_seed=1)))
    assert not set(Path(x.cfg.out).name for x in expand(c, str(tmp_path / "x"))) & set(ra)
    assert sorted(p.replicate for p in expand(a, str(tmp_path / "x"))) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_failed_run_is_recorded_and_the_others_finish(synthetic_store, tmp_path):
    f = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["feat_kd"], "student.name": ["test_resnet", "timm:no_such_net"]})
    out = tmp_path / "fail"
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"])
    assert res.exit_code == 1 and "2 done now" in res.output and "2 failed" in res.output
    errors = list(out.glob("runs/*/error.txt"))
    assert len(errors) == 2 and "no_such_net" in errors[0].read_text()
    assert f"(its error in {errors[0]})" in res.output or f"(its error in {errors[1]})" in res.output  # a path from here
    # the error is said once, as the run fails; the closing list names the run and its traceback (each was
    # said twice, 16 long lines for 8 failures: a trial)
    closing = [ln for ln in res.output.splitlines() if ln.startswith("failed: ")]
    assert len(closing) == 2 and all(ln.endswith("error.txt)") and "(its error in " in ln for ln in closing), closing
    assert "no run of feat_kd / timm:no_such_net has results: it is not in the tables" in res.output, res.output
    # the base's student is the grid's to set: said (a base recipe the grid also set was dropped unsaid: a trial)
    assert "note: the grid sets student.name in every run, so base.student.name='test_resnet' is not used" in res.output
    assert "no run of feat_kd / timm:no_such_net" in (out / "report" / "report.md").read_text()


def test_bad_sweep_files_are_rejected_before_any_run(synthetic_store, tmp_path, make_cfg, tiny_teacher):
    with pytest.raises(ConfigError, match="unknown config key gird; valid keys under the top level: base, base_seed"):
        load_sweep(str(_sweep_file(tmp_path, synthetic_store, gird={})))
    cases = [({"grid": {"recipe": ["nope"]}}, "recipe='nope' is not valid: choose one of ce"),
             ({"grid": {"student.name": ["resnet9"]}}, "student.name='resnet9' is not valid: choose one of"),
             ({"grid": {"optim.lrr": [1.0]}}, "unknown config key grid.optim.lrr; valid keys under grid.optim: gamma, lr"),
             ({"grid": {"optim.name": ["adamz"]}}, "optim.name='adamz' is not valid: choose one of adam, adamw, sgd"),
             ({"grid": {"optim.schedule": ["linear"]}}, "optim.schedule='linear' is not valid"),
             ({"grid": {"averaging": ["ema"]}}, "averaging='ema' is not valid: choose one of none, swa, swad"),
             ({"grid": {"steps": [10, -5]}}, "steps=-5 is not valid: must be at least 1"),
             ({"grid": {"optim.lr": [-1]}}, "optim.lr=-1.0 is not valid: must be at least 0"),
             ({"grid": {"optim.lr": [0]}}, "optim.lr=0 trains nothing"),
             ({"base": {"batch_size": "abc"}}, "batch_size='abc' is not valid: expected an integer"),
             ({"grid": {"text_source": ["colours"]}}, "text_source='colours' is not valid: choose one of attributes"),
             ({"protocol": "zero_shot"}, "protocol='zero_shot' is not valid: choose one of lodo"),
             ({"launcher": "slurm"}, "launcher='slurm' is not valid: choose one of local, ray, serial"),
             ({"grid": {"views_used": [2, 4]}}, r"sweep run \(views_used=4\): views_used=4 but store .* holds 3 views"),
             ({"grid": {"loss_weights": [{"cos": 1}]}}, r"grid entry 'loss_weights' lists mappings; grid over their "
                                                         r"entries instead \(loss_weights.<key>: \[values\]\)"),
             ({"holdout_domains": []}, r"holdout_domains=\[\] holds no domain out"),  # was: every domain
             ({"grid": {"optim.warmup_steps": [0, 9]}}, r"sweep run \(optim.warmup_steps=9\): optim.warmup_steps=9 "
                                                        r"but the run has 4 steps"),
             ({"holdout_domains": ["solid", "solid"]}, r"holdout_domains=\['solid', 'solid'\] names a domain twice"),
             # the sweep sets each run's split: a base one was silently overridden
             ({"base": {"split": {"holdout_domains": ["solid"]}}}, r"split.holdout_domains in a sweep's base, "
                                                                  r"per_recipe or grid is set by the sweep itself"),
             # in the grid it silently replaced the sweep's own holdout_domains (a trial)
             ({"grid": {"split.holdout_domains": [["outline"]]}}, r"split.holdout_domains in a sweep's base, "
                                                                  r"per_recipe or grid is set by the sweep itself"),
             ({"resources": {"gpus": 0.5}}, r"resources.gpus is not a per-run request; use num_cpus, num_gpus, memory"),
             ({"resources": {"num_gpus": "half"}}, r"resources.num_gpus='half' is not valid: expected a number >= 0"),
             # each of these was a traceback (a trial): numpy's on a negative seed, Ray's on nan, an
             # AttributeError on a bare number, os.fspath's TypeError on a null store
             ({"resources": {"num_cpus": float("nan")}}, r"resources.num_cpus=nan is not valid: expected a number >= 0"),
             ({"split_seed": -1, "protocol": "open_vocab"}, r"split_seed=-1 is not valid: must be at least 0"),
             ({"base_seed": -1}, r"base_seed=-1 is not valid: must be at least 0"),
             ({"per_recipe": {"feat_kd": 5}}, r"per_recipe.feat_kd=5 is not valid: expected a mapping of the settings"),
             ({"transfer": [None]}, r"transfer\[0\]=null is not valid: expected a string"),
             # the base's store was overridden without a word; a grid over it said "the grid repeats a value"
             ({"base": {"store": "/elsewhere.zarr"}}, r"store in a sweep's base, per_recipe or grid is set by the sweep"),
             ({"grid": {"out": ["a", "b"]}}, r"out in a sweep's base, per_recipe or grid is set by the sweep itself"),
             ({"holdout_domains": "solid"}, r"holdout_domains='solid' is not valid: expected a list of strings")]
    for change, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            expand(load_sweep(str(_sweep_file(tmp_path, synthetic_store, **change))), str(tmp_path / "none"))
        assert not (tmp_path / "none").exists()
    # `--set grid.optim.lr=[...]` nests the key: it is the dotted grid entry optim.lr
    nested = load_sweep(str(_sweep_file(tmp_path, synthetic_store)), ["grid.optim.lr=[0.01, 0.001]"])
    assert nested.grid["optim.lr"] == [0.01, 0.001] and "optim" not in nested.grid
    # the split setting a protocol does not set stays the sweep's to give (a lodo sweep holding classes out)
    lodo_ov = {"base": {"split": {"train_classes": ["circle", "square"]}, "batch_size": 8}}
    points = expand(load_sweep(str(_sweep_file(tmp_path, synthetic_store, **lodo_ov))), str(tmp_path / "none"))
    assert all(p.cfg.split.train_classes == ("circle", "square") for p in points)
    with pytest.raises(ConfigError, match=r"split.train_classes in a sweep's base, per_recipe or grid is set by the sweep"):
        load_sweep(str(_sweep_file(tmp_path, synthetic_store, protocol="open_vocab", **lodo_ov)))
    from embedcache.extract import extract

    def boom(block):
        raise KeyboardInterrupt

    part = make_cfg("part.zarr")
    with pytest.raises(KeyboardInterrupt):
        extract(part, teacher=tiny_teacher, on_block_done=boom, log=lambda m: None)
    with pytest.raises(Exception, match="incomplete"):
        expand(load_sweep(str(_sweep_file(tmp_path, part.out))), str(tmp_path / "none"))
    # a device this machine lacks: one line before any run (each run had started and failed on it)
    spec = load_sweep(str(_sweep_file(tmp_path, synthetic_store)))
    bad = [("nosuch", r"unknown device 'nosuch'; use auto, cpu, cuda or cuda:N")]
    if not torch.cuda.is_available():
        bad.append(("cuda", r"device 'cuda' asked for, but no CUDA device is visible; set it to auto or cpu \(--device cpu\)"))
    for device, msg in bad:
        for launcher in ("local", "serial"):
            with pytest.raises(ConfigError, match=msg):
                run_sweep(spec, str(tmp_path / "dev"), launcher, device=device, progress=False, log=quiet)
            assert not (tmp_path / "dev").exists()


def test_unreachable_ray_address_is_one_line(synthetic_store, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]'")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    f = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["feat_kd"]})
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(tmp_path / "r"), "--launcher", "ray",
                                    "--address", f"127.0.0.1:{port}", "--no-progress"])
    assert res.exit_code == 2 and "cannot reach a Ray cluster at '127.0.0.1:" in res.output


@pytest.mark.xdist_group("ray")  # Ray instances one at a time (test_stopping counts their daemons)
def test_a_run_asking_ray_for_more_than_it_has_is_refused(synthetic_store, tmp_path):
    """resources.num_gpus=1 on a machine without a GPU: Ray started and no run ever did, with no word
    (a trial). Refused in one line, and the Ray instance the launch started is shut down."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]'")
    from embedcache.students.sweep.launchers import _require_fits

    f = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["feat_kd"]}, resources={"num_cpus": 1, "num_gpus": 1})
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(tmp_path / "r"), "--launcher", "ray", "--no-progress"])
    assert res.exit_code == 2 and "resources.num_gpus=1 per run is more than the Ray cluster has (GPU: 0)" in res.output
    assert not list((tmp_path / "r").glob("runs/*/attempts.jsonl"))
    assert not ray.is_initialized()  # the instance this launch started went with it
    _require_fits({"CPU": 2.0, "GPU": 1.0}, {"num_cpus": 1, "num_gpus": 0.5}, None)  # fits: nothing said
    with pytest.warns(UserWarning, match="an autoscaling cluster may add it"):
        _require_fits({"CPU": 2.0}, {"num_cpus": 64}, "ray://head:10001")


def test_a_ray_cluster_s_gpus_that_no_run_asks_for_are_said():
    """resources.num_gpus defaults to 0, and Ray hides every GPU from such a task: on a GPU cluster each
    run trained on its CPU without a word (a review), and with device cuda each failed."""
    from embedcache.students.sweep.launchers import _require_gpus_used

    have = {"CPU": 16.0, "GPU": 2.0}
    with pytest.warns(UserWarning, match=r"the Ray cluster has 2 GPU\(s\), but resources.num_gpus is 0: Ray shows "
                                         r"such tasks no GPU, so every run trains on a CPU; set resources.num_gpus"):
        _require_gpus_used(have, {"num_cpus": 1, "num_gpus": 0}, ["auto"])
    with pytest.raises(ConfigError, match=r"device cuda:1 with resources.num_gpus=0"):
        _require_gpus_used(have, {"num_cpus": 1}, ["cuda:1"])
    with pytest.raises(ConfigError, match=r"device cuda with resources.num_gpus=0"):  # runs of their own devices
        _require_gpus_used(have, {"num_cpus": 1}, ["cpu", "cuda"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _require_gpus_used(have, {"num_gpus": 0.25}, ["auto"])  # asked for: nothing said
        _require_gpus_used(have, {"num_gpus": 0}, ["cpu"])  # CPUs on purpose
        _require_gpus_used({"CPU": 4.0}, {"num_gpus": 0}, ["auto"])  # no GPU to use


@pytest.mark.xdist_group("ray")  # Ray instances one at a time (test_stopping counts their daemons)
def test_ray_packs_runs_on_a_gpu_by_fractional_requests_runs_each_once_and_matches_serial(synthetic_store, tmp_path,
                                                                                          monkeypatch):
    """resources.num_gpus=0.5: each run asks Ray for half a GPU, so two share one (a node declaring one
    GPU here; the runs themselves on the CPU); every run is attempted exactly once, and the results are
    the serial launcher's. A run asking for more GPUs than the cluster has is refused before any starts
    (resources.num_gpus=1 on a machine without a GPU: Ray started and no run ever did, with no word: a
    trial). One Ray instance for all three: each start costs seconds."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]'")
    monkeypatch.chdir(tmp_path)  # relative store and sweep paths, as in the shipped sweep files
    rel_store = os.path.relpath(synthetic_store, tmp_path)

    def spec_of(gpus):
        return load_sweep(str(_sweep_file(tmp_path, rel_store, grid={"recipe": ["feat_kd", "ce"], "seed": [0, 1]},
                                          holdout_domains=["outline"], resources={"num_cpus": 1, "num_gpus": gpus})))

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task trains: sums split over other thread counts may round otherwise
    try:
        ref = run_sweep(spec_of(0.5), "serial", "serial", progress=False, log=quiet)["results"]
    finally:
        torch.set_num_threads(threads)
    asked, remote = [], ray.remote

    def recording(*args, **kw):
        asked.append(kw)
        return remote(*args, **kw)

    monkeypatch.setattr(ray, "remote", recording)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        with pytest.raises(ConfigError, match=r"resources.num_gpus=2 per run is more than the Ray cluster has \(GPU: 1"):
            run_sweep(spec_of(2), "too_many", "ray", device="cpu", progress=False, log=quiet)
        assert not list(Path("too_many").glob("runs/*/attempts.jsonl")) and not asked
        res = run_sweep(spec_of(0.5), "sw", "ray", device="cpu", progress=False, log=quiet)
    finally:
        ray.shutdown()
    assert [a["num_gpus"] for a in asked if "num_gpus" in a] == [0.5] and res["done"] == 4, asked
    assert set(_attempts(tmp_path / "sw").values()) == {1} and len(_attempts(tmp_path / "sw")) == 4
    key = ["run", "protocol", "split", "domain", "metric"]
    a, b = ref.sort_values(key).reset_index(drop=True), res["results"].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key + ["value"]], b[key + ["value"]])
    assert set(LAUNCHERS.names()) == {"local", "ray", "serial"}


def test_per_recipe_settings_apply_to_that_recipe_only(synthetic_store, tmp_path):
    spec = load_sweep(str(_sweep_file(tmp_path, synthetic_store, per_recipe={"ce": {"steps": 9, "optim": {"lr": 0.5}}})))
    points = expand(spec, str(tmp_path / "x"))
    ce = [p.cfg for p in points if p.cfg.recipe == "ce"]
    kd = [p.cfg for p in points if p.cfg.recipe == "feat_kd"]
    assert ce and all(c.steps == 9 and c.optim.lr == 0.5 for c in ce)
    assert kd and all(c.steps == 4 and c.optim.lr == 1e-3 for c in kd)
    with pytest.raises(ConfigError, match="unknown recipe 'cee'"):
        expand(load_sweep(str(_sweep_file(tmp_path, synthetic_store, per_recipe={"cee": {"steps": 1}}))), str(tmp_path / "y"))


def test_runs_train_and_score_on_the_sweeps_device(synthetic_store, tmp_path, monkeypatch):
    """A sweep's --device (and each local worker's own GPU) reached only the scoring: its runs trained on
    their config's device (auto: every worker of a multi-GPU machine on cuda:0; a GPU where --device cpu
    was asked)."""
    import embedcache.students.scoring as scoring
    import embedcache.students.sweep as sweep
    import embedcache.students.train as train
    from embedcache.students.sweep import sweep_device

    seen = []

    def spy(device="auto", fix="--device cpu"):
        seen.append(device)
        return torch.device("cpu")

    for module in (scoring, sweep, train):
        monkeypatch.setattr(module, "resolve_device", spy)
    spec = load_sweep(str(_sweep_file(tmp_path, synthetic_store, holdout_domains=["solid"])),
                      ["grid.recipe=[ce]", "grid.seed=[0]"])
    run_sweep(spec, str(tmp_path / "sw"), "serial", device="cuda:1", progress=False, log=quiet)
    assert seen and set(seen) == {"cuda:1"}, seen  # checked, trained and scored there
    points = expand(spec, str(tmp_path / "sw"))
    assert sweep_device(None, points) == "cpu" and sweep_device("cuda", points) == "cuda"  # base.device, --device
    assert sweep_device("auto", points) == "auto"  # given: over base.device (its help said default auto, and auto
    # given was taken for not given, a trial)
    mixed = points + [type(points[0])(replace(points[0].cfg, device="cuda"), 0)]
    assert sweep_device(None, mixed) is None  # each run on its own


def test_the_progress_bar_counts_running_runs_not_live_workers(capsys):
    """running=2 showed at 18/18 done (workers live a moment after their last run), running=4 with 4
    workers and 1 run left (a trial)."""
    from embedcache.students.sweep.launchers import Progress

    bar = Progress(3, enabled=False)
    bar.update({"run": "a", "status": "done"}, workers=4)
    assert bar.postfix(4) == {"running": 2, "done": 1}
    bar.update({"run": "b", "status": "failed", "error": "x"}, workers=4)
    bar.update({"run": "c", "status": "done"}, workers=2)
    assert bar.postfix(2) == {"running": 0, "done": 2, "failed": 1}
    assert "run b failed: x" in capsys.readouterr().out  # a failed run is said as it ends


def test_ray_s_running_count_is_what_its_cluster_runs_at_once():
    """Ray's bar counted every queued task as running: running=11 with 12 runs on 2 CPUs (a trial)."""
    from embedcache.students.sweep.launchers import ray_slots

    assert ray_slots({"CPU": 2.0}, {"num_cpus": 1, "num_gpus": 0}) == 2
    assert ray_slots({"CPU": 1.0, "GPU": 1.0}, {"num_cpus": 0.1, "num_gpus": 0.25}) == 4  # 1.0 // 0.1 is 9.0, not 10
    assert ray_slots({"CPU": 16.0, "GPU": 1.0}, {"num_cpus": 1, "num_gpus": 0.5}) == 2
    assert ray_slots({"CPU": 1.0}, {"num_cpus": 2}) == 1


def test_more_local_workers_than_cores_is_a_note(monkeypatch):
    """--workers 50 on 2 cores started 4 single-thread workers (one per job) with no word (a trial)."""
    from embedcache.students.sweep import crowded_note

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert crowded_note(50, 4, "auto", 2) == ("note: 4 local workers (--workers 50, one per job) share 2 CPU cores, a "
                                              "thread each: the runs slow each other down; --workers 2 runs as many at "
                                              "once as this machine has cores for")
    assert crowded_note(3, 8, "cpu", 2).startswith("note: 3 local workers share 2 CPU cores")
    assert crowded_note(2, 8, "auto", 2) == "" and crowded_note(8, 1, "cpu", 2) == ""  # they fit
    assert crowded_note(8, 8, "cuda", 2) == ""  # on GPUs: packing runs there is the point


def test_local_workers_are_spread_round_robin_over_the_gpus(monkeypatch):
    """More local workers than GPUs pack several runs onto each GPU (issue 12); a CPU device is kept."""
    import torch

    from embedcache.students.sweep.launchers import worker_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert worker_devices("auto", 5) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert worker_devices("cpu", 3) == ["cpu"] * 3
    assert worker_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]


def test_runs_packed_on_a_gpu_keep_their_arrays_within_their_share_of_it():
    """Packed runs start together and each saw the whole GPU free: four workers each putting 0.6 of it
    under their canvases would run out of memory (a review). Each takes its share, else pinned host memory."""
    from embedcache.students.providers import fits_on_device
    from embedcache.students.sweep.launchers import device_sharers

    assert device_sharers(["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]) == [3, 2, 3, 2, 3]
    gb = 2 ** 30
    assert fits_on_device(15 * gb, 78 * gb, 80 * gb, sharers=1)  # alone: 0.6 of the free 78
    assert not fits_on_device(15 * gb, 78 * gb, 80 * gb, sharers=4)  # one of four: 0.6 of its 20
    assert fits_on_device(2 * gb, 78 * gb, 80 * gb, sharers=4)  # PACS at 256 px: on the device still
    assert not fits_on_device(2 * gb, 3 * gb, 80 * gb, sharers=1)  # and never past 0.6 of what is free


def test_a_run_keeps_its_name_when_settings_are_added():
    """A sweep started before a new setting existed must still find its finished runs: the name of a
    run at the new setting's default is the name it had before (computed with the code of 1db5533)."""
    from embedcache.config import replace
    from embedcache.students.config import StudentConfig, TrainConfig
    from embedcache.students.identity import run_name

    cfg = TrainConfig(store="s.zarr", recipe="li_iccv23", student=StudentConfig(name="resnet18"))
    assert run_name(cfg) == "li_iccv23-resnet18-56163929bb"
    assert run_name(replace(cfg, batch_per_domain=True)) != run_name(cfg)  # a set one still names its run


def test_a_few_shot_sweep_fine_tunes_in_the_mode_it_names(synthetic_store, tmp_path):
    """Li et al. mix the shots into training batches (``mixed``); a sweep can ask for it."""
    f = _sweep_file(tmp_path, synthetic_store, protocol="few_shot", finetune_steps=1, finetune_mode="mixed", shots=2,
                    grid={"recipe": ["feat_kd"], "seed": [0]})
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(tmp_path / "sw"), "--no-progress"])
    assert res.exit_code == 0, res.output
    splits = set(pd.read_parquet(tmp_path / "sw" / "results.parquet").split)
    assert {"finetune_mixed@1@2shot", "prototype@2shot"} <= splits and not {"finetune@1", "prototype"} & splits
    table = res.output.split("prototype@2shot: mean per-class accuracy")[1]  # the summary of its 2-shot rows
    assert "feat_kd" in table, res.output
    again = CliRunner().invoke(main, ["sweep", str(f), "--out", str(tmp_path / "sw"), "--no-progress", "--set",
                                      "finetune_steps=3"])
    assert again.exit_code == 2 and "finetune_steps: 1 -> 3" in again.output, again.output
    with pytest.raises(ConfigError, match="finetune_mode='mix' is not valid: choose one of shots, mixed"):
        load_sweep(str(_sweep_file(tmp_path, synthetic_store, finetune_mode="mix")))
    with pytest.raises(ConfigError, match=r"finetune_mode='mixed' sets how runs are fine-tuned, and finetune_steps=0 "
                                          r"fine-tunes none"):
        load_sweep(str(_sweep_file(tmp_path, synthetic_store, protocol="few_shot", finetune_mode="mixed")))
    with pytest.raises(ConfigError, match="finetune_mode=mixed mixes the run's own training images into each batch, and "
                                          "transfer stores hold none of them; use finetune_mode=shots"):
        load_sweep(str(_sweep_file(tmp_path, synthetic_store, protocol="few_shot", finetune_steps=1,
                                   finetune_mode="mixed", transfer=[str(synthetic_store)])))
    # few-shot settings on another protocol's sweep were ignored
    for setting in ({"finetune_steps": 5}, {"shots": 1}, {"finetune_mode": "mixed"}):
        with pytest.raises(ConfigError, match=rf"{next(iter(setting))}=.* sets few-shot scoring, which a lodo sweep "
                                              r"does not do; leave it out, or use protocol: few_shot"):
            load_sweep(str(_sweep_file(tmp_path, synthetic_store, **setting)))
    with pytest.raises(ConfigError, match=r"--set shots=5 sets few-shot scoring, which a lodo sweep does not do"):
        load_sweep(str(_sweep_file(tmp_path, synthetic_store)), ["shots=5"])  # at its default, it was accepted
    assert load_sweep(str(_sweep_file(tmp_path, synthetic_store, shots=5))).shots == 5  # a saved sweep.yaml holds it


def test_scoring_a_sweeps_runs_again_keeps_their_variant_and_replicate(synthetic_store, tmp_path):
    """`evaluate sweeps/x/runs` gives the rows the sweep gave: a grid over optim.lr keeps its variants
    apart and each run its replicate (the grid's seed), so a report's ± stays the spread over seeds."""
    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"],
                    grid={"optim.lr": [0.001, 0.01], "seed": [0, 1]}, base={
                        "recipe": "feat_kd", "student": {"name": "test_resnet", "input_size": 32}, "steps": 2,
                        "batch_size": 8, "eval_every": 2, "ckpt_every": 2, "device": "cpu"})
    out = tmp_path / "sw"
    assert CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"]).exit_code == 0
    res = CliRunner().invoke(main, ["evaluate", str(out / "runs"), "--out", str(tmp_path / "again.parquet")])
    assert res.exit_code == 0, res.output
    cols = ["run", "variant", "replicate"]
    swept = pd.read_parquet(out / "results.parquet")[cols].drop_duplicates().sort_values("run")
    again = pd.read_parquet(tmp_path / "again.parquet")[cols].drop_duplicates().sort_values("run")
    assert len(swept) == 4 and set(swept.variant) == {"optim.lr=0.001", "optim.lr=0.01"} and set(swept.replicate) == {0, 1}
    pd.testing.assert_frame_equal(swept.reset_index(drop=True), again.reset_index(drop=True))


def test_a_sweep_directory_holds_the_runs_of_one_store(synthetic_store, make_cfg, tiny_teacher, tmp_path):
    """Relaunching a sweep's --out on another store would pool both stores' runs in one table."""
    from embedcache.extract import extract

    other = make_cfg("other.zarr", "dataset.per_class=3", "dataset.seed=7")
    extract(other, teacher=tiny_teacher, log=lambda m: None)
    from embedcache import open_store

    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce"], "seed": [0]})
    out = tmp_path / "sw"
    out.mkdir()
    with open_store(str(synthetic_store)) as r:  # a folder begun before runs were named by the store's key
        began = {"store_key": r.key, "store": str(synthetic_store), "named_as": str(synthetic_store)}
    (out / "store.json").write_text(json.dumps(began))
    assert CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"]).exit_code == 0
    before = (out / "results.parquet").read_bytes()
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress", "--set", f"store={other.out}"])
    assert res.exit_code == 2 and "holds the runs of store" in res.output and "use another --out" in res.output
    assert res.output.strip().count("\n") == 0 and (out / "results.parquet").read_bytes() == before
    assert len(list((out / "runs").iterdir())) == 1
    (out / "store.json").unlink()  # a sweep made before store.json: its results name their store
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress", "--set", f"store={other.out}"])
    assert res.exit_code == 2 and "holds the runs of store (named in its results)" in res.output
    again = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"])
    assert again.exit_code == 0 and "1 already done" in again.output


def test_a_sweep_runs_seed_is_the_one_earlier_code_derived():
    """Settings added since (loss_weights, loss_args, skip_plain_view) stay out of the seed at their defaults: a sweep
    relaunched after an upgrade finds its runs (the value was computed by the code of 0951d50)."""
    from embedcache.students.config import TrainConfig
    from embedcache.students.sweep import derive_seed, seed_identity

    cfg = TrainConfig(store="stores/x.zarr", recipe="ce")
    assert derive_seed(0, seed_identity(cfg)) == 311852142
    assert derive_seed(0, seed_identity(TrainConfig(store="stores/x.zarr", recipe="ce", loss_weights={"ce": 2.0}))) != 311852142
    assert derive_seed(0, seed_identity(TrainConfig(store="stores/x.zarr", recipe="ce", skip_plain_view=True))) != 311852142


def test_a_bad_setting_of_the_demo_sweep_is_refused_before_its_store_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["sweep", "--set", "finetune_mode=mix", "--no-progress"])
    assert res.exit_code == 2 and "finetune_mode='mix' is not valid" in res.output
    assert not (tmp_path / "stores").exists()


def test_a_relaunch_with_other_settings_is_refused_and_the_table_holds_the_current_grid(synthetic_store, tmp_path):
    """A sweep folder's table is its current grid: relaunched with other base settings it pooled the
    old and new runs as if they were replicates; with a seed dropped it kept the dropped seed's rows."""
    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce"], "seed": [0, 1]})
    out = tmp_path / "sw"
    assert CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"]).exit_code == 0
    # the grid's seed is the replicate; each run trains with a seed derived from it, named run_seed (a
    # column "seed" holding it was the one a user grouped replicates by, with a spread 6x too large)
    first = pd.read_parquet(out / "results.parquet")
    assert set(first.replicate) == {0, 1} and "seed" not in first.columns
    seeds = {json.loads(p.read_text())["seed"] for p in out.glob("runs/*/config.json")}
    assert set(first.run_seed) == seeds and len(seeds) == 2 and not seeds & {0, 1}
    for change in ("base.steps=6", "per_recipe.ce.steps=5", "base_seed=3"):
        res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress", "--set", change])
        assert res.exit_code == 2 and "was launched with other settings" in res.output, res.output
        assert change.split("=")[0] in res.output and "use another --out" in res.output
        assert res.output.strip().count("\n") == 0
    assert len(list((out / "runs").iterdir())) == 2
    # a base setting written out at its default is the same sweep; another value is said against that default
    same = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress", "--set", "base.optim.lr=0.001"])
    assert same.exit_code == 0 and "2 already done" in same.output, same.output
    other = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress", "--set", "base.optim.lr=0.002"])
    assert other.exit_code == 2 and "base.optim.lr: 0.001 -> 0.002" in other.output, other.output
    # settings that change no run: the device, keeping checkpoints (a trial: each refused the relaunch)
    for idle in ("base.device=auto", "base.keep_checkpoint=true", "base.seed=5"):  # (the grid sets seed: unused)
        res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress", "--set", idle])
        assert res.exit_code == 0 and "2 already done" in res.output, (idle, res.output)
    fewer = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress", "--set", "grid.seed=[1]",
                                      "--set", "launcher=local", "--set", "workers=2"])
    assert fewer.exit_code == 0 and "1 already done" in fewer.output, fewer.output
    assert set(pd.read_parquet(out / "results.parquet").replicate) == {1}
    rep = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "rep")])
    cells = [ln for ln in (tmp_path / "rep" / "report.md").read_text().splitlines() if not ln.startswith("#")]
    assert rep.exit_code == 0 and not any("± " in ln for ln in cells)  # one replicate: no spread


def test_finished_runs_of_an_earlier_recipe_definition_are_not_pooled_with_new_ones(synthetic_store, tmp_path):
    """Relaunched after the package redefined a recipe, a sweep kept its finished runs' results and
    trained the rest under the new definition, one table pooling both: refused, naming the change."""
    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce"], "seed": [0, 1]})
    out = tmp_path / "sw"
    assert CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"]).exit_code == 0
    cfg = next((out / "runs").iterdir()) / "config.json"
    d = json.loads(cfg.read_text())
    d["recipe_definition"]["stages"][0]["args"]["ce"]["temperature"] = 0.5
    cfg.write_text(json.dumps(d))
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
    assert ("1 run(s)" in res.output and "another definition of recipe ce (stage1.args.ce.temperature: "
            "0.5 -> 1.0)" in res.output and "another --out" in res.output), res.output


def test_how_the_store_is_spelled_changes_no_run(synthetic_store, tmp_path, monkeypatch):
    """The same store named by another path (relative, absolute, a copy) is the same sweep: its runs
    were named and seeded by the path's spelling, so a relaunch from another folder trained them all
    again with other seeds and pooled the duplicates."""
    import shutil

    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce"], "seed": [0]})
    out = tmp_path / "sw"
    monkeypatch.chdir(Path(synthetic_store).parent)
    rel = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress", "--set",
                                    f"store={Path(synthetic_store).name}"])
    assert rel.exit_code == 0, rel.output
    seeds = {p.parent.name: json.loads(p.read_text())["seed"] for p in out.glob("runs/*/config.json")}
    copy = tmp_path / "copy.zarr"
    shutil.copytree(synthetic_store, copy)
    for spelling in (str(Path(synthetic_store).resolve()), str(copy)):
        again = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress", "--set", f"store={spelling}"])
        assert again.exit_code == 0 and "1 already done" in again.output, again.output
    spec = load_sweep(str(f), [f"store={copy}"])
    assert {Path(p.cfg.out).name: p.cfg.seed for p in expand(spec, str(out))} == seeds


def test_a_new_sweep_folder_seeds_its_runs_by_the_store_not_its_spelling(synthetic_store, tmp_path, monkeypatch):
    """Two sweep folders of one sweep file over one store trained other seeds when the store was spelled
    otherwise (relative, absolute, a copy) or the base set keep_checkpoint or device, settings that change
    no result: another folder's numbers differed by seed variance without a word (a trial). A new folder
    names and seeds its runs by the store's key; a folder begun before keeps its runs' names and seeds."""
    import shutil

    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce"], "seed": [0, 1]})
    copy = tmp_path / "copy.zarr"
    shutil.copytree(synthetic_store, copy)
    monkeypatch.chdir(Path(synthetic_store).parent)
    ways = ([f"store={Path(synthetic_store).name}"], [f"store=./{Path(synthetic_store).name}"], [f"store={copy}"],
            [f"store={Path(synthetic_store).resolve()}", "base.keep_checkpoint=true", "base.device=cpu"])
    made = [{Path(p.cfg.out).name: p.cfg.seed for p in expand(load_sweep(str(f), sets), str(tmp_path / f"new{i}"))}
            for i, sets in enumerate(ways)]
    assert len(made[0]) == 2 and all(m == made[0] for m in made), made
    with pytest.raises(ConfigError, match=r"device change no result, so no run's name or seed: sweep each in a sweep "
                                          r"folder of its own"):  # it said "the grid repeats a value"
        expand(load_sweep(str(f), ["grid.device=[cpu, auto]"]), str(tmp_path / "devices"))
    old = tmp_path / "old"  # begun before: its store.json names the store as spelled then
    old.mkdir()
    from embedcache import open_store

    with open_store(str(synthetic_store)) as r:
        key = r.key
    (old / "store.json").write_text(json.dumps({"store_key": key, "store": "stores/x.zarr", "named_as": "stores/x.zarr"}))
    kept = {Path(p.cfg.out).name: p.cfg.seed for p in expand(load_sweep(str(f), []), str(old))}
    assert len(kept) == 2 and set(kept).isdisjoint(made[0]) and set(kept.values()).isdisjoint(made[0].values())


def test_a_worker_killed_from_outside_fails_its_runs_instead_of_losing_them(synthetic_store, tmp_path):
    """The OOM killer or a segfault takes a worker without a status for its run: the sweep reported
    fewer runs than it had, wrote a table short of them and exited 0."""
    import multiprocessing
    import signal
    import threading
    import time

    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce"], "seed": [0, 1]},
                    launcher="local", workers=1)
    spec = load_sweep(str(f), ["base.steps=400", "base.eval_every=400", "base.ckpt_every=400"])
    out = tmp_path / "sw"

    def kill_the_worker():
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("runs/*/attempts.jsonl")):
            time.sleep(0.1)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    logged = []
    res = run_sweep(spec, str(out), progress=False, log=logged.append)
    killer.join(5)
    assert res["failed"] == 2 and res["done"] == 0, res
    assert any("a worker process died (exit code -9)" in m and "rerun the same command" in m for m in logged), logged


def test_a_launch_writes_the_table_of_its_own_grid(synthetic_store, tmp_path):
    """Two launches on one folder with different grids: the last to write runs.json decided what the
    other's table held, so a launch could finish without the runs it had just trained in its table."""
    from embedcache.students.sweep.tables import write_outputs

    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce", "feat_kd"], "seed": [0]})
    out = tmp_path / "sw"
    spec = load_sweep(str(f))
    run_sweep(spec, str(out), progress=False, log=lambda m: None)
    points = expand(spec, str(out))
    ce_only = [Path(p.cfg.out).name for p in points if p.cfg.recipe == "ce"]
    (out / "runs.json").write_text(json.dumps(ce_only))  # another launch, over [ce], wrote it meanwhile
    (out / "results.parquet").unlink()
    said = []
    results, wrote = write_outputs(str(out), points, said.append)
    assert set(results.recipe) == {"ce", "feat_kd"}
    # ... and owns the folder's table: this launch's is not written over it (runs.json would not match it), and
    # the command's last line no longer points at those files as this table's (a trial)
    assert not (out / "results.parquet").exists() and "a later launch" in said[0] and "changed its grid" in said[0]
    assert not wrote


def test_a_relaunch_may_add_a_recipe_with_its_settings_or_move_a_base_setting_into_the_grid(synthetic_store, tmp_path):
    from embedcache.students.sweep import _require_same_spec

    out = tmp_path / "sw"
    (out / "results").mkdir(parents=True)
    first = {"store": str(synthetic_store), "base": {"steps": 4, "recipe": "ce"}, "grid": {"seed": [0]}}
    (out / "sweep.yaml").write_text(yaml.safe_dump(first))

    def relaunch(**changes):
        f = tmp_path / "next.yaml"
        f.write_text(yaml.safe_dump({**first, **changes}))
        _require_same_spec(str(out), load_sweep(str(f)))

    relaunch(base={"steps": 6, "recipe": "ce"})  # nothing finished yet: nothing to pool with
    (out / "results" / "ce-x.parquet").write_bytes(b"")
    relaunch(base={"steps": "4.0", "recipe": "ce"})  # the same number written otherwise (YAML's 1e-3 is a string)
    with pytest.raises(ConfigError, match=r"base.steps: 4 -> 6"):
        relaunch(base={"steps": 6, "recipe": "ce"})
    relaunch(grid={"recipe": ["ce", "feat_kd"], "seed": [0]}, per_recipe={"feat_kd": {"optim": {"lr": 0.01}}})
    # a recipe dropped from the grid takes its per_recipe block along (kept, it would name no run)
    first = {**first, "grid": {"recipe": ["ce", "feat_kd"], "seed": [0]}, "per_recipe": {"feat_kd": {"optim": {"lr": 0.01}}}}
    (out / "sweep.yaml").write_text(yaml.safe_dump(first))
    relaunch(grid={"recipe": ["ce"], "seed": [0]}, per_recipe={})
    with pytest.raises(ConfigError, match=r"per_recipe.feat_kd.optim.lr"):  # still in the grid: its runs would change
        relaunch(per_recipe={})
    first = {k: v for k, v in first.items() if k != "per_recipe"} | {"grid": {"seed": [0]}}
    (out / "sweep.yaml").write_text(yaml.safe_dump(first))
    with pytest.raises(ConfigError, match=r"per_recipe.ce.optim.lr"):  # the runs already made would change
        relaunch(per_recipe={"ce": {"optim": {"lr": 0.01}}})
    relaunch(base={"recipe": "ce"}, grid={"steps": [4, 6], "seed": [0]})  # base.steps 4 moved into the grid
    relaunch(base={"recipe": "ce"}, grid={"steps": ["4.0", 6], "seed": [0]})  # ... written another way
    with pytest.raises(ConfigError, match=r"base.steps: 4 -> None\) \(a base setting moved into the grid keeps its "
                                          r"base value among the grid's\)"):
        relaunch(base={"recipe": "ce"}, grid={"steps": [6], "seed": [0]})


def test_a_run_whose_results_were_written_before_its_worker_died_is_done(synthetic_store, tmp_path):
    from types import SimpleNamespace

    from embedcache.students.sweep.launchers import _lost_to_dead_workers

    spec = load_sweep(str(_sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"],
                                      grid={"recipe": ["ce"], "seed": [0, 1]})))
    points = expand(spec, str(tmp_path / "sw"))
    names = [Path(p.cfg.out).name for p in points]
    (tmp_path / "sw" / "results").mkdir(parents=True)
    (tmp_path / "sw" / "results" / f"{names[0]}.parquet").write_bytes(b"")  # written, then the worker was killed
    got = _lost_to_dead_workers([[p] for p in points], [], [SimpleNamespace(exitcode=-9)], str(tmp_path / "sw"))
    assert [(g["run"], g["status"]) for g in got] == [(names[0], "done"), (names[1], "failed")]
    assert _lost_to_dead_workers([[p] for p in points], [], [SimpleNamespace(exitcode=0)], str(tmp_path / "sw")) == []


def test_two_grid_points_made_one_run_name_what_made_them(synthetic_store, tmp_path):
    """A per_recipe setting overriding the grid's own key made two points one run; the message blamed
    duplicate grid values the grid did not have."""
    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"],
                    grid={"recipe": ["ce"], "optim.lr": [0.001, 0.002]}, per_recipe={"ce": {"optim": {"lr": 0.005}}})
    with pytest.raises(ConfigError, match=r"per_recipe.ce.optim.lr overrides the grid's optim.lr for the runs of ce, so "
                                          r"the grid's values of it never run for them"):
        expand(load_sweep(str(f)), str(tmp_path / "sw"))
    one = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"],  # one grid value: it never ran either
                      grid={"recipe": ["ce"], "optim.lr": [0.001]}, per_recipe={"ce": {"optim": {"lr": 0.5}}})
    with pytest.raises(ConfigError, match=r"per_recipe.ce.optim.lr overrides the grid's optim.lr"):
        expand(load_sweep(str(one)), str(tmp_path / "sw"))
    twice = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"optim.lr": [0.001, 0.001]})
    with pytest.raises(ConfigError, match=r"the grid repeats a value"):
        expand(load_sweep(str(twice)), str(tmp_path / "sw"))


def test_tables_follow_the_current_grid_and_say_when_they_are_partial(synthetic_store, tmp_path):
    """A run scored before a base value moved into the grid kept the variant "-" and split its method
    in two rows; a sweep with runs missing wrote a table that looked final; and two sweeps' replicates
    of one grid seed (other base seeds) were averaged into one."""
    from embedcache.students.sweep import expand
    from embedcache.students.sweep.worker import REPLICATES_PER_BASE_SEED, sweep_tags

    base = {"student": {"name": "test_resnet", "input_size": 32}, "batch_size": 8, "eval_every": 2, "ckpt_every": 2,
            "device": "cpu"}
    out = tmp_path / "sw"
    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce"], "seed": [0]},
                    base={**base, "steps": 4})
    assert CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"]).exit_code == 0
    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], base=base,
                    grid={"recipe": ["ce"], "seed": [0], "steps": [4, 6]})
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0 and "1 already done" in res.output, res.output
    df = pd.read_parquet(out / "results.parquet")
    assert set(df.variant) == {"steps=4", "steps=6"}, set(df.variant)
    again = CliRunner().invoke(main, ["evaluate", str(out / "runs"), "--out", str(tmp_path / "again.parquet")])
    assert again.exit_code == 0 and set(pd.read_parquet(tmp_path / "again.parquet").variant) == {"steps=4", "steps=6"}
    assert "partial" not in (out / "report" / "report.md").read_text()
    next(out.glob("results/*.parquet")).unlink()  # a run without results: the tables say they are partial
    seen = CliRunner().invoke(main, ["report", str(out)])
    assert seen.exit_code == 0 and "warning: partial: 1 of 2 runs of this sweep have results" in seen.output, seen.output
    assert "partial: 1 of 2 runs" in (out / "report" / "report.md").read_text()
    again = load_sweep(str(f), ["base_seed=3"])
    point = expand(again, str(tmp_path / "other"))[0]
    assert sweep_tags(again, point)["replicate"] == 3 * REPLICATES_PER_BASE_SEED + point.replicate


def test_a_worker_whose_sweep_died_stops_and_a_dead_ray_task_fails_only_its_runs(tmp_path):
    """After kill -9 of the sweep, its local workers went through the whole queue; a Ray task whose
    worker died stopped the whole sweep with a traceback."""
    import time

    from types import SimpleNamespace

    from embedcache import interrupt
    from embedcache.students.sweep.launchers import _ray_statuses, _stop_when_orphaned
    from embedcache.students.sweep.worker import result_path

    interrupt.reset()
    _stop_when_orphaned(os.getppid() + 12345, every=0.05)  # not our parent: as if ours had died
    deadline = time.monotonic() + 5
    while not interrupt.requested() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert interrupt.requested()
    interrupt.reset()

    class WorkerCrashedError(Exception):
        pass

    def dead(_ref):
        raise WorkerCrashedError("the worker died unexpectedly")

    job = [SimpleNamespace(cfg=SimpleNamespace(out=str(tmp_path / "runs" / n))) for n in ("a", "b")]
    result_path(str(tmp_path), "a").parent.mkdir(parents=True)
    result_path(str(tmp_path), "a").write_bytes(b"x")  # written before the worker died: done
    got = _ray_statuses(SimpleNamespace(get=dead), "ref", job, str(tmp_path))
    assert got[0] == {"run": "a", "status": "done"} and got[1]["status"] == "failed"
    assert "WorkerCrashedError: a worker died or was killed" in got[1]["error"] and "rerun" in got[1]["error"]

    class RayTaskError(Exception):
        pass

    def cannot_run(_ref):  # not a dead worker: the task's own cause, not "rerun to resume"
        raise RayTaskError("FileNotFoundError: /work/x is not on this node")

    got = _ray_statuses(SimpleNamespace(get=cannot_run), "ref", job[1:], str(tmp_path))
    assert got[0]["error"] == ("its Ray task failed (RayTaskError: FileNotFoundError: /work/x is not on this node); "
                               "see the Ray worker's log")


def test_a_sweep_whose_recipes_keep_checkpoints_by_different_rules_says_so(synthetic_store, tmp_path, make_cfg,
                                                                             tiny_teacher):
    """select: auto keeps li_iccv23's last weights and ce's best validation checkpoint: a sweep comparing
    them mixed model selection into the loss comparison without a word."""
    from embedcache.students.sweep import expand, load_sweep, selection_note

    mixed = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce", "li_iccv23"], "seed": [0]})
    note = selection_note(expand(load_sweep(str(mixed)), str(tmp_path / "x")))
    assert note and "last: li_iccv23" in note and "best_val: ce" in note and "base.select" in note
    res = CliRunner().invoke(main, ["sweep", str(mixed), "--out", str(tmp_path / "sw"), "--no-progress", "--set", "base.steps=4",
                                    "--set", "base.eval_every=2"])  # two validations for ce to choose among
    assert res.exit_code == 0 and note in res.output, res.output
    assert selection_note(expand(load_sweep(str(mixed), ["base.steps=2", "base.eval_every=2"]), str(tmp_path / "v"))) \
        is None  # one validation: ce keeps its last weights too
    # base.select set, and vl2v_adip validating once in Distill: not told to set base.select (a review)
    chosen = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce", "vl2v_adip"], "seed": [0]})
    note = selection_note(expand(load_sweep(str(chosen), ["base.select=best_val"]), str(tmp_path / "u")))
    assert note.startswith("note: vl2v_adip validate(s) once where they choose their weights (a recipe of several "
                           "stages: in its last) at these settings, so they keep their last weights") and \
        "base.select" not in note and "base.eval_every" in note
    one = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["ce", "li_iccv23"], "seed": [0]},
                      base={"student": {"name": "test_resnet", "input_size": 32}, "select": "best_val", "batch_size": 8})
    assert selection_note(expand(load_sweep(str(one)), str(tmp_path / "y"))) is None
    no_val = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["ce", "li_iccv23"], "seed": [0]},
                         base={"student": {"name": "test_resnet", "input_size": 32}, "split": {"val_fraction": 0.0},
                               "batch_size": 8})
    assert selection_note(expand(load_sweep(str(no_val)), str(tmp_path / "z"))) is None  # no validation: all keep the last
    # a dataset's own val rows are validation rows (a val_fraction beside them is refused): the rules differ again
    import numpy as np
    from PIL import Image

    from embedcache.extract import extract

    lines = ["path,label,domain,split"]
    for i, kind in enumerate(["train"] * 8 + ["val"] * 4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{'ab'[i // 2 % 2]},d{i % 2},{kind}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    own = extract(make_cfg("own-val.zarr", "dataset.name=csv", f"dataset.path={tmp_path / 'm.csv'}"), teacher=tiny_teacher,
                  log=quiet).path
    with_val = _sweep_file(tmp_path, own, grid={"recipe": ["ce", "li_iccv23"], "seed": [0]},
                           base={"student": {"name": "test_resnet", "input_size": 32}, "batch_size": 4})
    assert "best_val: ce" in selection_note(expand(load_sweep(str(with_val)), str(tmp_path / "w")))
    unread = _sweep_file(tmp_path, own, grid={"recipe": ["ce"], "split.val_fraction": [0.1, 0.3]},
                         base={"student": {"name": "test_resnet", "input_size": 32}, "batch_size": 4})
    with pytest.raises(ConfigError, match="split.val_fraction=0.1 is not read: .* own val rows"):
        expand(load_sweep(str(unread)), str(tmp_path / "v"))  # two names for one run, refused before the first


def test_a_launch_with_other_settings_while_another_runs_is_refused(synthetic_store, tmp_path):
    """Two launches into one folder with other settings, the second before the first had a result,
    were both accepted: each scored runs under its own settings into one table, and sweep.yaml
    named the last. A launch that is still running pins the folder's settings."""
    import threading

    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce"], "seed": [0, 1]})
    out = tmp_path / "sw"
    started, release, errors = threading.Event(), threading.Event(), []

    def hold(status):
        started.set()
        release.wait(60)

    def first():
        try:
            run_sweep(load_sweep(str(f)), str(out), progress=False, log=lambda m: None, on_run=hold)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(120)
        (out / "results").mkdir(exist_ok=True)
        for p in (out / "results").glob("*.parquet"):
            p.unlink()  # as if the first launch had no result yet: its settings still hold
        with pytest.raises(ConfigError, match=r"another launch of sweep .* is running with other settings "
                                              r"\(base.steps: 4 -> 6\); wait for it to end, or use another --out"):
            run_sweep(load_sweep(str(f), ["base.steps=6"]), str(out), progress=False, log=lambda m: None)
    finally:
        release.set()
        thread.join(120)
    assert not errors, errors
    assert yaml.safe_load((out / "sweep.yaml").read_text())["base"]["steps"] == 4


def test_a_per_recipe_block_for_a_recipe_no_run_trains_is_refused(synthetic_store, tmp_path):
    """per_recipe settings for a recipe the grid does not train were ignored without a word (a block
    meant for the runs of a recipe left out of the grid, or under the wrong recipe's name)."""
    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce", "feat_kd"]},
                    per_recipe={"li_iccv23": {"optim": {"lr": 0.01}}})
    with pytest.raises(ConfigError, match=r"per_recipe.li_iccv23 sets runs of a recipe the grid does not train \(it "
                                          r"trains ce, feat_kd\); add li_iccv23 to grid.recipe, or remove its block "
                                          r"\(`--set per_recipe.li_iccv23=null`"):
        expand(load_sweep(str(f)), str(tmp_path / "sw"))
    # that block dropped on the command line, the others kept (`=null` was refused as still setting it, a trial)
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(tmp_path / "sw2"), "--no-progress", "--set",
                                    "per_recipe.li_iccv23=null", "--set", "base.steps=2"])
    assert res.exit_code == 0, res.output


def test_launcher_settings_the_sweeps_launcher_would_not_read_are_refused(synthetic_store, tmp_path):
    """`workers: 4` in a serial sweep's file (or Ray's `resources` under the local launcher) was ignored
    without a word; chosen on the command line, another launcher runs with a note saying so."""
    for launcher, setting in (("serial", {"workers": 4}), ("local", {"resources": {"num_cpus": 2}})):
        f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce"]},
                        launcher=launcher, **setting)
        with pytest.raises(ConfigError, match=rf"{next(iter(setting))}=.* \(in the sweep file or --set\) does not apply "
                                              rf"to its launcher {launcher}; leave it out, or choose the launcher that reads it"):
            run_sweep(load_sweep(str(f)), str(tmp_path / "sw"), progress=False, log=lambda m: None)
    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["ce"]}, launcher="local",
                    workers=2)
    said = []
    run_sweep(load_sweep(str(f)), str(tmp_path / "sw"), launcher="serial", progress=False, log=said.append)
    assert said[0] == "note: workers=2 (in the sweep file or --set) does not apply to the serial launcher, which runs without it"


def test_split_settings_of_another_protocol_are_refused(synthetic_store, tmp_path):
    """A lodo sweep ignored unseen_fraction and split_seed, and a class-split sweep holdout_domains."""
    for changes, said in (({"unseen_fraction": 0.3}, r"unseen_fraction=0.3 sets the class split of open_vocab and "
                                                      r"few_shot sweeps, which a lodo sweep does not make"),
                          ({"split_seed": 2}, r"split_seed=2 sets the class split"),
                          ({"protocol": "open_vocab", "holdout_domains": ["outline"]},
                           r"holdout_domains sets the runs of a lodo sweep; protocol open_vocab holds classes out")):
        with pytest.raises(ConfigError, match=said):
            load_sweep(str(_sweep_file(tmp_path, synthetic_store, **changes)))


def test_a_lodo_sweep_saved_with_settings_it_never_read_relaunches_without_them(synthetic_store, tmp_path):
    """An older version saved a lodo sweep's finetune_steps and unseen_fraction (ignored then): refused
    now, and a relaunch without them was refused as launched with other settings, so the folder could
    not be resumed either way."""
    from embedcache.students.sweep import _require_same_spec

    out = tmp_path / "sw"
    (out / "results").mkdir(parents=True)
    (out / "results" / "x.parquet").write_bytes(b"")
    saved = {"store": str(synthetic_store), "protocol": "lodo", "base": {"steps": 4}, "grid": {"seed": [0]},
             "finetune_steps": 5, "unseen_fraction": 0.3}
    (out / "sweep.yaml").write_text(yaml.safe_dump(saved))
    f = tmp_path / "now.yaml"
    f.write_text(yaml.safe_dump({k: v for k, v in saved.items() if k not in ("finetune_steps", "unseen_fraction")}))
    _require_same_spec(str(out), load_sweep(str(f)))
    f.write_text(yaml.safe_dump({**saved, "base": {"steps": 6}}))
    with pytest.raises(ConfigError, match="finetune_steps=5 sets few-shot scoring"):
        load_sweep(str(f))


def test_a_sweep_trains_on_every_domain_and_scores_on_transfer_stores(synthetic_store, make_cfg, tiny_teacher, tmp_path):
    """The data-free setting as a sweep: runs trained on every image of a (synthesised) store, scored on a
    real store with --transfer. A lodo sweep held out one of the store's domains (a synthesis's styles) in
    each run, and `holdout_domains: []` was refused, so there was no way to train on all (a trial)."""
    from embedcache.api import StoreReader
    from embedcache.extract import extract

    real = make_cfg("real.zarr", "dataset.per_class=3", "dataset.seed=1")
    extract(real, teacher=tiny_teacher, log=quiet)
    with pytest.raises(ConfigError, match=r"holdout_domains=\[\] holds no domain out.*; or give transfer: stores"):
        run_sweep(load_sweep(str(_sweep_file(tmp_path, synthetic_store, holdout_domains=[]))), str(tmp_path / "x"),
                  progress=False, log=quiet)
    f = _sweep_file(tmp_path, synthetic_store, holdout_domains=[], transfer=[real.out],
                    grid={"recipe": ["feat_kd"], "seed": [0, 1]})
    f.write_text(f.read_text().replace("device: cpu", "device: cpu\n  split: {val_fraction: 0.0}"))
    res = run_sweep(load_sweep(str(f)), str(tmp_path / "sw"), progress=False, log=quiet)
    rows = res["results"]
    with StoreReader(real.out) as r, StoreReader(str(synthetic_store)) as own:
        assert set(rows.store_key) == {r.key} and set(rows.trained_on) == {own.key}
        n_real = int(r.ok.sum())
    assert rows.run.nunique() == 2 and set(rows.holdout) == {"transfer"}  # one run per grid point, on every domain
    top1 = rows[(rows.metric == "top1") & (rows.domain != "avg")]
    assert set(top1.split) == {"zero_shot"} and top1.groupby("run").n.sum().eq(n_real).all()
    for run in rows.run.unique():
        assert json.loads((tmp_path / "sw" / "runs" / run / "split.json").read_text())["holdout_domains"] == []
    assert "zero_shot" in (tmp_path / "sw" / "report" / "report.md").read_text()
    # the command's own table: it printed lodo's out_of_domain split, which such a sweep has none of (a trial)
    said = CliRunner().invoke(main, ["sweep", str(f), "--out", str(tmp_path / "sw"), "--no-progress"])
    assert said.exit_code == 0, said.output
    table = [line for line in said.output.splitlines() if line.startswith("| feat_kd")]
    assert len(table) == 1 and "zero_shot" in table[0] and table[0].count("±") >= 2, said.output
    # a transfer store the runs cannot be scored on is refused before any run trains
    typo = tmp_path / "typo.json"
    typo.write_text('{"circle": "circle", "square": "square", "triangle": "trianglee"}')
    other = make_cfg("other.zarr", "dataset.per_class=3", f"dataset.class_names={typo}")
    extract(other, teacher=tiny_teacher, log=quiet)
    g = _sweep_file(tmp_path, synthetic_store, holdout_domains=[], transfer=[other.out])
    with pytest.raises(ConfigError, match=r"transfer store .*other.zarr: its classes differ"):
        run_sweep(load_sweep(str(g)), str(tmp_path / "sw2"), progress=False, log=quiet)
    assert not (tmp_path / "sw2" / "runs").exists() or not any((tmp_path / "sw2" / "runs").iterdir())
    # the sweep's own store, or one store twice (by another path): every row was written three times (a fuzzing trial)
    shutil.copytree(real.out, tmp_path / "real-copy.zarr")
    for stores, said in [([str(synthetic_store)], "the sweep's own store"),
                         ([real.out, str(tmp_path / "real-copy.zarr")], f"transfer store {real.out}")]:
        h = _sweep_file(tmp_path, synthetic_store, holdout_domains=[], transfer=stores)
        with pytest.raises(ConfigError, match=f"transfer store .* is the same store as {said} \\(key .*list each other "
                                              "store once in transfer"):
            run_sweep(load_sweep(str(h)), str(tmp_path / "sw3"), progress=False, log=quiet)


def test_report_of_a_sweep_folder_keeps_rows_added_to_its_results_file(tmp_path):
    """Rows scored into SWEEP_DIR/results.parquet (`evaluate --out`: the teacher's, the runs' per_class)
    were silently left out of `report SWEEP_DIR`, and the next launch's rewrite of the file, even one
    with nothing to run, erased them (two trials). They are kept, but where the runs' results/ files
    give the same scope (those are the runs' own), and rows of runs with no results now are said to be
    left out."""
    from embedcache.evaluate.results import upsert
    from embedcache.students.sweep import collect

    def rows(run, value, protocol="lodo", recipe="feat_kd"):
        return pd.DataFrame([{"run": run, "recipe": recipe, "student": "s", "replicate": 0, "protocol": protocol,
                              "split": "out_of_domain", "domain": "d1", "metric": "top1", "value": value,
                              "store_key": "K", "trained_on": "K", "source": "name"}])

    sweep = tmp_path / "sw"
    (sweep / "results").mkdir(parents=True)
    for run in ("a", "b", "dropped"):
        (sweep / "runs" / run).mkdir(parents=True)
    (sweep / "runs.json").write_text(json.dumps(["a", "b"]))
    upsert(str(sweep / "results" / "a.parquet"), rows("a", 0.5))
    upsert(str(sweep / "results" / "dropped.parquet"), rows("dropped", 0.1))
    upsert(str(sweep / "results.parquet"), pd.concat([rows("a", 0.4), rows("dropped", 0.1)]))  # an earlier launch's
    upsert(str(sweep / "results.parquet"), rows("teacher:open_clip:ViT", 0.9, recipe="teacher"))  # added by hand
    upsert(str(sweep / "results.parquet"), rows("a", 0.7, protocol="open_vocab"))  # a sweep run, another protocol
    upsert(str(sweep / "results.parquet"), rows("b", 0.3, protocol="open_vocab"))  # a run that has no results now
    got = collect(str(sweep))
    assert sorted(zip(got.run, got.protocol, got.value)) == [
        ("a", "lodo", 0.5), ("a", "open_vocab", 0.7), ("teacher:open_clip:ViT", "lodo", 0.9)]
    res = CliRunner().invoke(main, ["report", str(sweep)])
    assert res.exit_code == 0, res.output
    assert "| teacher |" in (sweep / "report" / "report.md").read_text()
    said = [ln for ln in res.output.splitlines() if "results.parquet" in ln]
    assert len(said) == 1 and "1 row of run b, which has no results now" in said[0], res.output
    (sweep / "results.parquet").write_bytes(b"PAR1 cut short")
    res = CliRunner().invoke(main, ["report", str(sweep)])
    assert res.exit_code != 0 and "results.parquet is damaged" in res.output and "delete it" in res.output, res.output


def test_the_partial_note_names_a_method_none_of_whose_runs_has_results(tmp_path):
    """Every run of one grid point failed (a learning rate of 1e12): the method was simply missing from
    the tables, and the note said only "6 of 12 runs" (a trial)."""
    from embedcache.evaluate.results import upsert
    from embedcache.students.sweep import partial_note

    sweep = tmp_path / "sw"
    tags = {f"{lr}-{rep}": {"variant": f"optim.lr={lr}", "replicate": rep, "recipe": "li_iccv23", "student": "resnet18"}
            for lr in ("0.001", "1e+12") for rep in (0, 1)}
    (sweep / "results").mkdir(parents=True)
    (sweep / "runs.json").write_text(json.dumps(sorted(tags)))
    (sweep / "tags.json").write_text(json.dumps(tags))
    upsert(str(sweep / "results" / "0.001-0.parquet"), pd.DataFrame([{"run": "0.001-0", "metric": "top1", "value": 0.5}]))
    note = partial_note(str(sweep))
    assert note.startswith("partial: 1 of 4 runs of this sweep have results"), note
    assert "no run of li_iccv23 / resnet18 / optim.lr=1e+12 has results: it is not in the tables" in note, note
    # a table collected before another launch sharing the folder scored the rest: its note is of what it holds
    # (the note was of the folder now, and a partial table was printed without it, a trial)
    table = pd.DataFrame({"run": ["0.001-0"]})
    for name in sorted(tags):
        upsert(str(sweep / "results" / f"{name}.parquet"), pd.DataFrame([{"run": name, "metric": "top1", "value": 0.5}]))
    assert partial_note(str(sweep)) == ""
    assert partial_note(str(sweep), None, table).startswith("partial: 1 of 4 runs of this sweep have results")


def test_a_dropped_run_deleted_from_disk_stays_out_of_the_table(synthetic_store, tmp_path):
    """A run the grid dropped, whose folder and results file the user then deleted, read as rows added
    by hand to results.parquet (not a sweep run any more) and came back in every table (a review)."""
    import shutil

    from embedcache.students.sweep import collect

    out = tmp_path / "sw"
    both = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["feat_kd", "ce"], "seed": [0]}, holdout_domains=["solid"])
    run_sweep(load_sweep(str(both)), str(out), progress=False, log=quiet)
    ce = sorted(p.stem for p in (out / "results").glob("ce*.parquet"))
    assert len(ce) == 1
    one = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["feat_kd"], "seed": [0]}, holdout_domains=["solid"])
    shutil.rmtree(out / "runs" / ce[0])
    (out / "results" / f"{ce[0]}.parquet").unlink()
    res = run_sweep(load_sweep(str(one)), str(out), progress=False, log=quiet)
    assert set(res["results"]["recipe"]) == {"feat_kd"} and set(collect(str(out))["recipe"]) == {"feat_kd"}


def test_a_run_whose_folder_was_deleted_or_undone_trains_again_on_relaunch(synthetic_store, tmp_path):
    """Deleting a run's folder (or its done marker, as a damaged split.json's message says) and relaunching
    said every run "already finished", and the table kept the deleted run's old rows, where `evaluate runs/`
    no longer had them (a trial)."""
    import shutil

    spec = load_sweep(str(_sweep_file(tmp_path, synthetic_store, grid={"recipe": ["ce"], "seed": [0, 1]},
                                      holdout_domains=["solid"])))
    out = tmp_path / "sw"
    first = run_sweep(spec, str(out), progress=False, log=quiet)
    gone, undone = sorted(p.name for p in (out / "runs").iterdir())
    before = pd.read_parquet(out / "results" / f"{gone}.parquet")
    shutil.rmtree(out / "runs" / gone)
    (out / "runs" / undone / "done").unlink()
    changed = load_sweep(str(_sweep_file(tmp_path, synthetic_store, grid={"recipe": ["ce"], "seed": [0, 1]},
                                         holdout_domains=["solid"], base={"student": {"name": "test_resnet", "input_size": 32},
                                                                          "steps": 6, "batch_size": 8, "eval_every": 2,
                                                                          "ckpt_every": 2, "device": "cpu"})))
    with pytest.raises(ConfigError, match="was launched with other settings"):  # refused before anything is moved
        run_sweep(changed, str(out), progress=False, log=quiet)
    assert not (out / "results" / "orphaned").exists()
    said = []
    again = run_sweep(spec, str(out), progress=False, log=said.append)
    assert again["done"] == 2 and again["skipped"] == 0
    assert any(f"2 run(s) of {out} had result rows but no finished run folder" in s for s in said), said
    assert sorted(p.name for p in (out / "results" / "orphaned").iterdir()) == sorted([f"{gone}.parquet", f"{undone}.parquet"])
    assert _attempts(out)[gone] == 1 and _attempts(out)[undone] == 2  # the deleted folder's count went with it
    assert (out / "runs" / gone / "done").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results" / f"{gone}.parquet"), before)  # the same run again
    assert len(again["results"]) == len(first["results"])
    shutil.rmtree(out / "runs" / gone)  # orphaned twice: the rows set aside first are kept
    run_sweep(spec, str(out), progress=False, log=quiet)
    assert sorted(p.name for p in (out / "results" / "orphaned").glob(f"{gone}*")) == [f"{gone}.1.parquet", f"{gone}.parquet"]


def test_a_sweep_of_a_staged_recipe_under_a_decaying_schedule_says_so(synthetic_store, tmp_path):
    """A sweep's runs train silently (their log goes nowhere): the note that one schedule runs across a
    recipe's stages is said once, by the sweep, before its runs start."""
    from embedcache.students.sweep import expand, load_sweep, stage_schedule_sweep_note

    staged = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"],
                         grid={"recipe": ["vl2v_adip", "li_iccv23"], "seed": [0, 1]})
    note = stage_schedule_sweep_note(expand(load_sweep(str(staged)), str(tmp_path / "x")))
    assert note and note.startswith("note: vl2v_adip under cosine:") and "li_iccv23" not in note
    res = CliRunner().invoke(main, ["sweep", str(staged), "--out", str(tmp_path / "sw"), "--no-progress", "--set",
                                    "base.steps=2"])
    assert res.exit_code == 0 and res.output.count(note) == 1, res.output
    const = _sweep_file(tmp_path, synthetic_store, holdout_domains=["outline"], grid={"recipe": ["vl2v_adip"]},
                        base={"student": {"name": "test_resnet", "input_size": 32}, "optim": {"schedule": "constant"},
                              "batch_size": 8})
    assert stage_schedule_sweep_note(expand(load_sweep(str(const)), str(tmp_path / "y"))) is None


def test_a_partial_table_names_the_held_out_domains_no_run_has_results_for(tmp_path):
    """Every run holding out 'noisy' failed (a killed worker took their pack): the tables had no noisy
    column and an avg over 'solid' alone, said only as "partial: 12 of 24 runs" (a trial)."""
    from embedcache.students.sweep import partial_note

    held = {"a": ["solid"], "b": ["solid"], "c": ["noisy"], "d": ["noisy"]}
    (tmp_path / "runs.json").write_text(json.dumps(sorted(held)))
    (tmp_path / "tags.json").write_text(json.dumps({n: {"recipe": "ce", "student": "s", "variant": "-", "held": h}
                                                    for n, h in held.items()}))
    (tmp_path / "results").mkdir()
    for n in ("a", "b", "c"):
        (tmp_path / "results" / f"{n}.parquet").write_bytes(b"")
    assert "no run holding out" not in partial_note(str(tmp_path))  # c holds noisy out and has results
    (tmp_path / "results" / "c.parquet").unlink()
    note = partial_note(str(tmp_path))
    assert note.startswith("partial: 2 of 4 runs") and ("; no run holding out noisy has results: the tables have no "
                                                        "noisy column, and their avg is over the other held-out "
                                                        "domains") in note, note


def test_a_run_setting_at_a_sweeps_top_level_names_where_it_goes(synthetic_store, tmp_path):
    """`sweep --set steps=30` said "unknown config key steps; valid keys under the top level: base, ..."
    without the base.steps the user meant (a trial)."""
    f = _sweep_file(tmp_path, synthetic_store)
    with pytest.raises(ConfigError, match=r"unknown config key steps: a sweep's runs take it under base "
                                          r"\(base.steps\), or grid.steps to cross its values"):
        load_sweep(str(f), ["steps=30"])
    with pytest.raises(ConfigError, match="unknown config key stpes; valid keys under the top level"):
        load_sweep(str(f), ["stpes=30"])  # not a run setting either: the plain refusal


def test_a_setting_no_run_of_the_sweep_reads_is_refused(synthetic_store, tmp_path):
    """swad settings in base with no swad run, or momentum in an adamw recipe's per_recipe block, were
    ignored by every run without a word (a trial). A grid of momenta crossed with the optimizer, or one that holds
    its default, made the adamw runs as many variants of one method, apart only by their seeds (a trial: 0.5
    'beat' 0.9 by 5.5 points)."""
    base = {"student": {"name": "test_resnet", "input_size": 32}, "steps": 4, "batch_size": 8, "device": "cpu"}
    for grid in ({"optim.name": ["sgd", "adamw"], "optim.momentum": [0.5, 0.7], "seed": [0]},
                 {"optim.momentum": [0.5, 0.9], "seed": [0]}):  # 0.9, the default, is no unread value of its own
        with pytest.raises(ConfigError, match=r"grid.optim.momentum=\[0.5, 0.[79]\] is read only with optim.name=sgd, "
                                              r"which \d of the sweep's \d runs do not use \(optim.name=adam\w*\): they "
                                              r"would be 2 variants of one method, apart only by their seeds"):
            expand(load_sweep(str(_sweep_file(tmp_path, synthetic_store, base=base, grid=grid))), str(tmp_path / "s"))
    sgd = {"optim.name": ["sgd"], "optim.momentum": [0.5, 0.7], "seed": [0]}  # every run reads it
    assert len(expand(load_sweep(str(_sweep_file(tmp_path, synthetic_store, base=base, grid=sgd))), str(tmp_path / "s"))) == 4
    (tmp_path / "begun").mkdir()  # a folder begun before the check grows as it began (a review: more seeds refused)
    (tmp_path / "begun" / "runs_ever.json").write_text(json.dumps(["a-run"]))
    crossed = {"optim.name": ["sgd", "adamw"], "optim.momentum": [0.5, 0.7], "seed": [0, 1]}
    assert len(expand(load_sweep(str(_sweep_file(tmp_path, synthetic_store, base=base, grid=crossed))),
                      str(tmp_path / "begun"))) == 16
    with pytest.raises(ConfigError, match=r"swad.n_converge=5 is read only with averaging=swad, which no run of the "
                                          r"sweep uses"):
        expand(load_sweep(str(_sweep_file(tmp_path, synthetic_store, base={**base, "swad": {"n_converge": 5}}))),
               str(tmp_path / "s"))
    block = {"grid": {"recipe": ["feat_kd", "ce"], "optim.name": ["sgd", "adamw"], "seed": [0]},
             "per_recipe": {"ce": {"swad": {"n_converge": 5}}}}
    with pytest.raises(ConfigError, match=r"per_recipe.ce.swad.n_converge=5 is read only with averaging=swad, which "
                                          r"no ce run of the sweep uses"):
        expand(load_sweep(str(_sweep_file(tmp_path, synthetic_store, base=base, **block))), str(tmp_path / "s"))
    empty = load_sweep(str(_sweep_file(tmp_path, synthetic_store, base=base, per_recipe={"ce": None})))
    assert expand(empty, str(tmp_path / "s"))  # an empty block was a traceback (a review)
    # each block's own value is named (another recipe's was), and a grid's setting as the grid's
    two = {"grid": {"recipe": ["feat_kd", "ce"], "seed": [0]},
           "per_recipe": {"ce": {"optim": {"gamma": 0.5}}, "feat_kd": {"optim": {"gamma": 0.3}}}}
    with pytest.raises(ConfigError, match=r"per_recipe.ce.optim.gamma=0.5 is read only with optim.schedule=step"):
        expand(load_sweep(str(_sweep_file(tmp_path, synthetic_store, base=base, **two))), str(tmp_path / "s"))
    with pytest.raises(ConfigError, match=r"grid.optim.momentum=\[0.5, 0.7\] is read only with optim.name=sgd, which "
                                          r"no run of the sweep uses"):
        expand(load_sweep(str(_sweep_file(tmp_path, synthetic_store, base=base,
                                          grid={"optim.momentum": [0.5, 0.7], "seed": [0]}))), str(tmp_path / "s"))
    # a sweep launched with such a setting (before the check) relaunches as it began: it could not be resumed
    began = load_sweep(str(_sweep_file(tmp_path, synthetic_store, base={**base, "swad": {"n_converge": 5}})))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "sweep.yaml").write_text(yaml.safe_dump(to_dict(began), sort_keys=True))
    assert expand(began, str(tmp_path / "old"))


def test_a_batch_larger_than_a_runs_images_is_refused_before_any_run(synthetic_store, tmp_path):
    """It failed each run as it came to it (a trial: the packaged demo sweep on a tiny store)."""
    spec = load_sweep(str(_sweep_file(tmp_path, synthetic_store, grid={"batch_size": [8, 1000], "seed": [0]})))
    with pytest.raises(ConfigError, match=r"sweep run \(seed=0, batch_size=1000, holding out \w+\): batch_size=1000 is "
                                          r"more than the \d+ training images the split has.*use grid.batch_size <= \d+"):
        expand(spec, str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_the_sweep_says_its_collapsed_runs_under_its_table(synthetic_store, tmp_path, monkeypatch):
    """The sweep's collapse warnings came amid the runs' progress bars, and its closing table showed the
    collapsed cell as a plain figure (report.md alone named it; a trial): said under the table now."""
    import embedcache.students.sweep as sweep_mod

    base = {"recipe": "feat_kd", "student": "s", "source": "name", "split": "out_of_domain", "domain": "sketch",
            "protocol": "lodo", "holdout": "sketch"}
    rows = [{**base, "run": f"r{k}", "replicate": k, "metric": "top1", "value": 0.28} for k in range(2)]
    rows += [{**base, "run": "r0", "replicate": 0, "metric": "collapsed_share", "value": 0.97, "class_name": "circle"}]
    done = {"runs": 2, "done": 2, "skipped": 0, "failed": 0, "busy": 0, "results": pd.DataFrame(rows),
            "run_dirs": [str(tmp_path / "sw" / "runs" / f"r{k}") for k in range(2)], "wrote": True}
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda *a, **k: done)
    monkeypatch.setattr(sweep_mod, "partial_note", lambda *a, **k: "")
    res = CliRunner().invoke(main, ["sweep", str(_sweep_file(tmp_path, synthetic_store)), "--out", str(tmp_path / "sw"),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    table, _, after = res.output.partition("| feat_kd")
    assert ("warning: collapsed: feat_kd / s on sketch answers 'circle' for 97% of the images in 1 of its 2 runs "
            "(its top-1 there is that class's share)") in after, res.output
    assert res.output.splitlines()[-1].startswith("results: ")
    done["wrote"] = False  # a later launch changed the grid: the folder's files are its table, not this one's
    res = CliRunner().invoke(main, ["sweep", str(_sweep_file(tmp_path, synthetic_store)), "--out", str(tmp_path / "sw"),
                                    "--no-progress"])
    assert res.exit_code == 0 and "results: " not in res.output, res.output


def test_a_sweep_and_a_run_never_share_a_folder(synthetic_store, tmp_path):
    """`sweep --out RUN` and `train --out SWEEP` were accepted: each wrote its files among the other's, and
    `evaluate` of the folder then scored the one run alone, exit 0 (a trial). An empty --out is refused
    (train read it as none, report as report/)."""
    f = _sweep_file(tmp_path, synthetic_store, grid={"recipe": ["ce"], "seed": [0]}, holdout_domains=["solid"])
    swept = CliRunner().invoke(main, ["sweep", str(f), "--out", str(tmp_path / "sw"), "--no-progress"])
    assert swept.exit_code == 0, swept.output
    args = ["--student", "test_resnet", "--set", "steps=2", "--set", "batch_size=8", "--set", "student.input_size=32",
            "--set", "eval_every=1", "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(main, ["train", "--store", str(synthetic_store), "--out", str(tmp_path / "sw"), *args])
    assert res.exit_code == 2 and f"--out {tmp_path / 'sw'} is a sweep's folder; a run there would write its files " \
                                  "among the sweep's: give the run a folder of its own" in res.output, res.output
    assert not (tmp_path / "sw" / "config.json").exists()
    res = CliRunner().invoke(main, ["train", "--store", str(synthetic_store), "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(tmp_path / "r"), "--no-progress"])
    assert res.exit_code == 2 and "is a run's folder; a sweep there would write its files among the run's" in res.output
    assert not (tmp_path / "r" / "runs").exists() and not (tmp_path / "r" / "sweep.yaml").exists()
    for cmd in (["train", "--store", str(synthetic_store), *args], ["report", str(tmp_path / "sw")],
                ["sweep", str(f), "--no-progress"]):
        res = CliRunner().invoke(main, [*cmd, "--out", ""])
        assert res.exit_code == 2 and "--out is empty; give a path, or leave --out out for its default" in res.output, cmd


def test_an_open_vocab_sweep_holding_out_one_class_is_refused_before_any_run(synthetic_store, tmp_path):
    """Its unseen_zero_shot, among the unseen labels only, is 100% by construction: the closing table and
    report.md showed 100.0 ± 0.0, the runs' warnings lost amid the progress bars (a trial)."""
    grid = {"recipe": ["feat_kd"], "seed": [0]}
    with pytest.raises(ConfigError, match=r"open_vocab: the class split holds out one class \('\w+'\), so "
                                          r"unseen_zero_shot.* set unseen_fraction so that two or more of the store's 3"):
        run_sweep(load_sweep(str(_sweep_file(tmp_path, synthetic_store, protocol="open_vocab", grid=grid))),
                  str(tmp_path / "a"), progress=False, log=quiet)
    assert not (tmp_path / "a" / "runs").exists()
    spec = load_sweep(str(_sweep_file(tmp_path, synthetic_store, protocol="open_vocab", unseen_fraction=0.67,
                                      grid=grid, base={"student": {"name": "test_resnet", "input_size": 32}, "steps": 2,
                                                       "batch_size": 4, "eval_every": 2, "ckpt_every": 2,
                                                       "device": "cpu"})))
    res = run_sweep(spec, str(tmp_path / "b"), progress=False, log=quiet)["results"]  # two of three held out: it runs
    assert set(res[res["split"] == "unseen_zero_shot"]["protocol"]) == {"open_vocab"}


def test_a_few_shot_sweep_whose_episodes_cannot_be_drawn_is_refused_before_any_run(synthetic_store, make_cfg,
                                                                                 tiny_teacher, tmp_path):
    """A few_shot sweep over a synthesised store of 2 images per class under 5 shots trained its run, then
    failed scoring it, naming evaluate's --shots (a trial): each store it scores is checked before any run."""
    from embedcache.extract import extract

    few = make_cfg("few.zarr", "dataset.per_class=1", "dataset.seed=1")  # 2 images per class (2 domains)
    extract(few, teacher=tiny_teacher, log=quiet)
    grid = {"recipe": ["feat_kd"], "seed": [0]}
    with pytest.raises(ConfigError, match=r"few_shot: class '\w+' has 16 usable images in the sweep's store .*, "
                                          r"fewer than shots=16 \+ 1 to test; set shots: 15 or fewer, or hold out"):
        run_sweep(load_sweep(str(_sweep_file(tmp_path, synthetic_store, protocol="few_shot", shots=16, grid=grid))),
                  str(tmp_path / "a"), progress=False, log=quiet)
    small = {"student": {"name": "test_resnet", "input_size": 32}, "steps": 4, "batch_size": 2, "eval_every": 2,
             "ckpt_every": 2, "device": "cpu"}
    f = _sweep_file(tmp_path, few.out, protocol="few_shot", shots=2, grid=grid, transfer=[str(synthetic_store)],
                    base=small)
    with pytest.raises(ConfigError, match=r"has 2 usable images in the sweep's store .*; set shots: 1 or fewer, or "
                                          r"hold out other classes \(unseen_fraction, split_seed\); a transfer store's "
                                          r"episodes with more shots: `embedcache evaluate .*/b/runs --store "):
        run_sweep(load_sweep(str(f)), str(tmp_path / "b"), progress=False, log=quiet)
    f = _sweep_file(tmp_path, synthetic_store, protocol="few_shot", shots=2, grid=grid, transfer=[few.out])
    with pytest.raises(ConfigError, match=r"has 2 usable images in transfer store .*few.zarr, fewer than shots=2"):
        run_sweep(load_sweep(str(f)), str(tmp_path / "c"), progress=False, log=quiet)
    assert not any((tmp_path / d / "runs").exists() for d in "abc")  # nothing trained


def test_the_demo_sweep_over_another_store_names_that_store_and_makes_no_demo_store(synthetic_store, tmp_path,
                                                                                   monkeypatch):
    """`embedcache sweep --set store=X` said "running the demo sweep (demo) over stores/demo.zarr" and extracted
    the demo store, though its runs trained on X (a trial)."""
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["sweep", "--set", f"store={synthetic_store}", "--set", "base.batch_size=8", "--dry-run",
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"no sweep file given: running the demo sweep (demo) over {synthetic_store}\n"), \
        res.output
    assert not (tmp_path / "stores").exists()
    res = CliRunner().invoke(main, ["sweep", "--dry-run", "--no-progress"])  # the demo store not made yet
    assert res.exit_code == 2 and "a dry run makes nothing: run `make extract` first" in res.output, res.output
    assert not (tmp_path / "stores").exists()


def test_a_stop_kills_at_once_a_local_worker_still_starting_and_asks_the_others():
    """A worker still importing (seconds under load) saw the stop only once started, and the sweep waited on it
    (a trial: 10 s). It has nothing to save: killed at once; a started one is asked (SIGTERM) and waited for."""
    import threading

    from embedcache.students.sweep.launchers import _stop_workers

    class Worker:
        def __init__(self):
            self.calls = []

        def is_alive(self):
            return "kill" not in self.calls and "terminate" not in self.calls

        def terminate(self):
            self.calls.append("terminate")

        def kill(self):
            self.calls.append("kill")

        def join(self, timeout=None):
            self.calls.append("join")

    starting, started = Worker(), Worker()
    ready = [threading.Event(), threading.Event()]
    ready[1].set()
    _stop_workers([starting, started], 30.0, ready)
    assert starting.calls[0] == "kill" and started.calls[0] == "terminate"


def test_a_local_worker_is_ready_only_once_its_runs_modules_are_imported(monkeypatch, tmp_path):
    """A stop that came as a worker's first run imported timm (seconds under load) waited for the import; a
    worker not yet ready is killed at once, so it imports what its runs need before it says it is ready."""
    import importlib
    import queue

    import torch

    from embedcache import interrupt
    from embedcache.students import sweep
    from embedcache.students.sweep import launchers

    real = [importlib.import_module(name, launchers.__package__).__name__ for name in launchers.RUN_MODULES]
    assert real == ["timm", "embedcache.students.train", "embedcache.students.heads"]
    said = []
    monkeypatch.setattr(importlib, "import_module", lambda name, package=None: said.append(name))
    monkeypatch.setattr(interrupt, "stop_on_signal", lambda: said.append("handlers set"))
    monkeypatch.setattr(interrupt, "let_go", lambda: said.append("let go"))
    monkeypatch.setattr(launchers, "_stop_when_orphaned", lambda parent: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(launchers, "_take_runs", lambda *a: said.append("runs taken"))
    monkeypatch.setattr(sweep, "SweepSpec", lambda **spec: spec)

    class Ready:
        def set(self):
            said.append("ready")

    launchers._worker_main(queue.Queue(), queue.Queue(), {}, str(tmp_path), "cpu", 1, ready=Ready())
    assert said == ["handlers set", *launchers.RUN_MODULES, "let go", "ready", "runs taken"]

    def broken(name, package=None):  # a broken timm: each run says so, as before, not the worker's death
        said.append(name)
        raise ImportError(f"no {name}")

    said.clear()
    monkeypatch.setattr(importlib, "import_module", broken)
    launchers._worker_main(queue.Queue(), queue.Queue(), {}, str(tmp_path), "cpu", 1, ready=Ready())
    assert said == ["handlers set", *launchers.RUN_MODULES, "let go", "ready", "runs taken"]
