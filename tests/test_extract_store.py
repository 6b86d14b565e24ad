"""Extraction into stores: round trips, resume, shards, cache keys, failures, bad input."""
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import embedcache
from embedcache.config import replace
from embedcache.errors import ConfigError, StoreError, StoreMismatchError
from embedcache.extract import extract, shard_blocks
from embedcache.store import Store
from embedcache.views import normalize, render_views, to_uint8

from conftest import png_folder, quiet, save_tiny_clip

ARRAYS = ["image/emb", "image/view_params", "image/pixels", "image/status"]


def _arrays(path):
    st = Store(path)
    out = {a: st.b.read(a) for a in ARRAYS}
    for src in st.manifest["text"]["sources"]:
        out[f"text/{src}/class_emb"] = st.b.read(f"text/{src}/class_emb")
    st.close()
    return out


@pytest.mark.parametrize("backend_suffix", ["zarr", "h5"])
def test_round_trip_layout_and_contents(make_cfg, tiny_teacher, backend_suffix):
    cfg = make_cfg(f"s.{backend_suffix}")
    res = extract(cfg, teacher=tiny_teacher, log=quiet)
    assert res.complete and res.images == 30 and res.failed == 0
    assert 0 < res.image_seconds < res.seconds  # the image pass, apart from the call's once-per-store work (bench)
    with embedcache.open_store(cfg.out) as s:
        n, v, d = 30, 3, tiny_teacher.embed_dim
        emb = s.image_emb()
        assert emb.shape == (n, v, d) and emb.dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=-1), 1.0, atol=2e-3)
        assert s.pixels().shape == (n, 48, 48, 3) and s.pixels().dtype == np.uint8
        assert s.view_params().shape == (n, v, 5)
        assert list(s.meta.columns) == ["index", "path", "class_name", "label", "domain", "split", "status", "reason"]
        assert (s.meta.status == "ok").all() and s.classes == ["circle", "square", "triangle"]
        assert s.class_emb("templates").shape == (3, d) and len(s.text("templates")) == 3 * 7
        m = s.manifest
        assert m["complete"] and m["teacher"]["embed_dim"] == d and m["dataset"]["n"] == n
        assert m["views"]["count"] == 3 and m["canvas"]["size"] == 48 and "torch" in m["versions"]
        # chunks span whole rows and never split the embedding axis: every array's, as written (DESIGN.md)
        assert s._store.b.chunks("image/emb")[1:] == (v, d)
        for name in s._store.layout["arrays"]:
            assert s._store.b.chunks(name)[1:] == s._store.b.shape(name)[1:], name
        # the teacher re-encoding the stored view-0 inputs gives the stored embeddings
        x = normalize(render_views(torch.from_numpy(s.pixels()[:4].copy()), torch.from_numpy(s.view_params()[:4].copy()),
                                   tiny_teacher.input_size, tiny_teacher.interpolation), tiny_teacher.mean, tiny_teacher.std)
        again = tiny_teacher.encode_image(x.flatten(0, 1)).view(4, v, d).numpy()
        np.testing.assert_allclose(again, emb[:4].astype(np.float32), atol=2e-3)


def test_zarr_and_hdf5_hold_the_same_arrays(make_cfg, tiny_teacher):
    a, b = make_cfg("a.zarr"), make_cfg("b.h5")
    extract(a, teacher=tiny_teacher, log=quiet)
    extract(b, teacher=tiny_teacher, log=quiet)
    za, hb = _arrays(a.out), _arrays(b.out)
    for k in za:
        assert np.array_equal(za[k], hb[k]), k
    with embedcache.open_store(a.out) as sa, embedcache.open_store(b.out) as sb:
        assert sa.key == sb.key  # the path and the backend are no part of what the store holds


def test_views_rebuilt_from_store_equal_teacher_input(make_cfg, tiny_teacher):
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tiny_teacher, name)

        def encode_pixels(self, x):
            seen.append(x.clone())
            return tiny_teacher.encode_pixels(x)

        def embed_views(self, x):  # the path extraction takes when the teacher has it
            seen.append(x.clone())
            return tiny_teacher.embed_views(x)

    cfg = make_cfg("spy.zarr", "views.count=4")
    extract(cfg, teacher=Spy(), log=quiet)
    fed = torch.cat(seen).view(-1, 4, 3, tiny_teacher.input_size, tiny_teacher.input_size)
    with embedcache.open_store(cfg.out) as s:
        rebuilt = render_views(torch.from_numpy(s.pixels().copy()), torch.from_numpy(s.view_params().copy()),
                               tiny_teacher.input_size, tiny_teacher.interpolation)
    assert fed.dtype == torch.uint8 and torch.equal(to_uint8(rebuilt), fed)  # the teacher sees 8-bit views
    assert not torch.equal(fed[:, 0], fed[:, 1])  # the views really differ


class _NoDecode:
    """The reader an extraction would use, refusing to decode: a local teacher's dry run only counts rows."""

    def __init__(self, cfg, teacher):
        from embedcache.datasets import build_dataset
        from embedcache.extract import make_reader
        from embedcache.extract.manifest import PIPELINE

        self.pipeline = getattr(make_reader(cfg, build_dataset(cfg.dataset), teacher), "pipeline", PIPELINE)

    def batches(self, batches):
        raise AssertionError("a dry run with a local teacher decoded images")


def test_a_dry_run_of_a_resume_says_what_the_resume_would(make_cfg, tiny_teacher):
    """A dry run before resuming with another batch size said nothing of it; the resume then said the
    blocks may differ (and a paid teacher's cut-off requests would not be replayed free): a trial."""
    cfg = make_cfg("resumed.zarr")

    def stop(block):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cfg, teacher=tiny_teacher, on_block_done=stop, log=quiet)
    said = []
    extract(replace(cfg, batch_size=3), teacher=tiny_teacher, log=said.append, dry_run=True)
    assert [s for s in said if s.startswith("resuming with batch_size=3; the store began with 4")], said


def test_a_resume_says_it_resumes(make_cfg, tiny_teacher):
    """A rerun after a stop printed the same lines as a fresh run (a trial): training says "resuming ...
    from step", a sweep "already finished"; extraction now says how many blocks it keeps."""
    cfg = make_cfg("resumed.zarr")

    def stop(block):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cfg, teacher=tiny_teacher, on_block_done=stop, log=quiet)
    with Store(cfg.out) as st:
        kept, blocks, rows = int(st.blocks_done().sum()), st.num_blocks, int(st.layout["block_rows"])
    said = []
    assert extract(cfg, teacher=tiny_teacher, log=said.append).complete
    assert said[0] == (f"resuming {cfg.out}: {kept} of {blocks} blocks ({kept * rows} images) already done and checked; "
                       f"encoding the other {blocks - kept}"), said
    said.clear()
    extract(cfg, teacher=tiny_teacher, log=said.append)
    assert not [s for s in said if s.startswith("resuming")], said


def test_crop_and_colour_settings_with_one_view_are_said_not_read(make_cfg, tiny_teacher):
    """views.count=1 with views.scale or colour settings was taken without a word: its one view is the whole
    canvas (a review). Said for a new store; the settings stay in the key, as in stores made before."""
    said = []
    cfg = make_cfg("one.zarr", "views.count=1", "views.scale=[0.5,1.0]", "views.color_jitter=0.3", "views.flip=false")
    extract(cfg, teacher=tiny_teacher, log=said.append)
    assert ("note: views.scale=[0.5, 1.0], views.flip=false, views.color_jitter=0.3 are not read with views.count=1 "
            "(its one view is the whole canvas), though part of the store's key") in said, said
    with embedcache.open_store(cfg.out) as st:
        assert (st.store.read("image/view_params")[:, 0, 2:4] == 48).all()  # the whole 48 px canvas, no jitter
        assert st.view_policy() == "one view: the whole canvas"  # `inspect` said crops and jitter
    for again in (cfg, make_cfg("plain.zarr", "views.count=1"), make_cfg("two.zarr", "views.count=2", "views.scale=[0.5,1.0]")):
        said = []
        extract(again, teacher=tiny_teacher, log=said.append)
        assert not [s for s in said if "not read with views.count=1" in s], said


def test_crop_settings_no_crop_of_which_fits_are_refused_and_most_falling_back_is_said(make_cfg, tiny_teacher, tmp_path):
    """views.ratio=[5,10] (or a scale of no pixel) fits no crop in the canvas, so every augmented view was one
    and the same fallback crop, exit 0 (a fuzz): refused before anything is written, the dry run too."""
    for bad in (["views.ratio=[5,10]"], ["views.scale=[1e-9,1e-9]"]):
        cfg = make_cfg("tall.zarr", *bad)
        for dry in (False, True):
            with pytest.raises(ConfigError, match=r"fits no crop in a 48 px canvas \(none in 256 draws\): every augmented view would be the "
                                                  r"same centre crop \(torchvision's fallback\); widen views.scale"):
                extract(cfg, teacher=tiny_teacher, log=quiet, dry_run=dry)
        assert not Path(cfg.out).exists()
    said = []
    extract(make_cfg("most.zarr", "views.scale=[0.8,1.0]", "views.ratio=[1.1,3.0]"), teacher=tiny_teacher,
            log=said.append)
    assert [s for s in said if "of the augmented views fit no crop in torchvision's 10 tries" in s], said


def test_a_store_smaller_than_one_block_reruns_without_a_block_note(make_cfg, tiny_teacher):
    """30 images at the default block_rows=256 make one block of 30 rows: rerunning the same command said
    the store "keeps the blocks of 30 rows it was made with; block_rows=256 applies to a new store",
    about a setting that had not changed (a trial). Any block_rows of at least its rows is the same."""
    cfg = make_cfg("small.zarr", "block_rows=256")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    for rows in (256, 30, 1000):
        said = []
        extract(replace(cfg, block_rows=rows), teacher=tiny_teacher, log=said.append)
        assert not [s for s in said if "keeps the blocks" in s], (rows, said)
    said = []
    extract(replace(cfg, block_rows=16), teacher=tiny_teacher, log=said.append)
    assert f"note: {cfg.out} keeps the blocks of 30 rows it was made with; block_rows=16 applies to a new store" in said


@pytest.mark.parametrize("suffix", ["zarr", "h5"])
def test_manifest_lists_each_call_and_how_it_differed(make_cfg, tiny_teacher, monkeypatch, suffix):
    """A store resumed with another batch size says so in its manifest, not only in a log line; a
    call killed with -9 (its end never written) is listed with the blocks it finished."""
    from click.testing import CliRunner

    from embedcache.cli import main
    from embedcache.extract.history import CallRecord

    cfg = make_cfg(f"calls.{suffix}")
    ends = []

    def killed(block):
        ends.append(block)
        if len(ends) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as mp:  # as kill -9 leaves it: no end written
        mp.setattr(CallRecord, "close", lambda self, finished=False: None)
        with pytest.raises(KeyboardInterrupt):
            extract(cfg, teacher=tiny_teacher, on_block_done=killed, log=quiet)
    said = []
    res = extract(replace(cfg, batch_size=3, block_rows=16), teacher=tiny_teacher, log=said.append)
    # another block_rows is ignored by a store made with its blocks: said, and not recorded as used (a trial)
    assert f"note: {cfg.out} keeps the blocks of 8 rows it was made with; block_rows=16 applies to a new store" in said
    st = Store(cfg.out)
    first, second = st.manifest["calls"]
    assert st.manifest["config"]["batch_size"] == 4
    assert (first["blocks"], first["ended"], first["finished"], first["settings"]) == (2, None, False, {})
    assert second["blocks"] == st.num_blocks - 2 == res.images // 8 + (res.images % 8 > 0) and second["finished"]
    assert second["settings"] == {"batch_size": 3} and second["ended"] >= second["began"] >= first["began"]
    assert first["device"] == second["device"] == "cpu" and first["versions"] == second["versions"] == {}
    st.close()
    seen = CliRunner().invoke(main, ["inspect", cfg.out])
    assert seen.exit_code == 0 and "2 on cpu; " in seen.output and ": batch_size=3" in seen.output, seen.output
    assert extract(cfg, teacher=tiny_teacher, log=quiet).skipped  # an intact store: no call recorded
    assert len(Store(cfg.out).call_history()) == 2


def test_a_call_whose_finish_failed_is_not_recorded_as_finishing(make_cfg, tiny_teacher, monkeypatch):
    """The call's entry said finished before the store's finish ran: a finish that then failed (a full
    disk) left a call 'finished' in the store's history though the store never completed (a review)."""
    from embedcache.errors import DiskFullError

    cfg = make_cfg("unfinished.zarr", "dataset.per_class=1")
    real = Store.finish

    def full(self, **fields):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Store, "finish", full)
    with pytest.raises(DiskFullError):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    with Store(cfg.out) as st:
        (entry,) = st.call_history()
        assert not st.complete and not entry["finished"] and entry["blocks"] == st.num_blocks
    monkeypatch.setattr(Store, "finish", real)
    assert extract(cfg, teacher=tiny_teacher, log=quiet).complete
    with Store(cfg.out) as st:
        assert [c["finished"] for c in st.manifest["calls"]] == [False, True]
        assert [e["finished"] for e in st.call_history()] == [False, True]


@pytest.mark.parametrize("suffix", ["zarr", "h5"])
def test_resume_after_interruption_is_byte_identical(make_cfg, tiny_teacher, suffix):
    full = make_cfg(f"full.{suffix}")
    extract(full, teacher=tiny_teacher, log=quiet)
    cut = make_cfg(f"cut.{suffix}")
    calls = []

    def boom(block):
        calls.append(block)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cut, teacher=tiny_teacher, on_block_done=boom, log=quiet)
    st = Store(cut.out)
    assert not st.complete and 2 <= st.blocks_done().sum() < st.layout["num_blocks"]
    st.close()
    with pytest.raises(StoreError, match="incomplete .* rerun the same"):
        embedcache.open_store(cut.out)
    from click.testing import CliRunner

    from embedcache.cli import main

    seen = CliRunner().invoke(main, ["verify", cut.out, "--no-progress"])  # intact, and says it is unfinished
    assert seen.exit_code == 0 and "intact; incomplete (" in seen.output and (  # as inspect says it: one may be
        "if its extract command is no longer running, rerun it to finish") in seen.output  # writing it now (a trial)
    assert "0 files" not in seen.output, seen.output  # its tables come when it finishes (a trial)
    seen = CliRunner().invoke(main, ["inspect", cut.out, "--json"])  # how far it got, from the manifest
    assert seen.exit_code == 0, seen.output
    part = json.loads(seen.output)
    assert part["complete"] is False
    assert part["progress"] == {"blocks_written": 2, "blocks": st.layout["num_blocks"], "images_written": 16}
    assert (part["images"], part["views"], part["failed"], part["domains"]) == (30, 3, 0, ["outline", "solid"])
    # the keys of a finished store's (a trial: calls and text sources were missing here), less its counts
    assert part["text_sources"] == list(cut.text.sources) and len(part["calls"]) == 1 and part["calls"][0]["blocks"] == 2
    assert part["teacher"] == st.manifest["teacher"]
    seen = CliRunner().invoke(main, ["inspect", cut.out])  # in words
    assert f"no: 2 of {st.layout['num_blocks']} blocks written (16 of 30 images); if its `embedcache extract`" in seen.output
    assert "0 so far" in seen.output and "outline, solid" in seen.output
    said = []

    def stop_when_said(line):  # resumed with another batch size: said (with the one to keep) before any block
        said.append(line)
        if "the store began" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(replace(cut, batch_size=3), teacher=tiny_teacher, log=stop_when_said)
    assert "the store began with 4" in said[-1] and "--set batch_size=4" in said[-1], said
    import embedcache.extract as extraction
    from embedcache.extract.manifest import build_manifest

    assert st.manifest["device"] == "cpu" and "torchvision" in st.manifest["versions"]
    with pytest.MonkeyPatch.context() as mp:  # resumed on a GPU: said likewise (its kernels round otherwise)
        mp.setattr(extraction, "build_manifest", lambda *a, **k: {**build_manifest(*a, **k), "device": "cuda (NVIDIA H200)"})
        with pytest.raises(KeyboardInterrupt):
            extract(cut, teacher=tiny_teacher, log=stop_when_said)
    assert said[-1] == ("resuming on cuda (NVIDIA H200); the store began on cpu: blocks encoded now may differ from theirs "
                        "by float rounding (another device's kernels); resuming on cpu keeps the store byte-identical"), said
    began = st.manifest["threads"]
    assert began == torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:  # on the CPU with another thread count: float reductions split otherwise
        mp.setattr(extraction, "build_manifest", lambda *a, **k: {**build_manifest(*a, **k), "threads": began + 3})
        with pytest.raises(KeyboardInterrupt):
            extract(cut, teacher=tiny_teacher, log=stop_when_said)
    assert said[-1] == (f"resuming with {began + 3} CPU threads; the store began with {began}: blocks encoded now may "
                        f"differ from theirs by float rounding; OMP_NUM_THREADS={began} keeps the store byte-identical"), said
    dry = extract(cut, teacher=tiny_teacher, log=quiet, dry_run=True, reader=_NoDecode(cut, tiny_teacher))
    res = extract(cut, teacher=tiny_teacher, log=quiet)
    assert res.complete and 0 < res.images < 30  # only the unfinished blocks were encoded
    assert (dry.rows, dry.views, dry.cost) == (res.images, 3 * res.images, {})  # counted, not decoded
    done = extract(cut, teacher=tiny_teacher, log=quiet, dry_run=True, reader=_NoDecode(cut, tiny_teacher))
    assert done.complete and (done.rows, done.views, done.cost) == (0, 0, {})  # "0 images x views" said nothing
    seen = CliRunner().invoke(main, ["inspect", cut.out, "--json"])
    assert seen.exit_code == 0 and json.loads(seen.output)["complete"] is True
    a, b = _arrays(full.out), _arrays(cut.out)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert extract(cut, teacher=tiny_teacher, log=quiet).skipped  # a complete store is a no-op


def test_a_store_begun_by_a_version_with_other_numbers_says_so_on_resume(make_cfg, tiny_teacher, monkeypatch):
    """Fixes that changed a store's numbers without changing its key (STORE_NUMBER_CHANGES): a store begun
    before one and resumed after would mix blocks of both silently; said, naming the fixes that touch it."""
    import embedcache.extract as extraction
    from embedcache.extract.manifest import build_manifest
    from embedcache.versions import STORE_NUMBER_CHANGES, STORE_NUMBERS, store_numbers_between

    def older(*a, **k):  # a version from before store numbers were recorded
        m = build_manifest(*a, **k)
        return {**m, "versions": {k: v for k, v in m["versions"].items() if k != "embedcache_store_numbers"}}

    cut, calls = make_cfg("cut.zarr"), []

    def stop(block):
        calls.append(block)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(extraction, "build_manifest", older)
    with pytest.raises(KeyboardInterrupt):
        extract(cut, teacher=tiny_teacher, on_block_done=stop, log=quiet)
    monkeypatch.setattr(extraction, "build_manifest", build_manifest)
    said = []
    res = extract(cut, teacher=tiny_teacher, log=said.append)
    assert res.complete
    (line,) = [s for s in said if "numbers" in s]
    assert line.startswith(f"resuming a store begun by an embedcache whose numbers differ from this one's (store "
                           f"numbers unsaid (before 2026-12-07); this version {STORE_NUMBERS}): a 16-bit grey PNG's "
                           "transparent value decodes white (was black). Its blocks"), line
    assert "IEEE" not in line  # a CPU store: the GPU fp32 change does not touch it
    with Store(cut.out) as st:  # the call that resumed it is listed with its store numbers
        assert [c["versions"] for c in st.manifest["calls"]] == [{}, {"embedcache_store_numbers": str(STORE_NUMBERS)}]
    same = {"versions": {"embedcache_store_numbers": str(STORE_NUMBERS)}}
    assert store_numbers_between(same, same) == []
    gpu = {"device": "cuda (NVIDIA H100)", "teacher": {"precision": "fp32"}, "versions": {}}
    assert len(store_numbers_between(gpu, same)) == 2 == STORE_NUMBERS - 1  # not the crop fallback: ratio holds 1
    tall = {"views": {"ratio": [5, 10]}, "versions": {"embedcache_store_numbers": "2"}}
    assert store_numbers_between(tall, same) == [STORE_NUMBER_CHANGES[2][0]]
    assert store_numbers_between({**gpu, "versions": {"embedcache_store_numbers": "1"}}, same) == [
        "an fp32 teacher on a GPU embeds in IEEE float32 (its convolutions were TF32)"]
    newer = {"versions": {"embedcache_store_numbers": str(STORE_NUMBERS + 1)}}  # begun by a later version: said too
    assert store_numbers_between(newer, same) == ["1 change(s) made after this version"]


def test_two_shards_fill_one_store_like_one_worker(make_cfg, tiny_teacher):
    one = make_cfg("one.zarr")
    extract(one, teacher=tiny_teacher, log=quiet)
    two = make_cfg("two.zarr")
    r0 = extract(replace(two, shard=0, num_shards=2), teacher=tiny_teacher, log=quiet)
    assert not r0.complete
    r1 = extract(replace(two, shard=1, num_shards=2), teacher=tiny_teacher, log=quiet)
    assert r1.complete and r0.images + r1.images == 30
    a, b = _arrays(one.out), _arrays(two.out)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_shard_ranges_cover_everything_once():
    for nb in (1, 5, 17):
        for n in (1, 2, 3, 8):
            got = [b for i in range(n) for b in shard_blocks(nb, i, n)]
            assert got == list(range(nb))


def test_torchrun_env_picks_the_shard(make_cfg, tiny_teacher, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = extract(make_cfg("env.zarr"), teacher=tiny_teacher, log=quiet)
    st = Store(res.path)
    done = st.blocks_done()
    assert not done[0] and done[-1] and not res.complete
    monkeypatch.setenv("RANK", "a")  # not a rank: one line, not a ValueError
    with pytest.raises(ConfigError, match=r"RANK='a' and WORLD_SIZE='2' \(torchrun's\) must be whole numbers"):
        extract(make_cfg("env2.zarr"), teacher=tiny_teacher, log=quiet)


def test_cache_key_follows_teacher_not_batch_size(make_cfg, tiny_teacher, tmp_path):
    base = extract(make_cfg("k1.zarr"), teacher=tiny_teacher, log=quiet).key
    same = extract(make_cfg("k2.zarr", "batch_size=7", "num_workers=1", "block_rows=5"), teacher=tiny_teacher, log=quiet).key
    assert same == base
    views = extract(make_cfg("k3.zarr", "views.count=2"), teacher=tiny_teacher, log=quiet).key
    other_dir = save_tiny_clip(tmp_path / "other_clip", seed=1)
    other = extract(make_cfg("k4.zarr", f"teacher.model=local-dir:{other_dir}"), log=quiet).key
    assert len({base, views, other}) == 3


def test_store_from_another_teacher_is_refused(make_cfg, tiny_teacher, tmp_path):
    cfg = make_cfg("mine.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    other_dir = save_tiny_clip(tmp_path / "other_clip", seed=2)
    with pytest.raises(StoreMismatchError, match=r"made from other inputs \(its teacher differs \(store: teacher.model='local-dir:.*'; "
                                                 r"this call: teacher.model='local-dir:.*other_clip'\); .* use another --out") as err:
        extract(replace(cfg, teacher=replace(cfg.teacher, model=f"local-dir:{other_dir}")), log=quiet)
    assert f"teacher open_clip/local-dir:{Path(cfg.teacher.model[10:]).resolve()})" in str(err.value)  # its folder, as
    # teacher.model takes it, not the key's bare "local-dir"
    from embedcache.store.differences import differing_parts

    def made(url, parts):  # a remote teacher's store: another model now behind a moved url
        return {"key_parts": parts, "config": {"teacher": {"name": "remote", "url": url, "max_queries": 5}}}

    said = differing_parts(made("http://a:1", {"teacher": "x"}), made("http://b:2", {"teacher": "y"}))
    assert said == "its teacher differs"  # not the url's move, which a store may be resumed with (a trial)
    # the teacher's input size changes its preprocessing part: that setting is named (it was not: a trial)
    sized = [{"key_parts": {"preprocessing": p}, "config": {"teacher": {"name": "remote", "input_size": n}}}
             for p, n in (("x", 224), ("y", 112))]
    assert differing_parts(*sized) == ("its preprocessing differs (store: teacher.input_size=224; this call: "
                                       "teacher.input_size=112)")
    # plural, alone too; and the setting to restore named (a trial)
    with pytest.raises(StoreMismatchError, match=r"\(its views differ \(store: views.count=3; this call: views.count=2\); "):
        extract(make_cfg("mine.zarr", "views.count=2"), teacher=tiny_teacher, log=quiet)
    with pytest.raises(StoreMismatchError, match=r"\(its views differ \(.*\); .*use another --out"):  # a dry run too
        extract(make_cfg("mine.zarr", "views.count=2"), teacher=tiny_teacher, log=quiet, dry_run=True)
    with pytest.raises(StoreMismatchError, match=r"\(its dataset and views differ \(store: dataset.max_per_class=None, "
                                                 r"views.count=3; this call: dataset.max_per_class=2, views.count=2\); "):
        extract(make_cfg("mine.zarr", "dataset.max_per_class=2", "views.count=2"), teacher=tiny_teacher, log=quiet)
    key = embedcache.open_store(cfg.out).key
    with pytest.raises(StoreMismatchError):
        embedcache.open_store(cfg.out, expect_key="0" * 16)
    assert embedcache.open_store(cfg.out, expect_key=key).key == key


def test_corrupt_and_missing_files_are_recorded_and_skipped(tmp_path, make_cfg, tiny_teacher):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((24, 24, 3), 40 * k, np.uint8)).save(root / c / f"{k}.jpg")
    (root / "dog" / "1.jpg").write_bytes(b"this is not a jpeg")
    res = extract(make_cfg("bad.zarr", "dataset.name=folder", f"dataset.path={root}"), teacher=tiny_teacher, log=quiet)
    assert res.complete and res.failed == 1
    with embedcache.open_store(res.path) as s:
        bad = s.meta[s.meta.status == "failed"]
        assert bad.path.tolist() == ["dog/1.jpg"] and "UnidentifiedImageError" in bad.reason.iloc[0]
        # the file named as the dataset names it: the absolute path made meta.parquet depend on where it sat
        assert "'dog/1.jpg'" in bad.reason.iloc[0] and str(root) not in bad.reason.iloc[0]
        assert np.isnan(s.image_emb()[bad.index[0]].astype(np.float32)).all()  # no embedding pretends to exist
        assert s.summary()["failed"] == 1


def test_a_dataset_whose_every_image_fails_is_refused_not_written_complete(tmp_path, make_cfg, tiny_teacher):
    """A CSV whose paths were written relative to another folder gave a store of nothing but failures,
    'complete' with exit 0, found out only at training time (its hint pointing at holdout settings)."""
    from embedcache.datasets import build_dataset
    from embedcache.config import DatasetConfig
    from embedcache.errors import DatasetError

    (tmp_path / "x.csv").write_text("path,label\nimgs/a.jpg,cat\nimgs/b.jpg,dog\n")
    missing = make_cfg("none.zarr", "dataset.name=csv", f"dataset.path={tmp_path / 'x.csv'}")
    for dry_run in (True, False):  # refused before the teacher is asked anything
        with pytest.raises(DatasetError, match=r"none of its 2 image files exists \(first: .*imgs/a.jpg\).*relative "
                                               r"to the CSV's folder") as err:
            extract(missing, teacher=tiny_teacher, log=quiet, dry_run=dry_run)
        assert "\n" not in str(err.value) and not os.path.exists(missing.out)
    assert build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "x.csv"))).classes == ["cat", "dog"]
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        (root / c / "0.jpg").write_bytes(b"this is not a jpeg")
    cfg = make_cfg("bad.zarr", "dataset.name=folder", f"dataset.path={root}")
    with pytest.raises(DatasetError, match=r"all 2 images failed to read \(cat/0.jpg: UnidentifiedImageError.*\); "
                                           r"fix the images or dataset.path, then delete .*bad.zarr and rerun"):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    with Store(cfg.out) as st:
        assert not st.complete  # never handed to training as a finished store


def test_an_image_too_elongated_for_a_canvas_is_recorded_not_fatal(tmp_path, make_cfg, tiny_teacher, monkeypatch):
    """The whole image was resized before the centre crop: an 8000 x 1 PNG of 24 KB took 2.75 GB at
    256 px, enough to get a worker killed and the extraction stopped. Past MAX_RESIZED_PIXELS it is a
    failed row, with the reason (the limit lowered here to keep the test small)."""
    from embedcache import views

    monkeypatch.setattr(views, "MAX_RESIZED_PIXELS", 50_000)
    with pytest.raises(ValueError, match=r"2000 x 10 resized to 48 px on its shorter side would be 460,800 pixels"):
        views.make_canvas(Image.new("RGB", (2000, 10)), 48)
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(root / c / "0.png")
    Image.new("RGB", (2000, 10)).save(root / "dog" / "1.png")
    res = extract(make_cfg("long.zarr", "dataset.name=folder", f"dataset.path={root}"), teacher=tiny_teacher, log=quiet)
    assert res.complete and res.failed == 1
    with embedcache.open_store(res.path) as s:
        bad = s.meta[s.meta.status == "failed"]
        assert bad.path.tolist() == ["dog/1.png"] and "crop it closer to square" in bad.reason.iloc[0]


def test_a_block_redone_without_failures_drops_its_old_failure_records(tmp_path, make_cfg, tiny_teacher):
    """A file damaged in place (same size, same key) failed; restored, and its block redone by a
    repair, the row read status ok with the old failure's reason beside it."""
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    for k in range(3):
        Image.fromarray(np.full((24, 24, 3), 40 * k, np.uint8)).save(root / "cat" / f"{k}.jpg")
    Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(root / "dog" / "0.jpg")
    good = (root / "cat" / "1.jpg").read_bytes()
    (root / "cat" / "1.jpg").write_bytes(b"\0" * len(good))
    cfg = make_cfg("bitrot.zarr", "dataset.name=folder", f"dataset.path={root}")
    assert extract(cfg, teacher=tiny_teacher, log=quiet).failed == 1
    (root / "cat" / "1.jpg").write_bytes(good)
    with Store(cfg.out, "a") as st:
        st.reopen_blocks([0])  # what a repair does to a damaged block
    res = extract(cfg, teacher=tiny_teacher, log=quiet)
    assert res.complete and res.failed == 0
    with embedcache.open_store(res.path) as s:
        assert (s.meta.status == "ok").all() and (s.meta.reason.fillna("") == "").all(), s.meta


def test_canvas_can_stay_out_of_the_store(make_cfg, tiny_teacher, tmp_path):
    data = png_folder(tmp_path / "data")  # files to rebuild the canvases from (the synthetic dataset's are drawn)
    res = extract(make_cfg("nopix.zarr", "dataset.name=folder", f"dataset.path={data}", "canvas.store=false"),
                  teacher=tiny_teacher, log=quiet)
    with embedcache.open_store(res.path) as s:
        assert s.image_emb().shape[0] == 6
        with pytest.raises(StoreError, match="canvas.store=false"):
            s.pixels()


def test_canvases_rebuilt_from_the_files_must_be_the_ones_the_teacher_saw(make_cfg, tiny_teacher, tmp_path):
    """canvas.store=false: students rebuild canvases from the source files; each is checked against
    the CRC-32C of the canvas the teacher saw, so a file changed since is refused, not trained on."""
    from PIL import Image

    from embedcache.students.data import StoreData

    for c in "ab":
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            img = np.random.default_rng([ord(c), i]).integers(0, 255, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / "data" / c / f"{i}.png")
    res = extract(make_cfg("nopix.zarr", "dataset.name=folder", f"dataset.path={tmp_path / 'data'}", "canvas.store=false"),
                  teacher=tiny_teacher, log=quiet)
    with_pixels = extract(make_cfg("pix.zarr", "dataset.name=folder", f"dataset.path={tmp_path / 'data'}"),
                          teacher=tiny_teacher, log=quiet)
    with embedcache.open_store(with_pixels.path) as s:
        assert np.array_equal(StoreData(res.path, "name").pixels, s.pixels())
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "data" / "b" / "1.png")  # changed since
    with pytest.raises(StoreError, match=r"b/1.png .*is not the image the teacher saw.*canvas.store=true"):
        StoreData(res.path, "name").pixels
    # a CSV of absolute paths: the canvases are rebuilt from the files the CSV names
    (tmp_path / "abs.csv").write_text("path,label\n" + "".join(f"{tmp_path / 'data' / c / f'{i}.png'},{c}\n"
                                                               for c in "ab" for i in (0, 2)))
    csv = extract(make_cfg("csv.zarr", "dataset.name=csv", f"dataset.path={tmp_path / 'abs.csv'}", "canvas.store=false"),
                  teacher=tiny_teacher, log=quiet)
    assert StoreData(csv.path, "name").pixels.shape[0] == 4
    (tmp_path / "data" / "a" / "2.png").unlink()  # moved or deleted since: one line naming the file and the fix
    with pytest.raises(StoreError, match=r"cannot read .*a/2.png \(row 1: FileNotFoundError\).*canvas.store=false.*put it back"):
        StoreData(csv.path, "name").pixels


def test_canvases_are_rebuilt_on_threads_in_chunks_that_stop_on_request(make_cfg, tiny_teacher, tmp_path, monkeypatch):
    """The re-decoding runs a chunk of rows at a time on torch's thread count: the canvases are the stored
    ones whatever the count and chunk, the first bad row in row order is the one said, and a stop request
    ends it between chunks (10,000 files are minutes on one core, past the seconds a stop may take)."""
    import torch

    import embedcache.students.data as data_module
    from embedcache import interrupt
    from embedcache.students.data import StoreData

    data = png_folder(tmp_path / "data")
    nopix = extract(make_cfg("nopix.zarr", "dataset.name=folder", f"dataset.path={data}", "canvas.store=false"),
                    teacher=tiny_teacher, log=quiet).path
    pix = extract(make_cfg("pix.zarr", "dataset.name=folder", f"dataset.path={data}"), teacher=tiny_teacher, log=quiet).path
    with embedcache.open_store(pix) as s:
        kept, paths = s.pixels(), s.meta["path"].tolist()
    monkeypatch.setattr(data_module, "DECODE_CHUNK", 2)
    pools, pool = [], data_module.ThreadPoolExecutor

    def counted(workers):
        pools.append(workers)
        return pool(workers)

    monkeypatch.setattr(data_module, "ThreadPoolExecutor", counted)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3, 64):
            torch.set_num_threads(n)
            assert np.array_equal(StoreData(nopix, "name").pixels, kept)
    finally:
        torch.set_num_threads(threads)
    assert pools == [1, 3, data_module.DECODE_THREADS]  # 64 threads: each holds a whole photo, so at most 8
    interrupt.request()
    try:
        with pytest.raises(KeyboardInterrupt, match="stopped while re-decoding the store's images"):
            StoreData(nopix, "name").pixels
    finally:
        interrupt.reset()
    for row in (5, 3, 2):  # rows of one chunk and the next, all gone: the first row's is said
        (data / paths[row]).unlink()
    with pytest.raises(StoreError, match=rf"cannot read .*{paths[2]} \(row 2: FileNotFoundError\)"):
        StoreData(nopix, "name").pixels


def test_a_store_made_from_relative_paths_is_read_from_any_folder(make_cfg, tiny_clip_dir, tmp_path, monkeypatch):
    """dataset.path=data and teacher.model=local-dir:tinyclip were recorded as given: a store without
    pixels could not be trained on from another folder ("cannot read data/...", the file being there),
    and its teacher not reloaded for a text search (a trial). The manifest records them absolute."""
    from PIL import Image

    from embedcache.students.data import StoreData

    work = tmp_path / "work"
    for c in "ab":
        (work / "data" / c).mkdir(parents=True)
        for i in range(3):
            img = np.random.default_rng([ord(c), i]).integers(0, 255, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(img).save(work / "data" / c / f"{i}.png")
    shutil.copytree(tiny_clip_dir, work / "tinyclip")
    monkeypatch.chdir(work)
    cfg = make_cfg("nopix.zarr", "dataset.name=folder", "dataset.path=data", "canvas.store=false",
                   "teacher.model=local-dir:tinyclip")
    res = extract(cfg, log=quiet)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert StoreData(res.path, "name").pixels.shape == (6, 48, 48, 3)
    with embedcache.open_store(res.path) as s:
        assert s.manifest["dataset"]["root"] == str(work / "data")
        assert s.manifest["config"]["teacher"]["model"] == f"local-dir:{work / 'tinyclip'}"
        assert len(s.nearest_images("a photo of a b", k=2)) == 2  # the teacher reloaded from the manifest
    with Store(res.path, "a") as st:  # a store made before: its relative folder is named in the error
        st.write_manifest({**st.manifest, "dataset": {**st.manifest["dataset"], "root": "data"}})
    with pytest.raises(StoreError, match=r"cannot read data/a/0.png .*its dataset folder data was recorded relative.*"
                                         r"run from the folder it was extracted in"):
        StoreData(res.path, "name").pixels


def test_recorded_paths_leave_names_as_given(tmp_path, monkeypatch):
    """A working folder holding ViT-B-32/ or openai/ made the recorded model name and pretrained tag
    paths, and the store's teacher could not be rebuilt from its manifest (a review)."""
    from embedcache.extract.manifest import absolute_paths

    monkeypatch.chdir(tmp_path)
    for folder in ("ViT-B-32", "openai", "short7", "tiny", "data"):
        (tmp_path / folder).mkdir()
    for f in ("w.safetensors", "tpl.txt"):
        (tmp_path / f).write_text("x")
    names = {"dataset": {"path": "data"}, "teacher": {"model": "ViT-B-32", "pretrained": "openai"},
             "text": {"templates": "short7", "attributes": None}}
    assert absolute_paths(names) == {**names, "dataset": {"path": str(tmp_path / "data")}}
    files = {"teacher": {"model": "local-dir:tiny", "pretrained": "w.safetensors"}, "text": {"templates": "tpl.txt"}}
    assert absolute_paths(files) == {"teacher": {"model": f"local-dir:{tmp_path / 'tiny'}",
                                                 "pretrained": str(tmp_path / "w.safetensors")},
                                     "text": {"templates": str(tmp_path / "tpl.txt")}}


def test_a_store_made_before_hidden_files_were_left_out_is_refused_saying_why(make_cfg, tiny_teacher, tmp_path):
    """Hidden files are no longer images: a store whose version read them has another dataset key, and
    the refusal said only "its dataset differs" (a review)."""
    from PIL import Image

    for c in "ab":
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "a" / "ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "data" / "a" / "ipynb_checkpoints" / "0.png")
    cfg = make_cfg("before.zarr", "dataset.name=folder", f"dataset.path={tmp_path / 'data'}")
    extract(cfg, teacher=tiny_teacher, log=quiet)  # 5 images, as the version before read the hidden folder's
    with Store(cfg.out, "a") as st:  # ... and recorded nothing of hidden files
        st.write_manifest({**st.manifest, "dataset": {k: v for k, v in st.manifest["dataset"].items()
                                                      if k != "hidden_images_left_out"}})
    (tmp_path / "data" / "a" / "ipynb_checkpoints").rename(tmp_path / "data" / "a" / ".ipynb_checkpoints")
    with pytest.raises(StoreMismatchError, match=r"its dataset differs \(this version leaves out the 1 hidden image "
                                                  r"file\(s\) of the dataset folder, e.g. in .ipynb_checkpoints"):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    with embedcache.open_store(extract(make_cfg("now.zarr", "dataset.name=folder", f"dataset.path={tmp_path / 'data'}"),
                                       teacher=tiny_teacher, log=quiet).path) as s:
        assert s.manifest["dataset"]["hidden_images_left_out"] == 1 and len(s.meta) == 4


def test_numbered_labels_need_names_before_the_teacher_is_built(tmp_path, make_cfg, tiny_teacher, monkeypatch):
    """A CSV labelled 0..C-1 made a store whose text embeddings were those of "a photo of a 10." and
    whose label indices followed the string order (1, 10, 2); now it is refused before any teacher is
    built or paid, and a class-names file gives the names and, by its order, the indices."""
    (tmp_path / "imgs").mkdir()
    labels = [str(k % 11) for k in range(22)]
    for k in range(22):
        Image.fromarray(np.full((24, 24, 3), 10 * k, np.uint8)).save(tmp_path / "imgs" / f"{k}.png")
    (tmp_path / "x.csv").write_text("path,label\n" + "".join(f"imgs/{k}.png,{lab}\n" for k, lab in enumerate(labels)))
    numbered = make_cfg("ids.zarr", "dataset.name=csv", f"dataset.path={tmp_path / 'x.csv'}")

    def no_teacher(cfg):
        raise AssertionError("the teacher was built for a store that is refused")

    monkeypatch.setattr("embedcache.extract.build_teacher", no_teacher)
    with pytest.raises(ConfigError, match=r"class names are ids \('0', '1', '10', ...\).*dataset.class_names=FILE"):
        extract(numbered, log=quiet)
    assert not (tmp_path / "ids.zarr").exists()
    names = [f"thing {chr(97 + k)}" for k in range(11)]
    (tmp_path / "names.csv").write_text("label,name\n" + "".join(f"{k},{n}\n" for k, n in enumerate(names)))
    named = make_cfg("ids.zarr", "dataset.name=csv", f"dataset.path={tmp_path / 'x.csv'}",
                     f"dataset.class_names={tmp_path / 'names.csv'}")
    res = extract(named, teacher=tiny_teacher, log=quiet)
    with embedcache.open_store(res.path) as s:
        assert s.classes == names
        assert s.meta.label.tolist() == [int(lab) for lab in labels]
        assert s.meta.class_id.tolist() == labels  # the dataset's own label, row by row, as the CSV wrote it
        assert list(s.meta.columns[:5]) == ["index", "path", "class_name", "class_id", "label"]
        assert s.text("name").prompt.iloc[10] == "a photo of a thing k."
    (tmp_path / "same.csv").write_text("label,name\n" + "".join(f"{k},{k}\n" for k in range(11)))
    with pytest.raises(ConfigError, match=r"dataset.class_names=\S*same.csv names the labels with ids: give each label a name"):
        extract(make_cfg("same.zarr", "dataset.name=csv", f"dataset.path={tmp_path / 'x.csv'}",
                         f"dataset.class_names={tmp_path / 'same.csv'}"), log=quiet)


def test_a_store_made_with_id_names_before_they_were_refused_is_still_found(tmp_path, make_cfg, tiny_teacher,
                                                                             monkeypatch):
    """Refusing ids for new stores must not strand the stores made before: a complete one is found
    (with a warning saying what its text embeddings are), as a half-done one is resumed."""
    (tmp_path / "imgs").mkdir()
    for k in range(6):
        Image.fromarray(np.full((24, 24, 3), 30 * k, np.uint8)).save(tmp_path / "imgs" / f"{k}.png")
    (tmp_path / "x.csv").write_text("path,label\n" + "".join(f"imgs/{k}.png,{k % 3}\n" for k in range(6)))
    cfg = make_cfg("old.zarr", "dataset.name=csv", f"dataset.path={tmp_path / 'x.csv'}")
    with monkeypatch.context() as mp:  # as extraction made it before
        mp.setattr("embedcache.extract.id_names", lambda classes: None)
        made = extract(cfg, teacher=tiny_teacher, log=quiet)
    with pytest.warns(UserWarning, match=r"old.zarr: the class names are ids .*text embeddings are of the ids.*"
                                         r"for a new store, name them with dataset.class_names"):
        again = extract(cfg, teacher=tiny_teacher, log=quiet)
    assert again.skipped and again.key == made.key


def test_a_store_opens_by_what_it_is_not_by_its_name(make_cfg, tiny_teacher):
    """`--set backend=hdf5 --out nosuffix` made a store that inspect, verify and open_store then looked
    for as Zarr (by its name) and could not open."""
    from click.testing import CliRunner

    from embedcache.cli import main

    for out, backend in (("nosuffix", "hdf5"), ("folder", "zarr")):
        cfg = make_cfg(out, f"backend={backend}")
        extract(cfg, teacher=tiny_teacher, log=quiet)
        with embedcache.open_store(cfg.out) as s:
            assert s.store.backend_name == backend and s.image_emb().shape[0] == 30
        seen = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"])
        assert seen.exit_code == 0 and "intact" in seen.output, seen.output
    # a new store whose name says the other format: refused (an HDF5 file named .zarr confused a trial);
    # one made so before still opens by what it is
    for out, backend, fix in (("x.zarr", "hdf5", "x.h5"), ("y.h5", "zarr", "y.zarr")):
        with pytest.raises(ConfigError, match=rf"--out .*{out} names a {'Zarr' if backend == 'hdf5' else 'HDF5'} store, "
                                              rf"but backend={backend}: .*--out .*{fix}"):
            extract(make_cfg(out, f"backend={backend}"), teacher=tiny_teacher, log=quiet)
    made = make_cfg("made-before.h5", "backend=zarr")
    os.rename(extract(make_cfg("folder", "backend=zarr"), teacher=tiny_teacher, log=quiet).path, made.out)
    assert extract(made, teacher=tiny_teacher, log=quiet).skipped


def test_hdf5_refuses_several_writers_and_bad_shards(make_cfg, tiny_teacher):
    with pytest.raises(ConfigError, match="hdf5 stores take one writer; use a .zarr store"):
        extract(replace(make_cfg("x.h5"), shard=0, num_shards=2), teacher=tiny_teacher, log=quiet)
    with pytest.raises(ConfigError, match=r"shard index 3 is out of range for 2 shards; use --shard 0 to 1"):
        extract(replace(make_cfg("y.zarr"), shard=3, num_shards=2), teacher=tiny_teacher, log=quiet)
    with pytest.raises(ConfigError, match=r"shard index 1 is out of range for one shard \(--num-shards 1\); use --shard 0, "
                                          r"or give --num-shards"):  # not "1 shards; use 0..0" (a trial)
        extract(replace(make_cfg("y.zarr"), shard=1, num_shards=None), teacher=tiny_teacher, log=quiet)


def test_full_disk_is_a_clear_error_and_never_complete(make_cfg, tiny_teacher, monkeypatch):
    from embedcache.errors import DiskFullError
    from embedcache.store.backends import ZarrBackend

    real = ZarrBackend.write
    writes = []

    def flaky(self, name, start, data):
        writes.append(name)
        if name == "image/pixels" and len(writes) > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, start, data)

    monkeypatch.setattr(ZarrBackend, "write", flaky)
    cfg = make_cfg("full.zarr")
    with pytest.raises(DiskFullError, match="disk full while writing .* rerun the same command to resume"):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    assert not Store(cfg.out).complete
    monkeypatch.setattr(ZarrBackend, "write", real)
    assert extract(cfg, teacher=tiny_teacher, log=quiet).complete


def test_an_hdf5_store_stops_short_of_a_full_disk_and_resumes_identical(make_cfg, tiny_teacher, monkeypatch):
    """HDF5 does not recover from a full disk mid-write: its error surfaced when a dataset handle was
    freed (swallowed), and closing the file then crashed the process (exit 139 on a 2 MB tmpfs). The
    backend refuses a write the disk has no room for, keeping a reserve to close the file cleanly."""
    from collections import namedtuple

    from embedcache.errors import DiskFullError
    from embedcache.store import backends

    full = make_cfg("full.h5")
    extract(make_cfg("ref.h5"), teacher=tiny_teacher, log=quiet)
    real, calls = shutil.disk_usage, []
    usage = namedtuple("usage", "total used free")

    def filling(path):  # room for the first writes, then less than the reserve
        calls.append(path)
        return real(path) if len(calls) < 10 else usage(1, 1, backends.HDF5_RESERVE - 1)

    monkeypatch.setattr(backends.shutil, "disk_usage", filling)
    # the reserve is said: a 3 MB disk nearly empty was called full without it (a trial)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*: 8.0 MiB free for a write of \d+\.\d MiB, and an "
                                            r"HDF5 store keeps 8 MiB free to close its file cleanly; .* rerun the same command to resume"):
        extract(full, teacher=tiny_teacher, log=quiet)
    with pytest.raises(DiskFullError, match="disk full while writing .* rerun the same command to resume"):
        extract(full, teacher=tiny_teacher, log=quiet)  # the resume, still full: its first write (the call's
                                                        # history entry) was a raw OSError traceback (a review)
    monkeypatch.setattr(backends.shutil, "disk_usage", real)
    with Store(full.out) as st:
        assert not st.complete and 0 < st.blocks_done().sum() < st.num_blocks
    assert extract(full, teacher=tiny_teacher, log=quiet).complete
    with Store(full.out) as a, Store(make_cfg("ref.h5").out) as b:
        for name in ("image/emb", "image/pixels", "image/view_params"):
            assert np.array_equal(a.read(name), b.read(name)), name


def test_a_second_extraction_of_the_same_blocks_is_refused_while_the_first_runs(make_cfg, tiny_teacher):
    """A second `extract` on a Zarr store being written encoded the same blocks again beside the first,
    silently (and a paid teacher would have been paid twice)."""
    import os

    from embedcache.fileio import try_exclusive_lock

    cfg = make_cfg("busy.zarr", "block_rows=8")
    refused = []

    def second_while_first_runs(block):  # a second extraction of the same store, while the first writes it
        if block == 0:
            with pytest.raises(StoreError, match=r"another extraction is writing .*busy.zarr now \(shard 0 of 1\); wait") as busy:
                extract(cfg, teacher=tiny_teacher, log=quiet)
            assert busy.value.exit_code == 75  # try again later: a scheduler retrying on 75 retries
            refused.append(block)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cfg, teacher=tiny_teacher, on_block_done=second_while_first_runs, log=quiet)
    assert refused == [0]
    held = try_exclusive_lock(os.path.join(cfg.out, ".writer-0-of-1.lock"))  # the first one's lock is released
    assert held is not None
    os.close(held)
    assert extract(cfg, teacher=tiny_teacher, log=quiet).complete  # it resumes
    from click.testing import CliRunner

    from embedcache.cli import main

    seen = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"])
    assert seen.exit_code == 0 and "intact" in seen.output, seen.output
    import errno

    import embedcache.extract as extraction

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", path)

    with pytest.MonkeyPatch.context() as mp:  # a complete store on read-only storage is still confirmed
        mp.setattr(extraction, "try_exclusive_lock", read_only)
        said = []
        assert extract(cfg, teacher=tiny_teacher, log=said.append).complete and "nothing to do" in said[-1]


def test_an_extraction_with_another_shard_count_is_refused_while_one_writes(make_cfg, tiny_teacher):
    """Writers of one store with different --num-shards split it into ranges that overlap (shard 0 of 2
    and shard 1 of 3 share blocks): each encoded the shared blocks beside the other (a paid teacher was
    paid twice), since each took only the lock of its own shard-of-count."""
    import os

    from embedcache.fileio import try_exclusive_lock

    cfg = make_cfg("mixed.zarr", "block_rows=2")  # 30 images: 15 blocks
    seen = []

    def others_while_first_runs(block):
        if not seen:
            with pytest.raises(StoreError, match=r"another extraction is writing .*mixed.zarr with --num-shards 2 now; "
                                                 r"give --num-shards 2 to join it"):
                extract(replace(cfg, shard=1, num_shards=3), teacher=tiny_teacher, log=quiet)
            with pytest.raises(StoreError, match=r"with --num-shards 2 now"):
                extract(cfg, teacher=tiny_teacher, log=quiet)  # one writer for the whole store overlaps it too
            joined = extract(replace(cfg, shard=1, num_shards=2), teacher=tiny_teacher, log=quiet)
            assert not joined.complete and joined.images > 0  # the same count still writes side by side
            seen.append(block)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(replace(cfg, shard=0, num_shards=2), teacher=tiny_teacher, on_block_done=others_while_first_runs,
                log=quiet)
    assert seen
    gate = try_exclusive_lock(os.path.join(cfg.out, ".writers.lock"))  # no gate is left held
    assert gate is not None
    os.close(gate)
    assert extract(replace(cfg, shard=0, num_shards=3), teacher=tiny_teacher, log=quiet).images > 0  # once it stopped
    assert extract(cfg, teacher=tiny_teacher, log=quiet).complete


def test_a_dry_run_beside_a_running_extraction_says_so(make_cfg, tiny_teacher):
    """A dry run while an extraction wrote the store priced its requests in flight as "a stopped call"'s,
    and said nothing of the running one (a trial)."""
    from embedcache.cli.data import _cost_lines

    cfg = make_cfg("live.zarr", "block_rows=2")
    seen = []

    def dry_run_while_writing(block):
        seen.append(extract(cfg, teacher=tiny_teacher, log=quiet, dry_run=True))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cfg, teacher=tiny_teacher, on_block_done=dry_run_while_writing, log=quiet)
    assert seen[0].writing and seen[0].rows == 30 - 2
    assert not extract(cfg, teacher=tiny_teacher, log=quiet, dry_run=True).writing  # the writer stopped
    line = _cost_lines({"images": 4, "replayable": 2}, writing=True)[0]
    assert "2 of them in requests a running or stopped call sent" in line, line


def test_a_dataset_of_one_class_is_refused_before_the_teacher_is_built(tmp_path, make_cfg, monkeypatch):
    """dataset.path one level too deep (a folder holding one class folder) made a store on which every
    nearest-label score, teacher and student alike, was 100% by construction, with exit 0."""
    (tmp_path / "data" / "dog").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((24, 24, 3), 40 * k, np.uint8)).save(tmp_path / "data" / "dog" / f"{k}.png")

    def no_teacher(cfg):
        raise AssertionError("the teacher was built for a store that is refused")

    monkeypatch.setattr("embedcache.extract.build_teacher", no_teacher)
    with pytest.raises(ConfigError, match=r"dataset 'folder' at \S*data holds one class \('dog'\): every nearest-label "
                                          r"score .*100% by construction; point dataset.path at a folder of two or more"):
        extract(make_cfg("one.zarr", "dataset.name=folder", f"dataset.path={tmp_path / 'data'}"), log=quiet)
    with pytest.raises(ConfigError, match=r"dataset 'synthetic' holds one class \('circle'\).*dataset.num_classes"):
        extract(make_cfg("one.zarr", "dataset.num_classes=1"), log=quiet)
    assert not (tmp_path / "one.zarr").exists()


def test_a_dry_run_stopped_says_it_left_nothing_to_resume(monkeypatch):
    """Ctrl-C on `extract --dry-run` said "rerun the same command to resume", of a command that writes nothing."""
    from click.testing import CliRunner

    import embedcache.extract as extraction
    from embedcache.cli import main

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(extraction, "extract", stopped)
    res = CliRunner().invoke(main, ["extract", "--dry-run", "--no-progress"])
    assert res.exit_code == 130 and "stopped: a dry run writes nothing; rerun it for its figures" in res.output
    assert "resume" not in res.output
    res = CliRunner().invoke(main, ["extract", "--no-progress", "--out", "never.zarr"])
    assert res.exit_code == 130 and "rerun the same command to resume" in res.output  # a real run resumes


def test_a_canvas_smaller_than_the_teachers_input_is_said(make_cfg, tiny_teacher, tmp_path):
    """canvas.size=16 for a 64 px teacher: every view upscaled from 16 px, with no word (a trial)."""
    import warnings

    from PIL import Image

    for c in "ab":
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((80, 90, 3), 40 * i, np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    files = ("dataset.name=folder", f"dataset.path={tmp_path / 'data'}")
    small = tiny_teacher.input_size // 2
    with pytest.warns(UserWarning, match=rf"canvas.size={small} is smaller than the teacher's {tiny_teacher.input_size} px "
                                         rf"input: .*canvas.size={tiny_teacher.input_size} or more"):
        extract(make_cfg("small.zarr", *files, f"canvas.size={small}"), teacher=tiny_teacher, log=quiet, dry_run=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        extract(make_cfg("big.zarr", *files, f"canvas.size={tiny_teacher.input_size}"), teacher=tiny_teacher, log=quiet,
                dry_run=True)
        # generated shapes are drawn at their own small size: no canvas would hold more of them
        extract(make_cfg("shapes.zarr", f"canvas.size={small}"), teacher=tiny_teacher, log=quiet, dry_run=True)


def test_images_read_in_process_are_the_stores_a_worker_process_makes(make_cfg, tiny_teacher, tmp_path):
    """With no worker process (the default for a CPU teacher on 2 cores) a batch's files are decoded by
    a thread per core: every array, a corrupt file's record included, must be what a DataLoader worker
    makes, byte for byte."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(3)
    for k in range(10):
        cls = root / f"c{k % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (30 + k, 41 - k, 3), dtype=np.uint8)
        Image.fromarray(arr).save(cls / f"{k}.{'png' if k % 3 else 'jpg'}")
    (root / "c0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    stores, threads = {}, torch.get_num_threads()
    torch.set_num_threads(2)  # a pool of two decoding threads (the test workers of `make test` compute on one)
    try:
        for workers in (0, 1):
            cfg = make_cfg(f"w{workers}.zarr", "dataset.name=folder", f"dataset.path={root}", f"num_workers={workers}")
            stores[workers] = extract(cfg, teacher=tiny_teacher, log=quiet).path
    finally:
        torch.set_num_threads(threads)
    with Store(stores[0]) as a, Store(stores[1]) as b:
        assert int((a.read("image/status") != 1).sum()) == 1  # the broken file, recorded
        for name in ("image/emb", "image/pixels", "image/status", "image/view_params"):
            assert np.array_equal(a.read(name), b.read(name)), name
        assert a.table("meta.parquet").equals(b.table("meta.parquet"))


def test_the_reader_takes_a_worker_process_only_where_one_has_cores_to_itself(monkeypatch):
    """Unset, num_workers is none for a teacher computing on 2 CPU threads or fewer (a worker took a core
    from its forward: 0.78 to 0.85 of the bare forward against 0.84 to 0.90 without, on 2 cores), one for
    more threads or a remote teacher (whose network waits reading overlaps), and 1..8 beside a GPU."""
    from types import SimpleNamespace

    from embedcache.extract import reader_workers

    here = SimpleNamespace(device=torch.device("cpu"), computes_here=True)
    remote = SimpleNamespace(device=torch.device("cpu"), computes_here=False)
    gpu = SimpleNamespace(device=torch.device("cuda"), computes_here=True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert (reader_workers(None, here), reader_workers(None, remote), reader_workers(3, here)) == (0, 1, 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert reader_workers(None, here) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert reader_workers(None, gpu) == 8 and reader_workers(0, gpu) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert reader_workers(None, gpu) == 1


def test_a_store_made_with_a_relative_folder_lists_later_calls_naming_it_absolute_as_the_same():
    """A store made before paths were recorded absolute holds dataset.path as spelled ("data"); a
    resume records "/work/data", and its calls listed dataset.path as a setting it changed (a trial)."""
    from embedcache.extract.history import calls_of

    manifest = {"config": {"dataset": {"name": "folder", "path": "data/./pacs"}, "batch_size": 8}, "versions": {}}

    def changed(path, batch=8):
        call = {"config": {"dataset": {"name": "folder", "path": path}, "batch_size": batch}, "versions": {}}
        return calls_of([call], manifest)[0]["settings"]

    assert changed("/home/me/work/data/pacs") == {}
    assert changed("/home/me/work/data/pacs", batch=16) == {"batch_size": 16}
    assert changed("/home/me/work/other/pacs") == {"dataset.path": "/home/me/work/other/pacs"}
    assert changed("/home/me/data") == {"dataset.path": "/home/me/data"}
    manifest["config"]["dataset"]["path"] = "../pacs"  # not a tail of any path: as spelled
    assert changed("/home/me/pacs") == {"dataset.path": "/home/me/pacs"}


def test_a_teacher_model_left_to_its_default_is_named_by_the_model_it_resolved_to():
    """A store made with teacher.model unset (conse's default classifier) was described as
    "teacher.model=None" beside another store's 'efficientnet-lite1' (a trial)."""
    from embedcache.store.differences import differing_parts

    def made(model, classifier):
        return {"key_parts": {"teacher": classifier}, "config": {"teacher": {"name": "conse", "model": model}},
                "teacher": {"name": "conse", "classifier": classifier}}

    said = differing_parts(made(None, "efficientnet-lite0"), made("efficientnet-lite1", "efficientnet-lite1"))
    assert said == ("its teacher differs (store: teacher.model='efficientnet-lite0'; this call: "
                    "teacher.model='efficientnet-lite1')"), said


def test_each_differing_part_names_a_setting_before_any_names_a_second():
    """Four settings were named in name order: a store of other dataset and synthesis settings and another
    view count was said to differ in its views too, with no views setting among the four (a trial)."""
    from embedcache.store.differences import differing_parts

    def made(v, count):
        return {"key_parts": {"dataset": v, "synthesis": v, "views": v},
                "config": {"dataset": {"a": v, "b": v, "c": v}, "views": {"count": count}},
                "synthesis": {"classes": v, "per_class": v}}

    said = differing_parts(made("x", 3), made("y", 2))
    assert said == ("its dataset, synthesis and views differ (store: dataset.a='x', dataset.b='x', synthesis.classes='x', "
                    "views.count=3, and 2 more; this call: dataset.a='y', dataset.b='y', synthesis.classes='y', "
                    "views.count=2)"), said


def test_a_config_built_in_code_is_checked_as_a_files_is(make_cfg, monkeypatch):
    """extract() took a TeacherConfig built in code with a setting its teacher does not read (a review)."""
    import dataclasses

    import embedcache.extract as ex
    from embedcache.errors import ConfigError

    monkeypatch.setattr(ex, "build_teacher", lambda cfg: pytest.fail("the teacher was built"))
    cfg = make_cfg("code.zarr")
    with pytest.raises(ConfigError, match=r"teacher.topk=3 is not read by teacher.name=open_clip"):
        extract(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, topk=3)), log=quiet)
