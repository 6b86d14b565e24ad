"""One run path (issue 8): typed CLI options, one-line errors, model selection, scoring once into
an updated results file, the teacher-online target provider, the paper fidelity fixes, and every
store operation on every backend."""
import json
import warnings
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import embedcache
from embedcache.cli import main
from embedcache.config import replace
from embedcache.errors import StoreDamagedError, StoreError
from embedcache.store import BACKENDS, Store, plan_layout
from embedcache.store.layout import add_text_arrays
from embedcache.store.integrity import checksum
from embedcache.students.config import OptimConfig, SplitConfig, StudentConfig, TrainConfig
from embedcache.students.train import train

from conftest import quiet


def _cfg(store, out, **kw):
    base = dict(store=str(store), recipe="feat_kd", student=StudentConfig(name="test_resnet", input_size=32), steps=6,
                batch_size=8, eval_every=3, ckpt_every=3, out=str(out), progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_a_store_path_with_a_hash_is_used_as_given(synthetic_store, tmp_path):
    odd = tmp_path / "my #1 stores" / "s.zarr"
    shutil.copytree(synthetic_store, odd)
    res = CliRunner().invoke(main, ["train", "--store", str(odd), "--recipe", "feat_kd", "--student", "test_resnet",
                                    "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu",
                                    "--set", "steps=2", "--set", "student.input_size=32"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["store"] == str(odd)


def test_unknown_names_and_bad_values_are_one_line_everywhere(synthetic_store, tmp_path):
    cases = [
        (["train", "--store", str(synthetic_store), "--recipe", "nope"], "recipe='nope' is not valid"),
        (["train", "--store", str(synthetic_store), "--set", "optim.name=adamz"], "optim.name='adamz' is not valid"),
        (["train", "--store", str(synthetic_store), "--set", "steps=abc"], "steps='abc' is not valid: expected an integer"),
        (["extract", "--set", "teacher.name=gpt"], "teacher.name='gpt' is not valid: choose one of"),
        (["extract", "--set", "views.count=four"], "views.count='four' is not valid: expected an integer"),
        (["evaluate", "--store", str(synthetic_store), "--protocol", "zero"], "unknown protocol 'zero'; available:"),
        (["features", "--store", str(synthetic_store), "--student", "resnet9"], "student.name='resnet9' is not valid"),
    ]
    for args, msg in cases:
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output.strip().count("\n") == 0 and msg in res.output, (args, res.output)


def test_a_launcher_refuses_options_it_does_not_use(synthetic_store, tmp_path):
    spec = {"store": str(synthetic_store), "base": {"student": {"name": "test_resnet", "input_size": 32}, "steps": 2},
            "grid": {"recipe": ["feat_kd"]}, "launcher": "serial"}
    f = tmp_path / "s.yaml"
    f.write_text(json.dumps(spec))
    for extra, msg in ((["--launcher", "ray", "--workers", "2"], "--workers does not apply to the ray launcher"),
                       (["--launcher", "local", "--address", "h:1"], "--address does not apply to the local launcher"),
                       (["--workers", "2"], "--workers does not apply to the serial launcher")):
        res = CliRunner().invoke(main, ["sweep", str(f), "--out", str(tmp_path / "sw"), *extra])
        assert res.exit_code == 2 and msg in res.output and res.output.strip().count("\n") == 0, res.output
    assert not (tmp_path / "sw").exists()


def test_devices_default_to_auto_in_every_command():
    for name in ("evaluate", "features"):
        opts = {o.name: o for o in main.commands[name].params}
        assert opts["device"].default == "auto", name
    import click.core

    unset = getattr(click.core, "UNSET", None)  # click 8.3's sentinel for no default; None before
    for name in ("train", "sweep"):  # unset: the config's (a sweep file's base.device), auto
        opts = {o.name: o for o in main.commands[name].params}
        assert "device" in opts and opts["device"].default in (None, unset), name
    assert TrainConfig().device == "auto"


def test_best_validation_checkpoint_is_kept_and_said(synthetic_store, tmp_path):
    flat = OptimConfig(lr=5e-3, schedule="constant")
    res = train(_cfg(synthetic_store, tmp_path / "best", recipe="vl2v_sd", steps=12, eval_every=3, optim=flat,
                     select="best_val"), log=quiet)
    rows = [json.loads(ln) for ln in open(tmp_path / "best" / "metrics.jsonl")]
    vals = [r["val_top1"] for r in rows]
    best_step = rows[int(np.argmax(vals))]["step"]  # the earliest of the best
    summary = json.loads((tmp_path / "best" / "summary.json").read_text())
    assert summary["selected"]["rule"] == "best_val" and summary["selected"]["step"] == best_step
    assert res.val_top1 == pytest.approx(max(vals))
    # batches depend on (seed, step) alone and the schedule is constant, so a run stopped at the
    # selected step has exactly the kept weights
    short = train(_cfg(synthetic_store, tmp_path / "short", recipe="vl2v_sd", steps=best_step, eval_every=3, optim=flat,
                       select="last"), log=quiet)
    a, b = load_file(f"{res.out}/model.safetensors"), load_file(f"{short.out}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the recipe decides by default: VL2V-ADiP selects by validation, Li et al. keep the last weights
    li = train(_cfg(synthetic_store, tmp_path / "li", recipe="li_iccv23"), log=quiet)
    assert li.selected["rule"] == "last" and "li_iccv23 recipe's default" in li.selected["why"]


def test_a_two_stage_recipe_selects_and_averages_within_its_last_stage(synthetic_store, tmp_path):
    """VL2V-ADiP selects its checkpoint in stage 2 (Distill): stage-1 weights (a projection fitted on
    the untouched backbone) are never the answer, however well they validate."""
    stage_one_won = False
    for seed in range(4):
        res = train(_cfg(synthetic_store, tmp_path / f"adip{seed}", recipe="vl2v_adip", steps=40, eval_every=5,
                         ckpt_every=40, seed=seed, select="best_val", split=SplitConfig(val_fraction=0.3)), log=quiet)
        rows = [json.loads(ln) for ln in open(tmp_path / f"adip{seed}" / "metrics.jsonl")]
        last = [r for r in rows if r["stage"] == 1]
        best = max(r["val_top1"] for r in last)
        assert res.selected["step"] == next(r["step"] for r in last if r["val_top1"] == best)  # the earliest of the best
        assert res.selected["step"] > 20  # stage 1 ends at step 20
        stage_one_won |= max(r["val_top1"] for r in rows if r["stage"] == 0) >= best
    assert stage_one_won  # else this test could not tell the rule from selecting over the whole run
    swa = train(_cfg(synthetic_store, tmp_path / "swa", recipe="vl2v_adip", steps=40, eval_every=5, ckpt_every=40,
                     averaging="swa", average_start=0.1), log=quiet)
    assert swa.selected["start_step"] == 20


def test_scoring_twice_updates_the_results_instead_of_appending(synthetic_store, tmp_path):
    train(_cfg(synthetic_store, tmp_path / "r", split=SplitConfig(holdout_domains=("outline",))), log=quiet)
    out = tmp_path / "results.parquet"
    for _ in range(2):
        res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "r"), "--protocol", "lodo", "--protocol", "per_class",
                                        "--out", str(out), "--device", "cpu"])
        assert res.exit_code == 0, res.output
    once = pd.read_parquet(out)
    keys = ["run", "protocol", "split", "domain", "class_name", "episode", "metric"]
    assert not once.duplicated(keys).any() and len(once) > 0
    # teacher rows go in the same file, with the same columns, and are kept beside the run's
    res = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), "--out", str(out)])
    both = pd.read_parquet(out)
    assert res.exit_code == 0 and list(both.columns) == list(once.columns)
    assert len(both) > len(once) and set(both.recipe) == {"feat_kd", "teacher"}


def test_lodo_scoring_embeds_only_the_rows_it_reads_and_scores_the_same(synthetic_store, tmp_path, monkeypatch):
    import embedcache.students.scoring as scoring
    from embedcache.students.scoring import score_run

    train(_cfg(synthetic_store, tmp_path / "r", split=SplitConfig(holdout_domains=("outline",), val_fraction=0.25)),
          log=quiet)
    embedded = []
    real = scoring.embed_rows

    def spy(*args, **kw):
        emb, scores = real(*args, **kw)
        embedded.append(int(np.isfinite(emb[:, 0]).sum()))
        return emb, scores

    monkeypatch.setattr(scoring, "embed_rows", spy)
    few = score_run(str(tmp_path / "r"), ["lodo"], device="cpu")
    monkeypatch.setattr(scoring, "rows_read", lambda *a, **k: None)  # every row, as before
    every = score_run(str(tmp_path / "r"), ["lodo"], device="cpu")
    pd.testing.assert_frame_equal(few, every)
    split = json.loads((tmp_path / "r" / "split.json").read_text())
    assert embedded[0] == len(split["test_idx"]) + len(split["val_idx"]) < embedded[1]


def test_rows_that_collide_with_different_values_are_refused_not_dropped(tmp_path):
    from embedcache.evaluate.results import upsert

    row = {"run": "r", "protocol": "lodo", "split": "out_of_domain", "domain": "photo", "metric": "top1"}
    upsert(str(tmp_path / "ok.parquet"), pd.DataFrame([{**row, "value": 0.5}, {**row, "value": 0.5}]))  # the same row twice
    assert len(pd.read_parquet(tmp_path / "ok.parquet")) == 1
    with pytest.raises(ValueError, match="same key .* differ in value"):
        upsert(str(tmp_path / "bad.parquet"), pd.DataFrame([{**row, "value": 0.5}, {**row, "value": 0.6}]))
    assert not (tmp_path / "bad.parquet").exists()


def test_a_run_scored_on_another_teachers_store_is_refused_before_any_work(synthetic_store, make_cfg, tiny_clip_dir,
                                                                            tmp_path):
    from embedcache.extract import extract

    from conftest import save_tiny_clip

    train(_cfg(synthetic_store, tmp_path / "r"), log=quiet)
    other = make_cfg("other.zarr", f"teacher.model=local-dir:{save_tiny_clip(tmp_path / 'clip2', seed=3)}")
    extract(other, log=quiet)
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "r"), "--store", other.out, "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0
    assert "was made from other inputs" in res.output and "the store it was trained on" in res.output
    assert "delete" not in res.output and "; the run's store's key " in res.output  # not "this call's key" (a trial)


def test_a_run_scores_from_another_working_folder(synthetic_store, tmp_path, monkeypatch):
    monkeypatch.chdir(synthetic_store.parent)
    train(_cfg(synthetic_store.name, tmp_path / "r"), log=quiet)  # a relative store path
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "r"), "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code == 0, res.output


def test_li_iccv23_filters_l_vlalign_like_the_authors_commands():
    from embedcache.students.recipes import RECIPES

    assert RECIPES.get("li_iccv23").stages[0].loss_args["vlalign"] == {"correct_only": True}
    assert RECIPES.get("li_iccv23_attr").stages[0].loss_args["vlalign"] == {"correct_only": True}
    assert "vlalign" not in RECIPES.get("li_iccv23_nofilter").stages[0].loss_args


def test_vl2v_sd_uses_the_clip_towers_own_output(tiny_clip_dir):
    import open_clip

    from embedcache.students.models import build_student

    scfg = StudentConfig(name="openclip_visual", model=f"local-dir:{tiny_clip_dir}")
    same = build_student(scfg, 32).eval()  # the tiny tower's output width is 32, as the teacher's
    assert isinstance(same.head, torch.nn.Identity)
    ref = open_clip.create_model(f"local-dir:{tiny_clip_dir}").visual.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(same(x)["emb"], ref(x))
    wider = build_student(scfg, 48).eval()  # another width: a projection that starts as the identity
    out = wider(x)["emb"]
    torch.testing.assert_close(out[:, :32], ref(x))
    assert torch.equal(out[:, 32:], torch.zeros(2, 16))


def test_building_teachers_leaves_global_state_alone(tiny_teacher_cfg):
    from embedcache.teachers import build_teacher

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    env = dict(os.environ)
    build_teacher(tiny_teacher_cfg)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert dict(os.environ) == env


def test_features_on_an_hdf5_store(make_cfg, tiny_teacher, tmp_path):
    from embedcache.extract import extract

    cfg = make_cfg("s.h5")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    res = CliRunner().invoke(main, ["features", "--store", cfg.out, "--student", "test_resnet", "--no-progress",
                                    "--set", "input_size=32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with Store(cfg.out) as st:
        (name, info), = st.derived().items()
        assert info["complete"] and st.read_derived(name).shape == (30, 3, info["feat_dim"])
    run = train(_cfg(cfg.out, tmp_path / "h", recipe="linear_probe", features=True), log=quiet)
    assert run.val_top1 is not None


# --- every store operation, on every backend ------------------------------------------------------
@pytest.fixture(params=BACKENDS.names())
def blank_store(request, tmp_path):
    suffix = {"zarr": "zarr", "hdf5": "h5"}[request.param]
    layout = plan_layout(10, 2, 4, 8, True, 4)
    manifest = {"schema": embedcache.store.SCHEMA_VERSION, "key": "k", "complete": False}
    return Store.create(str(tmp_path / f"s.{suffix}"), manifest, layout, request.param)


def _block(store, b, seed):
    start, stop = store.block_range(b)
    rng = np.random.default_rng(seed)
    n = stop - start
    pixels = rng.integers(0, 255, (n, 8, 8, 3)).astype(np.uint8)
    return {"image/emb": rng.standard_normal((n, 2, 4)).astype(np.float16),
            "image/view_params": rng.integers(0, 8, (n, 2, 5)).astype(np.int32),
            "image/status": np.ones(n, np.uint8), "image/pixels": pixels,
            "image/canvas_crc32c": np.array([checksum(c) for c in pixels], np.uint32)}


def test_store_operations_on_every_backend(blank_store):
    st = blank_store
    blocks = {b: _block(st, b, b) for b in range(st.num_blocks)}
    for b, arrays in blocks.items():
        st.write_block(b, arrays, {b * 4: "broken"} if b == 1 else None)
    assert st.blocks_done().all() and st.failures() == {4: "broken"}
    for name in st.layout["block_arrays"]:
        np.testing.assert_array_equal(st.read(name), np.concatenate([blocks[b][name] for b in range(st.num_blocks)]))
    st.put_table("meta.parquet", pd.DataFrame({"index": range(10)}))
    st.put_table("text.parquet", pd.DataFrame({"source": ["name"]}))
    st.finish(failed=1)
    assert st.complete and st.verify().ok and st.table("meta.parquet")["index"].tolist() == list(range(10))
    feats = np.arange(10 * 2 * 3, dtype=np.float32).reshape(10, 2, 3)
    st.put_derived("student-x", feats, {"kind": "test"})
    np.testing.assert_array_equal(st.read_derived("student-x"), feats)
    assert st.derived()["student-x"]["complete"]
    st.reopen_blocks([1])
    assert not st.complete and st.blocks_done().tolist() == [True, False, True]
    st.write_block(1, blocks[1])
    assert st.blocks_done().all()


def test_a_derived_array_written_again_in_another_dtype_is_refused_and_the_old_one_kept(blank_store):
    """The array kept its first dtype and cast the new data into it, while the record took the new dtype and a
    checksum of the uncast data: every later read said the store was damaged (a review)."""
    st = blank_store
    st.put_derived("x", np.ones((10, 4), np.float32), {"kind": "test"})
    with pytest.raises(StoreError, match=r"derived array x in .* is \(10, 4\) float32, not \(10, 4\) float64"):
        st.put_derived("x", np.full((10, 4), 0.1), {"kind": "test"})
    assert st.derived()["x"]["complete"] and st.derived()["x"]["dtype"] == "float32"
    np.testing.assert_array_equal(st.read_derived("x"), np.ones((10, 4), np.float32))


def test_an_unfinished_stores_text_arrays_are_refused_block_by_block_as_whole(tmp_path):
    """``read`` refused an unfinished store's text arrays (zeros till it finishes, read as scores of 0);
    ``read_blocks`` gave the zeros (a review)."""
    layout = plan_layout(8, 2, 8, 8, False, 4)
    add_text_arrays(layout, {"name": 3}, 3, 8)
    manifest = {"schema": embedcache.store.SCHEMA_VERSION, "key": "k", "complete": False}
    with Store.create(str(tmp_path / "s.zarr"), manifest, layout) as st:
        for read in (st.read, lambda name: list(st.read_blocks(name))):
            with pytest.raises(StoreError, match="not finished"):
                read("text/name/class_emb")


def test_a_stores_embeddings_digest_is_taken_again_once_its_blocks_are_rewritten(blank_store):
    """``refresh`` forgot the contents digest but kept the embeddings digest: a Store asked before a repair
    answered the old one after it (a review)."""
    st = blank_store
    for b in range(st.num_blocks):
        st.write_block(b, _block(st, b, b))
    st.put_table("meta.parquet", pd.DataFrame({"index": range(10)}))
    st.put_table("text.parquet", pd.DataFrame({"source": ["name"]}))
    st.finish()
    before = st.embeddings_digest()
    st.reopen_blocks([1])
    st.write_block(1, _block(st, 1, 99))
    st.finish()
    assert st.embeddings_digest() != before


def test_a_store_that_fails_as_it_opens_or_is_made_closes_its_file(tmp_path, monkeypatch):
    """A failure while a store opened (not one of its own refusals) or a refusal of a store just made left the
    HDF5 file open, and so locked, in the process (a review)."""
    import embedcache.extract as extract_mod
    from embedcache.store.backends import HDF5Backend

    from conftest import block_store

    path, _ = block_store(tmp_path, "hdf5")
    open_now, init, close = set(), HDF5Backend.__init__, HDF5Backend.close
    monkeypatch.setattr(HDF5Backend, "__init__", lambda self, *a, **k: open_now.add(id(self)) or init(self, *a, **k))
    monkeypatch.setattr(HDF5Backend, "close", lambda self: (open_now.discard(id(self)), close(self)))
    with monkeypatch.context() as m:
        m.setattr(HDF5Backend, "recover", lambda self, arrays: (_ for _ in ()).throw(OSError("cut off")))
        with pytest.raises(OSError, match="cut off"):
            Store(path, "a")
    assert not open_now
    monkeypatch.setattr(extract_mod, "made_so", lambda st, manifest: (_ for _ in ()).throw(StoreError("made otherwise")))
    layout = plan_layout(10, 2, 4, 8, True, 4)
    manifest = {"schema": embedcache.store.SCHEMA_VERSION, "key": "k", "complete": False}
    with pytest.raises(StoreError, match="made otherwise"):
        extract_mod.open_or_create(replace(extract_mod.ExtractConfig(), out=str(tmp_path / "new.h5")), manifest, layout)
    assert not open_now


def test_a_damaged_block_is_refused_on_every_backend(blank_store):
    st = blank_store
    for b in range(st.num_blocks):
        st.write_block(b, _block(st, b, b))
    st.b.write("image/emb", 5, np.zeros((1, 2, 4), np.float16))  # rows change behind the checksum's back
    with pytest.raises(StoreDamagedError, match=r"image/emb: rows 4-7 \(block 1\) do not match .*embedcache verify"):
        st.read("image/emb")
    report = st.verify()
    assert report.damaged == {1: ["image/emb"]}
    with pytest.raises(StoreError, match="no array image/nope"):
        st.read("image/nope")


def test_transfer_scores_a_run_on_another_store_of_the_same_teacher(synthetic_store, make_cfg, tiny_teacher, tmp_path):
    from embedcache.extract import extract
    from embedcache.students.scoring import score_run

    train(_cfg(synthetic_store, tmp_path / "r", split=SplitConfig(holdout_domains=("outline",))), log=quiet)
    other = make_cfg("other.zarr", "views.count=2", "dataset.per_class=3", "dataset.seed=1",
                     "text.sources=[name,templates,attributes]",
                     "text.attributes=synthetic")  # same teacher and classes, other images and views
    extract(other, teacher=tiny_teacher, log=quiet)
    with pytest.raises(StoreError, match="was made from other inputs"):
        score_run(tmp_path / "r", ["lodo"], other.out)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # other images: none is taken for a training image
        warnings.filterwarnings("ignore", message=".*collapsed model")
        rows = score_run(tmp_path / "r", ["lodo"], other.out, transfer=True)
    top1 = rows[rows.metric == "top1"]
    assert set(top1.split) == {"zero_shot"} and set(top1.domain) == {"outline", "solid", "avg"}
    assert set(rows.holdout) == {"transfer; trained without: outline"} and int(top1[top1.domain == "solid"].n.iloc[0]) == 9
    # the same source name made from other prompts is another text classifier: refused
    train(_cfg(synthetic_store, tmp_path / "t", text_source="templates", split=SplitConfig(holdout_domains=("outline",))),
          log=quiet)
    assert score_run(tmp_path / "t", ["lodo"], other.out, transfer=True)["source"].eq("templates").all()
    reworded = make_cfg("reworded.zarr", "dataset.per_class=3", "text.sources=[name,templates]",
                        "text.templates=openai80")
    extract(reworded, teacher=tiny_teacher, log=quiet)
    with pytest.raises(StoreError, match="its 'templates' prompts differ from those of the store the run was trained on; "
                                         "extract it with the text settings of the run's store"):
        score_run(tmp_path / "t", ["lodo"], reworded.out, transfer=True)
    # the same classes in another order (a class-names file's): the run's label indices would name others
    # (labels are ordered by label: swapping two names is what gives the names another order here)
    (tmp_path / "order.json").write_text('{"circle": "triangle", "square": "square", "triangle": "circle"}')
    reordered = make_cfg("reordered.zarr", "dataset.per_class=3", f"dataset.class_names={tmp_path / 'order.json'}")
    extract(reordered, teacher=tiny_teacher, log=quiet)
    with pytest.raises(StoreError, match=r"its classes are the run's store's in another order; the run's store has "
                                         r"circle, square, triangle \(all in its manifest's dataset.classes\); extract it "
                                         r"with labels that dataset.class_names names in that order"):
        score_run(tmp_path / "r", ["lodo"], reordered.out, transfer=True)
    # other names: said which (a misspelt synthesis class was told to re-extract the real store with them)
    (tmp_path / "typo.json").write_text('{"circle": "circle", "square": "square", "triangle": "trianglee"}')
    typo = make_cfg("typo.zarr", "dataset.per_class=3", f"dataset.class_names={tmp_path / 'typo.json'}")
    extract(typo, teacher=tiny_teacher, log=quiet)
    with pytest.raises(StoreError, match=r"its classes differ from the run's store's: the run's store has 'triangle', "
                                         r"which it lacks; it has 'trianglee', which the run's store lacks; extract both "
                                         r"with the same class names"):
        score_run(tmp_path / "r", ["lodo"], typo.out, transfer=True)
    # a store without the run's text source is said to lack it, with the settings that make it
    names_only = make_cfg("names.zarr", "dataset.per_class=3", "text.sources=[name]")
    extract(names_only, teacher=tiny_teacher, log=quiet)
    with pytest.raises(StoreError, match=r"it has no 'templates' text source, which the run predicts with; extract it "
                                         r"with the text settings of the run's store \(text.sources including templates, "
                                         r"text.templates="):
        score_run(tmp_path / "t", ["lodo"], names_only.out, transfer=True)
    # another teacher: the fix names the run's teacher, not the text settings it used to name
    import embedcache.students.scoring as scoring
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scoring, "same_teacher", lambda a, b: False)
        with pytest.raises(StoreError, match=r"its teacher differs .*; extract the store to score on with the run's "
                                             r"teacher \(teacher.name=open_clip, teacher.model=local-dir:/.*tiny"):
            # the model as teacher.model takes it: it said "model local-dir", which nothing takes (a trial)
            score_run(tmp_path / "r", ["lodo"], other.out, transfer=True)
    # the run's store moved away (a run folder copied to another machine): the run still scores on another
    # store, from what it kept of its own; a run from before it kept them names where to put the store back
    conf = tmp_path / "r" / "config.json"
    moved = {**json.loads(conf.read_text()), "store": str(tmp_path / "gone.zarr"), "store_path": str(tmp_path / "gone.zarr")}
    conf.write_text(json.dumps(moved))
    again = score_run(tmp_path / "r", ["lodo"], other.out, transfer=True)
    pd.testing.assert_frame_equal(again.drop(columns=["scored"], errors="ignore"), rows.drop(columns=["scored"], errors="ignore"))
    split = tmp_path / "r" / "split.json"
    split.write_text(json.dumps({k: v for k, v in json.loads(split.read_text()).items() if k != "trained_on"}))
    summary = tmp_path / "r" / "summary.json"  # such a run kept no checksum of its split either
    summary.write_text(json.dumps({k: v for k, v in json.loads(summary.read_text()).items() if k != "split_crc32c"}))
    with pytest.raises(StoreError, match=f"trained before runs kept what --transfer checks, and its store is not at "
                                         f"{tmp_path / 'gone.zarr'}: put that store back there"):
        score_run(tmp_path / "r", ["lodo"], other.out, transfer=True)
    conf.write_text(json.dumps({**moved, "store": str(synthetic_store), "store_path": str(synthetic_store)}))
    with pytest.raises(StoreError, match="its classes differ"):  # such a run's checks read its store, back in place
        score_run(tmp_path / "r", ["lodo"], typo.out, transfer=True)
    assert len(score_run(tmp_path / "r", ["lodo"], other.out, transfer=True)) == len(rows)


def test_an_array_read_block_by_block_is_the_array_and_a_damaged_block_is_refused(blank_store):
    """read_blocks (the --transfer check's pixels, a block in memory at a time) gives what read gives,
    each block held to its checksum as read holds it."""
    st = blank_store
    for b in range(st.num_blocks):
        st.write_block(b, _block(st, b, b))
    blocks = list(st.read_blocks("image/pixels"))
    assert [start for start, _ in blocks] == [st.block_range(b)[0] for b in range(st.num_blocks)]
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in blocks]), st.read("image/pixels"))
    st.b.write("image/pixels", 5, np.zeros((1, 8, 8, 3), np.uint8))  # rows change behind the checksum's back
    with pytest.raises(StoreDamagedError, match=r"image/pixels: rows 4-7 \(block 1\) do not match"):
        list(st.read_blocks("image/pixels"))


def test_a_block_of_zeros_is_written_not_taken_for_lost(blank_store):
    """Zarr skips chunks equal to the fill value unless told otherwise, on every opening of the array:
    black canvases or a block of unreadable images must still be on disk."""
    st = blank_store
    for b in range(st.num_blocks):
        arrays = _block(st, b, b)
        if b == 1:
            arrays = {k: np.zeros_like(v) for k, v in arrays.items()}
        st.write_block(b, arrays)
    path, backend = st.path, st.backend_name
    st.close()
    with Store(path, "a", backend) as again:  # a reopened store, as a resumed extraction writes it
        again.write_block(2, {k: np.zeros_like(v) for k, v in _block(again, 2, 2).items()})
        again.quick_check()
        assert again.verify().ok


def test_one_teacher_reached_two_ways_is_one_teacher():
    """A transfer between two stores of one paid service, reached by another URL or kept in another
    ledger, was refused as "its teacher differs": the recorded URL, limits and ledger were compared."""
    from embedcache.api import same_teacher

    def manifest(url, ledger, digest="d1"):
        return {"key_parts": {"teacher": digest}, "teacher": {"name": "remote", "model": "m", "url": url, "ledger": ledger,
                                                              "limits": {"url": url}, "server": {"fingerprint": "f"}}}

    a, b = manifest("http://a/v1", "/x/ledger.sqlite"), manifest("https://proxy/v1", "/y/ledger.sqlite")
    assert same_teacher(a, b) and not same_teacher(a, manifest("http://a/v1", "/x/ledger.sqlite", "d2"))
    old = [{k: v for k, v in m.items() if k != "key_parts"} for m in (a, b)]  # stores from before the digests
    assert same_teacher(*old) and not same_teacher(old[0], {"teacher": {**old[1]["teacher"], "model": "m2"}})


def test_transfer_leaves_out_the_images_the_run_trained_on(synthetic_store, make_cfg, tiny_teacher, tmp_path):
    """A transfer store holding the run's own training images (its dataset extracted again with other
    views) scored them as unseen test images: 90-100% in a trial. They are matched by canvas content
    and left out, with a warning; a store of nothing else is refused."""
    from embedcache.extract import extract
    from embedcache.students.scoring import score_run

    train(_cfg(synthetic_store, tmp_path / "r", split=SplitConfig(holdout_domains=("outline",))), log=quiet)
    again = make_cfg("again.zarr", "views.count=2", "dataset.per_class=8", "text.sources=[name,templates,attributes]",
                     "text.attributes=synthetic")  # the same images (and canvas size), other views: another key
    extract(again, teacher=tiny_teacher, log=quiet)
    split = json.loads((tmp_path / "r" / "split.json").read_text())
    used = len(split["train_idx"]) + len(split["val_idx"])
    with pytest.warns(UserWarning, match=rf"run .*: {used} of 48 images of .*again.zarr are images it trained or "
                                         r"validated on \(the same canvases\); its transfer scores leave them out; no "
                                         r"image of domain\(s\) solid is left, so its transfer tables have no such column"):
        rows = score_run(tmp_path / "r", ["lodo"], again.out, transfer=True)
    top1 = rows[(rows.metric == "top1") & (rows.domain != "avg")]
    assert dict(zip(top1.domain, top1.n)) == {"outline": 24}  # every solid image was trained or selected on
    own = score_run(tmp_path / "r", ["lodo"])  # the same held-out images as on its own store, the same scores
    own_top1 = own[(own.metric == "top1") & (own.split == "out_of_domain") & (own.domain == "outline")]
    assert float(own_top1.value.iloc[0]) == pytest.approx(float(top1.value.iloc[0]))
    train(_cfg(synthetic_store, tmp_path / "all"), log=quiet)  # every domain: nothing left to transfer to
    with pytest.raises(StoreError, match=r"every image of .*again.zarr is one run .* trained or validated on; score it "
                                         r"on its own store without --transfer"):
        score_run(tmp_path / "all", ["lodo"], again.out, transfer=True)
    bigger = make_cfg("bigger.zarr", "canvas.size=56", "dataset.per_class=8")
    extract(bigger, teacher=tiny_teacher, log=quiet)
    with pytest.warns(UserWarning, match=r"holds images the run trained on cannot be checked: their canvases differ in "
                                         r"size \(48 and 56 pixels\); its transfer scores count every image as unseen"):
        score_run(tmp_path / "r", ["lodo"], bigger.out, transfer=True)


def test_transfer_scores_a_run_that_held_classes_out_on_its_own_classes(synthetic_store, make_cfg, tiny_teacher, tmp_path):
    """A run that held classes out is scored by lodo on the classes it trained on, among their labels
    (its unseen ones are open_vocab's), on its own store and with --transfer alike: a trial's transfer
    rows scored every class among every label, as the teacher is scored."""
    from embedcache.api import StoreReader
    from embedcache.extract import extract
    from embedcache.students.scoring import score_run

    train(_cfg(synthetic_store, tmp_path / "r", split=SplitConfig(train_classes=("circle", "square"))), log=quiet)
    other = make_cfg("other.zarr", "dataset.per_class=3", "dataset.seed=1")
    extract(other, teacher=tiny_teacher, log=quiet)
    rows = score_run(tmp_path / "r", ["lodo", "open_vocab", "per_class"], other.out, transfer=True)
    with StoreReader(other.out) as reader:
        labels, domains = reader.meta["label"].to_numpy(), reader.meta["domain"].to_numpy()
        seen = [reader.classes.index(c) for c in ("circle", "square")]
    top1 = rows[(rows.protocol == "lodo") & (rows.metric == "top1") & (rows.domain != "avg")]
    assert set(top1.split) == {"zero_shot"}
    for dom, n in zip(top1.domain, top1.n):  # the seen classes' images only
        assert n == int(((domains == dom) & np.isin(labels, seen)).sum()), dom
    per = rows[rows.protocol == "per_class"]
    assert set(per.domain) == {"zero_shot", "unseen_zero_shot"}
    assert set(per[per.domain == "zero_shot"].class_name) == {"circle", "square"}
    assert set(per[per.domain == "unseen_zero_shot"].class_name) == {"triangle"}
    assert "unseen_zero_shot" in set(rows[rows.protocol == "open_vocab"].split)
    train(_cfg(synthetic_store, tmp_path / "all", split=SplitConfig(holdout_domains=("outline",))), log=quiet)
    every = score_run(tmp_path / "all", ["per_class"], other.out, transfer=True)  # a run that saw every class
    assert set(every.domain) == {"all"}


def test_few_shot_fine_tuning_on_a_transfer_store(synthetic_store, make_cfg, tiny_teacher, tmp_path):
    """--transfer with few_shot fine-tuning (evaluate's default 50 steps) crashed with KeyError('train_idx')
    (a review): the shots mode fine-tunes on the transfer store's shots; the mixed mode, which mixes the
    run's own training images into each batch, is refused in one line."""
    from embedcache.errors import EvaluationError
    from embedcache.extract import extract
    from embedcache.students.scoring import score_run

    train(_cfg(synthetic_store, tmp_path / "r", split=SplitConfig(train_classes=("circle", "square"))), log=quiet)
    other = make_cfg("other.zarr", "dataset.per_class=3", "dataset.seed=1")
    extract(other, teacher=tiny_teacher, log=quiet)
    options = {"few_shot": {"shots": 2, "episodes": 1}}
    rows = score_run(tmp_path / "r", ["few_shot"], other.out, transfer=True, finetune_steps=1, options=options)
    tuned = rows[(rows.split == "finetune@1@2shot") & (rows.metric == "top1") & (rows.episode == 0)]
    proto = rows[(rows.split == "prototype@2shot") & (rows.metric == "top1") & (rows.episode == 0)]
    assert len(tuned) == 1 and tuned.n.iloc[0] == proto.n.iloc[0] > 0  # the same query images
    assert set(rows.holdout) == {"transfer; unseen: triangle"}
    with pytest.raises(EvaluationError, match="--finetune-mode mixed mixes the run's own training images .* transfer "
                                              "stores hold none of them; use --finetune-mode shots"):
        score_run(tmp_path / "r", ["few_shot"], other.out, transfer=True, finetune_steps=1, options=options,
                  finetune_mode="mixed")
    # one shot of one unseen class: BatchNorm's batch of one; the advice leaves out the mode refused here (a review)
    with pytest.raises(EvaluationError, match=r"needs 2 or more; use more shots, or --finetune-steps 0$"):
        score_run(tmp_path / "r", ["few_shot"], other.out, transfer=True, finetune_steps=1,
                  options={"few_shot": {"shots": 1, "episodes": 1}})


def test_runs_trained_on_two_stores_are_two_methods_on_a_transfer_store(synthetic_store, make_cfg, tiny_teacher,
                                                                       tmp_path):
    """Runs of one recipe and settings trained on two stores (a plain and a contrastive synthesis),
    scored with --transfer on one real store, were one method: each replicate averaged a run of each
    store (a trial). The store a run trained on is a column of its rows, and tells methods apart."""
    from embedcache.api import StoreReader
    from embedcache.evaluate.results import upsert
    from embedcache.evaluate.report import transfer_note, write_report
    from embedcache.evaluate.store_eval import method_frame, method_keys, summary_table
    from embedcache.extract import extract
    from embedcache.students.scoring import score_run

    alt = make_cfg("alt.zarr", "dataset.seed=2")  # the same teacher, classes and prompts: other images
    extract(alt, teacher=tiny_teacher, log=quiet)
    real = make_cfg("real.zarr", "dataset.per_class=3", "dataset.seed=1")
    extract(real, teacher=tiny_teacher, log=quiet)
    rows = []
    for store, name in ((synthetic_store, "a"), (alt.out, "b")):
        for seed in (0, 1):  # runs named alike in two folders (plain/r0, contrastive/r0): one name, two runs
            train(_cfg(store, tmp_path / name / f"r{seed}", seed=seed, split=SplitConfig(holdout_domains=("outline",))),
                  log=quiet)
            rows.append(score_run(tmp_path / name / f"r{seed}", ["lodo"], real.out, transfer=True))
    with StoreReader(synthetic_store) as a, StoreReader(alt.out) as b:
        keys = {a.key, b.key}
    results = pd.concat(rows, ignore_index=True)
    assert set(results.trained_on) == keys
    res = tmp_path / "res.parquet"
    upsert(str(res), results.assign(trained_on="-").iloc[: len(rows[0])])  # a file of the rows of before the column
    upsert(str(res), results)  # rescored: they replace those (no duplicate), and the two r0 runs keep their rows
    assert len(pd.read_parquet(res)) == len(results)
    upsert(str(res), rows[0])  # one run rescored: its rows alone replaced
    pd.testing.assert_frame_equal(pd.read_parquet(res).sort_values(["trained_on", "run", "domain", "metric"]).reset_index(
        drop=True)[["run", "trained_on", "value"]], results.sort_values(["trained_on", "run", "domain", "metric"]).reset_index(
        drop=True)[["run", "trained_on", "value"]])
    frame = method_frame(pd.read_parquet(res))
    assert "trained_on" in method_keys(frame)
    table = summary_table(frame)
    assert len(table) == 2 and set(table["replicates"]) == {"2"}
    unknown = method_frame(pd.concat([results, results.iloc[: len(rows[0])].assign(trained_on="-", run="old")]))
    assert "trained_on" in method_keys(unknown)  # rows whose store is unknown are a method of their own
    own = pd.concat([score_run(tmp_path / n / "r0", ["lodo"]) for n in "ab"], ignore_index=True)
    assert (own.trained_on == own.store_key).all()  # on its own store: the store it was scored on
    legacy = method_frame(own.assign(trained_on="-"))  # rows scored before the column: their own store's
    assert (legacy.trained_on == legacy.store_key).all() and "trained_on" not in method_keys(legacy)
    # one run's transfer rows alone read as its own scores on that store (a trial): its store and a note say not
    alone = method_frame(rows[0])
    assert "trained_on" in method_keys(alone) and transfer_note(rows[0]).startswith("Rows whose `trained_on` is not")
    assert transfer_note(own) == "" and transfer_note(legacy) == ""
    report = (write_report(rows[0], str(tmp_path / "rep"))[0]).read_text()
    assert transfer_note(rows[0]) in report and f"| {rows[0].trained_on.iloc[0]} |" in report


def test_transfer_to_the_runs_own_store_by_another_path_keeps_its_split(synthetic_store, tmp_path):
    """The run's own store named by another path (a copy) is still its own: scored as a transfer
    store, the domains it trained on counted as unseen test images."""
    import shutil

    from embedcache.students.scoring import score_run

    train(_cfg(synthetic_store, tmp_path / "r", split=SplitConfig(holdout_domains=("outline",))), log=quiet)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(synthetic_store, copy)
    own = score_run(tmp_path / "r", ["lodo"])
    with pytest.warns(UserWarning, match=rf"run r: --transfer: {copy} is the store the run trained on \(its key\), "
                                         "so it is scored with its own split, as without --transfer"):
        again = score_run(tmp_path / "r", ["lodo"], str(copy), transfer=True)  # said, not silently dropped (a trial)
    assert set(again.holdout) == {"outline"} and "zero_shot" not in set(again.split)
    cols = ["split", "domain", "metric", "value", "n"]
    pd.testing.assert_frame_equal(own[cols].reset_index(drop=True), again[cols].reset_index(drop=True))


def test_settings_that_need_validation_rows_are_refused_when_the_split_leaves_none(synthetic_store, tmp_path):
    """val_fraction=0.01 rounds to no row of a domain: SWAD and an explicit best_val silently kept the
    last weights, their summaries saying SWAD defined them or that val_fraction was 0."""
    from embedcache.errors import ConfigError

    for change in ({"averaging": "swad"}, {"select": "best_val"}):
        with pytest.raises(ConfigError, match=r"needs validation rows, and split.val_fraction=0.01 leaves none"):
            train(_cfg(synthetic_store, tmp_path / "r", split=SplitConfig(val_fraction=0.01), **change), log=quiet)
    assert not (tmp_path / "r" / "config.json").exists()  # nothing written: the fixed command starts afresh
    res = train(_cfg(synthetic_store, tmp_path / "s", averaging="swad", average_start=0.0, steps=2, eval_every=1),
                log=quiet)  # two evaluations: too few for a valley; SWAD's code keeps the last segment's average
    assert res.selected["rule"] == "average (swad)" and res.selected["swad_segments"] == [1]
    assert res.selected["swad_settled"] is False and "never settled, so the last segment's average" in res.selected["why"]


def test_best_val_with_one_validation_keeps_the_last_weights_said_as_such(synthetic_store, tmp_path):
    """eval_every >= steps validates only at the end, and a recipe of two stages chooses in its last (VL2V-ADiP's
    Distill): best_val with one validation to choose among kept the last weights, its summary calling them the
    best (a fuzz of the settings; the shipped PACS sweeps' vl2v_adip runs among them). Said as the last weights."""
    cfg = _cfg(synthetic_store, tmp_path / "r", select="best_val", steps=6, eval_every=6, ckpt_every=6,
               split=SplitConfig(val_fraction=0.3))
    said = []
    res = train(cfg, log=said.append)
    assert res.selected["rule"] == "last" and res.selected["why"] == ("one validation to choose among (eval_every=6 of "
                                                                       "steps=6): the last weights")
    assert "warning: select=best_val: one validation to choose among (eval_every=6 of steps=6): the last weights; lower " \
           "eval_every to choose among more" in said
    res = train(replace(cfg, eval_every=3, out=str(tmp_path / "two")), log=quiet)  # two validations: a choice
    assert res.selected["rule"] == "best_val" and res.selected["step"] in (3, 6)
    # vl2v_adip (Align, then Distill) at 4 of 8 steps validates once in Distill, explicitly asked or by its default
    for select in ("best_val", "auto"):
        two = replace(cfg, recipe="vl2v_adip", steps=8, eval_every=4, select=select, out=str(tmp_path / select))
        picked = train(two, log=quiet).selected
        assert picked["rule"] == "last" and picked["why"].startswith("one validation to choose among in the last stage")
    assert train(replace(two, eval_every=2, out=str(tmp_path / "three")), log=quiet).selected["rule"] == "best_val"


def test_the_logged_learning_rate_is_the_one_the_last_step_used(synthetic_store, tmp_path):
    """metrics.jsonl logged the next step's rate: 0.0 at the end of a cosine run whose last step used
    lr * (1 + cos(pi * 3/4)) / 2."""
    import math

    train(_cfg(synthetic_store, tmp_path / "r", steps=4, eval_every=2, ckpt_every=4), log=quiet)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lr = 1e-3  # OptimConfig's default
    expected = {2: lr * (1 + math.cos(math.pi * 1 / 4)) / 2, 4: lr * (1 + math.cos(math.pi * 3 / 4)) / 2}
    got = {r["step"]: r["lr"] for r in rows}
    assert got.keys() == expected.keys() and all(got[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())


def test_a_batch_of_one_for_a_batchnorm_student_is_one_line(synthetic_store, tmp_path):
    from embedcache.errors import ConfigError

    with pytest.raises(ConfigError, match=r"batch_size=1 gives 1 image a step, and the test_resnet student's "
                                          r"BatchNorm needs at least 2 in training; use batch_size >= 2"):
        train(_cfg(synthetic_store, tmp_path / "r", batch_size=1), log=quiet)
    # with its BatchNorm frozen (eval mode, the pretrained statistics) one image a step trains
    from safetensors.torch import save_file

    from embedcache.students.models import build_student

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in build_student(StudentConfig(name="test_resnet"), 32).backbone.state_dict().items()},
              str(weights))
    frozen = _cfg(synthetic_store, tmp_path / "f", batch_size=1, steps=2, eval_every=2, freeze_bn=True,
                  student=StudentConfig(name="test_resnet", input_size=32, pretrained=str(weights)))
    assert train(frozen, log=quiet).steps == 2


def test_a_run_finished_before_a_new_refusal_still_loads_scores_and_is_found_done(synthetic_store, tmp_path, monkeypatch):
    """Refusals added later apply when a run starts: a finished run made with such settings (by an
    earlier version) was refused when scored, and its sweep could no longer find it."""
    import embedcache.students.train as train_module
    from embedcache.errors import ConfigError
    from embedcache.students.scoring import score_run

    cfg = _cfg(synthetic_store, tmp_path / "old", select="best_val", averaging="swa", average_start=0.0,
               split=SplitConfig(holdout_domains=("outline",)))
    with pytest.raises(ConfigError, match="both choose the final weights"):
        train(cfg, log=quiet)
    monkeypatch.setattr(train_module, "check_trainable", lambda cfg: None)  # as the earlier version trained it
    train(cfg, log=quiet)
    monkeypatch.undo()
    assert len(score_run(tmp_path / "old", ["lodo"])) and train(cfg, log=quiet).steps == cfg.steps  # found done


def test_results_written_before_run_seed_read_with_it(tmp_path):
    """A results file whose run seed column is still named "seed" is read, and merged into, under the
    current name: no column of NaN seeds beside it."""
    from embedcache.evaluate.results import read_results, upsert

    row = {"run": "r", "protocol": "lodo", "split": "out_of_domain", "domain": "photo", "metric": "top1", "value": 0.5}
    pd.DataFrame([{**row, "seed": 1234, "replicate": 0}]).to_parquet(tmp_path / "old.parquet")
    old = read_results(tmp_path / "old.parquet")
    assert list(old.run_seed) == [1234] and "seed" not in old.columns
    both = upsert(str(tmp_path / "old.parquet"), pd.DataFrame([{**row, "run": "r2", "run_seed": 99, "replicate": 0}]))
    assert sorted(both.run_seed) == [99, 1234] and "seed" not in both.columns


def test_a_damaged_weights_file_is_one_line_whose_fix_works(synthetic_store, tmp_path):
    """A truncated model.safetensors was a SafetensorError traceback (a trial)."""
    from embedcache.students.scoring import score_run

    run = tmp_path / "r"
    train(_cfg(synthetic_store, run), log=quiet)
    good = score_run(run, ["lodo"])
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    res = CliRunner().invoke(main, ["evaluate", str(run), "--out", str(tmp_path / "r.parquet")])
    assert res.exit_code == 2 and "model.safetensors cannot be read" in res.output, res.output
    assert "delete the run's `done` file and rerun" in res.output and res.output.count("\n") == 1, res.output
    (run / "done").unlink()  # the fix it names
    train(_cfg(synthetic_store, run), log=quiet)
    again = score_run(run, ["lodo"])
    pd.testing.assert_frame_equal(good[["split", "domain", "metric", "value"]], again[["split", "domain", "metric", "value"]])


def test_distill_rows_are_left_out_for_runs_whose_losses_never_train_the_embedding(synthetic_store, tmp_path):
    """A classifier recipe (ce, naive_kd, linear_probe) trains its linear classifier alone: its distill
    rows measured the projection head as it was initialised, and read as a method's distillation."""
    from embedcache.students.recipes import RECIPES, definition, trains_embedding
    from embedcache.students.scoring import score_run

    untrained = {n for n in RECIPES.names() if not trains_embedding(definition(RECIPES.get(n)))}
    assert untrained == {"ce", "naive_kd", "linear_probe"}
    for recipe in ("ce", "feat_kd"):
        train(_cfg(synthetic_store, tmp_path / recipe, recipe=recipe, split=SplitConfig(holdout_domains=("outline",))),
              log=quiet)
    with pytest.warns(UserWarning, match=r"^run ce: no loss of recipe ce trains its embedding .* the distill rows, which "
                                         r"compare that embedding with the teacher's, are left out"):
        ce = score_run(tmp_path / "ce", ["distill"])
    assert set(ce.split) == {"text"}  # the store's own text separability stays
    kd = score_run(tmp_path / "feat_kd", ["distill"])
    assert {"m_rel", "teacher_student_cosine"} <= set(kd[kd.split == "distill"].metric)
    # the run's own loss weights count: ce with a cosine term trains the embedding too
    train(_cfg(synthetic_store, tmp_path / "ce_cos", recipe="ce", loss_weights={"cos": 1.0},
               split=SplitConfig(holdout_domains=("outline",))), log=quiet)
    assert "distill" in set(score_run(tmp_path / "ce_cos", ["distill"]).split)


def test_a_classifier_runs_tip_adapter_rows_are_left_out(synthetic_store, tmp_path):
    """few_shot's Tip-Adapter compares the run's embedding with the teacher's: a ce run's projection as
    initialised scored 24.7% there, below chance, with no word (a trial). Its prototype rows stay (shots
    of its own embedding)."""
    from embedcache.students.scoring import score_run

    train(_cfg(synthetic_store, tmp_path / "ce", recipe="ce", split=SplitConfig(train_classes=("circle",))), log=quiet)
    opts = {"few_shot": {"shots": 1, "episodes": 1}}
    with pytest.warns(UserWarning, match=r"^run ce: no loss of recipe ce trains its embedding .* so few_shot's "
                                         r"tip_adapter, li_retrieval and text_only rows, which compare that embedding with the "
                                         r"teacher's, are left out"):
        rows = score_run(tmp_path / "ce", ["few_shot"], options=opts)
    assert set(rows.split) == {"prototype@1shot"}
    train(_cfg(synthetic_store, tmp_path / "kd", recipe="feat_kd", split=SplitConfig(train_classes=("circle",))), log=quiet)
    assert set(score_run(tmp_path / "kd", ["few_shot"], options=opts).split) == {
        "prototype@1shot", "tip_adapter@1shot", "li_retrieval@1shot", "text_only@1shot"}


def test_evaluate_says_a_warning_many_runs_share_once_and_names_the_others(synthetic_store, tmp_path):
    """`evaluate --protocol distill` over a sweep of linear-probe runs printed the same paragraph once
    per run (a trial): it is said for the first run, and the others are named in one line."""
    runs = [tmp_path / "runs" / name for name in ("ce_a", "ce_b", "ce_c")]
    for run in runs:
        train(_cfg(synthetic_store, run, recipe="ce", split=SplitConfig(holdout_domains=("outline",))), log=quiet)
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "runs"), "--protocol", "distill",
                                    "--out", str(tmp_path / "r.parquet")])
    assert res.exit_code == 0, res.output
    assert res.output.count("the projection to the embedding stays as initialised") == 1, res.output
    said = [line for line in res.output.splitlines() if line.startswith("warning:")]
    first = said[0].split(":")[1].strip()  # "run ce_a"
    others = sorted({"run ce_a", "run ce_b", "run ce_c"} - {first})
    assert said[-1] == (f"warning: runs {others[0][4:]}, {others[1][4:]}: the same as {first} above (no loss of "
                        "recipe ce trains its embedding)"), res.output
    assert len(pd.read_parquet(tmp_path / "r.parquet").run.unique()) == 3

def test_distill_rows_stay_for_a_ce_run_whose_embedding_is_its_trained_backbones_output(tiny_clip_dir, synthetic_store,
                                                                                        tmp_path):
    """An open_clip image tower's embedding is its own output (an identity head): ce training moves it,
    and how far it drifts from the teacher is what the distill rows measure."""
    from embedcache.students.scoring import score_run

    tower = StudentConfig(name="openclip_visual", model=f"local-dir:{tiny_clip_dir}")
    train(_cfg(synthetic_store, tmp_path / "tower", recipe="ce", student=tower, steps=2, eval_every=2,
               split=SplitConfig(holdout_domains=("outline",))), log=quiet)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trains its embedding")
        rows = score_run(tmp_path / "tower", ["distill"])
    assert "teacher_student_cosine" in set(rows[rows.split == "distill"].metric)


def test_canvas_digests_agree_between_a_store_with_pixels_and_one_without(make_cfg, tiny_teacher, tmp_path):
    """--transfer matches images by canvas checksum: a store keeping pixels (checksummed now) and one
    keeping only each canvas's CRC-32C (canvas.store=false) must give one image one digest."""
    from embedcache import open_store
    from embedcache.extract import extract
    from embedcache.students.leakage import canvas_digests

    from conftest import png_folder

    files = ("dataset.name=folder", f"dataset.path={png_folder(tmp_path / 'data')}")  # canvases to rebuild from files
    kept, dropped = make_cfg("kept.zarr", *files), make_cfg("dropped.zarr", *files, "canvas.store=false")
    for cfg in (kept, dropped):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    with open_store(kept.out) as a, open_store(dropped.out) as b:
        da, db = canvas_digests(a), canvas_digests(b)
        assert len(set(da.tolist())) == len(da)  # every image its own digest
        np.testing.assert_array_equal(da, db)


def test_stores_and_runs_record_the_code_that_made_them(synthetic_store, tmp_path):
    """Stores recorded embedcache 0.1.0 (unchanged since the first commit) and runs only torch: nothing tied
    a number to the code, timm (which builds the students) or faiss (which scores them) (a trial)."""
    import subprocess
    from pathlib import Path

    from embedcache import open_store
    from embedcache.students.config import StudentConfig, TrainConfig
    from embedcache.students.train import train
    from embedcache.versions import source_commit

    import faiss
    import timm
    import torch

    import embedcache

    head = subprocess.run(["git", "-C", str(Path(embedcache.__file__).parent), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True)
    checkout = head.returncode == 0 and (Path(embedcache.__file__).parent.parent / ".git").exists()
    if checkout:  # a checkout of its own (CI clones one)
        assert source_commit().split("+")[0] == head.stdout.strip()
    res = train(TrainConfig(store=str(synthetic_store), recipe="feat_kd", student=StudentConfig(name="test_resnet", input_size=32),
                            steps=2, batch_size=8, eval_every=2, ckpt_every=2, out=str(tmp_path / "r"), progress=False,
                            device="cpu"), log=quiet)
    recorded = json.loads((Path(res.out) / "summary.json").read_text())["versions"]
    assert (recorded["timm"], recorded["faiss-cpu"], recorded["torch"]) == (timm.__version__, faiss.__version__,
                                                                         torch.__version__.split("+")[0])
    with open_store(str(synthetic_store)) as s:  # made by this session's code: its commit too
        made = s.manifest["versions"]
        assert "sentence-transformers" in made and (made.get("embedcache_commit") == source_commit() if checkout else True)


def test_a_run_met_from_a_folder_whose_relative_store_is_another_scores_on_its_own(synthetic_store, tmp_path, make_cfg,
                                                                                    tiny_teacher, monkeypatch):
    """The config's relative store path, met from another folder where it names another store, was taken
    over the absolute path recorded: the run was refused there, pointed at --transfer (a review)."""
    from embedcache.extract import extract
    from embedcache.students.rundir import RunDir

    (tmp_path / "a").mkdir()
    shutil.copytree(synthetic_store, tmp_path / "a" / "s.zarr")
    monkeypatch.chdir(tmp_path / "a")
    train(_cfg("s.zarr", tmp_path / "run", steps=2, eval_every=2, ckpt_every=2), log=quiet)
    other = extract(make_cfg("b/s.zarr", "dataset.num_classes=4"), teacher=tiny_teacher, log=quiet).path
    monkeypatch.chdir(tmp_path / "b")
    run = RunDir(tmp_path / "run")
    assert embedcache.open_store(other).key != run.store_key
    assert run.store_path() == str(tmp_path / "a" / "s.zarr")
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "run"), "--protocol", "lodo"])
    assert res.exit_code == 0, res.output
