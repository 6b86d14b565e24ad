"""The CLI end to end on synthetic data, and the analyst API on the store it writes."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import embedcache
from embedcache.cli import main


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, tiny_clip_dir):
    out = tmp_path_factory.mktemp("cli") / "demo.zarr"
    args = ["extract", "--config", "configs/extract/demo.yaml", "--out", str(out), "--no-progress",
            "--set", "teacher.name=open_clip", "--set", f"teacher.model=local-dir:{tiny_clip_dir}",
            "--set", "teacher.device=cpu", "--set", "num_workers=0", "--set", "dataset.per_class=3"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "36 images read in" in res.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "already complete" in again.output
    return out


def test_a_library_warning_is_one_line_and_bf16_on_a_cpu_is_warned(tmp_path, tiny_clip_dir):
    res = CliRunner().invoke(main, [
        "extract", "--config", "configs/extract/demo.yaml", "--out", str(tmp_path / "bf16.zarr"), "--no-progress",
        "--set", "teacher.name=open_clip", "--set", f"teacher.model=local-dir:{tiny_clip_dir}", "--set", "teacher.device=cpu",
        "--set", "teacher.precision=bf16", "--set", "num_workers=0", "--set", "dataset.per_class=1"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if "precision=bf16" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "teacher.precision=fp32" in lines[0]
    assert "UserWarning" not in res.output and ".py:" not in res.output


def test_inspect_summarises(cli_store):
    res = CliRunner().invoke(main, ["inspect", str(cli_store)])
    assert res.exit_code == 0, res.output
    for word in ("open_clip", "images", "36", "outline (12)", "templates (28 prompts)", "disk_mb",
                 "crops 0.35-1 of the canvas, flips, seed 0"):
        assert word in res.output
    # it reads no array: said, so that a damaged chunk it does not see is not taken for a clean bill
    assert res.output.rstrip().splitlines()[-1].split(None, 1) == [
        "checked", f"its finished blocks' chunk files and its tables are there; no array is read here (`embedcache "
                   f"verify {cli_store}` checks every checksum)"]
    js = json.loads(CliRunner().invoke(main, ["inspect", str(cli_store), "--json"]).output)
    assert js["views"] == 3 and js["classes"] == 4 and js["failed"] == 0
    # data, not the lines above in quotes (a trial: domains, text sources and calls were preformatted strings)
    assert js["images_per_domain"]["outline"] == 12 and sum(js["images_per_domain"].values()) == 36
    assert js["prompts_per_source"]["templates"] == 28 and "templates" in js["text_sources"]
    assert [c["finished"] for c in js["calls"]] == [True] and js["derived"] == [] and js["complete"] is True
    assert js["teacher"]["name"] == "open_clip" and isinstance(js["teacher"], dict)  # as the manifest records it
    assert js["synthesis"] is None and "synthesised" not in res.output  # a store of image files
    # the decoder and renderers that made the pixels, part of the key (inspect never said them: a trial)
    assert js["pipeline"]["decoder"] == "pil" and "decoder pil; canvas " in res.output


def test_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(main, ["extract", "--config", "configs/extract/demo.yaml", "--out", str(tmp_path / "x.zarr"),
                                    "--set", "dataset.name=domainbed", "--set", f"dataset.path={tmp_path / 'missing'}"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0
    assert "does not exist" in res.output and "--set dataset.path=" in res.output
    res = CliRunner().invoke(main, ["extract", "--config", "configs/extract/demo.yaml", "--set", "viewz.count=2"])
    assert res.exit_code == 2 and "unknown config key viewz" in res.output
    # click's own usage errors too: a path that is not there, an unknown option or command
    for args, says in ((["evaluate", str(tmp_path / "nope")], "does not exist"),
                       (["train", "--bogus"], "No such option '--bogus'"), (["nosuch"], "No such command 'nosuch'")):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and res.output.startswith("error: ") and says in res.output, res.output
        assert res.output.strip().count("\n") == 0 and "--help` lists what it takes" in res.output
    # a store that is not there: said as train and evaluate --store say it, with the command that makes one
    for command in ("inspect", "verify"):
        res = CliRunner().invoke(main, [command, str(tmp_path / "nope.zarr")])
        assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
        assert res.output.startswith(f"error: no zarr store at {tmp_path / 'nope.zarr'}; give its path, or run `embedcache extract`")
    (tmp_path / "x.yaml").write_text("views: {count: 2}\n")  # "no zarr store at x.yaml" (a trial)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "x.yaml")])
    assert res.exit_code == 2 and f"{tmp_path / 'x.yaml'} is a file, not a store" in res.output, res.output
    # a packaged config of another command is named with that command (it said only "not found", a trial)
    res = CliRunner().invoke(main, ["extract", "--config", "li-iccv23"])
    assert res.exit_code == 2 and "li-iccv23 is a packaged train config (`embedcache train --config li-iccv23`)" in \
        res.output, res.output
    res = CliRunner().invoke(main, ["train", "--config", "pacs-losses"])
    assert res.exit_code == 2 and "(`embedcache sweep pacs-losses`)" in res.output, res.output
    (tmp_path / "dir.h5").mkdir()  # "no hdf5 store at", where extract --out said it exists (a trial)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "dir.h5")])
    assert res.exit_code == 2 and f"{tmp_path / 'dir.h5'} is a folder, not a store" in res.output, res.output
    run = tmp_path / "run"  # a run's folder for its store: "no zarr store at run" (a trial)
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"store_key": "abc", "store_path": "/data/pacs.zarr"}))
    res = CliRunner().invoke(main, ["inspect", str(run)])
    assert res.exit_code == 2 and f"{run} is a run's folder, not a store; its store is /data/pacs.zarr" in res.output
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 0 and res.output.startswith("Usage: ") and "extract" in res.output
    res = CliRunner().invoke(main, ["features", "--store", str(tmp_path / "x.zarr"), "--student", "test_resnet",
                                    "--seed", "-1"])  # it cached features no run could use (seeds are >= 0)
    assert res.exit_code == 2 and "--seed" in res.output and "-1" in res.output, res.output


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 1680000000000 bytes."),
    MemoryError("Unable to allocate 1.5 TiB for an array with shape (100000, 100000, 42) and data type float32"),
    "cuda"])
def test_running_out_of_memory_is_one_line(tmp_path, monkeypatch, error):
    """synthesize with image.cut_size=100000 (a typo) ended in a torch allocator traceback, exit 1 (a trial):
    out of memory, on the CPU or a GPU, is one line naming what to lower, exit 2 (not 75: a scheduler retrying
    the same settings would meet it again)."""
    import torch

    import embedcache.extract as extraction

    if error == "cuda":
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                       "of 79.19 GiB of which 3.1 GiB is free.")

    def out_of_memory(*a, **k):
        raise error

    monkeypatch.setattr(extraction, "extract", out_of_memory)
    res = CliRunner().invoke(main, ["extract", "--config", "demo", "--out", str(tmp_path / "x.zarr")])
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: out of memory") and "batch_size" in last and "rerun" in last, res.output
    assert "Traceback" not in res.output
    monkeypatch.setattr(extraction, "extract", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    assert CliRunner().invoke(main, ["extract", "--config", "demo", "--out", str(tmp_path / "x.zarr")]).exit_code == 1


def test_a_path_through_a_file_is_one_line(cli_store, tmp_path):
    """`--out afile/x` with afile a plain file: a FileExistsError or NotADirectoryError traceback; and
    evaluate found out only after scoring everything."""
    (tmp_path / "afile").write_text("")
    bad = str(tmp_path / "afile" / "run")
    for args in (["train", "--store", str(cli_store), "--recipe", "ce", "--student", "test_resnet", "--out", bad,
                  "--set", "steps=1"],
                 ["extract", "--config", "configs/extract/demo.yaml", "--out", bad + ".zarr", "--no-progress",
                  "--set", "dataset.per_class=1"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
        assert res.output.startswith("error: --out ") and "afile is a file, where the path needs a folder" in res.output
    for args in (["evaluate", "--store", str(cli_store), "--out", bad + ".parquet"],
                 ["report", str(_a_sweep_folder(tmp_path)), "--out", bad], ["sweep", "demo", "--out", bad]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and "afile is a file, where the path needs a folder" in res.output, res.output
        assert "top-1" not in res.output  # refused before any scoring


def _a_sweep_folder(tmp_path):
    (tmp_path / "sw" / "results").mkdir(parents=True, exist_ok=True)
    return tmp_path / "sw"


def test_report_checks_the_folder_it_writes_to(tmp_path, monkeypatch):
    """Without --out, report SWEEP_DIR writes SWEEP_DIR/report, and it checked ./report (a review)."""
    import embedcache.cli.evaluation as evaluation

    checked = []

    monkeypatch.setattr(evaluation, "require_writable", lambda path, option="--out": checked.append(path))
    CliRunner().invoke(main, ["report", str(_a_sweep_folder(tmp_path))])
    assert checked == [str(tmp_path / "sw" / "report")]


def test_an_out_path_inside_a_store_is_refused(cli_store, tmp_path):
    """evaluate --out STORE/results.parquet wrote among the store's arrays (verify still said intact), and
    a store inside a store was accepted (a trial)."""
    for args in (["evaluate", "--store", str(cli_store), "--out", f"{cli_store}/results.parquet"],
                 ["extract", "--config", "demo", "--out", f"{cli_store}/inner.zarr", "--dry-run"],
                 ["report", str(_a_sweep_folder(tmp_path)), "--out", f"{cli_store}/image/report"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and f"is inside the Zarr store {cli_store}; write it outside the store" in res.output, \
            (args, res.output)


def test_a_dry_run_checks_where_the_store_would_go_without_writing(tmp_path, monkeypatch):
    """extract --dry-run said "N views to encode", exit 0, for an --out under a file, which the real run then
    refused (a trial): checked by permissions, with no probe file made."""
    (tmp_path / "afile").write_text("x")
    res = CliRunner().invoke(main, ["extract", "--config", "demo", "--out", str(tmp_path / "afile" / "s.zarr"),
                                    "--dry-run"])
    assert res.exit_code == 2 and f"{tmp_path / 'afile'} is a file, where the path needs a folder" in res.output, \
        res.output
    before, touched = sorted(p.name for p in tmp_path.iterdir()), []
    real_touch = Path.touch
    monkeypatch.setattr(Path, "touch", lambda self, *a, **k: touched.append(self) or real_touch(self, *a, **k))
    res = CliRunner().invoke(main, ["extract", "--config", "demo", "--set", "dataset.per_class=1", "--out",
                                    str(tmp_path / "new" / "s.zarr"), "--dry-run"])
    assert res.exit_code == 0 and "views to encode" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not touched  # nothing written, not even a probe


def test_an_out_path_that_is_a_store_is_refused(cli_store, tmp_path):
    """train, sweep and report with --out naming a store wrote their runs, tables and report.md among its
    arrays, exit 0, and verify still said the store was intact (a trial); a path inside one was refused."""
    before = sorted(p.name for p in cli_store.iterdir())
    for args in (["train", "--store", str(cli_store), "--out", str(cli_store), "--set", "steps=1", "--set", "batch_size=4"],
                 ["sweep", "demo", "--out", str(cli_store)],
                 ["report", str(_a_sweep_folder(tmp_path)), "--out", str(cli_store)]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and f"--out {cli_store} is a Zarr store; give another --out" in res.output, \
            (args, res.output)
    assert sorted(p.name for p in cli_store.iterdir()) == before


def test_an_out_path_that_cannot_be_written_is_one_line_before_the_work(cli_store, tmp_path):
    """--out under /proc (a file system that takes no new file, which root's access() lets by) was a
    FileNotFoundError traceback from train and evaluate and, for extract, "delete it and rerun the command
    that made it" once the teacher had loaded (a trial)."""
    bad = "/proc/embedcache-test/run"
    for args in (["train", "--store", str(cli_store), "--recipe", "ce", "--student", "test_resnet", "--out", bad],
                 ["evaluate", "--store", str(cli_store), "--out", bad + ".parquet"],
                 ["report", str(_a_sweep_folder(tmp_path)), "--out", bad],
                 ["extract", "--config", "demo", "--out", bad + ".zarr", "--no-progress"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and res.output.strip().count("\n") == 0, (args, res.output)
        assert res.output.startswith(f"error: --out {bad}") and "/proc is not writable (" in res.output, res.output
        assert "choose another --out" in res.output


def test_open_store_frames_and_neighbours(cli_store, tiny_teacher):
    s = embedcache.open_store(str(cli_store))
    df = s.frame(embeddings=True)
    assert len(df) == 36 and df["emb"].iloc[0].shape == (s.layout["dim"],)
    # nearest classes of an image embedding: brute force over the class embeddings
    e = s.image_emb(0).astype(np.float32)
    ref = np.argsort(-(s.class_emb("name") @ e[5]))[:3]
    assert s.nearest_classes(5, k=3)["label"].tolist() == ref.tolist()
    # a text query is embedded by the store's own teacher, reloaded from the manifest
    hits = s.nearest_images("a photo of a circle.", k=4)
    q = tiny_teacher.encode_text(["a photo of a circle."]).numpy()[0]
    assert hits["index"].tolist() == np.argsort(-(e @ q), kind="stable")[:4].tolist()
    assert hits["score"].is_monotonic_decreasing
    with pytest.raises(embedcache.EmbedcacheError, match="no text source 'colours'"):
        s.class_emb("colours")
    with pytest.raises(embedcache.EmbedcacheError, match="dimension 3"):
        s.nearest_images(np.ones(3))
    for k in (-1, 0, 2.5, True):  # -1 gave all classes but the last, 0 an empty frame, 2.5 a TypeError
        for search in (s.nearest_classes, s.nearest_images):
            with pytest.raises(embedcache.EmbedcacheError, match=f"k={k!r}: give the number of results"):
                search(5, k=k)


def test_editing_a_readers_tables_in_place_changes_nothing_it_answers(cli_store):
    """s.meta and s.text_table were the reader's own cached frames: a sort in place had frame(), nearest_images
    and text() pair rows with other images' embeddings and prompts, without a word (a trial). They are copies."""
    s = embedcache.open_store(str(cli_store))
    raw = s.image_emb(0).astype(np.float32)
    want, prompts = s.frame(embeddings=True), s.text("name")
    s.meta.sort_values("path", ascending=False, inplace=True)
    s.meta.drop(index=[0, 1], inplace=True)
    s.text_table.sort_values("prompt", ascending=False, inplace=True)
    got = s.frame(embeddings=True)
    assert got.drop(columns="emb").equals(want.drop(columns="emb")) and len(got) == 36
    assert all(np.array_equal(e, raw[i]) for i, e in zip(got["index"], got["emb"]))
    assert s.nearest_images(raw[7], k=1)["index"].tolist() == [7]
    assert s.text("name").equals(prompts) and (s.prompt_emb("name") @ s.class_emb("name").T).argmax(1).tolist() \
        == prompts["label"].tolist()
    classes = s.classes  # the manifest too: sorting its class list in place changed classes (a review)
    s.manifest["dataset"]["classes"].sort(reverse=True)
    assert s.classes == classes and s.nearest_classes(7, k=1)["class_name"].tolist() == \
        [classes[int(np.argmax(s.class_emb("name") @ raw[7]))]]
    # an image index as the query of nearest_images too (it said "query has dimension 1"): itself first
    assert s.nearest_images(7, k=1)["index"].tolist() == [7]


@pytest.mark.parametrize("call,said", [
    (lambda s: s.nearest_classes(36), "image 36 is not one of .*36 images"),
    (lambda s: s.nearest_classes(-1), "image -1 is not one of"),  # answered for image 35
    (lambda s: s.frame(embeddings=True, view=s.views), "view .* is not one of"),
    (lambda s: s.image_emb(-1), "view -1 is not one of"),
])
def test_an_image_or_view_index_out_of_range_is_one_line(cli_store, call, said):
    with embedcache.open_store(str(cli_store)) as s, pytest.raises(embedcache.EmbedcacheError, match=said):
        call(s)


def test_an_unfinished_store_refuses_its_text_embeddings(make_cfg, tiny_teacher):
    """Read with require_complete=False, an unfinished store's class and prompt embeddings were zeros
    (written as it finishes): nearest_classes ranked every class at score 0.0 (a trial)."""
    from embedcache.extract import extract
    from conftest import quiet

    cfg = make_cfg("unfinished.zarr")

    def stop(block):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cfg, teacher=tiny_teacher, on_block_done=stop, log=quiet)
    with embedcache.open_store(cfg.out, require_complete=False) as s:
        assert s.summary()  # what inspect prints still reads
        for call in (lambda: s.class_emb("name"), lambda: s.prompt_emb("name"), lambda: s.nearest_classes(np.ones(s.dim))):
            with pytest.raises(embedcache.EmbedcacheError, match="text/name/.* yet: it is not finished; rerun"):
                call()


def test_inspect_names_the_teachers_weights_in_words():
    """A local-dir teacher printed a Python dict of file hashes, and a teacher of random weights (no
    teacher.pretrained) read like any other (a trial)."""
    from embedcache.api import teacher_line

    local = {"name": "open_clip", "model": "local-dir", "source": {"model": "local-dir:/w/tiny"},
             "pretrained": {"open_clip_config.json": "876d0a1b2c3d4e5f", "open_clip_model.safetensors": "abcdef0123456789"}}
    assert teacher_line(local) == "open_clip local-dir:/w/tiny (weights open_clip_model.safetensors abcdef012345)"
    random = {"name": "open_clip", "model": "tiny", "pretrained": None}
    assert teacher_line(random) == "open_clip tiny (random weights: no teacher.pretrained)"
    assert teacher_line({"name": "open_clip", "model": "ViT-B-32", "pretrained": "openai"}) == "open_clip ViT-B-32 openai"
    assert teacher_line({"name": "conse", "classifier": "efficientnet-lite0"}) == "conse efficientnet-lite0"


def test_the_calls_line_says_a_setting_a_later_call_did_not_give_as_not_set():
    """A resume without a setting the first call gave printed ``teacher.limits.rate=None``, a Python
    value where the line speaks of settings."""
    from embedcache.api import _calls_line

    calls = [{"began": "t0", "device": "cpu", "threads": 2, "settings": {}, "versions": {}},
             {"began": "t1", "device": "cpu", "threads": 2, "settings": {"a.b": None, "c": 3}, "versions": {}}]
    line = _calls_line(calls)
    assert "None" not in line and "a.b not set" in line and "c=3" in line


def test_a_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    """Ctrl-C in a command's first half second (pandas and torch loading) was a traceback (a trial)."""
    import embedcache.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_group", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.entry()
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted while starting; nothing was done\n"


def test_the_package_and_its_command_line_import_light():
    """`import embedcache.cli` loads no pandas and no torch: what the console script runs before it can
    take a Ctrl-C as one line."""
    import subprocess
    import sys

    code = "import sys, embedcache.cli; print(sorted(m for m in ('pandas', 'torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_bare_import_still_reaches_the_submodules():
    """`import embedcache; embedcache.store` raised AttributeError once the package's names loaded lazily (a
    review)."""
    import subprocess
    import sys

    code = "import embedcache; print(embedcache.store.Store.__name__, hasattr(embedcache, 'nosuch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["Store", "False"]
