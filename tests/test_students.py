"""Student training from a store: recipes, view consistency, determinism, resume, head-only mode."""
import json
import re
import shutil
from pathlib import Path

import numpy as np

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import embedcache
from embedcache.cli import main
from embedcache.config import replace
from embedcache.errors import ConfigError, StoreError
from embedcache.views import render_views, to_uint8
from embedcache.students.data import SplitConfig, StoreData
from embedcache.students.models import StudentConfig, build_student
from embedcache.students.recipes import RECIPES
from embedcache.students.train import TrainConfig, train

from conftest import quiet


def _cfg(store, tmp_path, recipe="li_iccv23", name="run", **kw):
    base = dict(store=str(store), recipe=recipe, student=StudentConfig(name="test_resnet", input_size=32),
                steps=30, batch_size=8, eval_every=10, ckpt_every=10, out=str(tmp_path / name), progress=False,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("recipe", RECIPES.names())
def test_every_recipe_trains_and_its_loss_goes_down(recipe, synthetic_store, tmp_path):
    from embedcache.students.train import OptimConfig

    res = train(_cfg(synthetic_store, tmp_path, recipe, optim=OptimConfig(lr=3e-3, schedule="constant")), log=quiet)
    rows = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["loss"] < rows[0]["loss"], rows
    assert res.val_top1 is not None and 0.0 <= res.val_top1 <= 1.0
    for f in ("config.json", "split.json", "model.safetensors", "summary.json", "done"):
        assert (tmp_path / "run" / f).exists()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # resume state is dropped once the run is done
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recipe"] == recipe
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["torch_threads"] == torch.get_num_threads() and summary["device"] == "cpu"  # what the bits depend on


def test_student_view_is_resampled_as_the_teachers_was(make_cfg, tiny_teacher, tmp_path):
    """A teacher that resizes bilinear (open_clip's MobileCLIP, DFN and PE models; a remote teacher so
    set): the student's views were always bicubic, up to 0.13 off the view whose embedding is its target."""
    import copy

    from embedcache.extract import extract
    from embedcache.students.providers import TARGETS, student_views

    bilinear = copy.copy(tiny_teacher)
    bilinear.interpolation = "bilinear"
    cfg = make_cfg("bilinear.zarr", "views.count=3", "views.scale=[0.2,0.5]")  # small crops: resized a lot
    extract(cfg, teacher=bilinear, log=quiet)
    data = StoreData(cfg.out, "name")
    assert data.interpolation == "bilinear"
    idx, views = data.sample(step=1, seed=0, batch_size=6)
    x = student_views(data, idx, views, tiny_teacher.input_size, (0, 0, 0), (1, 1, 1), torch.device("cpu"))
    canvas, params = torch.from_numpy(data.pixels[idx]), torch.from_numpy(data.params[idx, views][:, None])
    ref = render_views(canvas, params, tiny_teacher.input_size, "bilinear")[:, 0]
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=0)
    assert float((render_views(canvas, params, tiny_teacher.input_size)[:, 0] - ref).abs().max()) > 1e-2  # it matters
    t, _ = TARGETS.get("store")(data, torch.device("cpu"))(idx, views)
    torch.testing.assert_close(bilinear.encode_pixels(to_uint8(x)), t, atol=2e-3, rtol=0)


def test_student_view_is_the_teachers_view(synthetic_store, tiny_teacher):
    from embedcache.students.providers import TARGETS, student_views

    data = StoreData(str(synthetic_store), "name")
    idx, views = data.sample(step=3, seed=0, batch_size=6)
    assert (views > 0).any()
    x = student_views(data, idx, views, tiny_teacher.input_size, (0, 0, 0), (1, 1, 1), torch.device("cpu"))
    ref = render_views(torch.from_numpy(data.pixels[idx]), torch.from_numpy(data.params[idx, views][:, None]),
                       tiny_teacher.input_size)[:, 0]
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=0)  # the batched renderer, to float32 rounding
    t, _ = TARGETS.get("store")(data, torch.device("cpu"))(idx, views)
    # the teacher re-encoding the student's view (as 8-bit pixels) gives the stored target of that view
    torch.testing.assert_close(tiny_teacher.encode_pixels(to_uint8(x)), t, atol=2e-3, rtol=0)
    online, _ = TARGETS.get("teacher_online")(data, torch.device("cpu"), teacher=tiny_teacher)(idx, views)
    torch.testing.assert_close(online, t, atol=2e-3, rtol=0)


def test_online_targets_and_text_queries_take_only_the_stores_own_teacher(synthetic_store, tmp_path):
    from conftest import save_tiny_clip

    from embedcache.config import TeacherConfig
    from embedcache.students.providers import TARGETS
    from embedcache.teachers import build_teacher

    other = build_teacher(TeacherConfig(name="open_clip", model=f"local-dir:{save_tiny_clip(tmp_path / 'c', seed=1)}",
                                        device="cpu"))
    data = StoreData(str(synthetic_store), "name")
    with pytest.raises(StoreError, match="differs from the one that made .*online targets must come from the store's"):
        TARGETS.get("teacher_online")(data, torch.device("cpu"), teacher=other)
    with pytest.raises(StoreError, match="differs from the one that made"):
        data.reader.nearest_images("a circle", teacher=other)


def test_a_colour_augmented_store_gives_the_student_the_teachers_view(make_cfg, tiny_teacher):
    """views.color_jitter / views.grayscale (DomainBed's augmentation): stored with each crop, rendered
    alike for teacher and student, and part of the store's key only when in use."""
    from embedcache.extract import extract
    from embedcache.students.providers import TARGETS, student_views

    cfg = make_cfg("color.zarr", "views.color_jitter=0.3", "views.grayscale=0.5", "views.count=4")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    plain = make_cfg("plain.zarr", "views.count=4")
    extract(plain, teacher=tiny_teacher, log=quiet)
    data, base = StoreData(cfg.out, "name"), StoreData(plain.out, "name")
    assert data.params.shape[-1] == 11 and base.params.shape[-1] == 5 and data.key != base.key
    assert data.reader.manifest["views"]["params"][5:] == ["brightness", "contrast", "saturation", "hue", "order", "gray"]
    assert np.array_equal(data.params[..., :5], base.params) and np.array_equal(data.emb[:, 0], base.emb[:, 0])
    assert "color_jitter" not in plain.views.key() and cfg.views.key()["color_jitter"] == 0.3
    assert data.reader.summary()["view_policy"].endswith("flips, colour jitter 0.3, grayscale p 0.5, seed 0")
    idx, views = data.sample(step=1, seed=0, batch_size=12)
    assert (views > 0).any() and (data.params[idx, views, 10] == 1).any()  # grayscale views are drawn
    x = student_views(data, idx, views, tiny_teacher.input_size, (0, 0, 0), (1, 1, 1), torch.device("cpu"))
    t, _ = TARGETS.get("store")(data, torch.device("cpu"))(idx, views)
    torch.testing.assert_close(tiny_teacher.encode_pixels(to_uint8(x)), t, atol=2e-3, rtol=0)
    crop_only = student_views(base, idx, views, tiny_teacher.input_size, (0, 0, 0), (1, 1, 1), torch.device("cpu"))
    assert float((x - crop_only).abs().max()) > 0.05  # the student sees the colour too
    assert float((tiny_teacher.encode_pixels(to_uint8(crop_only)) - t).abs().max()) > 2e-2  # and the targets are of it


def test_same_seed_same_weights_other_seed_differs(synthetic_store, tmp_path):
    a = train(_cfg(synthetic_store, tmp_path, name="a", steps=12), log=quiet)
    b = train(_cfg(synthetic_store, tmp_path, name="b", steps=12), log=quiet)
    c = train(_cfg(synthetic_store, tmp_path, name="c", steps=12, seed=1), log=quiet)
    wa, wb, wc = (load_file(f"{r.out}/model.safetensors") for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("averaging", ["none", "swad"])
def test_resume_continues_from_the_last_checkpoint(synthetic_store, tmp_path, averaging):
    full = train(_cfg(synthetic_store, tmp_path, name="full", averaging=averaging), log=quiet)

    def stop(step):
        if step == 25:
            raise KeyboardInterrupt

    cut = _cfg(synthetic_store, tmp_path, name="cut", averaging=averaging)
    with pytest.raises(KeyboardInterrupt):
        train(cut, on_step=stop, log=quiet)
    assert not (tmp_path / "cut" / "done").exists()
    res = train(cut, log=quiet)
    assert res.resumed_from == 20  # the last checkpoint before the interruption
    wa, wb = load_file(f"{full.out}/model.safetensors"), load_file(f"{res.out}/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [json.loads(ln)["step"] for ln in open(tmp_path / "cut" / "metrics.jsonl")]
    assert rows == [10, 20, 30]  # rows logged after the checkpoint were dropped, none duplicated
    assert "torch_threads_earlier" not in json.loads((tmp_path / "cut" / "summary.json").read_text())  # one count
    assert train(cut, log=quiet).seconds == 0.0  # a finished run is skipped


def test_a_run_resumed_with_another_thread_count_says_so_and_records_both(synthetic_store, tmp_path):
    """Resumed with OMP_NUM_THREADS=1 after 2 threads, a run said only "resuming" and its summary named 1
    thread, though its weights then differed from an uninterrupted run's by rounding (a trial)."""
    before = torch.get_num_threads()

    def stop(step):
        if step == 25:
            raise KeyboardInterrupt

    cut = _cfg(synthetic_store, tmp_path, name="cut")
    try:
        torch.set_num_threads(2)
        with pytest.raises(KeyboardInterrupt):
            train(cut, on_step=stop, log=quiet)
        torch.set_num_threads(1)
        said = []
        train(cut, log=said.append)
    finally:
        torch.set_num_threads(before)
    assert any("resuming with 1 torch threads; the run trained with 2 so far" in line and "OMP_NUM_THREADS=2" in line
               for line in said), said
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["torch_threads"] == 1 and summary["torch_threads_earlier"] == [2]


def test_a_run_directory_is_not_resumed_or_reused_with_other_settings(synthetic_store, tmp_path):
    """A stopped run resumed with another held-out domain would have trained on the domain it then
    claims to hold out (and split.json would be rewritten to hide it); a finished one would hand back
    the old result for the new settings. Both are refused; the device and display settings may change."""
    from embedcache.errors import TrainingError
    from embedcache.students.config import SplitConfig

    def cfg(hold, **kw):
        return _cfg(synthetic_store, tmp_path, split=SplitConfig(holdout_domains=(hold,)), **kw)

    with pytest.raises(KeyboardInterrupt):
        train(cfg("outline"), on_step=lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 12 else None,
              log=quiet)
    with pytest.raises(TrainingError, match=r"was made with other settings \(split.holdout_domains: \['outline'\] -> "
                                            r"\['solid'\]\); use another --out"):
        train(cfg("solid"), log=quiet)
    assert json.loads((tmp_path / "run" / "split.json").read_text())["holdout_domains"] == ["outline"]
    done = train(cfg("outline", device="auto", progress=True), log=quiet)
    assert done.resumed_from == 10
    with pytest.raises(TrainingError, match=r"\(averaging: 'none' -> 'swa'\)"):
        train(cfg("outline", averaging="swa"), log=quiet)
    assert train(cfg("outline"), log=quiet).seconds == 0.0


def test_a_run_made_under_another_definition_of_its_recipe_is_not_resumed_or_reused(synthetic_store, tmp_path,
                                                                                    monkeypatch):
    """A recipe redefined by a later version of the package (naive_kd's KD temperature) would resume an
    old run under the new losses, or hand back its result as the new recipe's: both refused, naming
    what changed. A run from before records began is refused only for a recipe changed since."""
    from embedcache.errors import TrainingError
    from embedcache.students import recipes

    def edit(name, change):
        f = tmp_path / name / "config.json"
        d = json.loads(f.read_text())
        change(d)
        f.write_text(json.dumps(d))

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synthetic_store, tmp_path, "naive_kd", name="stopped"),
              on_step=lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 12 else None, log=quiet)
    recorded = json.loads((tmp_path / "stopped" / "config.json").read_text())["recipe_definition"]
    assert recorded["stages"][0]["args"]["kd"] == {"temperature": 0.1, "scale": 100.0, "student": "linear",
                                                          "t_squared": False}
    edit("stopped", lambda d: d["recipe_definition"]["stages"][0]["args"]["kd"].update(temperature=4.0))
    with pytest.raises(TrainingError, match=r"stopped was trained under another definition of recipe naive_kd "
                                            r"\(stage1.args.kd.temperature: 4.0 -> 0.1\); use another --out"):
        train(_cfg(synthetic_store, tmp_path, "naive_kd", name="stopped"), log=quiet)

    train(_cfg(synthetic_store, tmp_path, "naive_kd", name="old"), log=quiet)
    edit("old", lambda d: d.pop("recipe_definition"))  # a finished run from before the records
    with pytest.raises(TrainingError, match="another definition of recipe naive_kd \\(its KD term ran at temperature 4"):
        train(_cfg(synthetic_store, tmp_path, "naive_kd", name="old"), log=quiet)
    train(_cfg(synthetic_store, tmp_path, "ce", name="old_ce", steps=10, select="last"), log=quiet)
    edit("old_ce", lambda d: d.pop("recipe_definition"))
    assert train(_cfg(synthetic_store, tmp_path, "ce", name="old_ce", steps=10, select="last"), log=quiet).seconds == 0.0
    train(_cfg(synthetic_store, tmp_path, "ce", name="old_val", steps=10), log=quiet)  # best_val: chose by validation
    edit("old_val", lambda d: d.pop("recipe_definition"))
    with pytest.raises(TrainingError, match="another definition of recipe ce \\(its validation pooled the training"):
        train(_cfg(synthetic_store, tmp_path, "ce", name="old_val", steps=10), log=quiet)
    assert "ce" not in recipes.REDEFINED_RECIPES
    # recipe names and averaging names are apart: a recipe called "swad" is not SWAD averaging
    from types import SimpleNamespace
    assert recipes.definition_change(SimpleNamespace(recipe="swad", averaging="none"), None) == ""
    assert recipes.definition_change(SimpleNamespace(recipe="naive_kd", averaging="swad"), None).count("its ") == 3
    # a vl2v_adip run from before the records that kept its last weights: its validation chose nothing then
    assert recipes.definition_change(SimpleNamespace(recipe="vl2v_adip", averaging="none", select="last"), None) == \
        recipes.REDEFINED_RECIPES["vl2v_adip"]
    # SWAD's valley now follows the prediction cross-entropy: a SWAD run from before the records trained otherwise
    swad = _cfg(synthetic_store, tmp_path, "ce", averaging="swad")
    assert recipes.definition_change(swad, None).startswith("its SWAD valley followed the recipe's loss")
    now = recipes.definition(recipes.recipe_of(swad), "swad")
    assert now["swad_loss"] == "prediction_ce" and recipes.definition_change(swad, now) == ""
    assert recipes.definition_change(swad, {k: v for k, v in now.items() if k != "swad_loss"}) == \
        "swad_loss: None -> 'prediction_ce'"


def test_head_only_on_cached_features_matches_frozen_backbone_training(synthetic_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(synthetic_store, store)
    torch.manual_seed(5)
    weights = tmp_path / "backbone.safetensors"
    from safetensors.torch import save_file
    pre = build_student(StudentConfig(name="test_resnet"), 32)
    save_file({k: v.contiguous() for k, v in pre.backbone.state_dict().items()}, str(weights))
    scfg = StudentConfig(name="test_resnet", input_size=32, pretrained=str(weights))
    res = CliRunner().invoke(main, ["features", "--store", str(store), "--student", "test_resnet", "--no-progress",
                                    "--set", f"pretrained={weights}", "--set", "input_size=32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for recipe in ("vl2v_adip_align", "linear_probe"):
        head = train(_cfg(store, tmp_path, recipe, name=f"{recipe}-h", student=scfg, features=True, steps=20), log=quiet)
        full = train(_cfg(store, tmp_path, recipe, name=f"{recipe}-f", student=scfg, features=False, steps=20), log=quiet)
        wh, wf = load_file(f"{head.out}/model.safetensors"), load_file(f"{full.out}/model.safetensors")
        for k in wh:
            torch.testing.assert_close(wh[k], wf[k], atol=1e-5, rtol=1e-4)
        frozen = {k: v for k, v in load_file(str(weights)).items()}
        assert all(torch.equal(wf[f"backbone.{k}"], v) for k, v in frozen.items())  # BN statistics included
        assert head.val_top1 == pytest.approx(full.val_top1)
    # other weights have no cached features
    with pytest.raises(StoreError, match="no cached features .*`embedcache features --store"):
        train(_cfg(store, tmp_path, "linear_probe", name="nofeat", features=True), log=quiet)


def test_weights_saved_over_a_run_s_pretrained_file_are_not_taken_for_its_own(synthetic_store, tmp_path):
    """A run's settings hold student.pretrained's path: weights saved over that file answered "already done"
    with the earlier weights' result, and two runs from the two files were one method in evaluate's tables,
    their scores averaged as replicates (a trial). The run records the file's content hash."""
    from safetensors.torch import save_file

    from embedcache.errors import TrainingError
    from embedcache.fileio import file_sha256
    from embedcache.students.scoring import score_run

    weights = tmp_path / "backbone.safetensors"

    def save(seed):
        torch.manual_seed(seed)
        pre = build_student(StudentConfig(name="test_resnet"), 32)
        save_file({k: v.contiguous() for k, v in pre.backbone.state_dict().items()}, str(weights))

    save(1)
    scfg = StudentConfig(name="test_resnet", input_size=32, pretrained=str(weights))
    first = train(_cfg(synthetic_store, tmp_path, "ce", name="a", student=scfg, steps=2, eval_every=2, ckpt_every=2),
                  log=quiet)
    assert json.loads((Path(first.out) / "config.json").read_text())["student_weights"] == file_sha256(weights)
    save(2)
    with pytest.raises(TrainingError, match=r"run .*a began from other weights in student.pretrained=.*backbone."
                                            r"safetensors \(content hash \w+; the file now holds \w+\); use another "
                                            r"--out to train from the file as it is, or restore the file"):
        train(_cfg(synthetic_store, tmp_path, "ce", name="a", student=scfg, steps=2, eval_every=2, ckpt_every=2),
              log=quiet)
    second = train(_cfg(synthetic_store, tmp_path, "ce", name="b", student=scfg, steps=2, eval_every=2, ckpt_every=2),
                   log=quiet)
    a, b = (score_run(r.out, ["lodo"]) for r in (first, second))
    assert a.settings.iloc[0] != b.settings.iloc[0]  # two methods, not two replicates of one
    save(1)  # the file as the run began: found done
    assert train(_cfg(synthetic_store, tmp_path, "ce", name="a", student=scfg, steps=2, eval_every=2, ckpt_every=2),
                 log=quiet).seconds == 0.0
    # a run from before the record, from the same file unchanged since: one method with a run made after it
    config = json.loads((Path(first.out) / "config.json").read_text())
    (Path(first.out) / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "student_weights"}))
    later = train(_cfg(synthetic_store, tmp_path, "ce", name="c", student=scfg, steps=2, eval_every=2, ckpt_every=2),
                  log=quiet)
    assert score_run(first.out, ["lodo"]).settings.iloc[0] == score_run(later.out, ["lodo"]).settings.iloc[0]
    save(3)  # ... but not once the file is newer than the run: not known, so not taken for the new file's
    assert score_run(first.out, ["lodo"]).settings.iloc[0] != score_run(later.out, ["lodo"]).settings.iloc[0]


def test_canvases_past_the_memory_available_are_said_before_they_are_read(synthetic_store, tmp_path, monkeypatch):
    """A run on images holds every canvas in host memory: 100,000 images at 256 px are 19.7 GB, read whole and then
    swapped or killed minutes in (a trial). Said before they are read, naming the size and the ways out; a run on
    cached features reads none and says nothing."""
    import embedcache.students.data as data_module
    from embedcache.device import _cgroup_room
    from embedcache.store import Store

    with Store(str(synthetic_store)) as st:
        n, size = st.layout["n"], st.layout["canvas"]
    monkeypatch.setattr(data_module, "host_memory_available", lambda: n * size * size * 3 - 1)
    said = []
    assert train(_cfg(synthetic_store, tmp_path, "ce", steps=2, eval_every=2, ckpt_every=2), log=said.append).steps == 2
    (line,) = [s for s in said if "in memory" in s]
    assert line.startswith(f"warning: this run holds its store's canvases in memory ({n} of {size}x{size} px: ")
    assert "it may swap or be killed for memory" in line and "features=true" in line
    monkeypatch.setattr(data_module, "host_memory_available", lambda: n * size * size * 3)
    said.clear()
    train(_cfg(synthetic_store, tmp_path, "ce", name="fits", steps=2, eval_every=2, ckpt_every=2), log=said.append)
    assert not [s for s in said if "in memory" in s]
    # a container's limit is the room there is, not the host's (v2 and v1 files; no limit: none)
    v2, v1, free = tmp_path / "v2", tmp_path / "v1" / "memory", tmp_path / "none"
    for folder in (v2, v1, free):
        folder.mkdir(parents=True)
    (v2 / "memory.max").write_text("8589934592\n"), (v2 / "memory.current").write_text("1073741824\n")
    (v1 / "memory.limit_in_bytes").write_text("4294967296\n"), (v1 / "memory.usage_in_bytes").write_text("1\n")
    (free / "memory.max").write_text("max\n")
    assert (_cgroup_room(str(v2)), _cgroup_room(str(v1.parent)), _cgroup_room(str(free))) == (7 << 30, (4 << 30) - 1,
                                                                                              None)


def test_splits_follow_the_store_metadata(synthetic_store):
    d = StoreData(str(synthetic_store), "name", SplitConfig(holdout_domains=("outline",), val_fraction=0.25))
    dom = d.reader.meta["domain"].to_numpy()
    assert set(dom[d.train_idx]) == {"solid"} and set(dom[d.test_idx]) == {"outline"}
    assert len(d.val_idx) == 6 and not set(d.val_idx) & set(d.train_idx)
    o = StoreData(str(synthetic_store), "attributes", SplitConfig(train_classes=("circle", "triangle")))
    assert o.text.shape[0] == 2 and set(o.targets[o.train_idx]) == {0, 1}
    assert set(o.reader.meta["class_name"].to_numpy()[o.test_idx]) == {"square"}


def test_validation_rows_drawn_by_domain_stay_whichever_domain_is_held_out(make_cfg, tiny_teacher):
    """One draw through the training domains in turn gave a domain other validation rows for each
    held-out domain (a new user's DomainBed-style sweep); split.val_by_domain draws each domain's from
    its own seed, as DomainBed fixes them. The default keeps the draw the earlier runs were made with."""
    from embedcache.extract import extract
    from embedcache.students.identity import run_name

    res = extract(make_cfg("three.zarr", "dataset.num_domains=3", "dataset.per_class=5"), teacher=tiny_teacher, log=quiet)
    domains = ["noisy", "outline", "solid"]

    def val_rows(held, by_domain):
        d = StoreData(res.path, "name", SplitConfig(holdout_domains=(held,), val_fraction=0.4, val_by_domain=by_domain))
        dom = d.reader.meta["domain"].to_numpy()
        return {x: sorted(d.val_idx[dom[d.val_idx] == x]) for x in domains if x != held}, dom

    for a, b in [("noisy", "outline"), ("noisy", "solid"), ("outline", "solid")]:
        shared = next(x for x in domains if x not in (a, b))
        assert val_rows(a, True)[0][shared] == val_rows(b, True)[0][shared]
    for held in domains:  # the default: numpy's draw through the sorted training domains, as before
        got, dom = val_rows(held, False)
        rng, want = np.random.default_rng([0, 17]), {}
        for x in sorted(set(domains) - {held}):
            rows = np.flatnonzero(dom == x)
            want[x] = sorted(rng.permutation(rows)[: int(round(len(rows) * 0.4))])
        assert got == want
    # what the option is for: outline is drawn first with noisy held out, second with solid held out
    assert val_rows("noisy", False)[0]["outline"] != val_rows("solid", False)[0]["outline"]
    # runs made before the option keep their names; the option names its runs apart
    cfg = TrainConfig(store=res.path, split=SplitConfig(holdout_domains=("noisy",)))
    named = run_name(cfg)
    assert named == run_name(replace(cfg, split=SplitConfig(holdout_domains=("noisy",), val_by_domain=False)))
    assert named != run_name(replace(cfg, split=SplitConfig(holdout_domains=("noisy",), val_by_domain=True)))


def test_a_datasets_own_split_is_kept(make_cfg, tiny_teacher, tmp_path):
    """A CSV's split column: its test rows are never trained on or selected with; its val rows are
    the validation rows (none carved from the training rows then)."""
    from PIL import Image

    from embedcache.extract import extract

    kinds = ["train"] * 8 + ["val"] * 4 + ["test"] * 4 + ["train"] * 8  # d0: rows 0-15, d1: rows 16-23
    lines = ["path,label,domain,split"]
    for i, kind in enumerate(kinds):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{'ab'[i % 2]},{'d0' if i < 16 else 'd1'},{kind}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    cfg = make_cfg("csv.zarr", "dataset.name=csv", f"dataset.path={tmp_path / 'm.csv'}")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    d = StoreData(cfg.out, "name", SplitConfig(holdout_domains=("d1",)))
    assert d.train_idx.tolist() == list(range(8)) and d.val_idx.tolist() == [8, 9, 10, 11]
    assert d.test_idx.tolist() == list(range(12, 24))
    every = StoreData(cfg.out, "name", SplitConfig())
    assert every.train_idx.tolist() == list(range(8)) + list(range(16, 24)) and every.val_idx.tolist() == [8, 9, 10, 11]
    assert every.test_idx.tolist() == [12, 13, 14, 15]
    # a fraction set beside them was read by nothing while naming the run apart (a sweep over it: one run, many names)
    for unread, said in [(dict(val_fraction=0.0), "val_fraction=0.0"), (dict(val_by_domain=True), "val_by_domain=True")]:
        with pytest.raises(ConfigError, match=f"split.{said} is not read: .* has its own val rows \\(4\\).*defaults"):
            train(TrainConfig(store=cfg.out, recipe="feat_kd", student=StudentConfig(name="test_resnet", input_size=32),
                              steps=2, batch_size=4, split=SplitConfig(**unread), out=str(tmp_path / "r"), progress=False,
                              device="cpu"), log=quiet)
    assert len(StoreData(cfg.out, "name", SplitConfig(val_fraction=0.0), training=False).val_idx) == 4  # scoring reads it
    # a run begun before the check resumes as it began
    begun = TrainConfig(store=cfg.out, recipe="feat_kd", student=StudentConfig(name="test_resnet", input_size=32), steps=4,
                        batch_size=4, ckpt_every=2, eval_every=2, split=SplitConfig(val_fraction=0.0),
                        out=str(tmp_path / "old"), progress=False, device="cpu")
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(StoreData, "require_split_read", lambda self, split: None)
        train(begun, log=quiet, on_step=lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3 else None)
    assert train(begun, log=quiet).resumed_from == 2


def _csv_store(make_cfg, tiny_teacher, tmp_path, kinds, name="csv.zarr"):
    from PIL import Image

    from embedcache.extract import extract

    lines = ["path,label,domain,split"]
    for i, kind in enumerate(kinds):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{'ab'[i % 2]},d0,{kind}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return extract(make_cfg(name, "dataset.name=csv", f"dataset.path={tmp_path / 'm.csv'}"), teacher=tiny_teacher,
                   log=quiet).path


def test_an_evaluation_only_store_is_scored_not_trained_on(make_cfg, tiny_teacher, tmp_path):
    """Every row a test row (a store scored with --transfer, or features cached for it): readable for
    scoring and features, refused for training."""
    from embedcache.students.features import cache_features

    path = _csv_store(make_cfg, tiny_teacher, tmp_path, ["test"] * 6)
    d = StoreData(path, "name", SplitConfig(val_fraction=0.0), training=False)
    assert len(d.train_idx) == 0 and d.test_idx.tolist() == list(range(6))
    cache_features(path, StudentConfig(name="test_resnet", input_size=32), device="cpu", progress=False, log=quiet)
    with pytest.raises(StoreError, match="no training images left"):
        StoreData(path, "name")


def test_a_store_with_a_split_name_from_before_the_check_is_refused(make_cfg, tiny_teacher, tmp_path, monkeypatch):
    import embedcache.datasets as datasets

    monkeypatch.setattr(datasets, "SPLITS", ("train", "valid"))  # as a store made before split names were checked
    path = _csv_store(make_cfg, tiny_teacher, tmp_path, ["train", "valid"] * 3)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="dataset split is 'valid', not one of train, val, test; fix the split column"):
        StoreData(path, "name")


def test_features_rendered_another_way_than_the_stores_views_are_not_used(make_cfg, tiny_teacher, tmp_path):
    """Features cached before the student's views followed the store's interpolation were rendered
    bicubic; on a bilinear store they are refused with the command that remakes them, and that
    command recomputes them (it does not answer "already cached")."""
    import copy

    from embedcache.extract import extract
    from embedcache.store import Store
    from embedcache.students.features import cache_features, load_features
    from embedcache.students.models import build_seeded
    from embedcache.students.providers import student_views

    bilinear = copy.copy(tiny_teacher)
    bilinear.interpolation = "bilinear"
    cfg = make_cfg("bilinear-feats.zarr", "views.count=2", "views.scale=[0.2,0.5]")
    extract(cfg, teacher=bilinear, log=quiet)
    student = StudentConfig(name="test_resnet", input_size=32)
    key = cache_features(cfg.out, student, device="cpu", progress=False, log=quiet)
    with Store(cfg.out, "a") as st:
        info = st.derived()
        assert info[key]["interpolation"] == "bilinear"
        info[key].pop("interpolation")  # as an older embedcache wrote them: rendered bicubic
        st.b.set_attr("derived", info)
        st.b.flush()
        model = build_seeded(student, StoreData(cfg.out, "name").reader.dim, 0, 0).eval()
        with pytest.raises(StoreError, match=r"may have rendered bicubic.*bilinear.*embedcache features"):
            load_features(st, model)
    said = []
    assert cache_features(cfg.out, student, device="cpu", progress=False, log=said.append) == key
    assert "already cached" not in said[-1]
    data = StoreData(cfg.out, "name", SplitConfig(val_fraction=0.0), training=False)
    idx = np.arange(len(data.labels))
    with Store(cfg.out, "r") as st, torch.no_grad():
        got = load_features(st, model)
        want = model.features(student_views(data, idx, np.ones(len(idx), int), 32, model.mean, model.std,
                                            torch.device("cpu")))
    torch.testing.assert_close(torch.from_numpy(got[:, 1]), want, atol=1e-4, rtol=0)


def test_batches_per_domain_draw_batch_size_rows_from_each_training_domain(synthetic_store, tmp_path):
    """DomainBed / VL2V-ADiP: "batch 32 per source domain", not one draw from the pooled rows."""
    d = StoreData(str(synthetic_store), "name", SplitConfig(val_fraction=0.25))
    dom = d.reader.meta["domain"].to_numpy()
    for step in range(5):
        idx, views = d.sample(step, seed=3, batch_size=4, per_domain=True)
        assert len(idx) == len(views) == 8 and set(idx) <= set(d.train_idx)
        assert list(dom[idx]) == ["outline"] * 4 + ["solid"] * 4  # sorted domains, 4 each
        again = d.sample(step, seed=3, batch_size=4, per_domain=True)
        assert np.array_equal(idx, again[0]) and np.array_equal(views, again[1])  # a function of (seed, step)
    pooled = [dom[d.sample(s, seed=3, batch_size=8)[0]].tolist().count("outline") for s in range(40)]
    assert min(pooled) != max(pooled)  # a pooled draw varies its domain mix: the two are not the same thing
    train(_cfg(synthetic_store, tmp_path, "vl2v_sd", name="perdom", batch_size=4, batch_per_domain=True), log=quiet)
    assert json.loads((tmp_path / "perdom" / "summary.json").read_text())["batch_rows"] == 8


def test_bad_input_is_refused_with_the_options(synthetic_store, tmp_path):
    with pytest.raises(ConfigError, match="recipe='distill' is not valid: choose one of ce, feat_kd"):
        train(_cfg(synthetic_store, tmp_path, "distill"), log=quiet)
    with pytest.raises(KeyError, match="unknown student 'resnet9'; available: .*test_resnet.*timm:<any name"):
        build_student(StudentConfig(name="resnet9"), 32)
    with pytest.raises(ConfigError, match="head-only training.* head-only recipes: linear_probe, vl2v_adip_align"):
        train(_cfg(synthetic_store, tmp_path, "li_iccv23", features=True), log=quiet)
    with pytest.raises(StoreError, match="holdout domain 'sketch' is not in the store"):
        StoreData(str(synthetic_store), "name", SplitConfig(holdout_domains=("sketch",)))


def test_seen_classes_left_without_training_images_are_warned_about(make_cfg, tiny_teacher):
    """A tiny store: validation rows can take a class's only images, so it counts as seen untrained."""
    from embedcache.extract import extract

    cfg = make_cfg("tiny.zarr", "dataset.per_class=1")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    with pytest.warns(UserWarning, match=r"1 of 3 seen classes have no training image after the split \(square\): the "
                                         r"student never trains on them; lower split.val_fraction"):
        d = StoreData(cfg.out, "name", SplitConfig(val_fraction=0.5))
    assert set(d.labels[d.train_idx]) == {0, 2}


def test_a_misspelt_text_source_is_named_as_such():
    from embedcache.config import build_config

    with pytest.raises(ConfigError, match="text_source='attribute' is not valid: choose one of attributes, name, templates"):
        build_config(TrainConfig, {"store": "x", "text_source": "attribute"})


def test_more_views_than_the_store_holds_are_refused(synthetic_store, tmp_path):
    """views_used above the stored count would be recorded as used while fewer were drawn."""
    with pytest.raises(ConfigError, match=r"views_used=8 but store .* holds 3 views per image; use at most 3"):
        train(_cfg(synthetic_store, tmp_path, views_used=8), log=quiet)
    assert not (tmp_path / "run").exists()


def test_plain_targets_pair_each_view_with_the_plain_canvas_embedding(synthetic_store, tmp_path, monkeypatch):
    """Li et al.'s cache: teacher features of the un-augmented image while the student trains on random crops
    (an audit: li-iccv23.yaml paired each crop with its own embedding, unsaid). plain_targets asks for view 0's
    embedding whatever view the student sees; by default each view's own, as before."""
    from embedcache.students.providers import StoredTargets

    asked = {}
    call = StoredTargets.__call__

    def record(self, idx, views):
        asked.setdefault(self.data.reader.key, []).append(np.asarray(views).copy())
        return call(self, idx, views)

    monkeypatch.setattr(StoredTargets, "__call__", record)
    for name, plain in (("own", False), ("plain", True)):
        asked.clear()
        train(_cfg(synthetic_store, tmp_path, "feat_kd", name=name, steps=6, skip_plain_view=True,
                   plain_targets=plain, split=SplitConfig(val_fraction=0.0)), log=quiet)  # the steps' targets only
        views = np.concatenate([v for vs in asked.values() for v in vs])
        assert set(views) == ({0} if plain else {1, 2}), (name, set(views))
    # where every view drawn is view 0 it changes nothing but the run's name and seed: refused (a sweep showed it
    # as a variant of its own, seed noise for a comparison: a trial)
    with pytest.raises(ConfigError, match=r"plain_targets=true changes nothing here: every view drawn is view 0 "
                                          r"\(store .* holds 3 view\(s\) per image and views_used=1\)"):
        train(_cfg(synthetic_store, tmp_path, "feat_kd", name="one", views_used=1, plain_targets=True), log=quiet)


def test_skip_plain_view_trains_on_augmented_views_only(synthetic_store, tmp_path, monkeypatch):
    """View 0 is the whole canvas, unflipped, its colours untouched: drawn among the others it was a
    1/V share of the training images left un-augmented, with no way to leave it out. skip_plain_view
    draws from views 1..k-1; by default the draws stay exactly what they were (runs keep their names)."""
    from embedcache.students.data import StoreData
    from embedcache.students.identity import NAMED_WHEN_SET, NOT_IN_NAME, run_name, settings_identity

    drawn = {}

    def record(self, step, seed, batch_size, views_used=None, per_domain=False, skip_plain=False):
        idx, views = sample(self, step, seed, batch_size, views_used, per_domain, skip_plain)
        drawn.setdefault(skip_plain, []).append(views)
        return idx, views

    sample = StoreData.sample
    monkeypatch.setattr(StoreData, "sample", record)
    train(_cfg(synthetic_store, tmp_path, "feat_kd", name="plain", steps=12), log=quiet)
    train(_cfg(synthetic_store, tmp_path, "feat_kd", name="aug", steps=12, skip_plain_view=True), log=quiet)
    every, augmented = np.concatenate(drawn[False]), np.concatenate(drawn[True])
    assert set(every) == {0, 1, 2} and set(augmented) == {1, 2}
    data = StoreData.__new__(StoreData)
    data.views, data.train_idx = 3, np.arange(40)
    data.__dict__["train_by_domain"] = [data.train_idx]
    rng = np.random.default_rng([7, 3])
    rng.choice(data.train_idx, size=8, replace=False)
    assert np.array_equal(sample(data, 3, 7, 8)[1], rng.integers(0, 3, size=8))  # the default draws as before
    at_default = settings_identity(_cfg(synthetic_store, tmp_path, "feat_kd"), NOT_IN_NAME, NAMED_WHEN_SET)
    assert "skip_plain_view" not in at_default  # runs named before the setting keep their names
    assert run_name(_cfg(synthetic_store, tmp_path, "feat_kd")) != run_name(
        _cfg(synthetic_store, tmp_path, "feat_kd", skip_plain_view=True))
    with pytest.raises(ConfigError, match="skip_plain_view=true needs augmented views.*views_used=1"):
        train(_cfg(synthetic_store, tmp_path, "feat_kd", name="one", views_used=1, skip_plain_view=True), log=quiet)


def test_store_without_the_recipes_text_or_incomplete_is_refused(make_cfg, tiny_teacher, tmp_path):
    from embedcache.extract import extract

    cfg = make_cfg("plain.zarr")  # text sources: name, templates
    extract(cfg, teacher=tiny_teacher, log=quiet)
    with pytest.raises(StoreError, match="no text source 'attributes'"):
        train(_cfg(cfg.out, tmp_path, "li_iccv23_attr"), log=quiet)

    def boom(block):
        raise KeyboardInterrupt

    part = make_cfg("part.zarr")
    with pytest.raises(KeyboardInterrupt):
        extract(part, teacher=tiny_teacher, on_block_done=boom, log=quiet)
    with pytest.raises(StoreError, match="incomplete"):
        train(_cfg(part.out, tmp_path, "feat_kd"), log=quiet)


@pytest.mark.parametrize("name", [n for n in __import__("embedcache.students.models", fromlist=["STUDENTS"]).STUDENTS.names()
                                  if n != "openclip_visual"])
def test_every_registered_student_builds_and_projects(name):
    """Every registered backbone, from scratch at a small input: features, projection, classifier."""
    m = build_student(StudentConfig(name=name, input_size=32), 48, num_classes=3).eval()
    out = m(torch.randn(2, 3, 32, 32))
    assert out["emb"].shape == (2, 48) and out["logits"].shape == (2, 3)
    assert m.head.in_features == m.features(torch.randn(1, 3, 32, 32)).shape[-1]


def test_head_dimension_comes_from_the_store(synthetic_store):
    d = StoreData(str(synthetic_store), "name")
    m = build_student(StudentConfig(name="test_vit", input_size=32), d.dim)
    assert m.head.out_features == d.dim == 32 and m(torch.randn(2, 3, 32, 32))["emb"].shape == (2, d.dim)


def test_openclip_visual_student(tiny_clip_dir, synthetic_store, tmp_path):
    scfg = StudentConfig(name="openclip_visual", model=f"local-dir:{tiny_clip_dir}")
    res = train(_cfg(synthetic_store, tmp_path, "vl2v_sd", student=scfg, steps=4, eval_every=2), log=quiet)
    assert res.val_top1 is not None


def test_train_cli(synthetic_store, tmp_path):
    res = CliRunner().invoke(main, ["train", "--store", str(synthetic_store), "--recipe", "feat_kd", "--student",
                                    "test_resnet", "--out", str(tmp_path / "cli"), "--no-progress", "--set", "steps=4",
                                    "--set", "eval_every=2", "--set", "student.input_size=32", "--set", "device=cpu"])
    assert res.exit_code == 0, res.output
    assert "validation top-1" in res.output and (tmp_path / "cli" / "done").exists()
    meta = embedcache.open_store(str(synthetic_store)).meta  # 0.2 of each domain's readable rows validate
    held = sum(int(round(0.2 * n)) for n in meta[meta.status == "ok"].groupby("domain").size())
    said = re.search(r"validation top-1 \d+\.\d% of (\d+) images", res.output)  # 0.0% alone read as broken (a trial)
    assert said and int(said.group(1)) == held == json.loads((tmp_path / "cli" / "summary.json").read_text())["val_images"]
    bad = CliRunner().invoke(main, ["train", "--store", str(synthetic_store), "--recipe", "nope", "--student", "test_resnet"])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0, bad.output
    assert "recipe='nope' is not valid: choose one of ce, feat_kd" in bad.output
    # a run's config.json trains the run again (it was refused: "unknown config key recipe_definition")
    again = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "cli" / "config.json"), "--out",
                                      str(tmp_path / "again"), "--no-progress"])
    assert again.exit_code == 0, again.output
    a, b = load_file(tmp_path / "cli" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "note:" not in again.output  # --out given: the new folder is the user's choice
    done = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "cli" / "config.json"), "--out",
                                     str(tmp_path / "cli"), "--no-progress"])
    # a finished run is said done, with no line of a 0-second training after it (a trial)
    assert done.exit_code == 0 and "is already done" in done.output and "steps, validation top-1" not in done.output


def test_a_runs_config_without_out_says_where_its_run_goes(synthetic_store, tmp_path, monkeypatch):
    """`train --config RUN/config.json` without --out trained a fresh copy in runs/<name> with no word: the
    config's own folder is dropped (a trial)."""
    monkeypatch.chdir(tmp_path)
    args = ["--no-progress", "--set", "steps=2", "--set", "eval_every=2", "--set", "student.input_size=32", "--set",
            "device=cpu"]
    first = CliRunner().invoke(main, ["train", "--store", str(synthetic_store), "--recipe", "feat_kd", "--student",
                                      "test_resnet", "--out", "ref", *args])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["train", "--config", "ref/config.json", "--no-progress"])
    assert again.exit_code == 0, again.output
    (made,) = (tmp_path / "runs").iterdir()
    assert again.output.startswith(f"note: ref/config.json is a run's config: that run is trained again in a new folder, "
                                   f"runs/{made.name} (its own, ref, is neither resumed nor overwritten); --out names "
                                   "the folder"), again.output
    # a run trained without --out: its config's default folder is its own, found done there; the note had
    # said "trained again in a new folder" before "is already done" (a trial)
    third = CliRunner().invoke(main, ["train", "--config", f"runs/{made.name}/config.json", "--no-progress"])
    assert third.exit_code == 0, third.output
    assert third.output.startswith(f"note: runs/{made.name}/config.json is a run's config, and its default folder is "
                                   f"that run's own (runs/{made.name}): it is resumed there, or found done; --out NEW "
                                   "trains it again in a new folder"), third.output
    assert "is already done" in third.output and len(list((tmp_path / "runs").iterdir())) == 1


def test_swad_through_training(synthetic_store, tmp_path):
    from embedcache.students.train import OptimConfig, SwadConfig

    flat = _cfg(synthetic_store, tmp_path, "feat_kd", name="swad", steps=12, eval_every=2, averaging="swad",
                average_start=0.0, optim=OptimConfig(lr=1e-12, weight_decay=0.0, schedule="constant"),
                swad=SwadConfig(n_converge=2, n_tolerance=2, tolerance_ratio=0.3))
    res = train(flat, log=quiet)
    summary = json.loads((tmp_path / "swad" / "summary.json").read_text())
    assert summary["selected"]["rule"] == "average (swad)"
    rows = [json.loads(ln) for ln in open(tmp_path / "swad" / "metrics.jsonl")]
    assert all(r["val_loss"] is not None for r in rows)
    from embedcache.students.averaging import LossValley

    valley = LossValley(2, 2, 0.3)  # the segments the logged validation cross-entropy picks
    for r in rows:
        valley.update({"sum": {"w": torch.zeros(1)}, "n": 1}, r["val_ce"])
    valley.result()
    assert summary["selected"]["swad_segments"] == valley.chosen and len(valley.chosen) >= 2
    torch.manual_seed(0)
    init = build_student(StudentConfig(name="test_resnet", input_size=32), 32).state_dict()
    final = load_file(f"{res.out}/model.safetensors")
    for k, v in init.items():
        if v.is_floating_point() and "running" not in k:  # BN running stats move in train mode
            torch.testing.assert_close(final[k], v)
    with pytest.raises(ConfigError, match="swad picks its window by validation loss"):
        train(_cfg(synthetic_store, tmp_path, name="noval", averaging="swad", split=SplitConfig(val_fraction=0.0)), log=quiet)


def test_swads_valley_follows_the_validation_cross_entropy_of_the_predictions(synthetic_store, tmp_path, monkeypatch):
    """SWAD (and VL2V-ADiP's use of it) finds its valley on the evaluator's loss, the cross-entropy of the
    logits the model predicts with, not on the recipe's training loss (vl2v_adip's is a negative -cos)."""
    from embedcache.students import averaging
    from embedcache.students.train import prediction_ce

    seen = []
    real = averaging.SWAD.at_eval
    monkeypatch.setattr(averaging.SWAD, "at_eval", lambda self, step, model, loss: seen.append(loss) or real(self, step, model, loss))
    train(_cfg(synthetic_store, tmp_path, "vl2v_adip", steps=8, eval_every=2, averaging="swad", average_start=0.0), log=quiet)
    rows = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")]
    assert seen == [r["val_ce"] for r in rows] and all(r["val_ce"] > 0 > r["val_loss"] for r in rows)

    g = torch.Generator().manual_seed(1)
    emb, text, logits = torch.randn(6, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(6, 3, generator=g)
    y = torch.tensor([0, 1, 2, 2, 1, 0])

    def ce(z):
        z = z - z.max(1, keepdims=True)
        return float(-(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(6), y.numpy()].mean())

    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    out = {"emb": emb, "logits": logits}
    assert float(prediction_ce(out, text, y, "text")) == pytest.approx(ce(100 * unit(emb.numpy()) @ unit(text.numpy()).T), rel=1e-5)
    assert float(prediction_ce(out, text, y, "linear")) == pytest.approx(ce(logits.numpy()), rel=1e-6)


def test_averaged_weights_get_their_own_batchnorm_statistics(synthetic_store, tmp_path):
    """The average of BatchNorm statistics belongs to no network: after SWA, the run's statistics
    are those torch's own update_bn computes for the averaged weights over the same batches."""
    from torch.optim.swa_utils import update_bn

    from embedcache.students.train import Trainer

    cfg = _cfg(synthetic_store, tmp_path, "feat_kd", name="swa", steps=8, eval_every=4, averaging="swa",
               average_start=0.0, average_bn_batches=5)
    res = train(cfg, log=quiet)
    saved = load_file(f"{res.out}/model.safetensors")
    summary = json.loads((tmp_path / "swa" / "summary.json").read_text())
    assert summary["selected"]["batchnorm"] == "recomputed over 5 training batches"
    ref = Trainer(replace(cfg, out=str(tmp_path / "ref")), log=quiet)
    ref.model.load_state_dict({k: v for k, v in saved.items()})
    batches = [ref.inputs(*ref.data.sample(8 + i, cfg.seed, cfg.batch_size)) for i in range(5)]
    update_bn(batches, ref.model)
    stats = {k: v for k, v in ref.model.state_dict().items() if "running" in k}
    assert stats and all(torch.allclose(saved[k], v, rtol=1e-5, atol=1e-6) for k, v in stats.items())
    averaged = train(replace(cfg, out=str(tmp_path / "kept"), average_bn_batches=0), log=quiet)  # 0: the average
    kept = load_file(f"{averaged.out}/model.safetensors")
    assert not all(torch.allclose(kept[k], v, rtol=1e-5, atol=1e-6) for k, v in stats.items())


def test_freeze_bn_keeps_the_pretrained_batchnorm_statistics_while_the_backbone_trains(synthetic_store, tmp_path):
    """DomainBed's, SWAD's and VL2V-ADiP's ResNets keep BatchNorm in eval mode (freeze_bn=True there), and
    SWAD's code then refreshes no statistics for its average (an audit against their code): every stage
    trained them here, and a projection fitted on Align's eval-mode features met train-mode ones in Distill."""
    from safetensors.torch import save_file

    from embedcache.students.config import check_trainable

    torch.manual_seed(5)
    weights = tmp_path / "backbone.safetensors"
    pre = build_student(StudentConfig(name="test_resnet"), 32)
    save_file({k: v.contiguous() for k, v in pre.backbone.state_dict().items()}, str(weights))
    given = load_file(str(weights))
    stats = [k for k in given if k.endswith(("running_mean", "running_var"))]
    scales = [k for k in given if k.endswith(".weight") and k.replace(".weight", ".running_mean") in given]
    scfg = StudentConfig(name="test_resnet", input_size=32, pretrained=str(weights))
    kw = dict(student=scfg, steps=12, eval_every=4, averaging="swa", average_start=0.0)
    frozen = train(_cfg(synthetic_store, tmp_path, "vl2v_adip", name="frozen", freeze_bn=True, **kw), log=quiet)
    moving = train(_cfg(synthetic_store, tmp_path, "vl2v_adip", name="moving", average_bn_batches=5, **kw), log=quiet)
    wf, wm = load_file(f"{frozen.out}/model.safetensors"), load_file(f"{moving.out}/model.safetensors")
    assert stats and scales
    assert all(torch.equal(wf[f"backbone.{k}"], given[k]) for k in stats)  # as the pretrained weights have them
    assert not all(torch.equal(wm[f"backbone.{k}"], given[k]) for k in stats)
    assert not all(torch.equal(wf[f"backbone.{k}"], given[k]) for k in scales)  # scales and shifts still train
    summary = json.loads((tmp_path / "frozen" / "summary.json").read_text())
    assert "batchnorm" not in summary["selected"]  # nothing to refresh: the statistics never moved
    assert json.loads((tmp_path / "moving" / "summary.json").read_text())["selected"]["batchnorm"].startswith("recomputed")
    with pytest.raises(ConfigError, match="freeze_bn=true keeps BatchNorm statistics as pretrained weights have them"):
        check_trainable(_cfg(synthetic_store, tmp_path, "vl2v_adip", freeze_bn=True))  # a student of random weights


def test_vl2v_adip_s_distill_starts_from_align_s_best_validation_weights(synthetic_store, tmp_path, monkeypatch):
    """VL2V-ADiP's Distill loads Align's best checkpoint (saved at each evaluation equal to its best: the
    latest on ties), not its last weights (an audit against its code). The projection is frozen in Distill,
    so the kept one is the carried one; a run stopped at the boundary and resumed carries the same."""
    from embedcache.students.train import Trainer

    scripted = {2: 0.7, 4: 0.7, 6: 0.6}  # Align's validation top-1 by step: tied best at 2 and 4, the last lower
    heads = {}
    real = Trainer.validate

    def validate(self, step, stage=None):
        got = real(self, step, stage)
        if step in scripted and step <= self.last_stage_start:
            heads.setdefault(self.run_dir.name, {})[step] = {k: v.clone() for k, v in self.model.head.state_dict().items()}
            return (scripted[step],) + tuple(got[1:])
        return got

    monkeypatch.setattr(Trainer, "validate", validate)
    kw = dict(steps=12, eval_every=2, ckpt_every=2)
    res = train(_cfg(synthetic_store, tmp_path, "vl2v_adip", name="full", **kw), log=quiet)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["stages_started"] == [{"stage": 2, "from_step": 4, "val_top1": 0.7, "why": "the best validation top-1"}]
    kept = load_file(f"{res.out}/model.safetensors")
    assert all(torch.equal(kept[f"head.{k}"], v) for k, v in heads["full"][4].items())
    assert not all(torch.equal(kept[f"head.{k}"], v) for k, v in heads["full"][6].items())
    with pytest.raises(KeyboardInterrupt):  # stopped at the boundary: the resume starts Distill
        train(_cfg(synthetic_store, tmp_path, "vl2v_adip", name="cut", **kw),
              on_step=lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 7 else None, log=quiet)
    again = train(_cfg(synthetic_store, tmp_path, "vl2v_adip", name="cut", **kw), log=quiet)
    assert again.resumed_from == 6
    cut = load_file(f"{again.out}/model.safetensors")
    assert all(torch.equal(kept[k], cut[k]) for k in kept)
    recorded = json.loads((tmp_path / "full" / "config.json").read_text())["recipe_definition"]
    from embedcache.students.recipes import definition

    assert recorded["carry"] == "best_val"
    assert all("carry" not in definition(RECIPES.get(n)) for n in RECIPES.names() if n != "vl2v_adip")  # theirs as made


def test_a_distill_stage_with_no_align_validation_to_choose_from_starts_from_align_s_last_weights(synthetic_store,
                                                                                                   tmp_path):
    """Without validation rows, or with no evaluation inside Align (eval_every past its end), Distill starts from
    Align's last weights: said as the run starts (it was said only in the summary, a review) and recorded."""
    said = []
    train(_cfg(synthetic_store, tmp_path, "vl2v_adip", name="sparse", steps=8, eval_every=8), log=said.append)
    assert any(s.startswith("warning: stage 2 starts from stage 1's weights of its best validation top-1, and "
                            "eval_every=8 validates stage 1 (steps 1-4) 0 time(s): it starts from the last weights")
               for s in said), said
    summary = json.loads((tmp_path / "sparse" / "summary.json").read_text())
    assert summary["stages_started"] == [{"stage": 2, "from_step": 4,
                                          "why": "the last weights (no validation in the stage before)"}]
    train(_cfg(synthetic_store, tmp_path, "vl2v_adip", name="noval", steps=8, eval_every=2,
               split=SplitConfig(val_fraction=0.0)), log=quiet)
    summary = json.loads((tmp_path / "noval" / "summary.json").read_text())
    assert summary["stages_started"] == [{"stage": 2, "from_step": 4, "why": "the last weights (no validation rows)"}]
    said = []  # one validation inside Align, before its end: the stage starts from that step's weights
    train(_cfg(synthetic_store, tmp_path, "vl2v_adip", name="one", steps=10, eval_every=3), log=said.append)
    assert any(s.endswith("validates stage 1 (steps 1-5) 1 time(s): it starts from its weights of step 3, the one "
                          "validated, not its last (step 5); lower eval_every to choose among more") for s in said), said
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["stages_started"][0]["from_step"] == 3


def test_swad_over_fewer_evaluations_than_start_its_valley_is_warned_of_as_the_run_starts(synthetic_store, tmp_path):
    """Two evaluations in the averaged half and swad.n_converge=3: the valley cannot form, and the run said only
    afterwards that the loss "never settled" (a trial)."""
    said, enough = [], []
    train(_cfg(synthetic_store, tmp_path, "ce", name="few", steps=8, eval_every=2, averaging="swad"), log=said.append)
    assert ("warning: averaging=swad over steps 5-8 evaluates 2 time(s), fewer than the swad.n_converge=3 that start "
            "its valley: it will keep the last segment's average; lower eval_every") in said, said
    train(_cfg(synthetic_store, tmp_path, "ce", name="enough", steps=8, eval_every=1, averaging="swad"),
          log=enough.append)
    assert not [s for s in enough if "averaging=swad over steps" in s], enough


def test_validation_is_the_mean_over_domains_not_over_their_pooled_images(synthetic_store, tmp_path):
    """DomainBed selects by the mean of the training domains' validation accuracies, and SWAD's evaluator
    averages their losses alike; pooled, PACS's 786 sketch rows outvoted its 410 art ones (an audit
    against DomainBed's IIDAccuracySelectionMethod)."""
    from embedcache.students.train import Trainer, validate

    t = Trainer(_cfg(synthetic_store, tmp_path, "vl2v_adip"), log=quiet)
    groups, dom = t.data.val_by_domain, t.data.reader.meta["domain"].to_numpy()
    assert sorted(np.concatenate(groups).tolist()) == sorted(t.data.val_idx.tolist())
    assert [set(dom[g]) for g in groups] == [{d} for d in sorted(set(dom[t.data.val_idx]))] and len(groups) == 2
    uneven = [groups[0][:1], np.concatenate([groups[0][1:], groups[1]])]  # one row against all the others
    t.data.__dict__["val_by_domain"] = uneven
    stage = t.recipe.stages[-1]
    got = t.validate(0, stage)
    each = []
    for rows in uneven:
        pred, loss, ce = validate(t.model, t.inputs, t.targets, t.data, rows, t.recipe.predict, t.text, stage)
        each.append((float(np.mean(pred == t.data.targets[rows])), loss, ce))
    assert got == pytest.approx(tuple(np.mean(each, axis=0)), rel=1e-6)
    pooled_ce = (each[0][2] + each[1][2] * len(uneven[1])) / (1 + len(uneven[1]))
    assert got[2] != pytest.approx(pooled_ce, rel=1e-6)


def test_loop_seconds_count_the_steps_not_evaluations_or_checkpoints(synthetic_store, tmp_path, monkeypatch):
    import time

    from embedcache.students.train import Trainer

    real_ckpt, real_eval = Trainer.checkpoint, Trainer.evaluate
    monkeypatch.setattr(Trainer, "checkpoint", lambda self, *a: (time.sleep(0.5), real_ckpt(self, *a)))
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a: (time.sleep(0.5), real_eval(self, *a)))
    res = train(_cfg(synthetic_store, tmp_path, steps=30), log=quiet)  # 3 evaluations + 3 checkpoints: 3 s
    assert 0 < res.loop_seconds <= res.seconds - 3.0  # whatever the machine's speed: the 3 s are left out


def test_a_runs_files_take_the_umasks_mode(synthetic_store, tmp_path):
    """safetensors writes owner-only files; a run's weights must be as readable as its other files
    (a shared sweep directory on a cluster)."""
    import os
    import stat

    from embedcache.fileio import FILE_MODE, atomic_write

    res = train(_cfg(synthetic_store, tmp_path, steps=10, eval_every=10, ckpt_every=10, keep_checkpoint=True), log=quiet)
    for f in ("model.safetensors", "checkpoint.pt", "summary.json", "split.json"):
        assert stat.S_IMODE(os.stat(f"{res.out}/{f}").st_mode) == FILE_MODE, f

    def private(tmp):
        tmp.write_text("x")
        os.chmod(tmp, 0o600)

    assert stat.S_IMODE(os.stat(atomic_write(tmp_path / "p.txt", private)).st_mode) == FILE_MODE


def test_loss_weights_and_arguments_of_a_run(synthetic_store, tmp_path):
    """A loss ablation without a new recipe: weights (0 drops a loss) and arguments merge into every
    stage; the run trains with them, its name changes, a default run's name does not."""
    from embedcache.config import build_config
    from embedcache.students.recipes import RECIPES, recipe_of
    from embedcache.students.identity import run_name

    cfg = _cfg(synthetic_store, tmp_path, loss_weights={"imcst": 0, "mse": 2.0}, loss_args={"vlalign": {"k": 2}},
               steps=4, eval_every=2, ckpt_every=2)
    st = recipe_of(cfg).stages[0]
    assert st.losses == {"cls": 1.0, "vlalign": 1.0, "mse": 2.0}
    assert st.loss_args == {"vlalign": {"correct_only": True, "k": 2}}
    assert RECIPES.get("li_iccv23").stages[0].losses["imcst"] == 1.0  # the registered recipe is untouched
    assert run_name(cfg) != run_name(_cfg(synthetic_store, tmp_path))
    res = train(cfg, log=quiet)
    rows = [json.loads(ln) for ln in open(f"{res.out}/metrics.jsonl")]
    assert "imcst" not in rows[-1] and "mse" in rows[-1]
    bad = [({"loss_weights": {"vlalignn": 1}}, "unknown loss 'vlalignn'"),
           ({"loss_weights": {"mse": -1}}, r"loss_weights.mse=-1 is not valid: expected a number >= 0"),
           ({"loss_weights": {"cls": 0, "vlalign": 0, "mse": 0, "imcst": 0}}, "leave stage 1 of recipe li_iccv23 with no loss"),
           ({"loss_args": {"vlalign": {"topk": 3}}}, r"loss_args.vlalign.topk is not an argument of vlalign; it takes tau, k"),
           ({"loss_args": {"cos": {}}}, "recipe li_iccv23 has no loss cos"),  # it named loss_weights none gave
           ({"loss_weights": {"mse": 2}, "loss_args": {"cos": {}}},
            "recipe li_iccv23 \\(with the loss_weights given\\) has no loss cos"),
           # a recipe's own loss given a bare number was a TypeError from merging it
           ({"loss_args": {"vlalign": 5}}, r"loss_args.vlalign=5 is not valid: expected a mapping of its arguments"),
           ({"loss_weights": {"ce": 1}}, "has no linear classifier for ce"),
           # argument values (a string where a number goes was a TypeError mid-run, tau=0 a NaN loss)
           ({"loss_args": {"cls": {"tau": "abc"}}}, r"loss_args.cls.tau='abc' is not valid: expected a number > 0"),
           ({"loss_args": {"imcst": {"tau": 0}}}, r"loss_args.imcst.tau=0 is not valid: expected a number > 0"),
           ({"loss_args": {"vlalign": {"k": -1}}}, r"loss_args.vlalign.k=-1 is not valid: expected a whole number >= 1"),
           ({"loss_args": {"vlalign": {"correct_only": "yes"}}}, r"correct_only='yes' is not valid: expected true or false"),
           ({"recipe": "naive_kd", "loss_args": {"kd": {"student": "Linear"}}}, r"expected text or linear"),
           ({"recipe": "vl2v_adip", "loss_args": {"vl2v_adip": {"lam": 2}}}, r"lam=2 is not valid: expected a number in \[0, 1\]")]
    for change, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            build_config(TrainConfig, {"store": "x", **change})


def test_a_weights_file_that_does_not_fit_the_backbone_is_refused(tmp_path):
    """A file covering part of the backbone left the rest random, and a deeper network's file filled
    a shallower one with the wrong blocks; both loaded without a word."""
    from safetensors.torch import save_file

    from embedcache.errors import ConfigError

    full = {k: v.contiguous() for k, v in build_student(StudentConfig(name="test_resnet"), 32).backbone.state_dict().items()}
    cases = {
        "part": ({k: v for i, (k, v) in enumerate(full.items()) if i < 3}, r"tensors are not in the file"),
        "deeper": ({**full, "layer9.0.conv1.weight": torch.zeros(2, 2)}, r"1 tensors of the file have no place in it "
                                                                           r"\(layer9.0.conv1.weight"),
        "shape": ({**full, next(iter(full)): torch.zeros(1, 1, 1, 1)}, rf"1 have another shape \({next(iter(full))}"),
    }
    for name, (state, msg) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ConfigError, match=rf"student.pretrained .*{name}.safetensors does not fit the student "
                                              rf"backbone: .*{msg}"):
            build_student(StudentConfig(name="test_resnet", pretrained=str(tmp_path / f"{name}.safetensors")), 32)
    # a checkpoint with its classifier (the backbone has none) and without BatchNorm's step counters loads
    ok = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    save_file({**ok, "fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, str(tmp_path / "ok.safetensors"))
    s = build_student(StudentConfig(name="test_resnet", pretrained=str(tmp_path / "ok.safetensors")), 32)
    first = next(iter(full))
    assert torch.equal(s.backbone.state_dict()[first], full[first])


def test_an_input_size_a_student_cannot_take_is_one_line():
    from embedcache.errors import ConfigError

    with pytest.raises(ConfigError, match=r"student test_vit cannot take 20 px inputs \(.*\); choose another "
                                          r"student.input_size"):
        build_student(StudentConfig(name="test_vit", input_size=20), 32)


def test_a_checkpoint_with_two_classifier_heads_loads(tmp_path):
    """Distilled DeiT names two classifiers (head, head_dist): a tuple, which ended in a traceback."""
    import timm
    from safetensors.torch import save_file

    name = "deit_tiny_distilled_patch16_224"
    full = timm.create_model(name, num_classes=10)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "w.safetensors"))
    s = build_student(StudentConfig(name=f"timm:{name}", input_size=224, pretrained=str(tmp_path / "w.safetensors")), 16)
    assert torch.equal(s.backbone.state_dict()["cls_token"], full.state_dict()["cls_token"])


def test_a_run_without_out_is_found_again_however_its_store_is_spelled(synthetic_store, tmp_path, monkeypatch):
    """`embedcache train --store stores/x.zarr` then `--store ./stores/x.zarr` (or --device cpu) trained
    the run again from scratch under another name."""
    import shutil

    from dataclasses import replace
    from pathlib import Path

    from embedcache.students.identity import default_out, run_name

    work = tmp_path / "work"
    shutil.copytree(synthetic_store, work / "stores" / "s.zarr")
    monkeypatch.chdir(work)
    first = train(_cfg("stores/s.zarr", tmp_path, "ce", out=None, steps=4, eval_every=2, ckpt_every=2, device="auto"),
                  log=quiet)
    assert first.seconds > 0 and Path(first.out).parent == Path("runs")
    for spelling, device in (("./stores/s.zarr", "auto"), (str(work / "stores" / "s.zarr"), "cpu")):
        again = train(_cfg(spelling, tmp_path, "ce", out=None, steps=4, eval_every=2, ckpt_every=2, device=device),
                      log=quiet)
        assert again.out == first.out and again.seconds == 0.0
    # a run named the earlier way (by the path as spelled) is still found there
    earlier = _cfg("stores/s.zarr", tmp_path, "ce", out=None, steps=6)
    (Path("runs") / run_name(earlier)).mkdir()
    assert default_out(earlier) == str(Path("runs") / run_name(earlier)) != default_out(replace(earlier, steps=7))


def test_a_finished_run_asked_for_with_another_store_is_refused(synthetic_store, make_cfg, tiny_teacher, tmp_path):
    """A finished run answered "already done" for any store at all (re-extracted with another teacher,
    other classes): its result stood for a store it never saw."""
    from embedcache.errors import StoreMismatchError
    from embedcache.extract import extract

    train(_cfg(synthetic_store, tmp_path, "ce", steps=4, eval_every=2, ckpt_every=2), log=quiet)
    other = extract(make_cfg("other.zarr", "views.count=2"), teacher=tiny_teacher, log=quiet)
    with pytest.raises(StoreMismatchError, match=r"run .*run was trained on another store \(its .* differ .*; key \w+; .*other.zarr has key "
                                                 r"\w+: another store, or re-extracted since\); use another --out"):
        train(_cfg(other.path, tmp_path, "ce", steps=4, eval_every=2, ckpt_every=2), log=quiet)
    assert train(_cfg(synthetic_store, tmp_path, "ce", steps=4, eval_every=2, ckpt_every=2), log=quiet).seconds == 0.0


def test_a_run_given_another_store_is_told_what_differs(make_cfg, tiny_teacher, tmp_path):
    """Scoring (or resuming) a run on another store named both keys and the fix, not what differs, where
    `extract` names it (a trial): the run's own store, still where it was, tells."""
    from embedcache.errors import StoreMismatchError
    from embedcache.extract import extract
    from embedcache.students.scoring import score_run

    own = extract(make_cfg("own.zarr"), teacher=tiny_teacher, log=quiet)
    other = extract(make_cfg("other.zarr", "views.count=2"), teacher=tiny_teacher, log=quiet)
    res = train(_cfg(own.path, tmp_path, "ce", steps=4, eval_every=2, ckpt_every=2), log=quiet)
    said = r"its views differ \(this store: views.count=2; the run's store: views.count=3\)"
    with pytest.raises(StoreMismatchError, match=rf"store .*other.zarr was made from other inputs \({said}; the store's key"):
        score_run(res.out, ["lodo"], store=other.path)
    with pytest.raises(StoreMismatchError, match=rf"run .* was trained on another store \({said}; key \w+; "):
        train(_cfg(other.path, tmp_path, "ce", steps=4, eval_every=2, ckpt_every=2), log=quiet)


def _one_run_sweep(tmp_path, store):
    import yaml

    from embedcache.students.sweep import load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"store": str(store), "protocol": "lodo", "launcher": "serial", "grid": {"seed": [0]},
                                    "base": {"recipe": "ce", "student": {"name": "test_resnet", "input_size": 32},
                                             "steps": 2, "batch_size": 4, "eval_every": 2, "ckpt_every": 2,
                                             "device": "cpu"}}))
    return load_sweep(str(path))


@pytest.mark.parametrize("pixels", [True, False])
def test_a_store_of_the_run_s_key_holding_other_images_is_refused(pixels, make_cfg, tiny_teacher, tmp_path):
    """The key holds the files' paths and sizes: an image replaced by another of the same size (a BMP
    edited in place) and the store extracted again gave the same key, and `train` answered "already done"
    with the result of the other images (`score` scored the run there as on its own store; a sweep pooled
    them). A store's images are told by its canvas checksums (contents_digest)."""
    from PIL import Image

    from embedcache.errors import ConfigError, StoreMismatchError
    from embedcache.extract import extract
    from embedcache.students.scoring import score_run
    from embedcache.students.sweep import run_sweep

    data = tmp_path / "data"
    for d in ("art", "photo"):
        for c in "ab":
            (data / d / c).mkdir(parents=True)
            for i in range(4):
                img = np.random.default_rng([ord(d[0]), ord(c), i]).integers(0, 255, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(img).save(data / d / c / f"{i}.bmp")
    sets = ("dataset.name=domainbed", f"dataset.path={data}", f"canvas.store={str(pixels).lower()}")
    first = extract(make_cfg("first.zarr", *sets), teacher=tiny_teacher, log=quiet)
    cfg = _cfg(first.path, tmp_path, "ce", steps=4, eval_every=2, ckpt_every=2, batch_size=4)
    done = train(cfg, log=quiet)
    sweep_dir = tmp_path / "sw"
    run_sweep(_one_run_sweep(tmp_path, first.path), str(sweep_dir), progress=False, log=quiet)
    same_again = extract(make_cfg("same.zarr", *sets), teacher=tiny_teacher, log=quiet)
    assert train(replace(cfg, store=same_again.path), log=quiet).seconds == 0.0  # the same images: found done
    assert not score_run(done.out, ["lodo"], store=same_again.path).empty  # its own images, by another store

    img = np.random.default_rng(99).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    size = (data / "art" / "a" / "2.bmp").stat().st_size
    Image.fromarray(img).save(data / "art" / "a" / "2.bmp")  # another image, the same size
    assert (data / "art" / "a" / "2.bmp").stat().st_size == size
    other = extract(make_cfg("other.zarr", *sets), teacher=tiny_teacher, log=quiet)
    assert other.key == first.key
    with pytest.raises(StoreMismatchError, match=r"run .*run was trained on another store of the same key: .*other.zarr's "
                                                 r"images differ \(contents digest \w+, the run's store's \w+: an image "
                                                 r"file replaced .*\); use another --out"):
        train(replace(cfg, store=other.path), log=quiet)
    with pytest.raises(StoreMismatchError, match=r"cannot be scored on .*other.zarr: a store of its key, but its images "
                                                 r"differ"):
        score_run(done.out, ["lodo"], store=other.path)
    with pytest.raises(StoreMismatchError, match=r"its images differ"):
        score_run(done.out, ["lodo"], store=other.path, transfer=True)
    with pytest.raises(ConfigError, match=r"sweep .*sw holds the runs of another store of key \w+: .*other.zarr's images "
                                          r"differ"):
        run_sweep(_one_run_sweep(tmp_path, other.path), str(sweep_dir), progress=False, log=quiet)


def test_a_store_of_the_run_s_key_and_images_with_other_embeddings_is_refused(make_cfg, tiny_teacher, tmp_path,
                                                                               monkeypatch):
    """A store extracted again at another batch size, device or CPU thread count has the run's key and images,
    and embeddings that differ by float rounding: a run resumed on it trained on both stores' numbers, a
    finished one was "already done" there, and nothing in either record told them apart (a trial). Told by
    the store's embeddings digest, recorded with the run and the sweep."""
    import torch.nn.functional as F

    from embedcache.errors import ConfigError, StoreMismatchError
    from embedcache.extract import extract
    from embedcache.store import Store
    from embedcache.students.sweep import run_sweep

    first = extract(make_cfg("first.zarr"), teacher=tiny_teacher, log=quiet)
    real = type(tiny_teacher).embed_views
    monkeypatch.setattr(type(tiny_teacher), "embed_views",  # the same teacher, rounding otherwise
                        lambda self, x: F.normalize(real(self, x) + 1e-3, dim=-1))
    other = extract(make_cfg("other.zarr"), teacher=tiny_teacher, log=quiet)
    monkeypatch.undo()
    same = extract(make_cfg("same.zarr"), teacher=tiny_teacher, log=quiet)
    with Store(first.path) as a, Store(other.path) as b, Store(same.path) as c:
        assert a.key == b.key == c.key and a.contents_digest() == b.contents_digest() == c.contents_digest()
        assert a.embeddings_digest() == c.embeddings_digest() != b.embeddings_digest()
        assert not np.array_equal(a.read("image/emb"), b.read("image/emb"))
    cfg = _cfg(first.path, tmp_path, "ce", steps=4, eval_every=2, ckpt_every=2, batch_size=4)

    def stop(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop, log=quiet)
    said = (r"run .*run was trained on another store of the same key and images: .*other.zarr's embeddings differ "
            r"\(embeddings digest \w+, the run's store's \w+: the store extracted again with other float rounding "
            r"\(another batch_size, device, CPU thread count or embedcache\), or blocks of it re-encoded so by a "
            r"repair; .*\); use the store the run was trained on, or another --out")
    with pytest.raises(StoreMismatchError, match=said):  # a resume
        train(replace(cfg, store=other.path), log=quiet)
    assert train(replace(cfg, store=same.path), log=quiet).resumed_from == 2  # the same numbers: resumed
    with pytest.raises(StoreMismatchError, match=said):  # a finished run
        train(replace(cfg, store=other.path), log=quiet)
    sweep_dir = tmp_path / "sw"
    run_sweep(_one_run_sweep(tmp_path, first.path), str(sweep_dir), progress=False, log=quiet)
    with pytest.raises(ConfigError, match=r"sweep .*sw holds the runs of another store of key \w+ and its images: "
                                          r".*other.zarr's embeddings differ"):
        run_sweep(_one_run_sweep(tmp_path, other.path), str(sweep_dir), progress=False, log=quiet)
    run_sweep(_one_run_sweep(tmp_path, same.path), str(sweep_dir), progress=False, log=quiet)


def test_a_run_whose_store_was_re_extracted_says_so_when_scored(synthetic_store, make_cfg, tiny_teacher, tmp_path):
    import shutil

    from embedcache.errors import StoreError
    from embedcache.extract import extract
    from embedcache.students.scoring import score_run

    store = tmp_path / "s.zarr"
    shutil.copytree(synthetic_store, store)
    res = train(_cfg(store, tmp_path, "ce", steps=4, eval_every=2, ckpt_every=2), log=quiet)
    shutil.rmtree(store)
    extract(make_cfg(str(store), "views.count=2"), teacher=tiny_teacher, log=quiet)  # another store at its path
    with pytest.raises(StoreError, match=r"has changed since run run was trained on it \(re-extracted\?\)"):
        score_run(res.out, ["lodo"])


def test_head_and_classifier_run_in_float32_inside_bf16_autocast():
    """stage_loss leaves autocast to keep class logits from bf16 rounding, but the head's and the
    classifier's Linear layers ran inside it: logits near 9 came out rounded by up to 0.03, 0.3 once
    divided by naive_kd's 0.1. They run in float32 on the (upcast) features."""
    from embedcache.students.models import Student

    torch.manual_seed(0)
    model = Student("t", torch.nn.Identity(), 64, 16, 7, 32, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        model.classifier.weight.mul_(20)
    feat = torch.randn(32, 64)
    want = model.from_features(feat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.from_features(feat.bfloat16())
    for k in ("emb", "logits"):
        assert got[k].dtype == torch.float32
        ref = {"emb": model.head, "logits": model.classifier}[k](feat.bfloat16().float())
        torch.testing.assert_close(got[k], ref, rtol=1e-6, atol=1e-6)
    assert want["logits"].abs().max() > 8  # logits of the size the rounding hurt


def test_a_student_setting_the_student_does_not_read_is_refused():
    """`features --student efficientnet_lite0 --set model=foo` passed: model is read by openclip_visual
    only (a trial)."""
    with pytest.raises(ConfigError, match=r"student.model='foo' is read by the openclip_visual student only; "
                                          r"student test_resnet has no use for it: leave it out"):
        build_student(StudentConfig(name="test_resnet", input_size=32, model="foo"), 16)


def test_a_student_input_larger_than_the_canvas_is_said(make_cfg, tiny_teacher, tmp_path):
    """student input_size 300 on a 96 px canvas trained without a word (a trial): every view upscaled."""
    import warnings

    from PIL import Image

    from embedcache.extract import extract

    for c in "ab":
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((60, 70, 3), 30 * i + (c == "b") * 100, np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    store = extract(make_cfg("files.zarr", "dataset.name=folder", f"dataset.path={tmp_path / 'data'}"),
                    teacher=tiny_teacher, log=quiet).path  # a 48 px canvas
    cfg = TrainConfig(store=store, recipe="feat_kd", student=StudentConfig(name="test_resnet", input_size=64), steps=2,
                      batch_size=4, eval_every=2, device="cpu", progress=False, out=str(tmp_path / "big"))
    with pytest.warns(UserWarning, match=r"student input_size=64 is larger than the store's 48 px canvas: every view"):
        train(cfg, log=quiet)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*larger than the store's")
        train(replace(cfg, student=StudentConfig(name="test_resnet", input_size=48), out=str(tmp_path / "fits")), log=quiet)


def _flip_middle(f: Path) -> None:
    """64 bytes zeroed mid-file: damage that still loads (a tensor's values changed)."""
    raw = bytearray(f.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(64)
    f.write_bytes(bytes(raw))


def _stopped_at_step_25(store, tmp_path, **kw) -> TrainConfig:
    """A run stopped by Ctrl-C at step 25 (its checkpoint: step 20), and its config."""
    def stop(step):
        if step == 25:
            raise KeyboardInterrupt

    cut = _cfg(store, tmp_path, name="cut", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(cut, on_step=stop, log=quiet)
    return cut


def test_a_damaged_checkpoint_that_still_loads_is_refused_not_resumed(synthetic_store, tmp_path):
    """A checkpoint with 64 bytes zeroed mid-file loaded and the run resumed from changed weights, exit 0
    (a trial): its zip records' CRC-32s are checked before it is used."""
    from embedcache.errors import TrainingError

    cut = _stopped_at_step_25(synthetic_store, tmp_path)
    _flip_middle(tmp_path / "cut" / "checkpoint.pt")
    with pytest.raises(TrainingError, match=r"checkpoint.pt is damaged \(its record \S+ does not match its "
                                            r"checksum\); delete it to restart the run from step 0"):
        train(cut, log=quiet)


def test_a_checkpoint_written_without_zip_checksums_still_resumes(synthetic_store, tmp_path):
    """torch.save may be told to write no CRC-32s (every one 0): such a checkpoint cannot be checked, and
    is not called damaged."""
    from torch import serialization

    cut = _stopped_at_step_25(synthetic_store, tmp_path)
    f = tmp_path / "cut" / "checkpoint.pt"
    state = torch.load(f, weights_only=True)
    serialization.set_crc32_options(False)
    try:
        torch.save(state, f)
    finally:
        serialization.set_crc32_options(True)
    assert train(cut, log=quiet).resumed_from == 20


@pytest.mark.parametrize("select", ["best_val", "last"])
def test_a_run_begun_while_validation_pooled_its_domains_is_another_definition(synthetic_store, tmp_path, select):
    """Its best checkpoint so far was chosen by the pooled accuracy: going on by the mean over domains would
    mix the two rules, and a finished one is not the recipe as it is now. A run keeping its last weights,
    unaveraged, chose nothing by them and resumes."""
    from embedcache.errors import TrainingError

    cut = _stopped_at_step_25(synthetic_store, tmp_path, select=select)
    f = tmp_path / "cut" / "config.json"
    d = json.loads(f.read_text())
    assert d["recipe_definition"].pop("validation", None) == ("mean_over_domains" if select == "best_val" else None)
    f.write_text(json.dumps(d))
    if select == "last":
        assert train(cut, log=quiet).resumed_from == 20
        return
    with pytest.raises(TrainingError, match=r"cut was trained under another definition of recipe li_iccv23 "
                                            r"\(validation: None -> 'mean_over_domains'\); use another --out"):
        train(cut, log=quiet)
    from types import SimpleNamespace

    from embedcache.students.recipes import definition_change
    old = SimpleNamespace(recipe="li_iccv23", averaging="none", select=select)  # a run from before the records
    assert definition_change(old, None) == "its validation pooled the training domains' images, not their mean over domains"


def test_damaged_weights_that_still_load_are_refused(synthetic_store, tmp_path):
    """model.safetensors has no checksum of its own: bytes changed in a tensor were read as weights.
    The summary keeps the file's CRC-32C, checked on loading."""
    from embedcache.errors import TrainingError
    from embedcache.students.rundir import RunDir

    res = train(_cfg(synthetic_store, tmp_path, name="w"), log=quiet)
    run = RunDir(res.out)
    assert run.weights()  # intact
    _flip_middle(Path(res.out) / "model.safetensors")
    with pytest.raises(TrainingError, match=r"model.safetensors do not match the checksum its run recorded"):
        run.weights()
    summary = json.loads(run.file("summary.json").read_text())  # a run finished before the checksum was kept
    del summary["weights_crc32c"]
    run.file("summary.json").write_text(json.dumps(summary))
    assert run.weights()  # read unchecked, as before


def test_a_finished_runs_edited_split_is_refused(synthetic_store, tmp_path):
    """split.json as valid JSON with rows moved from training to validation: evaluate scored the run on
    rows it trained on, 65.7% in-domain for 27.8%, exit 0 (a trial). The summary keeps its CRC-32C."""
    from embedcache.errors import TrainingError
    from embedcache.students.rundir import RunDir
    from embedcache.students.scoring import score_run

    res = train(_cfg(synthetic_store, tmp_path, "ce", name="sp", steps=4, eval_every=2, ckpt_every=2), log=quiet)
    run = RunDir(res.out)
    before = score_run(res.out, ["lodo"])
    split = run.split
    split["train_idx"], split["val_idx"] = split["train_idx"][5:], split["val_idx"] + split["train_idx"][:5]
    run.file("split.json").write_text(json.dumps(split))
    with pytest.raises(TrainingError, match=r"its split.json does not match the checksum its run recorded"):
        score_run(res.out, ["lodo"])
    summary = json.loads(run.file("summary.json").read_text())  # a run finished before the checksum was kept
    del summary["split_crc32c"]
    run.file("summary.json").write_text(json.dumps(summary))
    assert len(score_run(res.out, ["lodo"])) == len(before)  # read unchecked, as before


def test_an_input_size_a_clip_tower_cannot_take_is_one_line(tiny_clip_dir):
    """student.input_size=32 on open_clip's RN50 was a RuntimeError traceback from inside its attention
    pool (a trial): a CLIP tower's position embeddings fix its input size."""
    from embedcache.errors import ConfigError
    from embedcache.students.models import build_student

    native = build_student(StudentConfig(name="openclip_visual", model=f"local-dir:{tiny_clip_dir}"), 32)
    assert native.input_size == 32
    with pytest.raises(ConfigError, match=r"student.input_size=48: the openclip_visual tower .* takes 32 px "
                                          r"images only \(its position embeddings\); leave student.input_size out"):
        build_student(StudentConfig(name="openclip_visual", model=f"local-dir:{tiny_clip_dir}", input_size=48), 32)


def test_a_schedule_across_a_recipes_stages_is_said_with_the_last_stages_rates(synthetic_store, tmp_path):
    """vl2v_adip under cosine trained its Distill stage, which the kept model comes from, at the tail of
    one schedule across both stages (lr 6.7e-5 of 1e-3 at its end) with nothing said (a trial)."""
    from embedcache.students.recipes import stage_ends
    from embedcache.students.train import OptimConfig
    from embedcache.students.recipes import RECIPES

    said = []
    cfg = _cfg(synthetic_store, tmp_path, "vl2v_adip", steps=20, optim=OptimConfig(lr=1e-3, schedule="cosine"))
    train(cfg, log=said.append)
    rows = {json.loads(ln)["step"]: json.loads(ln)["lr"] for ln in open(tmp_path / "run" / "metrics.jsonl")}
    start = stage_ends(RECIPES.get("vl2v_adip"), 20)[0]
    note = [s for s in said if s.startswith("note: schedule cosine runs across recipe vl2v_adip's 2 stages")]
    assert len(note) == 1 and "optim.schedule=constant" in note[0] and f"steps {start + 1}-20" in note[0], said
    first = float(note[0].split("starts at lr ")[1].split(" ")[0])
    assert first < 1e-3 and rows[20] < first  # the stage starts below optim.lr and falls from there
    quiet_start = []
    train(_cfg(synthetic_store, tmp_path, "vl2v_adip", name="const", steps=20,
               optim=OptimConfig(lr=1e-3, schedule="constant")), log=quiet_start.append)
    assert not any("runs across" in s for s in quiet_start)
    # each stage is said as it starts (Align then Distill were seen only in metrics.jsonl, a trial)
    stages = [s for s in quiet_start if s.startswith("step ") and ": stage " in s]
    assert stages == ["step 0: stage 1 of 2 (vl2v_adip; trains the head)",
                      f"step {start}: stage 2 of 2 (vl2v_adip; trains the backbone)"], quiet_start


def test_a_resumed_runs_summary_counts_the_time_of_every_attempt(synthetic_store, tmp_path):
    """summary.json's seconds and loop_seconds after a resume covered the last attempt alone (10.6 s of
    a run that trained 140 s, a trial): each checkpoint keeps the time so far, and the resume adds to it."""
    import time as clock

    def slow_then_stop(step):
        clock.sleep(0.1)  # 2 s of training by the step-20 checkpoint
        if step == 25:
            raise KeyboardInterrupt

    cut = _cfg(synthetic_store, tmp_path, name="cut")
    began = clock.time()
    with pytest.raises(KeyboardInterrupt):
        train(cut, on_step=slow_then_stop, log=quiet)
    res = train(cut, log=quiet)
    both = clock.time() - began
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["loop_seconds"] >= res.loop_seconds + 2.0, (summary, res)
    assert summary["seconds"] >= res.seconds + 2.0, (summary, res)
    assert summary["loop_seconds"] <= summary["seconds"] <= both, (summary, both)  # nothing counted twice
    # the command's last line said this call's seconds beside summary.json's total without saying so (a trial)
    def stop_at_12(step):
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synthetic_store, tmp_path, name="cli"), on_step=stop_at_12, log=quiet)
    args = ["train", "--store", str(synthetic_store), "--student", "test_resnet", "--set", "student.input_size=32",
            "--set", "steps=30", "--set", "batch_size=8", "--set", "eval_every=10", "--set", "ckpt_every=10",
            "--device", "cpu", "--out", str(tmp_path / "cli"), "--no-progress"]
    out = CliRunner().invoke(main, args).output
    assert "s this call (resumed at step 10; summary.json's seconds count every attempt)" in out, out


def test_a_batch_larger_than_the_images_it_draws_from_is_refused_before_the_student(synthetic_store, tmp_path,
                                                                                      monkeypatch):
    """batch_size=5000 on the 96-image demo drew every batch with repeats and was killed for memory after
    135 s (a trial); repeats also make an anchor's own copies in-batch negatives of the contrastive losses."""
    import embedcache.students.train as tr
    from embedcache.errors import ConfigError
    from embedcache.students.data import SplitConfig, StoreData

    split = SplitConfig(holdout_domains=("outline",))
    pool = len(StoreData(str(synthetic_store), "name", split).train_idx)
    monkeypatch.setattr(tr, "build_seeded", lambda *a, **k: pytest.fail("the student was built"))
    with pytest.raises(ConfigError, match=rf"batch_size={pool + 1} is more than the {pool} training images the split "
                                          rf"has, so every batch would repeat images; use batch_size <= {pool}"):
        train(_cfg(synthetic_store, tmp_path, split=split, batch_size=pool + 1), log=quiet)
    by_domain = StoreData(str(synthetic_store), "name", SplitConfig()).train_by_domain
    fewest = min(len(p) for p in by_domain)
    with pytest.raises(ConfigError, match=rf"more than the {fewest} training images the smallest training domain has"):
        train(_cfg(synthetic_store, tmp_path, batch_size=fewest + 1, batch_per_domain=True), log=quiet)


def test_a_timm_students_missing_weights_path_is_not_asked_of_the_hub(tmp_path, monkeypatch):
    """student.pretrained=/path/weights (no suffix) was taken for a hub tag: 50 s of download retries, then
    "pass a local file", which the user had done (a trial)."""
    import timm

    from embedcache.errors import ConfigError

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        assert not pretrained, "the hub was asked"
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError, match=r"student weights .*nowhere/weights not found"):
        build_student(StudentConfig(name="timm:resnet10t", pretrained=str(tmp_path / "nowhere" / "weights")), 16)
    with pytest.raises(ConfigError, match=rf"student weights {tmp_path} is a folder; give a .safetensors/.pth file"):
        build_student(StudentConfig(name="timm:resnet10t", pretrained=str(tmp_path)), 16)  # it said "not found"


def test_train_refuses_an_unread_setting_for_a_fresh_run_only(synthetic_store, tmp_path):
    """A run begun with a setting its optimizer does not read (before the check) still resumes."""
    from embedcache.errors import ConfigError
    from embedcache.students.train import OptimConfig

    with pytest.raises(ConfigError, match=r"optim.momentum=0.5 is read only with optim.name=sgd"):  # from Python too
        train(_cfg(synthetic_store, tmp_path, name="old", optim=OptimConfig(momentum=0.5)), log=quiet)
    old = train(_cfg(synthetic_store, tmp_path, name="old", steps=2, eval_every=2, ckpt_every=2,
                     optim=OptimConfig(momentum=0.5)), log=quiet, unread_ok=True)  # as a run begun before the check
    again = CliRunner().invoke(main, ["train", "--config", f"{old.out}/config.json", "--out", old.out, "--no-progress"])
    assert again.exit_code == 0 and "is already done" in again.output, again.output
    fresh = CliRunner().invoke(main, ["train", "--config", f"{old.out}/config.json", "--out", str(tmp_path / "new"),
                                      "--no-progress"])
    assert fresh.exit_code == 2 and "optim.momentum=0.5 is read only with optim.name=sgd" in fresh.output, fresh.output


def test_a_weights_file_without_a_suffix_beside_the_command_is_a_file(tmp_path, monkeypatch):
    """student.pretrained=weights (a file in the working folder, no suffix, no slash) was asked of the hub
    (a review); a folder named timm/ leaves the hub word as it is."""
    import timm

    from embedcache.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").write_bytes(b"not a checkpoint")
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw:
                        pytest.fail("the hub was asked") if pretrained else real(name, pretrained=False, **kw))
    # a file that is no checkpoint: one line, not torch's UnpicklingError traceback
    with pytest.raises(ConfigError, match=r"student weights weights cannot be read as a state dict \(UnpicklingError: "
                                          r"Unsupported operand \d+\)") as err:
        build_student(StudentConfig(name="timm:resnet10t", pretrained="weights"), 16)
    assert "weights_only" not in str(err.value)  # torch's advice to unpickle it whole was quoted, cut mid-word


def test_a_run_refused_before_its_first_step_leaves_no_folder(synthetic_store, tmp_path):
    """A train refused on a damaged store left a folder of config.json, split.json and .train.lock (a trial):
    a folder this call made for a run that never trained is removed; one that existed before is kept."""
    from embedcache.errors import StoreDamagedError

    from conftest import alter_emb

    store = tmp_path / "damaged.zarr"
    shutil.copytree(synthetic_store, store)
    alter_emb(str(store), row=1, view=0, col=3)
    with pytest.raises(StoreDamagedError, match="image/emb"):
        train(_cfg(store, tmp_path, name="new/deep/run", steps=2), log=quiet)
    assert not (tmp_path / "new").exists()  # nor the folders made above it (a review)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(StoreDamagedError):
        train(_cfg(store, tmp_path, name="mine", steps=2), log=quiet)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "kept"


def test_a_head_trained_on_a_random_frozen_backbone_is_said(synthetic_store, tmp_path):
    """A shipped CPU sweep trained vl2v_adip's Align stage on a from-scratch backbone's random features,
    its rows named vl2v_adip, without a word (an audit): train and sweep say so."""
    from embedcache.students.sweep import frozen_random_sweep_note
    from embedcache.students.notes import frozen_random_note

    def note(recipe, **student):
        return frozen_random_note(_cfg(synthetic_store, tmp_path, recipe, student=StudentConfig(**student)))

    assert "recipe vl2v_adip trains a head on student test_resnet's frozen backbone, which starts from random" in \
        note("vl2v_adip", name="test_resnet", input_size=32)
    assert note("linear_probe", name="test_resnet", input_size=32, pretrained="scratch")
    assert not note("feat_kd", name="test_resnet", input_size=32)  # trains the whole backbone
    assert not note("vl2v_adip", name="test_resnet", input_size=32, pretrained="/w.safetensors")
    assert not note("vl2v_adip", name="efficientnet_lite0")  # its packaged ImageNet weights
    assert "(student.pretrained=scratch): its features are random, so its scores say nothing of the method's; leave " \
        "student.pretrained out for its packaged" in note("vl2v_adip", name="efficientnet_lite0", pretrained="scratch")
    said = []
    train(_cfg(synthetic_store, tmp_path, "vl2v_adip", steps=2, eval_every=2, ckpt_every=2), log=said.append)
    assert any(s.startswith("note: recipe vl2v_adip trains a head") for s in said), said
    points = [type("P", (), {"cfg": _cfg(synthetic_store, tmp_path, r)})() for r in ("vl2v_adip", "feat_kd")]
    assert frozen_random_sweep_note(points).startswith("note: vl2v_adip on test_resnet: a head trains on a frozen")


@pytest.mark.parametrize("pretrained,asked", [("timm", "resnet10t"), ("a1_in1k", "resnet10t.a1_in1k"),
                                               ("resnet10t.a1_in1k", "resnet10t.a1_in1k")])
def test_a_timm_tag_asks_the_hub_for_those_weights(monkeypatch, pretrained, asked):
    """A tag was dropped: every tag asked for timm's default weights, each under its own run name (a review)."""
    import timm

    calls, create = [], timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: calls.append((name, pretrained)) or
                        create(name.split(".")[0], pretrained=False, **kw))
    build_student(StudentConfig(name="timm:resnet10t", pretrained=pretrained, input_size=32), 16)
    assert calls == [(asked, True)]


def test_a_timm_student_from_scratch_asks_no_hub(monkeypatch):
    """student.pretrained=scratch on a timm student was read as a hub tag: ImageNet weights where random
    ones were asked for, or (offline) a failed download (a review)."""
    import timm

    from embedcache.students.models import starts_random

    asked, create = [], timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: asked.append(pretrained) or
                        create(name, pretrained=False, **kw))
    cfg = StudentConfig(name="resnet18", pretrained="scratch", input_size=32)
    model = build_student(cfg, 16, 3)
    assert asked == [False]  # no hub weights asked for
    assert starts_random(cfg) and model.input_size == 32
    assert not starts_random(StudentConfig(name="openclip_visual", model="hf-hub:timm/ViT-B-16"))


def test_a_run_begun_with_milestones_on_one_step_resumes_as_it_began(synthetic_store, tmp_path, monkeypatch):
    """The milestone check is for runs not yet begun: one begun before it was refused its resume (a review)."""
    import embedcache.students.train as training
    from embedcache.students.config import OptimConfig

    cfg = _cfg(synthetic_store, tmp_path, "feat_kd", steps=6, eval_every=2, ckpt_every=2,
               optim=OptimConfig(schedule="step", milestones=(0.5, 0.55)))  # both on step 3
    with pytest.raises(ConfigError, match="one falls on step 3 together with another"):
        train(cfg, log=quiet)
    assert not (tmp_path / "run").exists()
    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(training, "check_milestones", lambda cfg: None)  # as begun before the check
        train(cfg, log=quiet, on_step=lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3 else None)
    assert train(cfg, log=quiet).resumed_from == 2


def test_a_student_weights_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    """Every old run of a sweep's table, of an evaluate and of its settings legend hashed the same
    student.pretrained file again (hundreds of megabytes each): one hash per path, size and modification time."""
    import os

    import embedcache.fileio as fileio
    from embedcache.students.models import weights_file_sha

    hashed, real = [], fileio.file_sha256
    monkeypatch.setattr(fileio, "file_sha256", lambda p: hashed.append(p) or real(p))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 100)
    first = weights_file_sha(str(f))
    assert weights_file_sha(str(f)) == first and len(hashed) == 1
    f.write_bytes(b"b" * 100)  # saved over: the same size, a later time
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert weights_file_sha(str(f)) != first and len(hashed) == 2


def test_a_validation_that_meets_nan_puts_the_models_training_modes_back():
    """``validate`` set the modules' modes back only when it returned: a NaN output (raised) left the model in
    eval mode, and a pack's other heads go on training after one head diverges (a review)."""
    from embedcache.students.train import NonFiniteOutputs, validate

    class Nan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def from_features(self, x):
            return {"emb": self.drop(x) * float("nan"), "logits": None}

    class Features:
        kind = "features"

        def __call__(self, idx, views):
            return torch.ones(len(idx), 4)

    model = Nan().train()
    with pytest.raises(NonFiniteOutputs):
        validate(model, Features(), None, None, np.arange(3), "text", torch.ones(2, 4))
    assert model.training and model.drop.training


def test_validation_collapse_judges_each_domain_then_the_domains_pooled():
    from embedcache.evaluate.protocols import collapsed_class
    from embedcache.students.train import validation_collapse

    classes = ["circle", "square", "triangle"]
    truth = np.arange(12) % 3
    right, ones = (truth, truth), (np.ones(12, int), truth)
    assert validation_collapse([right, right], ["a", "b"], classes) == []
    assert validation_collapse([right, ones], ["a", "b"], classes) == \
        [{"domain": "b", "class": "square", "share": 1.0, "images": 12}]
    # every collapsed domain, the largest share first
    most = (np.r_[np.zeros(11, int), 1], np.arange(12) % 3)  # 'circle' for 11 of 12 (92%): not collapsed
    most20 = (np.r_[np.zeros(19, int), 1], np.arange(20) % 3)  # 'circle' for 19 of 20 (95%)
    assert collapsed_class(*most, classes) is None
    got = validation_collapse([most20, most, ones], ["a", "b", "c"], classes)
    assert [(c["domain"], c["class"], c["share"]) for c in got] == [("c", "square", 1.0), ("a", "circle", 0.95)]
    # each domain too small to judge alone (6 images), the two pooled (12): judged over both, as evaluate's lodo
    small = (np.ones(6, int), np.arange(6) % 3)
    assert collapsed_class(*small, classes) is None
    assert validation_collapse([small, small], ["a", "b"], classes) == \
        [{"domain": "avg", "class": "square", "share": 1.0, "images": 12}]
    assert validation_collapse([small], ["a"], classes) == []  # one domain of 6: not judged
    # a 19-image domain at 94.7% and a 9-image one at 100%: neither alone, 27 of 28 pooled (lodo's rule too)
    near = (np.r_[np.ones(18, int), 0], np.arange(19) % 3)
    assert [c["domain"] for c in validation_collapse([near, (np.ones(9, int), np.arange(9) % 3)], ["a", "b"],
                                                     classes)] == ["avg"]


def _answers(monkeypatch, plan):
    """Validation answers by evaluation: plan(i) is "right", "wrong" (every image another class) or
    "one" (class 0 for all) for the i-th evaluation; the model's own answers are replaced."""
    import embedcache.students.train as train_mod

    real, seen = train_mod.validate, []

    def answered(model, inputs, targets, data, rows, *a, **kw):
        pred, loss, ce = real(model, inputs, targets, data, rows, *a, **kw)
        seen.append(rows)
        truth = data.targets[rows]
        how = plan(sum(len(r) for r in seen[:-1]) // len(data.val_idx))
        n = int(truth.max()) + 1
        pred = {"right": truth, "wrong": (truth + 1) % n, "one": np.zeros_like(truth)}[how]
        return pred, loss, ce

    monkeypatch.setattr(train_mod, "validate", answered)


@pytest.mark.parametrize("kept", ["last", "best_val", "swa"])
def test_a_kept_model_answering_one_class_is_warned_of_and_recorded(kept, synthetic_store, tmp_path, monkeypatch):
    """`train` said "validation top-1 33.3%" of weights that answered one class for every validation image
    (a trial's SWAD average); evaluate said so, train did not. Judged on the weights kept: the best
    validation's, the last, or the average (validated as it is made)."""
    _answers(monkeypatch, lambda i: "one")
    said = []
    kw = {"select": "best_val"} if kept == "best_val" else {"averaging": "swa", "average_start": 0.0} if kept == "swa" else {}
    res = train(_cfg(synthetic_store, tmp_path, "feat_kd", split=SplitConfig(val_fraction=0.5), **kw), log=said.append)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    shape = summary["train_classes"][0]
    collapsed = summary["val_collapsed"]  # each validation domain (2, of 12 images each here)
    assert len(collapsed) == 2 and all(c["class"] == shape and c["share"] == 1.0 and c["images"] >= 10 for c in collapsed)
    warned = [s for s in said if "a collapsed model" in s]
    assert len(warned) == 1 and f"predict {shape!r} for 100%" in warned[0], said
    assert warned[0].startswith(f"warning: run run: the kept weights ({res.selected['rule']}")
    assert f"(collapsed on {collapsed[1]['domain']} too)" in warned[0]
    rows = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(r["val_collapsed"][0]["class"] == shape for r in rows)


@pytest.mark.parametrize("evaluations,average", [("one", "right"), ("right", "one")])
def test_an_average_is_judged_as_validated_not_by_its_evaluations(evaluations, average, synthetic_store, tmp_path,
                                                                  monkeypatch):
    """Averaged weights are validated once made (the fourth validation, after three evaluations): that
    validation, not the evaluation points', says whether the kept weights collapsed."""
    _answers(monkeypatch, lambda i: average if i == 3 else evaluations)
    said = []
    train(_cfg(synthetic_store, tmp_path, "feat_kd", averaging="swa", average_start=0.0,
               split=SplitConfig(val_fraction=0.5)), log=said.append)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert ("val_collapsed" in summary) == (average == "one")
    assert bool([s for s in said if "a collapsed model" in s]) == (average == "one")


def test_a_collapse_at_steps_not_kept_is_not_said(synthetic_store, tmp_path, monkeypatch):
    _answers(monkeypatch, lambda i: "right" if i == 1 else "one")  # best at step 20, collapsed at 10 and 30
    said = []
    train(_cfg(synthetic_store, tmp_path, "feat_kd", select="best_val"), log=said.append)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["selected"]["step"] == 20 and "val_collapsed" not in summary
    assert not [s for s in said if "collapsed" in s]


def test_a_resumed_run_judges_the_kept_weights_by_their_own_evaluation(synthetic_store, tmp_path, monkeypatch):
    """The kept weights were validated before the stop: their collapse comes back from metrics.jsonl."""
    from embedcache.students.train import RunInterrupted

    _answers(monkeypatch, lambda i: "one" if i == 0 else "wrong")  # step 10 the best (a class's share > 0)
    cfg = _cfg(synthetic_store, tmp_path, "feat_kd", select="best_val", split=SplitConfig(val_fraction=0.5))
    steps = []
    with pytest.raises(RunInterrupted):
        train(cfg, log=quiet, on_step=steps.append, should_stop=lambda: len(steps) >= 20)
    _answers(monkeypatch, lambda i: "wrong")  # this attempt's evaluations (steps 30) answer no class alike
    said = []
    train(cfg, log=said.append)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["selected"]["step"] == 10 and summary["val_collapsed"][0]["share"] == 1.0
    assert any("(best_val, step 10)" in s and "a collapsed model" in s for s in said), said
