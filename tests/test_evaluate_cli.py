"""Teacher baselines, run evaluation and reports through the CLI, on the synthetic store."""
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import embedcache
from embedcache.cli import main
from embedcache.evaluate.store_eval import teacher_baselines
from embedcache.students.data import SplitConfig
from embedcache.students.models import StudentConfig
from embedcache.students.train import TrainConfig, train

from conftest import quiet


def test_teacher_baselines_equal_a_direct_computation(synthetic_store):
    assert set(teacher_baselines(str(synthetic_store), protocols=("distill",)).metric) == {"text_pairwise_cosine"}
    res = teacher_baselines(str(synthetic_store), protocols=("lodo",))
    s = embedcache.open_store(str(synthetic_store))
    assert set(res["source"]) == set(s.text_sources) and set(res["split"]) == {"zero_shot"}
    emb, text, meta = s.image_emb(0).astype(np.float32), s.class_emb("templates"), s.meta
    pred = np.argmax(emb @ text.T, axis=1)
    for dom in s.domains:
        m = (meta.domain == dom).to_numpy()
        got = res[(res.source == "templates") & (res.domain == dom) & (res.metric == "top1")].value.iloc[0]
        assert got == pytest.approx(np.mean(pred[m] == meta.label.to_numpy()[m]))


@pytest.fixture(scope="module")
def runs(synthetic_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for recipe in ("feat_kd", "ce"):
        for seed in (0, 1):
            train(TrainConfig(store=str(synthetic_store), recipe=recipe, seed=seed, steps=6, batch_size=8, eval_every=3,
                              student=StudentConfig(name="test_resnet", input_size=32), device="cpu", progress=False,
                              split=SplitConfig(holdout_domains=("outline",), train_classes=("circle", "square")),
                              out=str(root / f"{recipe}-{seed}")),
                  log=quiet)
    return root


def test_two_runs_of_one_name_are_refused_and_a_run_given_twice_is_scored_once(runs, tmp_path):
    """Rows are named by the run's folder: plain/r0 and contrastive/r0 scored into one --out kept one run's
    rows and dropped the other's without a word (a review)."""
    import shutil

    for kind in ("plain", "contrastive"):
        shutil.copytree(runs / ("ce-0" if kind == "plain" else "ce-1"), tmp_path / kind / "r0")
    out = tmp_path / "r.parquet"
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "plain" / "r0"), str(tmp_path / "contrastive" / "r0"),
                                    "--out", str(out)])
    assert res.exit_code == 2 and "share the name 'r0', which names a run's rows in the results: rename one folder" \
        in res.output and not out.exists(), res.output
    once = CliRunner().invoke(main, ["evaluate", str(runs / "ce-0"), str(runs), "--out", str(out)])
    alone = CliRunner().invoke(main, ["evaluate", str(runs), "--out", str(tmp_path / "alone.parquet")])
    assert once.exit_code == 0 and once.output.splitlines()[-1].split(";")[0] == alone.output.splitlines()[-1].split(";")[0]


def test_evaluate_with_nothing_to_score_names_where_it_looked(runs, tmp_path):
    """`evaluate empty/` said "nothing to evaluate: no finished run found", naming no folder, and the same of a
    folder of unfinished runs (a new user's trial)."""
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["evaluate", str(empty), "--out", str(tmp_path / "r.parquet")])
    assert res.exit_code == 2 and f"nothing to evaluate: no run found in {empty} (each path given is a run's folder" \
        in res.output
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs / "ce-0", unfinished / "ce-0")
    (unfinished / "ce-0" / "done").unlink()
    res = CliRunner().invoke(main, ["evaluate", str(unfinished), "--out", str(tmp_path / "r.parquet")])
    assert res.exit_code == 2 and (f"nothing to evaluate: 1 run(s) found in {unfinished}, none finished (unfinished "
                                   "or failed); rerun" in res.output), res.output
    assert not (tmp_path / "r.parquet").exists()


def test_evaluate_runs_and_report(runs, tmp_path):
    out = tmp_path / "results.parquet"
    res = CliRunner().invoke(main, ["evaluate", str(runs), "--protocol", "lodo", "--protocol", "open_vocab",
                                    "--protocol", "distill", "--protocol", "per_class", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    assert set(df.recipe) == {"feat_kd", "ce"} and set(df.run_seed) == {0, 1}
    lodo = df[df.protocol == "lodo"]
    assert set(lodo[lodo.split == "out_of_domain"].domain) == {"outline", "avg"}
    assert set(lodo[lodo.split == "in_domain"].domain) == {"solid", "avg"}
    ov = df[df.protocol == "open_vocab"]
    assert {"unseen_zero_shot", "gzsl_harmonic"} <= set(ov.split)
    unseen = ov[(ov.split == "gzsl_unseen") & (ov.metric == "top1")]
    assert set(unseen.domain) == {"outline", "training_domains"}  # each side of a generalised row from like domains
    assert unseen.groupby(["recipe", "run_seed"]).n.sum().eq(16).all()  # the triangles
    # a linear classifier never predicts the class it did not see, and has no unseen-only answer
    ce_unseen = ov[(ov.recipe == "ce") & (ov.split == "gzsl_unseen") & (ov.metric == "top1")]
    assert (ce_unseen.value == 0.0).all() and "unseen_zero_shot" not in set(ov[ov.recipe == "ce"].split)
    assert set(df.holdout) == {"outline; unseen: triangle"}  # what every row's model never trained on
    assert "±" in res.output and "feat_kd" in res.output
    rep = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "rep")])
    assert rep.exit_code == 0, rep.output
    text = (tmp_path / "rep" / "report.md").read_text()
    # named by the k used: 3 classes rank 3 labels, not the 5 asked for
    assert {"m_rel", "m_neigh@10", "m_vlalign@3", "teacher_student_cosine"} <= set(df.metric)
    assert set(df[df.split == "per_class"].class_name) == {"circle", "square", "triangle"}
    for word in ("out_of_domain", "in_domain", "feat_kd", "ce", "outline", "solid", "avg", "per class", "m_rel", "triangle"):
        assert word in text
    assert (tmp_path / "rep" / "id_vs_ood.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "out_of_domain_domains.png").exists()
    # the class-held-out splits are reported as Li et al. report them: mean per-class accuracy
    assert "## unseen_zero_shot (mean per-class accuracy, %" in text and "## out_of_domain (top-1, %" in text
    assert "; avg: the unweighted mean over domains)" in text  # what the avg column holds, said
    import re
    for head, table in re.findall(r"\n## (.*)\n\n(\|.*)\n", text):  # and only where a table has one (a trial)
        assert ("avg: the unweighted" in head) == ("| avg |" in table or " avg |" in table), (head, table)
    # which classes the unseen rows are over, and what in_domain means for such runs (a trial)
    said = "unseen classes (never trained on): triangle; in_domain and out_of_domain rows of runs with unseen classes"
    assert said in text and said in res.output
    assert "mean per-class accuracy (%), the open-vocabulary and few-shot papers' metric" in res.output
    assert set(df[df.split == "per_class"].domain) == {"out_of_domain", "in_domain", "unseen_zero_shot"}


def test_a_run_is_refused_on_another_store(runs, make_cfg, tiny_teacher, tmp_path):
    from embedcache.extract import extract

    other = make_cfg("other.zarr")
    extract(other, teacher=tiny_teacher, log=quiet)
    res = CliRunner().invoke(main, ["evaluate", str(runs / "feat_kd-0"), "--store", other.out, "--out", str(tmp_path / "r.parquet")])
    assert res.exit_code == 2 and "made from other inputs" in res.output


def test_teacher_baseline_cli(synthetic_store, tmp_path):
    res = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), "--source", "name",
                                    "--out", str(tmp_path / "t.parquet")])
    assert res.exit_code == 0, res.output
    assert "teacher" in res.output and "zero_shot" in res.output
    assert "\ntop-1 accuracy (%), mean ± std over replicates; avg: the unweighted mean over domains:\n| " in res.output  # the table says what it holds
    notes, fake = tmp_path / "notes.txt", tmp_path / "fake.parquet"
    notes.write_text("keep me")
    fake.write_text("keep me too")
    for args in (["report", str(notes)], ["evaluate", "--store", str(synthetic_store), "--out", str(fake)]):
        res = CliRunner().invoke(main, args)  # a file that is not parquet: one line, and it is left as it was
        assert res.exit_code == 2 and "is not a results file" in res.output and res.output.count("\n") == 1, res.output
    # parquet, but not results: a KeyError traceback; without its replicate column, seeds pooled as one replicate
    other, pooled = tmp_path / "other.parquet", tmp_path / "pooled.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(other)
    pd.read_parquet(tmp_path / "t.parquet").drop(columns=["replicate"]).to_parquet(pooled)
    for args, lacks in ((["report", str(other)], "run, replicate, protocol"), (["report", str(pooled)], "replicate"),
                        (["evaluate", "--store", str(synthetic_store), "--out", str(pooled)], "replicate")):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and f"is not a results file (it has no {lacks}" in res.output, res.output
        assert res.output.count("\n") == 1, res.output
    for name in ("notes.txt", "results.csv"):  # parquet written under another suffix: refused before any scoring
        res = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), "--out", str(tmp_path / name)])
        assert res.exit_code == 2 and "results are one parquet table; give a .parquet file" in res.output, res.output
    assert notes.read_text() == "keep me" and fake.read_text() == "keep me too" and not (tmp_path / "results.csv").exists()


def test_teacher_baselines_of_every_text_source_are_all_kept(synthetic_store, tmp_path):
    """The teacher's rows differ only in their text source: each source's rows must survive the write."""
    out = tmp_path / "t.parquet"
    res = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), "--out", str(out)])
    assert res.exit_code == 0, res.output
    got = pd.read_parquet(out)
    assert sorted(got.source.unique()) == ["attributes", "name", "templates"]
    assert got.groupby("source").size().nunique() == 1 and f"{len(got)} rows in" in res.output


def test_teacher_baselines_hold_out_the_classes_a_sweep_holds_out(synthetic_store, tmp_path):
    """A sweep with split_seed/unseen_fraction trains on seeded_class_split's classes: the teacher's
    open-vocabulary rows must score the same unseen classes, and say which."""
    from embedcache.evaluate.protocols import seeded_class_split

    s = embedcache.open_store(str(synthetic_store))
    emb, text, labels = s.image_emb(0).astype(np.float32), s.class_emb("name"), s.meta.label.to_numpy()
    out = tmp_path / "t.parquet"
    for seed in (0, 1, 2):
        res = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), "--source", "name", "--protocol",
                                        "open_vocab", "--protocol", "lodo", "--split-seed", str(seed),
                                        "--unseen-fraction", "0.34", "--out", str(out)])
        assert res.exit_code == 0, res.output
        unseen = np.setdiff1d(np.arange(3), seeded_class_split(3, 0.34, seed))
        rows = np.isin(labels, unseen)
        ref = np.mean(unseen[np.argmax(emb[rows] @ text[unseen].T, axis=1)] == labels[rows])
        got = pd.read_parquet(out).query("split == 'unseen_zero_shot' and metric == 'top1'")
        tag = "unseen: " + ",".join(s.classes[i] for i in unseen)
        assert got[got.holdout == tag].value.tolist() == [pytest.approx(ref)]
    table = pd.read_parquet(out)  # each split's rows kept beside the others; lodo rows hold nothing out
    assert table.query("split == 'unseen_zero_shot' and metric == 'top1'").holdout.nunique() == len(
        {tuple(np.setdiff1d(np.arange(3), seeded_class_split(3, 0.34, k))) for k in (0, 1, 2)})
    assert set(table[table.protocol == "lodo"].holdout) == {"-"}
    for given in (["--split-seed", "1"], ["--unseen-fraction", "0.5"]):  # at its default too, as --shots is
        res = CliRunner().invoke(main, ["evaluate", str(tmp_path), *given, "--out", str(out)])
        assert res.exit_code == 2 and "runs are scored on the classes they held out themselves" in res.output, given


def test_teacher_baselines_hold_out_the_classes_a_run_names(synthetic_store, tmp_path):
    """A run trained with split.train_classes: the teacher is scored on the same unseen classes with
    --seen-classes (before, only a seeded split could be asked for, and the classes copied by hand)."""
    s = embedcache.open_store(str(synthetic_store))
    emb, text, labels = s.image_emb(0).astype(np.float32), s.class_emb("name"), s.meta.label.to_numpy()
    out = tmp_path / "t.parquet"
    res = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), "--source", "name", "--protocol",
                                    "open_vocab", "--seen-classes", f"{s.classes[2]}, {s.classes[0]}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    unseen = np.array([1])
    rows = np.isin(labels, unseen)
    ref = np.mean(unseen[np.argmax(emb[rows] @ text[unseen].T, axis=1)] == labels[rows])
    got = pd.read_parquet(out).query("split == 'unseen_zero_shot' and metric == 'top1'")
    assert got.holdout.tolist() == [f"unseen: {s.classes[1]}"] and got.value.tolist() == [pytest.approx(ref)]
    for args, said in [(["--seen-classes", "dragon"], f"class 'dragon' is not in the store; its classes: {s.classes[0]}"),
                       (["--seen-classes", ",".join(s.classes)], "the seen classes must leave some unseen: give 1 to 2"),
                       (["--seen-classes", s.classes[0], "--split-seed", "3"], "give one or the other"),
                       # each of these was ignored with exit 0 (a trial): the seeded split scored instead, a class
                       # named twice, a split for protocols that hold no class out, --transfer with no run
                       (["--seen-classes", ""], "--seen-classes names no class"),
                       (["--seen-classes", f"{s.classes[0]},{s.classes[0]}"], f"names {s.classes[0]!r} twice"),
                       (["--seen-classes", f"{s.classes[0]},,{s.classes[1]}"], "--seen-classes has an empty name"),
                       (["--seen-classes", s.classes[0], "--protocol", "lodo"], "add --protocol open_vocab"),
                       (["--transfer"], "--transfer scores runs")]:
        protocols = [] if "--protocol" in args else ["--protocol", "open_vocab"]
        bad = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), *protocols,
                                        "--out", str(out), *args])
        assert bad.exit_code == 2 and said in bad.output, (args, bad.output)
    for args, said in ((["evaluate", str(tmp_path), "--finetune-steps", "-5"], "--finetune-steps"),
                       (["sweep", "demo", "--workers", "0"], "--workers"),  # both accepted before (a trial)
                       (["evaluate", "--store", str(synthetic_store), "--protocol", "open_vocab", "--split-seed", "-1"],
                        "--split-seed"),  # numpy's traceback (a trial)
                       (["evaluate", "--store", str(synthetic_store), "--protocol", "open_vocab", "--unseen-fraction",
                         "nan"], "'nan' is not a number; give one between 0.0 and 0.99")):
        bad = CliRunner().invoke(main, args)
        assert bad.exit_code == 2 and said in bad.output and ("not in the range" in bad.output or "nan" in said), bad.output
    ran = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--transfer", "--out", str(out)])
    assert ran.exit_code == 2 and "--transfer scores runs on another store: give it as --store PATH" in ran.output


def test_the_teacher_on_two_stores_keeps_both_stores_rows(synthetic_store, make_cfg, tiny_teacher, tmp_path):
    """Same teacher, same domain names: the rows differ only in their store, and both must survive."""
    from embedcache.extract import extract

    other = make_cfg("other.zarr", "dataset.per_class=3", "dataset.seed=7")
    extract(other, teacher=tiny_teacher, log=quiet)
    out = tmp_path / "t.parquet"
    for store in (str(synthetic_store), other.out):
        assert CliRunner().invoke(main, ["evaluate", "--store", store, "--source", "name", "--out", str(out)]).exit_code == 0
    rows = pd.read_parquet(out)
    avg = rows.query("domain == 'avg' and metric == 'top1'")
    assert len(avg) == 2 and avg.store_key.nunique() == 2 and set(avg.n) == {3 * 2 * 8, 3 * 2 * 3}
    # the report keeps them apart too: one row per store, never their mean ± std
    from embedcache.evaluate.store_eval import summary_table

    table = summary_table(rows)
    assert table.index.names[0] == "store_key" and len(table) == 2
    for key, value in zip(avg.store_key, avg.value):
        assert table.loc[key, "avg"].item() == f"{100 * value:.1f}"
    res = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "rep")])
    cells = [ln for ln in (tmp_path / "rep" / "report.md").read_text().splitlines() if not ln.startswith("#")]
    assert res.exit_code == 0 and not any("±" in ln for ln in cells)


def test_class_split_protocols_refuse_a_run_that_saw_every_class(synthetic_store, tmp_path):
    run = train(TrainConfig(store=str(synthetic_store), recipe="feat_kd", steps=2, batch_size=4, eval_every=2,
                            student=StudentConfig(name="test_resnet", input_size=32), device="cpu", progress=False,
                            out=str(tmp_path / "all")), log=quiet)
    for protocol in ("open_vocab", "few_shot"):  # few_shot ended in a traceback (nothing to concatenate)
        res = CliRunner().invoke(main, ["evaluate", run.out, "--protocol", protocol, "--out", str(tmp_path / "r.parquet")])
        assert res.exit_code == 2 and "trained on every class" in res.output and res.output.count("\n") == 1, res.output
        assert res.output.startswith(f"error: run {run.out}: {protocol} needs at least one unseen class")
    # in a folder of runs, the one that cannot be scored is named and skipped; the others are scored
    held = train(TrainConfig(store=str(synthetic_store), recipe="feat_kd", steps=2, batch_size=4, eval_every=2,
                             student=StudentConfig(name="test_resnet", input_size=32), device="cpu", progress=False,
                             split=SplitConfig(train_classes=("circle", "square")), out=str(tmp_path / "held")), log=quiet)
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--protocol", "open_vocab", "--out", str(tmp_path / "r.parquet")])
    assert res.exit_code == 0 and f"skipping {run.out}: open_vocab needs at least one unseen class" in res.output
    assert set(pd.read_parquet(tmp_path / "r.parquet").run) == {Path(held.out).name}


@pytest.mark.skipif(not (__import__("conftest").PACS.is_dir()), reason="PACS is not at ../shared/datasets/pacs")
def test_conse_teacher_baselines_on_pacs(tmp_path):
    """A few PACS images per class and domain, the offline teacher, zero-shot from the store alone."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the offline extra is not installed: pip install '.[offline]'")
    from conftest import PACS
    from embedcache.config import ExtractConfig, build_config
    from embedcache.extract import extract

    cfg = build_config(ExtractConfig, {"dataset": {"name": "domainbed", "path": str(PACS), "max_per_class": 4},
                                       "teacher": {"name": "conse", "device": "cpu"}, "views": {"count": 1},
                                       "canvas": {"size": 224}, "text": {"sources": ["name"]},
                                       "out": str(tmp_path / "pacs.zarr"), "progress": False, "num_workers": 0})
    extract(cfg, log=quiet)
    res = teacher_baselines(cfg.out, protocols=("lodo",))
    top1 = res[(res.metric == "top1")].set_index("domain")["value"]
    assert set(top1.index) == {"art_painting", "cartoon", "photo", "sketch", "avg"}
    assert top1["photo"] >= 0.45 and top1["photo"] > top1["sketch"]  # chance is 1/7


def _finetune_setup(store, out, student: str):
    """A feat_kd run of ``student`` trained on one class of the synthetic store, loaded for few-shot fine-tuning:
    (store, labels, usable rows, unseen class ids, model, its config, its split, the store's data)."""
    from embedcache.students.data import StoreData
    from embedcache.students.rundir import RunDir

    run = train(TrainConfig(store=str(store), recipe="feat_kd", steps=4, batch_size=8, eval_every=2,
                            student=StudentConfig(name=student, input_size=32), device="cpu", progress=False,
                            split=SplitConfig(train_classes=("circle",)), out=str(out)), log=quiet).out
    s = embedcache.open_store(str(store))
    model, cfg = RunDir(run).load_student()
    data = StoreData(str(store), "name", SplitConfig(val_fraction=0.0))
    return (s, s.meta.label.to_numpy(), (s.meta.status == "ok").to_numpy(), np.array([1, 2]), model, cfg,
            RunDir(run).split, data)


def test_few_shot_finetune_uses_the_protocols_episodes(synthetic_store, tmp_path, monkeypatch):
    from embedcache.evaluate.metrics import nearest_label
    from embedcache.evaluate.protocols import episode
    from embedcache.students.data import StoreData
    from embedcache.students.finetune import few_shot_finetune
    from embedcache.students.scoring import embed_rows

    s, labels, ok, unseen, model, cfg, split, data = _finetune_setup(synthetic_store, tmp_path / "vit", "test_vit")
    # lr = 0 and no BatchNorm: fine-tuning changes nothing, so it must equal scoring the run itself by
    # nearest unseen-class text on the same episode's queries
    ft = few_shot_finetune(model, cfg, data, split, shots=3, episodes=2, steps=3, lr=0.0)
    emb, _ = embed_rows(model, data, split["seen_classes"], False, torch.device("cpu"))
    text = s.class_emb("name")
    for ep in (0, 1):
        _, query = episode(labels, ok, unseen, 3, 0, ep, s.classes)
        ref = np.mean(unseen[nearest_label(emb[query], text[unseen])] == labels[query])
        got = ft[(ft.episode == ep) & (ft.metric == "top1")].value.iloc[0]
        assert got == pytest.approx(ref) and len(query) == 2 * (16 - 3)
    moved = few_shot_finetune(model, cfg, data, split, shots=3, episodes=1, steps=3, lr=1e-2)
    assert set(moved.split) == {"finetune@3@3shot"} and (moved.value.between(0, 1)).all()  # 3 shots, not 5
    mixed = few_shot_finetune(model, cfg, data, split, shots=3, episodes=1, steps=3, lr=1e-2, mode="mixed")
    assert set(mixed.split) == {"finetune_mixed@3@3shot"} and (mixed.value.between(0, 1)).all()
    # mixed goes on training as the run trained: a run of plain_targets and skip_plain_view reads the plain
    # image's targets for augmented views (its fine-tuning drew every view and paired each with its own; a review)
    from dataclasses import replace as swap

    import embedcache.students.finetune as ft_mod

    asked, drawn = [], []

    class Recorded(np.ndarray):
        def __getitem__(self, key):
            asked.append(key)
            return np.asarray(self).__getitem__(key)

    real_views = ft_mod.student_views

    def views_seen(data, idx, views, *a):
        drawn.append(np.asarray(views).copy())
        return real_views(data, idx, views, *a)

    recorded = data.emb.view(Recorded)
    monkeypatch.setattr(StoreData, "emb", property(lambda self: recorded))
    monkeypatch.setattr(ft_mod, "student_views", views_seen)
    few_shot_finetune(model, swap(cfg, plain_targets=True, skip_plain_view=True), data, split, shots=3, episodes=1,
                      steps=3, lr=1e-2, mode="mixed")
    assert asked and all(np.all(np.asarray(k[1]) == 0) for k in asked if isinstance(k, tuple))
    assert 0 not in set(np.concatenate(drawn[:3]))  # the training steps' views: augmented only


def test_few_shot_finetuning_keeps_a_freeze_bn_run_s_batchnorm_statistics(synthetic_store, tmp_path, monkeypatch):
    """A run trained with freeze_bn is fine-tuned with its BatchNorm statistics fixed too: at lr 0 the fine-tuned
    student is then the run's own, and embeds the queries as it does; in train mode its statistics moved."""
    import embedcache.students.finetune as ft_mod
    from dataclasses import replace as swap

    from embedcache.evaluate.metrics import nearest_label
    from embedcache.evaluate.protocols import episode
    from embedcache.students.finetune import few_shot_finetune
    from embedcache.students.scoring import embed_rows

    s, labels, ok, unseen, model, cfg, split, data = _finetune_setup(synthetic_store, tmp_path / "bn", "test_resnet")
    emb, _ = embed_rows(model, data, split["seen_classes"], False, torch.device("cpu"))
    _, query = episode(labels, ok, unseen, 3, 0, 0, s.classes)
    seen = []
    monkeypatch.setattr(ft_mod, "nearest_label", lambda q, t: seen.append(q) or nearest_label(q, t))
    for frozen in (True, False):
        few_shot_finetune(model, swap(cfg, freeze_bn=frozen), data, split, shots=3, episodes=1, steps=3, lr=0.0)
    np.testing.assert_allclose(seen[0], emb[query], atol=1e-5)  # the query embeddings of the run itself
    assert not np.allclose(seen[1], emb[query], atol=1e-3)


def test_few_shot_cli_includes_finetuning(runs, tmp_path):
    out = tmp_path / "fs.parquet"
    res = CliRunner().invoke(main, ["evaluate", str(runs / "feat_kd-0"), "--protocol", "few_shot", "--finetune-steps", "2",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    assert {"prototype", "tip_adapter", "li_retrieval", "text_only", "finetune@2"} == set(df.split)
    assert set(df[df.split == "finetune@2"].recipe) == {"feat_kd"}
    again = CliRunner().invoke(main, ["evaluate", str(runs / "feat_kd-0"), "--protocol", "few_shot", "--finetune-steps",
                                      "1", "--out", str(out)])
    assert again.exit_code == 0 and {"finetune@1", "finetune@2"} <= set(pd.read_parquet(out).split)  # both kept
    # one protocol, one metric: fine-tuning is reported by mean per-class accuracy as its prototype and
    # Tip-Adapter neighbours are (it was top-1 beside them)
    assert "mean per-class accuracy" in res.output and "finetune@2" in res.output.split("mean per-class accuracy")[-1]
    rep = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "report.md").read_text()
    for split in ("prototype", "tip_adapter", "li_retrieval", "text_only", "finetune@1", "finetune@2"):
        assert f"## {split} (mean per-class accuracy, %" in text, rep.output


def test_summary_table_averages_domains_within_each_seed_first():
    from embedcache.evaluate.store_eval import summary_table

    rows = [("ood", "d1", 0, 0.2), ("ood", "d2", 0, 0.4), ("ood", "d1", 1, 0.4), ("ood", "d2", 1, 0.6)]
    df = pd.DataFrame([{"recipe": "r", "student": "s", "source": "name", "split": sp, "domain": d, "seed": sd,
                        "replicate": sd, "metric": "top1", "value": v} for sp, d, sd, v in rows])
    df = pd.concat([df, df.assign(domain="avg")], ignore_index=True)  # per-run avg rows, as lodo writes them
    t = summary_table(df)
    assert t.loc[("r", "s", "name", "-", "ood"), "d1"] == "30.0 ± 14.1"
    assert t.loc[("r", "s", "name", "-", "ood"), "avg"] == "40.0 ± 14.1"  # seeds: 0.3 and 0.5
    assert list(t.columns) == ["d1", "d2", "avg", "replicates"] and t.loc[("r", "s", "name", "-", "ood"), "replicates"] == "2"


def test_a_gzsl_tables_avg_is_over_held_out_domains_only():
    """A run that held domains out has generalised zero-shot rows per held-out domain and for its
    training domains together: the table shows that column, and its avg (out-of-domain, as lodo's)
    never averages it in, nor counts it among the domains a replicate must have."""
    from embedcache.evaluate.store_eval import summary_table

    rows = [("art", "art", 0, 0.2), ("art", "training_domains", 0, 0.9),
            ("sketch", "sketch", 0, 0.4), ("sketch", "training_domains", 0, 0.7)]
    df = pd.DataFrame([{"recipe": "r", "student": "s", "source": "name", "split": "gzsl_harmonic", "domain": d,
                        "holdout": held, "replicate": sd, "metric": "top1", "value": v} for held, d, sd, v in rows])
    t = summary_table(df)
    cell = t.loc[("r", "s", "name", "-", "gzsl_harmonic")]
    assert cell["avg"] == "30.0" and cell["training_domains"] == "80.0"
    assert list(t.columns) == ["art", "sketch", "training_domains", "avg", "replicates"] and cell["replicates"] == "1"


def test_report_tables_keep_variants_apart(tmp_path):
    """A sweep over optim.lr: the per-class and distillation tables show each variant, never their mean."""
    from embedcache.evaluate.report import write_report

    rows = [{"recipe": "r", "student": "s", "source": "name", "variant": f"optim.lr={lr}", "split": split,
             "class_name": "cat" if split == "per_class" else "", "metric": "top1" if split == "per_class" else "m_rel",
             "domain": "all", "value": v} for lr, v in (("0.1", 0.2), ("0.01", 0.8)) for split in ("per_class", "distill")]
    write_report(pd.DataFrame(rows), str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert "20.0" in text and "80.0" in text and "50.0" not in text and "0.5 " not in text


def test_report_plots_keep_variants_apart(tmp_path, monkeypatch):
    """The bar plots label methods as the tables do: two learning rates are two bars, not their mean."""
    import pandas.plotting._core as core

    from embedcache.evaluate.report import write_report

    plotted, bar = [], core.PlotAccessor.bar
    monkeypatch.setattr(core.PlotAccessor, "bar", lambda self, *a, **k: plotted.append(self._parent.copy()) or bar(self, *a, **k))
    rows = [{"recipe": "r", "student": "s", "source": "name", "variant": f"optim.lr={lr}", "split": "out_of_domain",
             "metric": "top1", "domain": "d1", "value": v} for lr, v in (("0.1", 0.2), ("0.01", 0.8))]
    write_report(pd.DataFrame(rows), str(tmp_path))
    assert sorted(plotted[0].loc["d1"].round(3)) == [20.0, 80.0]  # percent
    assert list(plotted[0].columns) == ["r / s / optim.lr=0.01", "r / s / optim.lr=0.1"]


def test_the_in_vs_out_of_domain_plot_keeps_its_methods_beside_teacher_rows(tmp_path):
    """Teacher baselines (zero_shot rows) in the same results file emptied the plot: the pivot over
    every split left each method a missing cell, and dropna took them all."""
    from embedcache.evaluate.report import id_vs_ood, write_report
    from embedcache.evaluate.store_eval import Tables, method_frame

    rows = [{"recipe": r, "student": st, "source": "name", "split": sp, "domain": "d1", "metric": "top1", "value": v}
            for r, st, sp, v in [("li", "resnet18", "in_domain", 0.9), ("li", "resnet18", "out_of_domain", 0.6),
                                 ("kd", "resnet18", "in_domain", 0.8), ("kd", "resnet18", "out_of_domain", 0.7),
                                 ("kd", "vit", "in_domain", 0.5),  # one side only: no point
                                 ("teacher", "-", "zero_shot", 0.95)]]
    results = method_frame(pd.DataFrame(rows))
    points = id_vs_ood(Tables(results))
    assert points.round(3).to_dict("index") == {"kd / resnet18": {"in_domain": 0.8, "out_of_domain": 0.7},
                                                "li / resnet18": {"in_domain": 0.9, "out_of_domain": 0.6}}
    write_report(pd.DataFrame(rows), str(tmp_path / "with"))
    assert (tmp_path / "with" / "id_vs_ood.png").exists()
    write_report(pd.DataFrame(rows[-2:]), str(tmp_path / "without"))  # no method scored on both sides: no empty plot
    assert not (tmp_path / "without" / "id_vs_ood.png").exists()


def test_the_in_vs_out_of_domain_plot_puts_each_method_at_its_tables_avg():
    """The plot averaged every run's own avg row: a leave-one-domain-out replicate scores a domain
    in-domain once per other held-out domain, and the table's avg (each domain once per replicate)
    differed (27.1 plotted, 26.4 in the table: a trial)."""
    from embedcache.evaluate.report import id_vs_ood
    from embedcache.evaluate.store_eval import Tables, method_frame, summary_table

    def row(held, split, domain, value):
        return {"recipe": "li", "student": "s", "source": "name", "split": split, "domain": domain, "metric": "top1",
                "value": value, "replicate": 0, "holdout": held}

    rows = [row("d1", "in_domain", "d2", 0.2), row("d1", "in_domain", "d3", 0.4), row("d1", "out_of_domain", "d1", 0.5),
            row("d2", "in_domain", "d1", 0.6), row("d2", "in_domain", "d3", 0.8), row("d2", "out_of_domain", "d2", 0.1)]
    rows += [{**r, "domain": "avg", "value": v} for r, v in ((rows[0], 0.3), (rows[3], 0.7), (rows[2], 0.5),
                                                              (rows[5], 0.1))]  # each run's own avg rows
    results = method_frame(pd.DataFrame(rows))
    point = id_vs_ood(Tables(results)).loc["li / s"]
    assert point["in_domain"] == pytest.approx((0.6 + 0.2 + 0.6) / 3)  # d3 once: the mean of its two runs' values
    assert point["out_of_domain"] == pytest.approx(0.3)
    table = summary_table(results, "in_domain")
    assert table.iloc[0]["avg"] == f"{100 * point['in_domain']:.1f}"  # what the table says, the plot shows


def test_the_in_vs_out_of_domain_plot_marks_an_avg_over_fewer_domains():
    """A method that held out fewer domains than the others has an avg the table marks "(2 of 3 domains)",
    not comparable with theirs; the plot put it among them unmarked (a trial)."""
    from embedcache.evaluate.report import id_vs_ood
    from embedcache.evaluate.store_eval import Tables, method_frame, summary_table

    rows = []
    for recipe, held_out in (("li", ("d1", "d2", "d3")), ("ce", ("d1", "d2"))):
        for held in held_out:
            rows += [{"recipe": recipe, "student": "s", "source": "name", "metric": "top1", "replicate": 0,
                      "holdout": held, "split": "out_of_domain" if d == held else "in_domain", "domain": d,
                      "value": 0.1 * (1 + int(d[1]))} for d in ("d1", "d2", "d3")]
    results = method_frame(pd.DataFrame(rows))
    table = summary_table(results, "out_of_domain").reset_index().set_index("recipe")
    assert table.loc["ce", "avg"].endswith("(2 of 3 domains)") and "domains" not in table.loc["li", "avg"]
    points = id_vs_ood(Tables(results))
    assert sorted(points.index) == ["ce / s (avg over fewer domains)", "li / s"], points


def test_a_bar_without_a_spread_or_a_cell_draws_no_error_cap(tmp_path, monkeypatch):
    """One replicate's bars, and a cell the table leaves blank, were drawn with a cap at 0 spread (and the blank
    one at 0%), read as measured (a trial)."""
    import matplotlib.pyplot as plt

    from embedcache.evaluate.report import write_report

    caps = []
    real = plt.savefig
    monkeypatch.setattr(plt, "savefig", lambda *a, **k: caps.extend(
        y for line in plt.gca().lines for y in line.get_ydata()) or real(*a, **k))
    rows = [{"recipe": "li", "student": "s", "source": "name", "metric": "top1", "replicate": 0, "holdout": "d1",
             "split": "out_of_domain", "domain": "d1", "value": 0.4}]  # one replicate: no spread
    write_report(pd.DataFrame(rows), str(tmp_path))
    assert caps and all(np.isnan(float(y)) for y in caps), caps


def test_labels_of_methods_at_one_point_go_one_under_another():
    """Two methods at the same in/out-of-domain point had their names printed over each other (a trial)."""
    from embedcache.evaluate.report import label_lines

    assert label_lines([(80, 70), (80, 70), (80, 70.1), (40, 30)], 5, 1) == [0, 1, 2, 0]
    assert label_lines([(80, 70), (95, 70)], 5, 1) == [0, 0]  # far enough apart: each on its own first line
    assert label_lines([(80, 70), (80, 70), (50, 50), (80, 70.5)], 5, 1) == [0, 1, 0, 2]  # the first line free


def _top1_rows(rows, **tags):
    return pd.DataFrame([{"recipe": "r", "student": "s", "source": "name", "split": sp, "domain": d, "replicate": rep,
                          "metric": "top1", "value": v, **tags, **extra} for sp, d, rep, v, extra in rows])


def test_an_avg_over_fewer_domains_is_never_shown_as_comparable():
    """A replicate missing a domain (a failed or unfinished run) made its avg a mean over fewer
    domains: two methods with the same per-domain accuracies got 63.3 and 74.2."""
    from embedcache.evaluate.store_eval import summary_table

    acc = {"d1": 0.9, "d2": 0.8, "d3": 0.2}
    full = [("ood", d, rep, v, {"recipe": "a"}) for rep in (0, 1) for d, v in acc.items()]
    short = [("ood", d, rep, v, {"recipe": "b"}) for rep in (0, 1) for d, v in acc.items() if (rep, d) != (1, "d3")]
    t = summary_table(_top1_rows(full + short))
    assert t.loc[("a", "s", "name", "-", "ood"), "avg"] == "63.3 ± 0.0"
    b = t.loc[("b", "s", "name", "-", "ood")]  # every cell from the complete replicate only
    assert (b["avg"], b["d1"], b["d3"], b["replicates"]) == ("63.3", "90.0", "20.0", "1 of 2 complete")
    none = [("ood", d, 0, v, {"recipe": "c"}) for d, v in acc.items() if d != "d2"]
    t = summary_table(_top1_rows(full + none))
    c = t.loc[("c", "s", "name", "-", "ood")]  # its one replicate has what it has: its avg says over how much
    assert (c["avg"], c["d1"], c["replicates"]) == ("55.0 (2 of 3 domains)", "90.0", "1")
    short_of_its_own = none + [("ood", d, 1, v, {"recipe": "c"}) for d, v in acc.items() if d == "d1"]
    c = summary_table(_top1_rows(full + short_of_its_own)).loc[("c", "s", "name", "-", "ood")]
    assert (c["avg"], c["d1"], c["d3"], c["replicates"]) == ("55.0 (2 of 3 domains)", "90.0", "20.0", "1 of 2 complete")
    # no replicate whole: seed 0 has only d1's run, seed 1 only d3's. Each had as many domains as the
    # other, so each passed as complete "by its own runs", and avg compared d1 of one with d3 of another
    # as "± 0.0 (2 of 3 domains)" over 2 replicates (a trial)
    apart = [("ood", "d1", 0, 0.9, {"recipe": "e"}), ("ood", "d3", 1, 0.2, {"recipe": "e"})]
    e = summary_table(_top1_rows(full + apart)).loc[("e", "s", "name", "-", "ood")]
    assert (e["avg"], e["d1"], e["d3"], e["replicates"]) == ("incomplete", "90.0", "20.0", "0 of 2 complete")


def test_a_domain_scored_by_several_runs_of_one_replicate_is_one_value_of_it():
    """Leave-one-domain-out: each run scores the validation rows of its training domains, so one
    seed gives a domain several in-domain values; their spread is not a spread over seeds."""
    from embedcache.evaluate.store_eval import summary_table

    rows = [("in_domain", "d1", 0, 0.2, {"holdout": "d2"}), ("in_domain", "d1", 0, 0.4, {"holdout": "d3"}),
            ("in_domain", "d1", 1, 0.6, {"holdout": "d2"}), ("in_domain", "d1", 1, 0.8, {"holdout": "d3"})]
    t = summary_table(_top1_rows(rows))
    assert t.loc[("r", "s", "name", "-", "in_domain"), "d1"] == "50.0 ± 28.3"  # seeds: 0.3 and 0.7
    one_seed = summary_table(_top1_rows([r for r in rows if r[2] == 0]))
    assert one_seed.loc[("r", "s", "name", "-", "in_domain"), "d1"] == "30.0"  # one seed: no ± at all
    # seed 1 lost its run holding out d3: its in-domain value would be one run's, the other seed's two
    short = summary_table(_top1_rows(rows[:3]))
    assert short.loc[("r", "s", "name", "-", "in_domain"), "d1"] == "30.0"
    assert short.loc[("r", "s", "name", "-", "in_domain"), "replicates"] == "1 of 2 complete"


def test_rows_of_different_class_splits_are_different_methods():
    """The teacher scored on two seeded class splits: its unseen accuracy on each is a number of its
    own, not two replicates of one (their mean ± std was shown as such)."""
    from embedcache.evaluate.store_eval import summary_table

    rows = [("unseen_zero_shot", "all", 0, 1.0, {"holdout": "unseen: cat"}),
            ("unseen_zero_shot", "all", 0, 0.5, {"holdout": "unseen: dog"})]
    t = summary_table(_top1_rows(rows))
    assert sorted(t["all"]) == ["100.0", "50.0"] and "unseen" in t.index.names and set(t["replicates"]) == {"1"}
    lodo = [("ood", "d1", 0, 0.2, {"holdout": "d1"}), ("ood", "d2", 0, 0.4, {"holdout": "d2"})]
    assert "unseen" not in summary_table(_top1_rows(lodo)).index.names  # held-out domains stay one method


def test_report_of_two_class_splits_keeps_them_apart(tmp_path):
    from embedcache.evaluate.report import write_report

    rows = _top1_rows([("unseen_zero_shot", "all", 0, 1.0, {"holdout": "unseen: cat"}),
                       ("unseen_zero_shot", "all", 0, 0.5, {"holdout": "unseen: dog"})])
    write_report(rows, str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    cells = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    assert "100.0" in cells and "50.0" in cells and "75.0" not in cells and "±" not in cells


def test_a_run_without_validation_rows_is_scored_on_the_rows_it_never_saw(synthetic_store):
    """Li et al.'s config keeps no validation rows (split.val_fraction=0): per_class and distill
    ended in a traceback (an empty index list read as floats), and open_vocab left out gzsl_seen and
    the harmonic mean without a word, although a test split's seen-class rows were never trained on."""
    import warnings

    import embedcache
    from embedcache.evaluate.protocols import PROTOCOLS
    from embedcache.evaluate.store_eval import eval_data

    with embedcache.open_store(str(synthetic_store)) as reader:
        emb = reader.image_emb(0).astype(np.float32)
        labels = reader.meta["label"].to_numpy()
        seen = [0, 1]
        test_rows = [i for i in range(len(labels)) if labels[i] in seen][:5]  # a dataset's own test rows
        d = eval_data(reader, "name", emb, {"val_idx": [], "test_idx": test_rows, "seen_classes": seen})
        for name in ("per_class", "distill"):
            assert len(PROTOCOLS.get(name)(d))
        ov = PROTOCOLS.get("open_vocab")(d)
        assert {"gzsl_seen", "gzsl_harmonic"} <= set(ov.split)
        assert int(ov[(ov.split == "gzsl_seen") & (ov.metric == "top1")].n.iloc[0]) == 5
        none = eval_data(reader, "name", emb, {"val_idx": [], "test_idx": [], "seen_classes": seen})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ov = PROTOCOLS.get("open_vocab")(none)
        assert "gzsl_seen" not in set(ov.split) and "unseen_zero_shot" in set(ov.split)
        assert any("gzsl_seen and gzsl_harmonic left out" in str(w.message) for w in caught)
        # a run that trained on every image: one line, not an argmax of nothing or an empty results file
        every = eval_data(reader, "name", emb, {"val_idx": [], "test_idx": []})
        from embedcache.errors import EvaluationError
        for name in ("per_class", "distill"):
            with pytest.raises(EvaluationError, match="the run trained on every usable image"):
                PROTOCOLS.get(name)(every)


def test_protocols_without_a_domain_table_say_where_their_numbers_are(synthetic_store, tmp_path):
    out = tmp_path / "pc.parquet"
    res = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), "--protocol", "per_class",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"no accuracy-by-domain table for per_class; `embedcache report {out}`" in res.output
    assert "| recipe |" not in res.output  # an empty table's header was all it printed


def test_each_store_has_its_own_domains_in_the_avg():
    """Rows of a 2-domain store and a 3-domain store in one file: every avg read 'incomplete'."""
    from embedcache.evaluate.store_eval import summary_table

    a = [("ood", d, rep, v, {"store_key": "A"}) for rep in (0, 1) for d, v in (("d1", 0.2 + rep / 10), ("d2", 0.6))]
    b = [("ood", d, rep, v, {"store_key": "B"}) for rep in (0, 1) for d, v in (("e1", 0.9), ("e2", 0.7), ("e3", 0.5))]
    t = summary_table(_top1_rows(a + b))
    assert t.loc[("A", "r", "s", "name", "-", "ood"), "avg"] == "42.5 ± 3.5"  # (0.2+0.6)/2, (0.3+0.6)/2
    assert t.loc[("B", "r", "s", "name", "-", "ood"), "avg"] == "70.0 ± 0.0"


def test_runs_trained_with_other_settings_are_never_one_methods_replicates(runs, synthetic_store, tmp_path):
    """Two runs trained one by one, same recipe, student and seed but another val_fraction, were
    pooled into one cell (1.2%: the mean of 0% and 2.4%, shown as one replicate). Their settings
    digest tells them apart; rows scored before it existed are a method of their own."""
    from embedcache.evaluate.store_eval import summary_table

    other = tmp_path / "ce-0-val0"
    train(TrainConfig(store=str(synthetic_store), recipe="ce", seed=0, steps=6, batch_size=8, eval_every=3,
                      student=StudentConfig(name="test_resnet", input_size=32), device="cpu", progress=False,
                      split=SplitConfig(holdout_domains=("outline",), train_classes=("circle", "square"), val_fraction=0.0),
                      out=str(other)), log=quiet)
    out = tmp_path / "r.parquet"
    res = CliRunner().invoke(main, ["evaluate", str(runs / "ce-0"), str(runs / "ce-1"), str(other), "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    assert df.groupby("run").settings.first().nunique() == 2  # ce-0 and ce-1 share theirs
    table = summary_table(df, "out_of_domain")
    assert "settings" in table.index.names and len(table) == 2
    # what tells the two digests apart is said under the tables (a row labelled by a digest said nothing)
    mine = df.loc[df.run == "ce-0-val0", "settings"].iloc[0]
    theirs = df.loc[df.run == "ce-0", "settings"].iloc[0]
    legend = [ln.strip() for ln in res.output.splitlines() if ln.strip().startswith("settings of ")]
    assert legend == [f"settings of ce / test_resnet / name / -: {min(mine, theirs)} = split.val_fraction="
                      f"{0.0 if mine < theirs else 0.2}; {max(mine, theirs)} = split.val_fraction="
                      f"{0.2 if mine < theirs else 0.0}"], res.output
    from embedcache.students.rundir import RunDir
    from embedcache.students.scoring import settings_legend

    found = [RunDir(runs / "ce-0"), RunDir(runs / "ce-1"), RunDir(other)]
    assert len(settings_legend(found, df)) == 1
    # runs of two stores: the tables tell them apart by store, show no settings column, and need no legend (a review)
    assert settings_legend(found, df.assign(store_key=np.where(df.run == "ce-0-val0", "B", df.store_key))) == []
    # likewise runs the tables tell apart by the store they trained on (--transfer rows: a review)
    assert settings_legend(found, df.assign(trained_on=np.where(df.run == "ce-0-val0", "X", df.trained_on))) == []
    assert sorted(table["replicates"]) == ["1", "2"]  # the seeds 0 and 1 of one setting; the other alone
    # rows from before the column (ce-1's): what they were trained with is not known, so never pooled
    old = df.assign(settings=np.where(df.run == "ce-1", "-", df.settings))
    assert sorted(summary_table(old, "out_of_domain")["replicates"]) == ["1", "1", "1"]
    # a naive_kd run from before the recipe records ran another KD: its digest says so
    from embedcache.students.identity import settings_digest

    nkd = TrainConfig(store=str(synthetic_store), recipe="naive_kd")
    from embedcache.students.recipes import definition, recipe_of

    assert settings_digest(nkd, None) != settings_digest(nkd, definition(recipe_of(nkd)))
    ce = TrainConfig(store=str(synthetic_store), recipe="ce", select="last")
    assert settings_digest(ce, None) == settings_digest(ce, definition(recipe_of(ce), select="last"))
    # one that selected by validation pooled the domains then: its digest says so too
    val = TrainConfig(store=str(synthetic_store), recipe="ce")
    assert settings_digest(val, None) != settings_digest(val, definition(recipe_of(val)))


def test_a_protocol_that_cannot_score_a_run_keeps_the_others_rows(synthetic_store, tmp_path):
    """`evaluate --protocol open_vocab --protocol lodo` on a run lodo cannot score (it held out no domain
    and kept no validation rows) wrote nothing: the open_vocab rows already scored were lost."""
    run = tmp_path / "ov"
    train(TrainConfig(store=str(synthetic_store), recipe="feat_kd", steps=4, batch_size=8, eval_every=2, out=str(run),
                      student=StudentConfig(name="test_resnet", input_size=32), device="cpu", progress=False,
                      split=SplitConfig(val_fraction=0.0, train_classes=("circle", "square"))), log=quiet)
    out = tmp_path / "r.parquet"
    res = CliRunner().invoke(main, ["evaluate", str(run), "--protocol", "open_vocab", "--protocol", "lodo",
                                    "--out", str(out)])
    assert res.exit_code == 2 and f"run {run}, lodo: lodo has nothing to score" in res.output, res.output
    assert "or score it on another store of its teacher and classes (--store STORE --transfer" in res.output  # the fix
    # for a run on synthesised images, trained on every image as their paper trains (a trial)
    assert f"(the rows of the other protocols are in {out})" in res.output
    assert set(pd.read_parquet(out).protocol) == {"open_vocab"}
    # what was scored is shown, the failure said once, and no warning of the first (failed) attempt said again:
    # "run ov: the same as run ov above" (a trial)
    assert "| unseen_zero_shot |" in res.output and "skipping" not in res.output, res.output
    assert res.output.count("lodo has nothing to score") == 1 and "the same as run" not in res.output, res.output


def test_a_protocols_warning_names_the_run_it_is_about(runs, tmp_path, monkeypatch):
    """`evaluate runs/` scores many runs: a collapsed model's warning said which split, not which run."""
    import warnings

    from embedcache.evaluate import protocols

    def flag(name, share, n, tags):
        if tags.get("split") == "out_of_domain":
            warnings.warn(f"{tags['split']} on {tags['domain']}: flagged")

    monkeypatch.setattr(protocols, "collapsed_class", lambda pred, labels, classes: ("c", 1.0))
    monkeypatch.setattr(protocols, "_warn_collapsed", flag)
    res = CliRunner().invoke(main, ["evaluate", str(runs / "feat_kd-0"), str(runs / "ce-1"), "--protocol",
                                    "lodo", "--out", str(tmp_path / "r.parquet")])
    assert res.exit_code == 0, res.output
    said = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert said == ["warning: run feat_kd-0: out_of_domain on outline: flagged",  # said alike of both: once
                    "warning: run ce-1: the same as run feat_kd-0 above (out_of_domain on outline)"], res.output


def test_report_bars_are_the_tables_numbers_with_their_spread(tmp_path, monkeypatch):
    """The bars averaged every row, short replicates too, where the table keeps the complete ones: a
    bar of 55% beside a cell of 20.0; and they had no error bars, though the cells show ± std."""
    import pandas.plotting._core as core

    from embedcache.evaluate.report import write_report

    plotted, bar = [], core.PlotAccessor.bar
    monkeypatch.setattr(core.PlotAccessor, "bar",
                        lambda self, *a, **k: plotted.append((self._parent.copy(), k.get("yerr"))) or bar(self, *a, **k))
    rows = [("d1", 0, 0.2), ("d2", 0, 0.4), ("d1", 1, 0.4), ("d2", 1, 0.6), ("d1", 2, 0.9)]  # replicate 2 is short of d2
    df = pd.DataFrame([{"recipe": "r", "student": "s", "source": "name", "split": "out_of_domain", "domain": d,
                        "seed": rep, "replicate": rep, "metric": "top1", "value": v} for d, rep, v in rows])
    write_report(df, str(tmp_path))
    means, err = plotted[0]
    assert means["r / s"].round(6).to_dict() == {"d1": 30.0, "d2": 50.0}  # the table's cells: 30.0 ± 14.1, 50.0 ± 14.1
    assert err is not None and err["r / s"].round(1).to_dict() == {"d1": 14.1, "d2": 14.1}
    assert "| 30.0 ± 14.1 | 50.0 ± 14.1 |" in (tmp_path / "report.md").read_text()


def test_report_csv_holds_the_tables_numbers_as_a_tidy_table(tmp_path):
    """report.md's tables were the only form of a report's numbers: an analyst rebuilt them from
    results.parquet (a trial). report.csv holds them, one row per method, split and domain."""
    from embedcache.evaluate.report import write_report

    rows = [("d1", 0, 0.2), ("d2", 0, 0.4), ("d1", 1, 0.4), ("d2", 1, 0.6), ("d1", 2, 0.9)]  # replicate 2 is short of d2
    df = pd.DataFrame([{"recipe": r, "student": "s", "source": "name", "split": "out_of_domain", "domain": d,
                        "seed": rep, "replicate": rep, "metric": "top1", "value": v + (0.1 if r == "b" else 0)}
                       for d, rep, v in rows for r in ("a", "b")])
    write_report(df, str(tmp_path))
    got = pd.read_csv(tmp_path / "report.csv").set_index(["recipe", "domain"])
    for r, shift in (("a", 0.0), ("b", 0.1)):  # plain numpy over the complete replicates 0 and 1
        d1, d2 = np.array([0.2, 0.4]) + shift, np.array([0.4, 0.6]) + shift
        for domain, want in (("d1", d1), ("d2", d2), ("avg", (d1 + d2) / 2)):
            row = got.loc[(r, domain)]
            assert np.isclose(row["mean"], want.mean()) and np.isclose(row["std"], want.std(ddof=1)) and row["count"] == 2
    assert set(got["metric"]) == {"top1"} and set(got["split"]) == {"out_of_domain"} and len(got) == 6
    assert got["count"].dtype.kind == "i"  # a count, not 2.0
    assert got.loc[("a", "avg"), "cell"] == "40.0 ± 14.1" and "40.0 ± 14.1" in (tmp_path / "report.md").read_text()


def test_report_and_evaluate_given_the_wrong_thing_say_what_they_take(synthetic_store, tmp_path):
    """A store or a run folder given to `report` said "no results in .../results yet; run the sweep
    first"; `--out` naming a file was a FileExistsError traceback; a store given to `evaluate`
    without --store said "no finished run found" (a new user's trial)."""
    rows = pd.DataFrame([{"recipe": "r", "student": "s", "source": "name", "split": "out_of_domain",
                          "domain": "d1", "metric": "top1", "value": 0.5}])
    rows.to_parquet(tmp_path / "res.parquet")
    store = str(synthetic_store)
    cases = [(["report", store], r"is a store, not results: report takes a results \.parquet file .*or a sweep "
                                           r"folder; `embedcache evaluate --store \S+ --out results.parquet` scores"),
             (["report", str(tmp_path)], r"is not a sweep folder \(no results/ in it\): report takes a results \.parquet"),
             (["report", str(tmp_path / "res.parquet"), "--out", str(tmp_path / "res.parquet")],
              r"--out \S+res.parquet is a file; report writes a folder \(report.md and its plots\)"),
             (["evaluate", store], r"\S+ is a store, not a run: give it as --store \S+ for the teacher's "
                                             r"baselines, or give the runs trained on it")]
    for args, says in cases:
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert re.search(says, " ".join(res.output.split())), res.output


def test_the_report_names_collapsed_models(tmp_path):
    """evaluate warned that a model answered one class for 98% of the images; report.md showed its
    20.8% as a plain figure (a new user's trial)."""
    from embedcache.evaluate.report import write_report

    base = {"recipe": "feat_kd", "student": "s", "source": "name", "split": "out_of_domain", "domain": "sketch"}
    rows = [{**base, "run": f"r{k}", "replicate": k, "metric": "top1", "value": 0.208} for k in range(3)]
    rows += [{**base, "run": f"r{k}", "replicate": k, "metric": "collapsed_share", "value": 0.98, "class_name": "person"}
             for k in range(2)]
    write_report(pd.DataFrame(rows), str(tmp_path))
    text = " ".join((tmp_path / "report.md").read_text().split())
    assert ("collapsed: feat_kd / s on sketch answers 'person' for 98% of the images in 2 of its 3 runs "
            "(its top-1 there is that class's share)") in text, text
    # a column telling methods apart among the top-1 rows only (the text source) named the collapsed rows'
    # method otherwise: "in 1 of its 0 runs" (a trial)
    rows += [{**base, "source": "attributes", "run": "q", "replicate": 0, "metric": "top1", "value": 0.5}]
    write_report(pd.DataFrame(rows), str(tmp_path))
    text = " ".join((tmp_path / "report.md").read_text().split())
    assert "collapsed: feat_kd / s / name on sketch answers 'person' for 98% of the images in 2 of its 3 runs" in text, text
    # runs collapsed onto different classes, each its own share: said apart, not as if each answered both (a trial)
    rows = [{**base, "run": f"r{k}", "replicate": k, "metric": "top1", "value": 0.5} for k in range(2)]
    rows += [{**base, "run": f"r{k}", "replicate": k, "metric": "collapsed_share", "value": v, "class_name": c}
             for k, (v, c) in enumerate(((0.97, "circle"), (1.0, "square")))]
    write_report(pd.DataFrame(rows), str(tmp_path))
    text = " ".join((tmp_path / "report.md").read_text().split())
    assert ("answers one class ('circle' or 'square', by run) for 97% to 100% of the images in 2 of its 2 runs"
            in text), text
    # a collapse judged over a split's domains pooled (domain avg) is not the table's avg cell (a trial)
    pooled = [{**r, "domain": "avg"} for r in rows]
    write_report(pd.DataFrame(pooled), str(tmp_path))
    text = " ".join((tmp_path / "report.md").read_text().split())
    assert "feat_kd / s over its domains pooled answers one class" in text and " on avg " not in text, text


def test_evaluate_says_why_runs_were_not_scored(runs, synthetic_store, tmp_path):
    """Runs that failed were skipped without a word (one that failed before its config was written was
    not even found), --source was ignored for runs, and a folder of runs none of which a protocol
    could score ended "no finished run found"."""
    import shutil

    folder = tmp_path / "runs"
    shutil.copytree(runs / "feat_kd-0", folder / "ok")
    (folder / "early").mkdir()  # failed before writing its config, as a sweep records it
    (folder / "early" / "error.txt").write_text("Traceback (most recent call last):\n  ...\nStoreError: store gone\n")
    shutil.copytree(runs / "ce-0", folder / "late")
    (folder / "late" / "done").unlink()
    (folder / "late" / "error.txt").write_text("Traceback (most recent call last):\nTrainingError: loss is NaN\n")
    res = CliRunner().invoke(main, ["evaluate", str(folder), "--out", str(tmp_path / "r.parquet")])
    assert res.exit_code == 0, res.output
    assert (f"skipping {folder / 'early'}: not finished; its last attempt failed (StoreError: store gone; more in its "
            "error.txt)") in res.output
    assert (f"skipping {folder / 'late'}: not finished; its last attempt failed (TrainingError: loss is NaN; more "
            "in its error.txt)") in res.output
    assert set(pd.read_parquet(tmp_path / "r.parquet").run) == {"ok"}
    said = CliRunner().invoke(main, ["evaluate", str(folder), "--source", "templates", "--out", str(tmp_path / "s.parquet")])
    assert said.exit_code == 2 and "--source sets the teacher's baselines' text sources; a run predicts with the " \
                                   "text source it trained with" in said.output, said.output
    # every run of the folder saw every class: what stopped each is said, not "no finished run found"
    full = tmp_path / "full"
    for name in ("a", "b"):
        train(TrainConfig(store=str(synthetic_store), recipe="feat_kd", steps=2, batch_size=4, eval_every=2, seed=len(name),
                          student=StudentConfig(name="test_resnet", input_size=32), device="cpu", progress=False,
                          out=str(full / name)), log=quiet)
    none = CliRunner().invoke(main, ["evaluate", str(full), "--protocol", "open_vocab", "--out", str(tmp_path / "t.parquet")])
    assert none.exit_code == 2 and "no finished run found" not in none.output, none.output
    assert none.output.strip().splitlines()[-1].startswith(f"error: none of the 2 finished runs could be scored: run {full / 'a'}: "
                                                           "open_vocab needs at least one unseen class")


def test_the_per_class_table_counts_complete_replicates_each_once():
    """The per-class table averaged every run's row: a replicate short of a held-out domain (a failed
    run) weighed the domains it had more, and a replicate with more runs counted more."""
    from embedcache.evaluate.store_eval import per_class_table

    def rows(rep, held, value, recipe="r"):
        return {"recipe": recipe, "student": "s", "source": "name", "split": "per_class", "domain": "out_of_domain",
                "class_name": "dog", "replicate": rep, "holdout": held, "metric": "top1", "value": value}

    full = [rows(0, "d1", 1.0), rows(0, "d2", 0.0), rows(1, "d1", 0.8), rows(1, "d2", 0.2)]
    short = [rows(2, "d1", 1.0)]  # replicate 2 lost its run holding out d2
    t = per_class_table(pd.DataFrame(full + short))
    assert t.loc[("r", "s", "name", "-", "out_of_domain"), "dog"] == 50.0  # (0.5 + 0.5) / 2; all runs gave 60.0
    assert t.loc[("r", "s", "name", "-", "out_of_domain"), "replicates"] == "2 of 3 complete"
    # a method with no complete replicate shows what it has, and says so
    t = per_class_table(pd.DataFrame(full + [rows(0, "d1", 0.4, recipe="q")]))
    assert t.loc[("q", "s", "name", "-", "out_of_domain"), "dog"] == 40.0
    assert t.loc[("q", "s", "name", "-", "out_of_domain"), "replicates"] == "0 of 1 complete"


def test_per_class_replicates_of_two_class_splits_are_both_complete():
    """Completeness counted classes across methods: two open_vocab methods with their own unseen
    classes each lacked the other's, so every replicate read incomplete (and short ones then counted)."""
    from embedcache.evaluate.store_eval import per_class_table

    rows = [{"recipe": "r", "student": "s", "source": "name", "split": "per_class", "domain": "unseen_zero_shot",
             "class_name": c, "replicate": rep, "holdout": f"unseen: {', '.join(split)}", "metric": "top1", "value": 0.5}
            for split in (("a", "b"), ("c", "d")) for rep in (0, 1) for c in split]
    t = per_class_table(pd.DataFrame(rows))
    assert set(t["replicates"]) == {"2"}, t


def test_rescoring_replaces_a_runs_rows_whole(tmp_path):
    """upsert replaced rows key by key: rows a rescoring no longer gives (images since left out of a
    transfer score, distill rows since dropped) stayed in the file, and in its tables."""
    from embedcache.evaluate.results import upsert

    def rows(domains, splits=("zero_shot",)):
        return pd.DataFrame([{"run": "r", "recipe": "ce", "student": "s", "replicate": 0, "protocol": "lodo", "split": sp,
                              "domain": d, "metric": "top1", "value": 0.5, "holdout": "transfer"}
                             for sp in splits for d in domains])

    out = str(tmp_path / "r.parquet")
    upsert(out, rows(["solid", "outline"], ("zero_shot", "finetune@50")))
    upsert(out, pd.DataFrame([{**rows(["x"]).iloc[0].to_dict(), "run": "other"}]))
    got = upsert(out, rows(["outline"]))
    assert sorted(zip(got.run, got.split, got.domain)) == [
        ("other", "zero_shot", "x"), ("r", "finetune@50", "outline"), ("r", "finetune@50", "solid"),
        ("r", "zero_shot", "outline")]  # solid's stale zero_shot row is gone; fine-tuning of 50 steps, not redone, stays


def test_merge_into_no_old_rows():
    """A sweep relaunched with a grid sharing no run with its results file merged its rows into no old
    rows, and reading an empty frame's split settings raised KeyError: 2 (the folder then stayed
    broken: every relaunch and `report` crashed the same way)."""
    from embedcache.evaluate.results import merge

    rows = pd.DataFrame([{"run": "r", "recipe": "ce", "student": "s", "replicate": 0, "protocol": "lodo", "split": sp,
                          "domain": "solid", "metric": "top1", "value": 0.5, "holdout": "transfer"}
                         for sp in ("zero_shot", "prototype@1shot")])
    got = merge(rows.iloc[:0], rows)
    assert sorted(got.split) == ["prototype@1shot", "zero_shot"]
    assert list(merge(rows, rows.iloc[:0]).split) == list(rows.split)  # and no new rows into old ones


def test_a_method_that_holds_no_domain_out_is_not_short_of_held_out_runs():
    """Runs trained on every domain, scored beside a run holding a domain out, read "0 of 1 complete"
    with no avg: the other method's held-out domain was counted as a run they lacked."""
    from embedcache.evaluate.store_eval import summary_table

    every = [("in_domain", d, 0, 0.5, {"recipe": "a", "holdout": "-"}) for d in ("d1", "d2", "d3")]
    held = [("in_domain", d, 0, 0.5, {"recipe": "b", "holdout": "d3"}) for d in ("d1", "d2")]
    t = summary_table(_top1_rows(every + held))
    assert (t.loc[("a", "s", "name", "-", "in_domain"), "replicates"], t.loc[("a", "s", "name", "-", "in_domain"), "avg"]) \
        == ("1", "50.0")
    # the run holding d3 out has in-domain values of two of the three domains: its avg is not comparable,
    # and says so; its replicate is short of no run of its own (it read "0 of 1 complete": a trial)
    b = t.loc[("b", "s", "name", "-", "in_domain")]
    assert (b["avg"], b["replicates"]) == ("50.0 (2 of 3 domains)", "1")


def test_transfer_rows_of_a_replicate_short_of_a_held_out_run_are_incomplete():
    """A lodo sweep that held domains out and also scored its runs on a transfer store: the transfer
    rows said only "transfer", so a replicate that lost its run holding out d2 read complete and its
    cells averaged the one run it had."""
    from embedcache.evaluate.results import holdout_tag
    from embedcache.evaluate.store_eval import summary_table

    acc = {"d1": 0.9, "d2": 0.3}  # the run trained without d1 scores 0.9 on the transfer store, without d2 0.3
    rows = [("zero_shot", t, rep, acc[h], {"holdout": holdout_tag([h], transfer=True), "store_key": "T",
                                           "trained_on": "S"})
            for rep in (0, 1) for h in acc for t in ("t1", "t2") if (rep, h) != (1, "d2")]
    assert {r[4]["holdout"] for r in rows} == {"transfer; trained without: d1", "transfer; trained without: d2"}
    t = summary_table(_top1_rows(rows))
    key = ("r", "s", "name", "-", "S", "zero_shot")  # transfer rows: the store they trained on is a column
    assert (t.loc[key, "replicates"], t.loc[key, "avg"], t.loc[key, "t1"]) == ("1 of 2 complete", "60.0", "60.0")
    # runs trained on every domain and scored on a transfer store hold nothing out: complete
    every = [("zero_shot", t, rep, 0.5, {"holdout": holdout_tag([], transfer=True)}) for rep in (0, 1) for t in ("t1", "t2")]
    assert summary_table(_top1_rows(every)).loc[key[:4] + ("-", "zero_shot"), "replicates"] == "2"  # scored before trained_on


def test_a_holdout_is_read_back_as_written_whatever_its_domains_are_named():
    """The holdout column was parsed by hand in four places: a domain named "unseen_sketch" was read as
    no held-out domain, and one named "transfer_set" as a --transfer row (a review)."""
    import pandas as pd

    from embedcache.evaluate.results import conform, held_domains, holdout_tag
    from embedcache.evaluate.store_eval import method_frame, transferred

    cases = [  # (domains, classes, seen, transfer) -> (held, transfer, unseen)
        ((["unseen_sketch"], (), (), False), ("unseen_sketch", False, "-")),
        ((["transfer_set"], (), (), False), ("transfer_set", False, "-")),
        ((["a", "b"], ("x", "y", "z"), (0,), False), ("a,b", False, "y,z")),
        ((["unseen_sketch"], ("x", "y"), (1,), True), ("unseen_sketch", True, "x")),
        (([], ("x", "y"), (0,), True), ("", True, "y")),
        (([], (), (), False), ("", False, "-")),
    ]
    tags = pd.Series([holdout_tag(*given) for given, _ in cases])
    rows = conform(pd.DataFrame({"holdout": tags, "value": 0.5, "metric": "top1", "split": "zero_shot",
                                 "run": "r", "trained_on": "S", "store_key": "S"}))
    assert list(held_domains(tags)) == [want[0] for _, want in cases]
    assert list(transferred(rows)) == [want[1] for _, want in cases]
    assert list(method_frame(rows)["unseen"]) == [want[2] for _, want in cases]
    # the teacher trained on no store: its rows beside transfer rows read "trained on <the store's key>" (a trial)
    teacher = conform(pd.DataFrame({"run": ["teacher"], "recipe": ["teacher"], "store_key": ["R"], "value": [0.5],
                                    "metric": ["top1"], "split": ["zero_shot"]}))
    assert method_frame(pd.concat([teacher, rows]))["trained_on"].iloc[0] == "-"


def test_bare_transfer_rows_beside_tagged_ones_take_their_runs_held_out_domains():
    """After the upgrade a relaunch rescored only some runs: one run's transfer rows named its held-out
    domain, the others' said only "transfer", and every replicate of bare rows read incomplete (a
    review). A bare row takes its run's held-out domains from the run's own-store rows."""
    from embedcache.evaluate.results import holdout_tag
    from embedcache.evaluate.store_eval import summary_table

    rows = []
    for rep in (0, 1):
        for h in ("d1", "d2"):
            run = f"{h}-{rep}"
            tagged = (rep, h) == (0, "d1")  # the one run rescored since
            rows.append(("zero_shot", "t1", rep, 0.5, {"run": run, "store_key": "T", "trained_on": "S",
                                                       "holdout": holdout_tag([h], transfer=True) if tagged else "transfer"}))
            rows.append(("out_of_domain", h, rep, 0.4, {"run": run, "store_key": "S", "trained_on": "S", "holdout": h}))
    t = summary_table(_top1_rows(rows), split="zero_shot")
    assert t.loc[("T", "r", "s", "name", "-", "S", "zero_shot"), "replicates"] == "2", t


def test_transfer_rows_scored_before_they_named_the_held_out_domains_are_replaced_by_a_rescoring(tmp_path):
    from embedcache.evaluate.results import holdout_tag, upsert

    def rows(holdout, value):
        return pd.DataFrame([{"run": "r", "recipe": "ce", "student": "s", "replicate": 0, "protocol": "lodo",
                              "split": "zero_shot", "domain": "t1", "metric": "top1", "value": value,
                              "holdout": holdout, "store_key": "T", "trained_on": "S"}])

    out = str(tmp_path / "r.parquet")
    upsert(out, rows("transfer", 0.1))
    got = upsert(out, rows(holdout_tag(["d1"], transfer=True), 0.2))
    assert list(got.value) == [0.2] and list(got.holdout) == ["transfer; trained without: d1"]
    # a run of the same name that held out another domain (art/r0, photo/r0) keeps its rows (a review)
    got = upsert(out, rows(holdout_tag(["d2"], transfer=True), 0.3))
    assert sorted(zip(got.holdout, got.value)) == [("transfer; trained without: d1", 0.2),
                                                  ("transfer; trained without: d2", 0.3)]


def test_few_shot_takes_a_shot_count_and_keeps_each_counts_rows(runs, synthetic_store, tmp_path):
    """evaluate had no --shots: few-shot results were Li et al.'s 5 shots only, and rows of two shot
    counts would have had one key. Other counts name theirs in the split, and both stay in one file."""
    from embedcache.evaluate.protocols import episode

    out = tmp_path / "fs.parquet"
    args = ["evaluate", str(runs / "feat_kd-0"), "--protocol", "few_shot", "--finetune-steps", "1", "--out", str(out)]
    five = CliRunner().invoke(main, args)
    two = CliRunner().invoke(main, args + ["--shots", "2"])
    assert five.exit_code == 0 and two.exit_code == 0, two.output
    df = pd.read_parquet(out)
    assert {"prototype", "tip_adapter", "li_retrieval", "text_only", "finetune@1", "prototype@2shot", "tip_adapter@2shot",
            "li_retrieval@2shot", "text_only@2shot", "finetune@1@2shot"} == set(df.split)
    # each 2-shot episode scored the unseen class's images less two support images
    s = embedcache.open_store(str(synthetic_store))
    unseen = np.array([s.classes.index("triangle")])
    _, query = episode(s.meta.label.to_numpy(), s.ok, unseen, 2, 0, 0, s.classes)
    row = df[(df.split == "prototype@2shot") & (df.episode == 0) & (df.metric == "top1")]
    assert int(row.n.iloc[0]) == len(query) == int((s.meta.class_name == "triangle").sum()) - 2
    # one shot of one unseen class: a batch of one image, which BatchNorm cannot train on (a ValueError)
    one = CliRunner().invoke(main, args + ["--shots", "1"])
    assert one.exit_code == 2 and "trains on batches of 1 image (shots x unseen classes)" in one.output, one.output
    teacher = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), "--protocol", "few_shot",
                                        "--shots", "2", "--out", str(tmp_path / "t.parquet")])
    assert teacher.exit_code == 0 and {"prototype@2shot"} <= set(pd.read_parquet(tmp_path / "t.parquet").split)
    unused = CliRunner().invoke(main, ["evaluate", str(runs / "feat_kd-0"), "--shots", "1", "--out", str(out)])
    assert unused.exit_code == 2 and "--shots sets few-shot scoring; add --protocol few_shot" in unused.output
    for extra in (["--finetune-steps", "7"], ["--finetune-mode", "mixed"], ["--shots", "5"]):  # explicit, even at 5
        said = CliRunner().invoke(main, ["evaluate", str(runs / "feat_kd-0"), "--protocol", "open_vocab", *extra,
                                         "--out", str(out)])
        assert said.exit_code == 2 and f"{extra[0]} sets few-shot scoring" in said.output, said.output
    said = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), "--protocol", "few_shot",
                                     "--finetune-steps", "7", "--out", str(tmp_path / "t.parquet")])
    assert said.exit_code == 2 and "--finetune-steps fine-tunes runs; the teacher's baselines have none" in said.output
    said = CliRunner().invoke(main, ["evaluate", str(runs / "feat_kd-0"), "--protocol", "few_shot", "--finetune-steps",
                                     "0", "--finetune-mode", "mixed", "--out", str(out)])
    assert said.exit_code == 2 and "--finetune-steps 0 fine-tunes none" in said.output, said.output


def test_rescoring_keeps_the_rows_of_settings_it_did_not_compute_scope_by_scope(tmp_path):
    """Settings were compared across the whole call: scoring lodo and 2-shot few_shot together dropped
    the 5-shot rows (lodo's rows count as the plain setting), and fine-tuning in the mixed mode
    dropped the shots mode's rows of the same step count."""
    from embedcache.evaluate.results import upsert

    def rows(protocol, splits):
        return pd.DataFrame([{"run": "r", "recipe": "ce", "student": "s", "replicate": 0, "protocol": protocol,
                              "split": sp, "domain": "all", "metric": "top1", "value": 0.5} for sp in splits])

    out = str(tmp_path / "r.parquet")
    upsert(out, rows("few_shot", ["prototype", "tip_adapter", "finetune@50"]))
    got = upsert(out, pd.concat([rows("lodo", ["in_domain"]), rows("few_shot", ["prototype@2shot"])]))
    assert set(got.split) == {"prototype", "tip_adapter", "finetune@50", "in_domain", "prototype@2shot"}
    got = upsert(out, rows("few_shot", ["prototype", "tip_adapter", "finetune_mixed@50"]))
    assert {"finetune@50", "finetune_mixed@50", "prototype@2shot"} <= set(got.split)
    got = upsert(out, rows("few_shot", ["prototype"]))  # tip_adapter's plain row is this scoring's setting: gone
    assert "tip_adapter" not in set(got.split) and "finetune@50" in set(got.split)


def test_a_method_of_no_class_split_beside_class_splits_says_so_with_a_dash():
    """A leave-one-domain-out method in a table beside class-split ones had a blank ``unseen`` cell,
    which read as a value left out; the other columns say "-" for none."""
    from embedcache.evaluate.store_eval import summary_table

    rows = [("unseen_zero_shot", "all", 0, 1.0, {"holdout": "unseen: cat"}),
            ("ood", "d1", 0, 0.2, {"holdout": "d1"})]
    t = summary_table(_top1_rows(rows))
    assert sorted(t.index.get_level_values("unseen")) == ["-", "cat"]


def test_two_runs_of_one_method_seed_and_holdout_are_said_to_be_pooled():
    """Two runs with the same settings and seed in other folders were one replicate, their mean, and
    the table said "replicates 1" with no word of the second run (a trial)."""
    import warnings

    from embedcache.evaluate.store_eval import per_class_table, summary_table

    lodo = [("ood", d, rep, 0.5, {"run": f"r{rep}-{d}", "holdout": d}) for rep in (0, 1) for d in ("d1", "d2")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # runs of one replicate holding out other domains: as it should be
        summary_table(_top1_rows(lodo))
    again = lodo + [("ood", "d1", 0, 0.7, {"run": "copy-of-r0-d1", "holdout": "d1"})]
    with pytest.warns(UserWarning, match=r"1 replicate\(s\) of recipe r hold two or more runs of one held-out split "
                                         r"\(copy-of-r0-d1 and r0-d1: replicate 0, holdout d1\)"):
        t = summary_table(_top1_rows(again))
    assert t.loc[("r", "s", "name", "-", "ood"), "d1"] == "55.0 ± 7.1"  # (0.6 + 0.5) / 2: their mean, as said
    seeded = _top1_rows(again)  # two folders that seeded the replicate otherwise: not "the same seed" (a trial)
    seeded["run_seed"] = [7 if r == "copy-of-r0-d1" else 3 for r in seeded["run"]]
    with pytest.warns(UserWarning, match=r"the same settings and replicate, trained from seeds 3 and 7"):
        summary_table(seeded)
    pc = [{"recipe": "r", "student": "s", "source": "name", "split": "per_class", "domain": "out_of_domain",
           "class_name": "dog", "replicate": 0, "holdout": "d1", "metric": "top1", "value": 1.0, "run": run}
          for run in ("a", "b")]
    with pytest.warns(UserWarning, match=r"\(a and b: replicate 0, holdout d1\)"):
        per_class_table(pd.DataFrame(pc))


def test_an_interrupted_evaluation_says_nothing_was_written(synthetic_store, tmp_path, monkeypatch):
    """Ctrl-C said "rerun the same command to resume", and evaluate resumes nothing: it writes its table
    once, at the end (a trial)."""
    import embedcache.evaluate.store_eval as store_eval

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_eval, "teacher_baselines", stopped)
    out = tmp_path / "r.parquet"
    res = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), "--out", str(out)])
    assert res.exit_code == 130 and not out.exists()
    assert res.output.strip() == (f"interrupted; nothing was written to {out} (it is written once everything is "
                                  "scored): rerun the same command to score again")


def test_evaluate_options_default_to_the_protocols_own_settings():
    """The few-shot and class-split options restate defaults that live with the protocols and the
    fine-tuning (click needs them at import): a drift would score a run under other settings than a
    sweep's, with no word. The episodes are one constant for the protocol and the fine-tuning."""
    import inspect

    from embedcache.evaluate.protocols import DEFAULT_SHOTS, EPISODES, few_shot, seeded_class_split
    from embedcache.students.finetune import MODES, few_shot_finetune
    from embedcache.students.sweep import SweepSpec

    opts = {p.name: p for p in main.commands["evaluate"].params}
    tune, proto = inspect.signature(few_shot_finetune).parameters, inspect.signature(few_shot).parameters
    split = inspect.signature(seeded_class_split).parameters
    assert opts["shots"].default == DEFAULT_SHOTS == tune["shots"].default == proto["shots"].default == SweepSpec.shots
    assert tune["episodes"].default == proto["episodes"].default == EPISODES
    assert opts["finetune_steps"].default == tune["steps"].default
    assert tuple(opts["finetune_mode"].type.choices) == MODES and opts["finetune_mode"].default == tune["mode"].default
    assert opts["unseen_fraction"].default == split["unseen_fraction"].default == SweepSpec.unseen_fraction
    assert opts["split_seed"].default == split["seed"].default == SweepSpec.split_seed


def test_a_domain_of_few_images_is_said_under_its_table(tmp_path):
    """A domain of one image read 0.0 and was a third of the teacher's avg (a check by hand): nothing in the
    tables said the cell rests on one image. A domain where a method's cell rests on fewer than FEW_IMAGES
    images in every run is said under its table in report.md, each method's cells apart (another method's or
    store's larger count of the domain hid it: a review); rows made by hand (no count, n = 0) are not judged."""
    from embedcache.evaluate.report import FEW_IMAGES, few_image_lines, write_report
    from embedcache.evaluate.store_eval import method_frame, method_keys

    def lines(rows):
        framed = method_frame(rows)
        return few_image_lines(framed, "ood", method_keys(framed))

    rows = _top1_rows([("ood", d, rep, v, {"n": n}) for rep in (0, 1)
                       for d, v, n in (("photo", 0.7, 30), ("sketch", 0.0, 1), ("art", 0.5, FEW_IMAGES - 1 + rep))])
    said = lines(rows)
    assert said[0].startswith("few images: sketch (1 image: r / s), per run at most in the cell") and "art" not in said[0]
    assert lines(rows.assign(n=0)) == []  # no count: not judged
    other = rows.assign(recipe="kd", n=500)  # another method's cells of the same domains, on many images
    assert lines(pd.concat([rows, other]))[0].startswith("few images: sketch (1 image: r / s),")
    big_store = rows.assign(store_key="B", n=500)  # another store's domain of the same name
    assert lines(pd.concat([rows.assign(store_key="A"), big_store]))[0].startswith("few images: sketch (1 image: r / s / A),")
    both = pd.concat([rows, rows.assign(recipe="kd", n=rows["n"] + 1)])  # two methods' cells of few: the fewest named
    assert lines(both)[0].startswith("few images: sketch (1 image: r / s and 1 more method(s)),")
    write_report(rows, str(tmp_path / "rep"))
    assert "few images: sketch (1 image: r / s)" in (tmp_path / "rep" / "report.md").read_text()


def test_labels_no_installed_font_draws_are_said_once(tmp_path, monkeypatch):
    """Two CJK domain names gave 15 warnings, one per glyph per plot (a trial): the characters no installed font
    has are said in one line naming the fix, and the tables keep the names as written."""
    import embedcache.evaluate.report as report

    monkeypatch.setattr(report, "FALLBACK_FONTS", ())  # DejaVu Sans alone, whatever this machine has installed
    rows = _top1_rows([("out_of_domain", d, rep, 0.5 + 0.1 * rep, {}) for d in ("素描", "照片") for rep in (0, 1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report.write_report(rows, str(tmp_path / "rep"))
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and said[0].startswith("report plots: 4 character(s) of their labels (描 照 片 素) are in no "
                                                 "installed font and show as boxes"), said
    assert "素描" in (tmp_path / "rep" / "report.md").read_text()


def test_a_report_that_fails_to_write_keeps_the_warnings_it_gave(tmp_path):
    """The plots' font handling held every warning back until the plots were done: a report whose write then
    failed dropped them, the pooled-replicates warning among them (a review)."""
    from embedcache.evaluate.report import write_report

    rows = _top1_rows([("ood", d, 0, 0.5, {"run": run, "holdout": "-"}) for d in ("d1", "d2") for run in ("a", "b")])
    (tmp_path / "rep" / "report.md").mkdir(parents=True)  # where the report's file goes: a folder
    with pytest.warns(UserWarning, match="hold two or more runs of one held-out split"):
        with pytest.raises(IsADirectoryError):
            write_report(rows, str(tmp_path / "rep"))


def test_a_report_written_off_the_main_thread_leaves_the_warnings_module_alone(tmp_path, monkeypatch):
    """The warnings module's state is the process's: four reports written in threads at once left the plots'
    glyph gathering installed for good, swallowing later glyph warnings (a review). Off the main thread the
    plots change nothing of it (each glyph is then said as matplotlib says it)."""
    import threading

    import embedcache.evaluate.report as report

    seen, real = [], report._write_report

    def spy(*args):  # what a warning raised while the report is written would be shown by
        seen.append(warnings.showwarning)
        return real(*args)

    monkeypatch.setattr(report, "_write_report", spy)
    rows = _top1_rows([("out_of_domain", d, rep, 0.5, {}) for d in ("d1", "d2") for rep in (0, 1)])
    before = warnings.showwarning
    thread = threading.Thread(target=report.write_report, args=(rows, str(tmp_path / "r")))
    thread.start()
    thread.join()
    assert seen == [before] and warnings.showwarning is before
    report.write_report(rows, str(tmp_path / "main"))  # on the main thread: the glyph gathering
    assert seen[1] is not before and warnings.showwarning is before


def test_a_device_is_checked_before_scoring_and_refused_where_nothing_reads_it(runs, synthetic_store, tmp_path):
    """`evaluate --store S --device gpu` wrote its table with exit 0 (a fuzz): the teacher's baselines read the
    store's embeddings and no device. With runs a device that is no device is refused before any scoring."""
    res = CliRunner().invoke(main, ["evaluate", "--store", str(synthetic_store), "--device", "cpu",
                                    "--out", str(tmp_path / "a.parquet")])
    assert res.exit_code == 2 and not (tmp_path / "a.parquet").exists(), res.output
    assert res.output.strip().splitlines()[-1].startswith("error: --device sets where runs are scored; the teacher's "
                                                          "baselines read the store's embeddings on the CPU: drop --device")
    res = CliRunner().invoke(main, ["evaluate", str(runs / "ce-0"), "--device", "gpu", "--out", str(tmp_path / "b.parquet")])
    assert res.exit_code == 2 and not (tmp_path / "b.parquet").exists(), res.output
    assert res.output.strip().splitlines()[-1] == "error: unknown device 'gpu'; use auto, cpu, cuda or cuda:N", res.output


def test_score_runs_keeps_each_run_s_other_protocols_and_says_what_it_skipped(monkeypatch):
    """``score_runs``, what `evaluate` scores runs with: a protocol that cannot score a run is named and
    the run's other protocols still scored; an unfinished run is skipped and said; a lone finished run
    that nothing could score is the error; warnings of a scoring come through once."""
    from types import SimpleNamespace

    from embedcache.errors import EvaluationError
    from embedcache.students import scoring

    calls = []

    def fake(run, protocols, **options):
        calls.append((run.path, tuple(protocols), options["store"]))
        warnings.warn(f"said of {run.path} {'+'.join(protocols)}")
        if run.path == "b" and "open_vocab" in protocols:
            raise EvaluationError("no class held out")
        return pd.DataFrame({"run": [run.path] * len(protocols), "protocol": protocols})

    monkeypatch.setattr(scoring, "score_run", fake)
    runs = [SimpleNamespace(path=p, done=p != "c", failure="OOM" if p == "c" else None) for p in "abc"]
    said = []
    with pytest.warns(UserWarning) as warned:
        frames, unscored = scoring.score_runs(runs, ["lodo", "open_vocab"], log=said.append, store="s")
    got = pd.concat(frames)
    assert got.values.tolist() == [["a", "lodo"], ["a", "open_vocab"], ["b", "lodo"]]
    assert unscored == ["run b, open_vocab: no class held out"]
    assert said == ["skipping b, open_vocab: no class held out",
                    "skipping c: not finished; its last attempt failed (OOM; more in its error.txt)"]
    assert calls == [("a", ("lodo", "open_vocab"), "s"), ("b", ("lodo", "open_vocab"), "s"), ("b", ("lodo",), "s"),
                     ("b", ("open_vocab",), "s")]
    # the failed joint attempt's warning is not said: b's protocols alone say theirs, once each
    assert [str(w.message) for w in warned] == ["said of a lodo+open_vocab", "said of b lodo", "said of b open_vocab"]
    lone = (r for r in [SimpleNamespace(path="b", done=True, failure=None), runs[2]])  # any iterable of runs
    with pytest.raises(EvaluationError, match=r"^run b: no class held out$"), pytest.warns(UserWarning, match="said of b"):
        scoring.score_runs(lone, ["open_vocab"], log=said.append, store="s")
    lone = [SimpleNamespace(path="b", done=True, failure=None), runs[2]]
    with pytest.warns(UserWarning, match="said of b"):
        frames, unscored = scoring.score_runs(lone, ["lodo", "open_vocab"], log=said.append, store="s")
    assert len(frames) == 1 and unscored == ["run b, open_vocab: no class held out"]  # the caller says it, after its table
