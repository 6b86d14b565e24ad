"""Packs of heads (issue 12): head-only runs that differ in seed, learning rate and weight decay,
trained together as one vectorised model, end where separate runs end."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from embedcache.errors import ConfigError
from embedcache.students.config import OptimConfig, TrainConfig
from embedcache.students.heads import pack_key, train_heads
from embedcache.students.train import train

from conftest import quiet, store_with_features


@pytest.fixture(scope="module")
def feature_store(synthetic_store, tmp_path_factory):
    store, student, _ = store_with_features(synthetic_store, tmp_path_factory.mktemp("heads"), seed=5)
    return store, student


def _cfg(store, student, out, recipe, seed, lr, wd=0.01, name="adamw", batch_size=8, **kw):
    return TrainConfig(store=str(store), recipe=recipe, student=student, features=True, steps=30, batch_size=batch_size,
                       eval_every=10, ckpt_every=10, seed=seed, optim=OptimConfig(name=name, lr=lr, weight_decay=wd),
                       out=str(out), progress=False, device="cpu", **kw)


@pytest.mark.parametrize("recipe,opt,kw", [("vl2v_adip_align", "adamw", {}), ("linear_probe", "adam", {}),
                                           ("linear_probe", "sgd", {}),
                                           # each view paired with the plain image's target, in a pack too (a review)
                                           ("vl2v_adip_align", "adamw", {"plain_targets": True, "skip_plain_view": True})])
def test_a_pack_ends_where_separate_runs_end(feature_store, tmp_path, recipe, opt, kw):
    store, student = feature_store
    grid = [(0, 1e-2, 0.01), (1, 3e-3, 0.0), (2, 1e-2, 0.1)]
    packed = [_cfg(store, student, tmp_path / f"pack{k}", recipe, s, lr, wd, opt, **kw) for k, (s, lr, wd) in enumerate(grid)]
    alone = [_cfg(store, student, tmp_path / f"alone{k}", recipe, s, lr, wd, opt, **kw) for k, (s, lr, wd) in enumerate(grid)]
    assert len({pack_key(c) for c in packed}) == 1
    got = train_heads(packed, log=quiet)
    for p, a, r in zip(packed, alone, got):
        ref = train(a, log=quiet)
        wp, wa = load_file(f"{p.out}/model.safetensors"), load_file(f"{a.out}/model.safetensors")
        assert set(wp) == set(wa)
        for k in wa:
            torch.testing.assert_close(wp[k], wa[k], atol=2e-5, rtol=1e-4)
        assert r.val_top1 == pytest.approx(ref.val_top1)
        mp = [json.loads(ln) for ln in open(f"{p.out}/metrics.jsonl")]
        ma = [json.loads(ln) for ln in open(f"{a.out}/metrics.jsonl")]
        assert [m["step"] for m in mp] == [m["step"] for m in ma]
        for x, y in zip(mp, ma):
            assert x["lr"] == pytest.approx(y["lr"]) and x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert (tmp_path / p.out / "done").exists()
        # whether a run was packed is recorded (the weights alone cannot tell: a trial)
        assert [json.loads((Path(c.out) / "summary.json").read_text())["heads_packed"] for c in (p, a)] == [3, 1]


def test_a_pack_holds_its_run_folders_as_a_lone_train_does(feature_store, tmp_path):
    """A pack of heads took no lock on its run folders: a `train` of one of them beside it trained the run
    twice (a review). A folder another process trains is refused; the pack's finished runs keep no lock."""
    import os

    from embedcache.errors import TrainingError
    from embedcache.fileio import try_exclusive_lock

    store, student = feature_store
    cfgs = [_cfg(store, student, tmp_path / f"pack{k}", "linear_probe", k, 1e-2) for k in range(2)]
    (tmp_path / "pack1").mkdir()
    held = try_exclusive_lock(tmp_path / "pack1" / ".train.lock")
    try:
        with pytest.raises(TrainingError, match=rf"another `embedcache train` is running in {tmp_path / 'pack1'}"):
            train_heads(cfgs, log=quiet)
    finally:
        os.close(held)
    assert not (tmp_path / "pack0" / "config.json").exists()  # nothing trained beside the holder
    train_heads(cfgs, log=quiet)
    assert all((tmp_path / f"pack{k}" / "done").exists() and not (tmp_path / f"pack{k}" / ".train.lock").exists()
               for k in range(2))


def test_runs_that_differ_in_more_than_seed_and_lr_do_not_pack(feature_store, tmp_path):
    store, student = feature_store
    a = _cfg(store, student, tmp_path / "a", "linear_probe", 0, 1e-2)
    b = _cfg(store, student, tmp_path / "b", "linear_probe", 0, 1e-2, batch_size=4)
    assert pack_key(a) != pack_key(b)
    with pytest.raises(ConfigError, match="differ only in seed, optim.lr, optim.weight_decay"):
        train_heads([a, b], log=quiet)


def test_a_sweep_of_head_only_runs_without_their_cached_features_is_refused_before_any_run(synthetic_store, tmp_path,
                                                                                         monkeypatch):
    """The full-backbone runs of a grid used to train first; then every head-only run failed alone."""
    import yaml

    from embedcache.students.sweep import load_sweep, run_sweep

    spec = {"store": str(synthetic_store), "protocol": "lodo", "holdout_domains": ["outline"], "launcher": "serial",
            "base": {"steps": 2, "batch_size": 8, "device": "cpu", "student": {"name": "test_resnet", "input_size": 32}},
            "grid": {"recipe": ["ce", "vl2v_adip_align"], "seed": [0]},
            "per_recipe": {"vl2v_adip_align": {"features": True}}}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"no cached features for 1 test_resnet backbone\(s\) .*`embedcache features --store"):
        run_sweep(load_sweep(str(f)), str(tmp_path / "sw"), progress=False, log=quiet)
    assert not (tmp_path / "sw").exists()
    # once the head-only run has its results, a relaunch (to train the others) does not need its features
    import embedcache.students.sweep as sweep_mod
    from embedcache.students.sweep.worker import result_path

    with monkeypatch.context() as m:
        m.setattr(sweep_mod, "missing_features", lambda reader, cfgs: None)
        head = next(p for p in sweep_mod.expand(load_sweep(str(f)), str(tmp_path / "sw")) if p.cfg.features)
    done = result_path(str(tmp_path / "sw"), Path(head.cfg.out).name)
    done.parent.mkdir(parents=True)
    done.write_bytes(b"")
    assert len(sweep_mod.expand(load_sweep(str(f)), str(tmp_path / "sw"))) == 2


def test_packed_heads_of_a_student_the_seed_builds_pack_by_backbone(synthetic_store, tmp_path):
    """A random-weights student (no student.pretrained) is another backbone under every run's seed: the
    sweep asked for one backbone's features per launch, then every pack failed ('must share one frozen
    backbone') after passing every check (a trial). All missing commands are named at once; packs form
    per backbone."""
    import shutil

    import yaml

    from embedcache.students.features import cache_features
    from embedcache.students.models import StudentConfig, build_seeded
    from embedcache.students.sweep import _backbones, expand, load_sweep, make_jobs, run_sweep

    store = tmp_path / "store.zarr"
    shutil.copytree(synthetic_store, store)
    spec = {"store": str(store), "protocol": "lodo", "holdout_domains": ["outline"], "launcher": "serial",
            "pack_heads": True,
            "base": {"recipe": "vl2v_adip_align", "features": True, "steps": 4, "batch_size": 8, "eval_every": 4,
                     "device": "cpu", "student": {"name": "test_resnet", "input_size": 32}},
            "grid": {"seed": [0, 1], "optim.lr": [1e-3, 1e-2]}}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(spec))
    # each run's own seed (derived from its grid point) builds its own backbone: four of them, all named
    with pytest.raises(ConfigError, match=r"no cached features for 4 test_resnet backbone\(s\) .*; run `embedcache "
                                          r"features [^`]*( --seed \d+){4}` first \(each run's seed builds its own "
                                          r"random backbone: a pretrained student \(student.pretrained\) shares one "
                                          r"set of features, and its heads can pack\)"):  # one command, four seeds
        run_sweep(load_sweep(str(f)), str(tmp_path / "sw"), progress=False, log=quiet)
    student = StudentConfig(name="test_resnet", input_size=32)
    import embedcache.students.sweep as sweep_mod
    with pytest.MonkeyPatch.context() as m:  # the runs and their own seeds (the sweep derives them), features aside
        m.setattr(sweep_mod, "missing_features", lambda reader, cfgs: None)
        points = expand(load_sweep(str(f)), str(tmp_path / "sw"))
    for seed in sorted({p.cfg.seed for p in points}):
        cache_features(str(store), student, seed=seed, device="cpu", progress=False, log=quiet)
    spec_ = load_sweep(str(f))
    jobs = make_jobs(points, True, _backbones(spec_, points))
    assert [len(j) for j in jobs] == [1, 1, 1, 1]  # no two share a backbone: nothing to pack, nothing fails
    assert [len(j) for j in make_jobs(points, True)] == [4]  # without the backbones: one pack, which failed
    said = []
    res = run_sweep(spec_, str(tmp_path / "sw"), progress=False, log=said.append)
    assert res["results"]["run"].nunique() == 4
    assert any(line.startswith("note: pack_heads is set, but no two runs pack: runs of a pack differ only in seed")
               and "random weights" in line for line in said), said  # it was ignored without a word (a trial)
    import embedcache.students.features as features_mod

    built = []
    with pytest.MonkeyPatch.context() as m:  # a launch asked for every backbone twice (missing features, packs)
        m.setattr(features_mod, "_KEYS", {}, raising=False)
        m.setattr(features_mod, "build_seeded", lambda *a: built.append(a) or build_seeded(*a))
        run_sweep(spec_, str(tmp_path / "sw2"), progress=False, log=quiet)
    assert len(built) == 4


def test_a_sweep_packs_heads_and_scores_like_one_run_at_a_time(feature_store, tmp_path):
    import pandas as pd
    import yaml

    from embedcache.students.sweep import expand, load_sweep, make_jobs, run_sweep

    store, student = feature_store
    spec = {"store": str(store), "protocol": "lodo", "holdout_domains": ["outline"], "launcher": "serial",
            "base": {"recipe": "vl2v_adip_align", "features": True, "steps": 20, "batch_size": 8, "eval_every": 10,
                     "device": "cpu", "student": {"name": "test_resnet", "input_size": 32, "pretrained": student.pretrained}},
            "grid": {"seed": [0, 1, 2], "optim.lr": [1e-3, 1e-2]}}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(spec))
    packed = load_sweep(str(f), ["pack_heads=true"])
    jobs = make_jobs(expand(packed, str(tmp_path / "a")), True)
    assert [len(j) for j in jobs] == [6]  # one pack of six heads
    a = run_sweep(packed, str(tmp_path / "a"), progress=False, log=quiet)["results"]
    b = run_sweep(load_sweep(str(f)), str(tmp_path / "b"), progress=False, log=quiet)["results"]
    key = ["run", "protocol", "split", "domain", "metric"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key + ["value"]], b[key + ["value"]], atol=1e-6)


def test_heads_on_different_backbones_do_not_pack_and_equal_ones_share_one(feature_store, tmp_path):
    from embedcache.students.config import StudentConfig
    from embedcache.students.features import cache_features
    from embedcache.students.train import Trainer

    store, student = feature_store
    seeded = StudentConfig(name="test_resnet", input_size=32)  # no file: each seed builds its own backbone
    cache_features(str(store), seeded, seed=0, device="cpu", progress=False, log=quiet)
    runs = [_cfg(store, seeded, tmp_path / f"r{k}", "linear_probe", k, 1e-2) for k in (0, 1)]
    with pytest.raises(ConfigError, match="must share one frozen backbone"):
        train_heads(runs, log=quiet)
    first = Trainer(_cfg(store, student, tmp_path / "s0", "linear_probe", 0, 1e-2), log=quiet)
    other = Trainer(_cfg(store, student, tmp_path / "s1", "linear_probe", 1, 1e-2), log=quiet, shared=first)
    assert other.model.backbone is first.model.backbone and other.backbone_key == first.backbone_key


def test_a_packs_loop_seconds_count_the_steps_not_evaluations(feature_store, tmp_path, monkeypatch):
    import time

    from embedcache.students.train import Trainer

    store, student = feature_store
    real_eval = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a: (time.sleep(0.5), real_eval(self, *a)))
    runs = [_cfg(store, student, tmp_path / f"r{k}", "linear_probe", k, 1e-2) for k in (0, 1)]
    res = train_heads(runs, log=quiet)  # 3 evaluations of 2 heads: 3 s
    assert all(0 < r.loop_seconds <= r.seconds - 3.0 for r in res)  # whatever the machine's speed


def test_a_head_only_run_trains_in_float32_alone_as_in_a_pack():
    """A pack of heads runs its vectorised loss in float32; a solo head-only run under bf16 autocast
    ended 0.02 away from its packed twin on a GPU."""
    from embedcache.students.config import TrainConfig
    from embedcache.students.train import autocast_on

    cfg = TrainConfig(store="s.zarr")
    assert autocast_on(cfg, "cuda", "images") and not autocast_on(cfg, "cuda", "features")
    assert not autocast_on(cfg, "cpu", "images")
    from embedcache.config import replace
    assert not autocast_on(replace(cfg, amp=False), "cuda", "images")


def test_a_pack_rerun_clears_old_failures_and_skips_runs_finished_meanwhile(feature_store, tmp_path, monkeypatch):
    """A pack (as one run) rechecks for results once it holds a claim, and a run scored now loses its
    old error.txt: the pack did neither (a run finished by another worker was scored again)."""
    import yaml

    from embedcache.students.sweep import claim, expand, load_sweep, make_jobs, run_sweep
    from embedcache.students.rundir import RunDir
    from embedcache.students.sweep.worker import result_path, run_pack

    store, student = feature_store
    spec = {"store": str(store), "protocol": "lodo", "holdout_domains": ["outline"], "launcher": "serial",
            "base": {"recipe": "linear_probe", "features": True, "steps": 10, "batch_size": 8, "eval_every": 10,
                     "device": "cpu", "student": {"name": "test_resnet", "input_size": 32, "pretrained": student.pretrained}},
            "grid": {"seed": [0, 1]}, "pack_heads": True}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(str(f))
    out = str(tmp_path / "sw")
    run_sweep(sweep, out, progress=False, log=quiet)
    points = make_jobs(expand(sweep, out), True)[0]
    first, second = (RunDir(p.cfg.out) for p in points)
    (first.path / "error.txt").write_text("an old failure")
    result_path(out, first.name).unlink()
    kept = result_path(out, second.name)
    kept_bytes = kept.read_bytes()
    kept.unlink()
    real_enter = claim.Claim.__enter__

    def finished_meanwhile(self):  # another worker writes the second run's results just before we claim it
        if self.path.parent == second.path:
            kept.write_bytes(kept_bytes)
        return real_enter(self)

    monkeypatch.setattr(claim.Claim, "__enter__", finished_meanwhile)
    statuses = {r["run"]: r["status"] for r in run_pack(points, sweep, out)}
    assert statuses == {first.name: "done", second.name: "skipped"}
    assert not (first.path / "error.txt").exists() and kept.read_bytes() == kept_bytes


def test_a_diverging_head_fails_alone_and_its_pack_mates_finish(feature_store, tmp_path):
    """One head of a pack at lr 1e38 made every run of the pack fail, on every relaunch, with the
    diverged run's error in each one's error.txt (a trial). It fails alone; the others end as they would
    alone."""
    from embedcache.errors import TrainingError

    store, student = feature_store
    good = _cfg(store, student, tmp_path / "good", "linear_probe", 0, 1e-3, name="sgd")
    bad = _cfg(store, student, tmp_path / "bad", "linear_probe", 0, 1e38, name="sgd")
    alone = _cfg(store, student, tmp_path / "alone", "linear_probe", 0, 1e-3, name="sgd")
    got = train_heads([bad, good], log=quiet)
    assert isinstance(got[0], TrainingError) and "bad" in str(got[0]) and "good" not in str(got[0])
    assert (tmp_path / "good" / "done").exists() and not (tmp_path / "bad" / "done").exists()
    ref = train(alone, log=quiet)
    assert got[1].val_top1 == pytest.approx(ref.val_top1)
    wg, wa = load_file(f"{good.out}/model.safetensors"), load_file(f"{alone.out}/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wg[k], wa[k], atol=2e-5, rtol=1e-4)
    with pytest.raises(TrainingError, match="bad"):  # a pack of diverging heads alone: its first error
        train_heads([_cfg(store, student, tmp_path / "bad2", "linear_probe", 0, 1e38, name="sgd")], log=quiet)


def test_a_packed_sweep_with_a_diverging_learning_rate_finishes_its_other_runs(feature_store, tmp_path):
    import yaml

    from embedcache.students.sweep import load_sweep, run_sweep

    store, student = feature_store
    spec = {"store": str(store), "protocol": "lodo", "holdout_domains": ["outline"], "launcher": "serial",
            "pack_heads": True,
            "base": {"recipe": "linear_probe", "features": True, "steps": 20, "batch_size": 8, "eval_every": 10,
                     "device": "cpu", "optim": {"name": "sgd"},
                     "student": {"name": "test_resnet", "input_size": 32, "pretrained": student.pretrained}},
            "grid": {"seed": [0], "optim.lr": [1e-3, 1e38]}}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(spec))
    res = run_sweep(load_sweep(str(f)), str(tmp_path / "sw"), progress=False, log=quiet)
    assert (res["done"], res["failed"]) == (1, 1), res
    errors = list((tmp_path / "sw" / "runs").glob("*/error.txt"))
    assert len(errors) == 1 and errors[0].parent.name in errors[0].read_text()  # its own error, not another's
    assert "lower optim.lr in the sweep file (another value is another run)" in errors[0].read_text()  # not --out


def test_the_no_pack_note_names_the_settings_that_keep_runs_apart():
    """A lodo sweep of head-only runs on a pretrained backbone was told its runs did not pack because of
    their backbone, when their held-out domains kept them apart (a review)."""
    from types import SimpleNamespace

    from embedcache.config import replace
    from embedcache.students.data import SplitConfig
    from embedcache.students.models import StudentConfig
    from embedcache.students.sweep import _why_no_pack

    base = TrainConfig(store="s.zarr", recipe="vl2v_adip_align", features=True,
                       student=StudentConfig(name="test_resnet", pretrained="w.safetensors"))
    held = [SimpleNamespace(cfg=replace(base, seed=s, split=SplitConfig(holdout_domains=[d]))) for s, d in ((0, "a"), (1, "b"))]
    assert _why_no_pack(held) == ("runs of a pack differ only in seed, optim.lr, optim.weight_decay, and these differ "
                                  "in split.holdout_domains")
    seeds = [SimpleNamespace(cfg=replace(base, seed=s)) for s in (0, 1)]
    assert "share one frozen backbone" in _why_no_pack(seeds)
    alone = [seeds[0], SimpleNamespace(cfg=replace(base, recipe="ce", features=False))]  # one run could pack
    assert _why_no_pack(alone).endswith("with no averaging and one stage, and one run of this sweep is one")
