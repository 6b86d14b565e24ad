"""Runs on cached features save their heads, not the frozen backbone: the backbone is named by the
features' key, rebuilt from the run's student settings when the run is loaded (and refused if it no
longer hashes to that key), and the run is scored from the store's cached features."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from embedcache.errors import StoreError, TrainingError
from embedcache.students import scoring
from embedcache.students.config import StudentConfig, TrainConfig
from embedcache.students.features import cache_features, features_key
from embedcache.students.models import build_student
from embedcache.students.rundir import RunDir
from embedcache.students.scoring import score_run
from embedcache.students.train import train

from conftest import quiet, store_with_features


@pytest.fixture(scope="module")
def feature_store(synthetic_store, tmp_path_factory):
    return store_with_features(synthetic_store, tmp_path_factory.mktemp("feature_runs"), seed=7)


def _cfg(store, student, out, recipe="vl2v_adip_align", **kw):
    base = dict(store=str(store), recipe=recipe, student=student, features=True, steps=30, batch_size=8,
                eval_every=10, ckpt_every=10, out=str(out), progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _interrupt(cfg, at: int) -> None:
    """Start ``cfg``'s run and kill it (Ctrl-C) after step ``at``: its last checkpoint stays."""
    def stop(step):
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop, log=quiet)


@pytest.mark.parametrize("recipe,select", [("vl2v_adip_align", "last"), ("linear_probe", "best_val")])
def test_a_feature_run_saves_its_heads_and_loads_with_its_own_backbone(feature_store, tmp_path, recipe, select):
    store, student, key = feature_store
    res = train(_cfg(store, student, tmp_path / "run", recipe, select=select, keep_checkpoint=True), log=quiet)
    saved = load_file(f"{res.out}/model.safetensors")
    assert saved and not [k for k in saved if k.startswith("backbone.")]
    assert ("classifier.weight" in saved) == (recipe == "linear_probe") and "head.weight" in saved
    ckpt = torch.load(f"{res.out}/checkpoint.pt", weights_only=True)
    assert ckpt["backbone_key"] == key and not [k for k in ckpt["model"] if k.startswith("backbone.")]
    if select == "best_val":
        assert not [k for k in ckpt["selection"]["state"] if k.startswith("backbone.")]
    run = RunDir(res.out)
    assert run.split["backbone_key"] == key
    model, _ = run.load_student()
    assert features_key(model) == key
    for k, v in load_file(student.pretrained).items():  # the backbone is the pretrained file's, BN statistics too
        assert torch.equal(model.backbone.state_dict()[k], v), k
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_image_runs_still_save_the_whole_student(feature_store, tmp_path):
    store, student, _ = feature_store
    res = train(_cfg(store, student, tmp_path / "img", features=False, steps=10, eval_every=10, ckpt_every=10), log=quiet)
    assert any(k.startswith("backbone.") for k in load_file(f"{res.out}/model.safetensors"))
    assert RunDir(res.out).split["backbone_key"] is None
    RunDir(res.out).load_student()


@pytest.mark.parametrize("recipe", ["vl2v_adip_align", "linear_probe"])
def test_scoring_from_cached_features_equals_scoring_through_the_backbone(feature_store, tmp_path, monkeypatch, recipe):
    store, student, _ = feature_store
    res = train(_cfg(store, student, tmp_path / "run", recipe), log=quiet)
    used = []
    real = scoring.cached_features

    def spy(*a):
        got = real(*a)
        used.append(got is not None)
        return got

    monkeypatch.setattr(scoring, "cached_features", spy)
    fast = score_run(res.out, protocols=("lodo", "per_class"), device="cpu")
    assert used == [True]  # scored from the cached features
    monkeypatch.setattr(scoring, "cached_features", lambda *a: None)  # the backbone on rendered views
    slow = score_run(res.out, protocols=("lodo", "per_class"), device="cpu")
    assert len(fast) and list(fast.columns) == list(slow.columns)
    num = fast.select_dtypes("number").columns
    np.testing.assert_allclose(fast[num].to_numpy(float), slow[num].to_numpy(float), atol=1e-6)
    assert fast.drop(columns=num).equals(slow.drop(columns=num))


def test_embeddings_from_cached_features_match_the_backbone(feature_store, tmp_path):
    from embedcache.api import StoreReader
    from embedcache.students.config import SplitConfig
    from embedcache.students.data import StoreData

    store, student, key = feature_store
    res = train(_cfg(store, student, tmp_path / "run", "linear_probe"), log=quiet)
    model, _ = RunDir(res.out).load_student()
    with StoreReader(str(store)) as reader:
        data = StoreData(reader, "name", SplitConfig(val_fraction=0.0))
        seen = RunDir(res.out).split["seen_classes"]
        a = scoring.embed_rows(model, data, seen, True, torch.device("cpu"), features=scoring.cached_features(reader, key))
        b = scoring.embed_rows(model, data, seen, True, torch.device("cpu"))
    assert np.isfinite(a[0]).all()
    np.testing.assert_allclose(a[0], b[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(a[1], b[1], atol=1e-5, rtol=1e-5)


def test_a_changed_backbone_file_is_refused_when_loading_and_resuming(feature_store, tmp_path, monkeypatch):
    store, student, key = feature_store
    weights = tmp_path / "backbone.safetensors"
    shutil.copy(student.pretrained, weights)
    own = StudentConfig(name="test_resnet", input_size=32, pretrained=str(weights))
    res = train(_cfg(store, own, tmp_path / "run"), log=quiet)
    cut = _cfg(store, own, tmp_path / "cut")
    _interrupt(cut, 15)
    before = score_run(res.out, device="cpu")
    state = load_file(str(weights))
    first = next(k for k in sorted(state) if state[k].is_floating_point())
    state[first] = state[first] + 1.0
    save_file(state, str(weights))
    with pytest.raises(TrainingError, match="trained a head on the features of backbone .* restore that file, or retrain"):
        RunDir(res.out).load_student()
    assert score_run(res.out, device="cpu").equals(before)  # from the cached features: no backbone needed
    with pytest.raises(TrainingError, match="changed or moved"):  # through the backbone it is refused
        monkeypatch.setattr(scoring, "cached_features", lambda *a: None)
        score_run(res.out, device="cpu")
    monkeypatch.undo()
    cache_features(str(store), own, device="cpu", progress=False, log=quiet)  # features of the changed file exist too
    with pytest.raises(TrainingError, match=r"began from other weights in student.pretrained=.*backbone.safetensors"):
        train(cut, log=quiet)  # the file's hash, recorded as the run began
    config = json.loads((tmp_path / "cut" / "config.json").read_text())  # a run from before the hash was recorded
    (tmp_path / "cut" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "student_weights"}))
    with pytest.raises(TrainingError, match=f"trained on the features of backbone {key}; the student settings now give student-"):
        train(cut, log=quiet)


def test_a_resumed_feature_run_ends_where_an_uninterrupted_one_ends(feature_store, tmp_path):
    store, student, _ = feature_store
    full = train(_cfg(store, student, tmp_path / "full", "linear_probe", select="best_val"), log=quiet)
    cut = _cfg(store, student, tmp_path / "cut", "linear_probe", select="best_val")
    _interrupt(cut, 25)
    res = train(cut, log=quiet)
    assert res.resumed_from == 20
    a, b = load_file(f"{full.out}/model.safetensors"), load_file(f"{res.out}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["selected"] == \
        json.loads((tmp_path / "cut" / "summary.json").read_text())["selected"]


def _keys(obj, prefix=""):
    """Every dict key in a nested checkpoint, dotted."""
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in [f"{prefix}{key}"] + _keys(v, f"{prefix}{key}.")]
    if isinstance(obj, (list, tuple)):
        return [k for v in obj for k in _keys(v, prefix)]
    return []


@pytest.mark.parametrize("averaging", ["swa", "swad"])
def test_averaging_a_feature_run_averages_its_heads_as_the_frozen_backbone_run_does(feature_store, tmp_path, averaging):
    store, student, _ = feature_store
    kw = dict(averaging=averaging, steps=40, eval_every=5, ckpt_every=5, average_start=0.2, keep_checkpoint=True)
    head = train(_cfg(store, student, tmp_path / "head", "linear_probe", **kw), log=quiet)
    full = train(_cfg(store, student, tmp_path / "full", "linear_probe", features=False, **kw), log=quiet)
    ckpt = torch.load(f"{head.out}/checkpoint.pt", weights_only=True)
    assert not [k for k in _keys(ckpt) if "backbone." in k]  # neither the model nor the averages hold it
    assert [k for k in _keys(torch.load(f"{full.out}/checkpoint.pt", weights_only=True)) if "backbone." in k]
    summary = json.loads((tmp_path / "head" / "summary.json").read_text())
    assert summary["selected"]["rule"] == f"average ({averaging})"
    assert summary["selected"] == json.loads((tmp_path / "full" / "summary.json").read_text())["selected"]
    wh, wf = load_file(f"{head.out}/model.safetensors"), load_file(f"{full.out}/model.safetensors")
    assert set(wh) == {"head.weight", "head.bias", "classifier.weight", "classifier.bias"}
    for k in wh:  # the closed-form head steps agree with autograd's to float32 rounding
        torch.testing.assert_close(wh[k], wf[k], atol=1e-5, rtol=1e-4)
    RunDir(head.out).load_student()


def test_a_feature_run_on_a_seeded_random_backbone_loads_under_its_seed(feature_store, tmp_path):
    store, _, _ = feature_store
    student = StudentConfig(name="test_resnet", input_size=32)  # no file: the backbone is the seed's
    key = cache_features(str(store), student, seed=3, device="cpu", progress=False, log=quiet)
    res = train(_cfg(store, student, tmp_path / "run", "linear_probe", seed=3), log=quiet)
    assert RunDir(res.out).split["backbone_key"] == key
    model, _ = RunDir(res.out).load_student()
    assert features_key(model) == key
    with pytest.raises(StoreError, match="no cached features"):  # another seed builds another backbone
        train(_cfg(store, student, tmp_path / "other", "linear_probe", seed=4), log=quiet)


@pytest.mark.parametrize("averaging,select", [("swa", "auto"), ("swad", "auto"), ("none", "best_val")])
def test_an_old_checkpoint_that_saved_its_backbone_resumes_and_saves_heads_only(feature_store, tmp_path, averaging, select):
    """Checkpoints written before runs on cached features left out their backbone hold it in the model,
    the weight averages and the selected weights: the run resumes from one and ends as if uninterrupted."""
    store, student, _ = feature_store
    kw = dict(averaging=averaging, select=select, steps=40, eval_every=5, ckpt_every=5,
              **({"average_start": 0.2} if averaging != "none" else {}))  # averaging none reads no start
    full = train(_cfg(store, student, tmp_path / "full", "linear_probe", **kw), log=quiet)
    cut = _cfg(store, student, tmp_path / "cut", "linear_probe", **kw)
    _interrupt(cut, 22)
    path = tmp_path / "cut" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    backbone = {f"backbone.{k}": v for k, v in load_file(student.pretrained).items()}
    ckpt["model"].update(backbone)
    del ckpt["backbone_key"]
    if averaging == "swa":
        ckpt["averaging"]["avg"].update({f"module.{k}": v for k, v in backbone.items()})
    elif averaging == "swad":  # the valley's segments (sums, not means) and the final average
        valley = ckpt["averaging"]["valley"]
        sums = [seg["sum"] for seg in valley["segments"]] + ([valley["final"]["sum"]] if valley["final"] else [])
        assert sums
        for total in sums:
            total.update({k: v.double() for k, v in backbone.items()})
    else:
        ckpt["selection"]["state"].update(backbone)
    torch.save(ckpt, path)
    res = train(cut, log=quiet)
    a, b = load_file(f"{full.out}/model.safetensors"), load_file(f"{res.out}/model.safetensors")
    assert a.keys() == b.keys() and not [k for k in b if k.startswith("backbone.")]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_old_checkpoint_with_another_backbone_is_refused(feature_store, tmp_path):
    """Checkpoints written before runs on cached features left out their backbone hold one and no key:
    the one they hold must be the backbone whose features the run reads."""
    store, student, _ = feature_store
    cut = _cfg(store, student, tmp_path / "cut")
    _interrupt(cut, 15)
    path = tmp_path / "cut" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    other = build_student(StudentConfig(name="test_resnet", input_size=32), 8)
    ckpt["model"].update({f"backbone.{k}": v for k, v in other.backbone.state_dict().items()})
    del ckpt["backbone_key"]
    torch.save(ckpt, path)
    with pytest.raises(TrainingError, match="checkpoint's backbone is not the one whose cached features this run reads"):
        train(cut, log=quiet)


def test_few_shot_fine_tuning_of_a_feature_run_trains_its_whole_student(feature_store, tmp_path, monkeypatch):
    from embedcache.students.config import SplitConfig

    store, student, _ = feature_store
    res = train(_cfg(store, student, tmp_path / "run", split=SplitConfig(train_classes=("circle", "triangle"))), log=quiet)
    loaded = []
    real = RunDir.load_student
    monkeypatch.setattr(RunDir, "load_student", lambda self, *a: loaded.append(1) or real(self, *a))
    rows = score_run(res.out, protocols=("few_shot",), finetune_steps=2, device="cpu")
    assert loaded and (rows["split"] == "finetune@2").any()  # the rebuilt backbone, fine-tuned on the shots
    loaded.clear()
    assert len(score_run(res.out, protocols=("few_shot",), device="cpu")) and not loaded  # heads alone
    # the protocol's episodes, also for fine-tuning: the same query images under every method
    rows = score_run(res.out, protocols=("few_shot",), finetune_steps=1, device="cpu",
                     options={"few_shot": {"shots": 2, "episodes": 1}})
    top1 = rows[(rows.metric == "top1") & (rows.episode == 0)].set_index("split").n
    assert set(rows.episode) == {0, -1} and top1["finetune@1@2shot"] == top1["prototype@2shot"] == top1["tip_adapter@2shot"]


def test_the_command_named_for_missing_features_makes_them(feature_store, tmp_path):
    """The refusal named `embedcache features --store S --student X` without the run's input size or
    seed: run as given, it cached another backbone's features and the same refusal came back."""
    import re
    import shlex

    from click.testing import CliRunner

    from embedcache.cli import main

    store, _, _ = feature_store
    student = StudentConfig(name="test_resnet", input_size=40)
    cfg = _cfg(store, student, tmp_path / "run", "linear_probe", seed=5)
    with pytest.raises(StoreError, match="no cached features") as err:
        train(cfg, log=quiet)
    said = re.search(r"`(embedcache features [^`]*)`", str(err.value)).group(1)
    assert "--set input_size=40" in said and "--seed 5" in said, said
    made = CliRunner().invoke(main, shlex.split(said)[1:] + ["--device", "cpu", "--no-progress"])
    assert made.exit_code == 0, made.output
    assert train(cfg, log=quiet).steps == cfg.steps
    # a train-style spelling of the student setting works there too
    again = CliRunner().invoke(main, ["features", "--store", str(store), "--student", "test_resnet", "--set",
                                      "student.input_size=40", "--seed", "5", "--device", "cpu", "--no-progress"])
    assert again.exit_code == 0, again.output


def test_a_sweeps_missing_features_hint_names_seeds_only_where_they_move_the_weights(feature_store, tmp_path):
    """The hint gave a pretrained backbone's first run's --seed, irrelevant to its weights, and one
    command per seed of a random backbone, all in one long line (a trial): now one command per
    student, naming the seeds that build other weights; run as given, it caches every one."""
    import re
    import shlex

    from click.testing import CliRunner

    from embedcache.api import StoreReader
    from embedcache.cli import main
    from embedcache.store import Store
    from embedcache.students.features import missing_features

    store, pretrained, _ = feature_store
    store = shutil.copytree(store, tmp_path / "s.zarr")
    fresh = StudentConfig(name="test_resnet", input_size=24)  # random weights: each seed its own
    runs = [_cfg(store, pretrained, tmp_path / f"p{seed}", seed=seed) for seed in (3, 4)]
    runs += [_cfg(store, fresh, tmp_path / f"f{seed}", seed=seed) for seed in (0, 1, 2)]
    with Store(str(store)) as st:
        hint = missing_features(StoreReader(st), [runs[0], runs[1]])
        assert hint is None  # the pretrained backbone's features are cached (under seed 7): seeds 3, 4 read them
        hint = missing_features(StoreReader(st), runs)
    commands = re.findall(r"`(embedcache features [^`]*)`", hint)
    assert len(commands) == 1 and commands[0].endswith("--seed 0 --seed 1 --seed 2"), hint
    assert "for 3 test_resnet backbone(s)" in hint, hint
    assert "each run's seed builds its own random backbone" in hint, hint
    with Store(str(store)) as st:  # seed 0 builds a random backbone of its own too: 0 and 1 are two (a review)
        assert "each run's seed builds its own random backbone" in missing_features(StoreReader(st), runs[2:4])
    made = CliRunner().invoke(main, shlex.split(commands[0])[1:] + ["--device", "cpu", "--no-progress"])
    assert made.exit_code == 0 and made.output.count("cached ") == 3, made.output
    with Store(str(store)) as st:
        assert missing_features(StoreReader(st), runs) is None
    # a pretrained backbone whose features are missing: its command names no seed
    other = StudentConfig(name="test_resnet", input_size=28, pretrained=pretrained.pretrained)
    with Store(str(store)) as st:
        hint = missing_features(StoreReader(st), [_cfg(store, other, tmp_path / "o", seed=5)])
    assert "--set input_size=28" in hint and "--seed" not in hint and "random backbone" not in hint, hint

def test_features_refuse_a_batch_size_below_one_and_remake_an_array_gone_from_disk(synthetic_store, tmp_path):
    """`features --batch-size -1` stored all-zero features as complete (exit 0; a linear probe on them
    trained at chance), and a features array deleted from disk read as "already cached" (a trial)."""
    from click.testing import CliRunner

    from embedcache.cli import main
    from embedcache.errors import ConfigError
    from embedcache.store import Store

    store = tmp_path / "s.zarr"
    shutil.copytree(synthetic_store, store)
    student = StudentConfig(name="test_resnet", input_size=32)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=f"batch_size={bad} is not valid: give 1 or more"):
            cache_features(str(store), student, batch_size=bad, device="cpu", progress=False, log=quiet)
        said = CliRunner().invoke(main, ["features", "--store", str(store), "--student", "test_resnet", "--set",
                                         "input_size=32", "--batch-size", str(bad)])
        assert said.exit_code == 2 and "--batch-size" in said.output, said.output
    key = cache_features(str(store), student, device="cpu", progress=False, log=quiet)
    with Store(str(store)) as st:
        made = st.read_derived(key)
    assert np.abs(made).max() > 0
    shutil.rmtree(store / "derived" / key)
    said = []
    cache_features(str(store), student, device="cpu", progress=False, log=said.append)
    assert not any("already cached" in line for line in said), said
    with Store(str(store)) as st:
        assert np.array_equal(st.read_derived(key), made)


def test_a_second_features_call_beside_a_live_one_is_refused_to_try_again(synthetic_store, tmp_path):
    """Two `features` calls at once on one Zarr store both computed (twice the compute), and the later of two
    for other backbones wrote the store's list of derived arrays without the earlier's (a review)."""
    import os

    from embedcache.fileio import try_exclusive_lock
    from embedcache.store import Store

    store = tmp_path / "s.zarr"
    shutil.copytree(synthetic_store, store)
    student = StudentConfig(name="test_resnet", input_size=32)
    held = try_exclusive_lock(store / ".features.lock")  # what a live `features` call holds
    try:
        with pytest.raises(StoreError, match=r"another `embedcache features` is computing features in .*s.zarr now; "
                                             r"wait for it to finish") as busy:
            cache_features(str(store), student, device="cpu", progress=False, log=quiet)
        assert busy.value.exit_code == 75
    finally:
        os.close(held)
    key = cache_features(str(store), student, device="cpu", progress=False, log=quiet)  # once it is done
    with Store(str(store)) as st:
        assert list(st.derived()) == [key]


def test_a_stopped_features_command_says_it_starts_again(synthetic_store, tmp_path, monkeypatch):
    """Ctrl-C said "rerun the same command to resume"; the array is written whole, so a rerun starts
    from the first batch (a trial)."""
    from click.testing import CliRunner

    from embedcache.cli import main
    from embedcache.students import features

    def stop(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "student_views", stop)
    said = CliRunner().invoke(main, ["features", "--store", str(synthetic_store), "--student", "test_resnet", "--set",
                                     "input_size=24", "--device", "cpu", "--no-progress"])
    assert said.exit_code == 130 and "nothing was kept (backbones already cached stay); rerun the same command to compute the rest from the start" in said.output
    assert "resume" not in said.output, said.output


def test_features_refuses_a_second_student_name_in_set(synthetic_store):
    """`features --student resnet18 --set name=test_resnet` cached resnet18's features without a word (a review)."""
    from click.testing import CliRunner

    from embedcache.cli import main

    said = CliRunner().invoke(main, ["features", "--store", str(synthetic_store), "--student", "resnet18", "--set",
                                     "student.name=test_resnet", "--no-progress"])
    # named as typed (it said `--set name=test_resnet`, a trial)
    assert said.exit_code == 2 and "--student resnet18 and --set student.name=test_resnet name two students" in said.output
    nested = CliRunner().invoke(main, ["features", "--store", str(synthetic_store), "--student", "test_resnet", "--set",
                                       "name.x=1", "--no-progress"])  # an IndexError (a review)
    assert nested.exit_code == 2 and "Traceback" not in nested.output and "name two students" in nested.output, \
        nested.output

