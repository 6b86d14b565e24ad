"""Nothing silently wrong (issue 9): damaged stores are found and repaired, images decode faithfully,
unreadable rows never pass for data, bad settings are refused before work, the sweep lock holds."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

import embedcache
from embedcache.cli import main
from embedcache.errors import ConfigError, StoreDamagedError, StoreError, StoreMismatchError, TrainingError
from embedcache.extract import extract
from embedcache.store import Store

from conftest import alter_emb, block_store, quiet

ROOT = Path(__file__).resolve().parents[1]
ARRAYS = ["image/emb", "image/view_params", "image/pixels", "image/status"]


def _arrays(path):
    with Store(path) as st:
        out = {a: st.read(a, verify=False) for a in ARRAYS}
        for src in st.manifest["text"]["sources"]:
            out[f"text/{src}/class_emb"] = st.read(f"text/{src}/class_emb", verify=False)
        out["meta"] = st.table("meta.parquet")
    return out


def _same(a, b):
    for k in a:
        if k == "meta":
            pd.testing.assert_frame_equal(a[k], b[k])
        else:
            assert np.array_equal(a[k], b[k]), k


def _damage(path: str, name: str, block: int):
    """Lose one chunk of ``name`` in ``block`` (Zarr: delete the file, or zero the block's rows in a
    chunk of several blocks, as a finished store packs raw arrays; HDF5: overwrite rows in place)."""
    with Store(path) as st:
        start, stop = st.block_range(block)
        rows = st.chunks(name)[0]
        row_bytes = int(np.prod(st.shape(name)[1:])) * np.dtype(st.b.dtype(name)).itemsize
    if path.endswith(".zarr"):
        victim = next(p for p in (Path(path) / name / "c").rglob("*") if p.is_file()
                      and int(p.relative_to(Path(path) / name / "c").parts[0]) == start // rows)
        if stop - start < rows:
            raw = bytearray(victim.read_bytes())
            lo = (start % rows) * row_bytes
            raw[lo:lo + (stop - start) * row_bytes] = bytes((stop - start) * row_bytes)
            victim.write_bytes(bytes(raw))
        else:
            victim.unlink()
    else:
        import h5py

        with h5py.File(path, "a") as f:
            f[name][start] = 0


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_status_changed_behind_the_store_s_back_is_refused_by_readers_not_served(make_cfg, tiny_teacher, suffix):
    """image/status set to failed with h5py: h5py said the row failed while open_store, reading meta.parquet
    alone, served its embedding as a real one, without a word (a trial)."""
    cfg = make_cfg("s" + suffix)
    extract(cfg, teacher=tiny_teacher, log=quiet)
    with embedcache.open_store(cfg.out) as st:
        assert st.ok.all()
    if suffix == ".h5":
        import h5py

        with h5py.File(cfg.out, "a") as f:
            f["image/status"][5] = 2
    else:
        import zarr

        status = zarr.open_array(str(Path(cfg.out) / "image" / "status"), mode="r+")
        status[5] = 2
    with embedcache.open_store(cfg.out) as st, pytest.raises(StoreDamagedError, match=r"image/status"):
        st.ok
    # meta.parquet rewritten and sealed with its checksum (as a script through the store's API would): the two disagree
    other = make_cfg("t" + suffix)
    extract(other, teacher=tiny_teacher, log=quiet)
    with Store(other.out, "a") as st:
        meta = st.table("meta.parquet")
        meta.loc[5, "status"] = "failed"
        st.put_table("meta.parquet", meta)
        st.finish()
    with embedcache.open_store(other.out) as st, pytest.raises(
            StoreDamagedError, match=r"meta.parquet's status and image/status disagree \(1 row\(s\), the first 5\)"):
        st.ok


def test_stray_files_beside_zarr_chunks_are_not_chunks(make_cfg, tiny_teacher):
    """Zarr's own `<chunk>.<hex>.partial` left by a kill -9 (or a macOS copy's `._1`) in a chunk
    folder made the store unopenable with a traceback while verify called it intact."""
    cfg = make_cfg("stray.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    for name in ("image/status", "image/emb"):
        (Path(cfg.out) / name / "c" / "1.0f3a9c2b.partial").write_bytes(b"")
        (Path(cfg.out) / name / "c" / "._1").write_bytes(b"")
    with embedcache.open_store(cfg.out) as s:
        assert s.image_emb().shape[0] == 30
    assert CliRunner().invoke(main, ["inspect", cfg.out]).exit_code == 0


@pytest.mark.parametrize("suffix", ["zarr", "h5"])
def test_a_lost_chunk_is_found_refused_and_repaired_exactly(make_cfg, tiny_teacher, suffix):
    good = make_cfg(f"good.{suffix}")
    extract(good, teacher=tiny_teacher, log=quiet)
    cfg = make_cfg(f"hurt.{suffix}")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    _damage(cfg.out, "image/emb", 2)
    _damage(cfg.out, "image/pixels", 0)
    with pytest.raises(StoreDamagedError, match="embedcache verify"):
        embedcache.open_store(cfg.out).image_emb()
    res = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"])
    assert res.exit_code == 2 and "block 0: image/pixels" in res.output and "block 2: image/emb" in res.output
    # a lost Zarr chunk is seen from a file listing when the store is opened; contents need a read
    cmds = [["evaluate", "--store", cfg.out, "--out", cfg.out + ".parquet"]] + ([["inspect", cfg.out]] if suffix == "zarr" else [])
    for cmd in cmds:
        bad = CliRunner().invoke(main, cmd)
        assert bad.exit_code == 2 and "is damaged" in bad.output and bad.output.strip().count("\n") == 0, bad.output
    encoded = []
    again = extract(cfg, teacher=tiny_teacher, log=quiet, on_block_done=encoded.append)  # the same command repairs it
    assert again.complete and again.repaired == 2 and sorted(encoded) == [0, 2] and again.images == 16
    _same(_arrays(good.out), _arrays(cfg.out))
    assert CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"]).exit_code == 0


@pytest.mark.parametrize("suffix", ["zarr", "h5"])
def test_a_complete_store_that_lost_a_done_flag_is_damaged_not_unchecked(make_cfg, tiny_teacher, suffix):
    """Checks run over finished blocks; in a complete store every block is finished, so a lost done
    flag (with the block's rows gone too) is damage to refuse and repair, not a block to skip."""
    good = make_cfg(f"good.{suffix}")
    extract(good, teacher=tiny_teacher, log=quiet)
    cfg = make_cfg(f"hurt.{suffix}")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    _damage(cfg.out, "image/emb", 1)
    if suffix == "zarr":
        (Path(cfg.out) / "blocks" / "done" / "c" / "1").unlink()
    else:
        import h5py

        with h5py.File(cfg.out, "a") as f:
            f["blocks/done"][1] = 0
    with pytest.raises(StoreDamagedError, match="block 1"):
        embedcache.open_store(cfg.out).image_emb()
    res = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"])
    assert res.exit_code == 2 and "block 1: blocks/done" in res.output, res.output
    encoded = []
    again = extract(cfg, teacher=tiny_teacher, log=quiet, on_block_done=encoded.append)
    assert again.complete and again.repaired == 1 and encoded == [1]
    _same(_arrays(good.out), _arrays(cfg.out))
    assert CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"]).exit_code == 0


@pytest.mark.parametrize("where", ["image", "text"])
def test_a_teacher_that_answers_nan_is_refused_before_the_store(make_cfg, tiny_teacher, monkeypatch, where):
    """A damaged checkpoint's NaN would be stored as every student's target and score the teacher at
    chance: extraction stops in one line, keeps the finished blocks, and the rerun finishes the store."""
    from embedcache.errors import TeacherOutputError

    cfg = make_cfg("nan.zarr")
    name = "embed_views" if where == "image" else "encode_text"
    real, calls = getattr(tiny_teacher, name), []

    def bad(x):
        out = real(x).clone()
        calls.append(1)
        if len(calls) == 3 or where == "text":
            out[1, 0] = float("nan")
        return out

    monkeypatch.setattr(tiny_teacher, name, bad)
    with pytest.raises(TeacherOutputError, match=r"NaN or inf for 1 of \d+ .*teacher.precision=fp32"):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    with Store(cfg.out) as st:
        done = st.blocks_done()
        assert not st.complete and done[0] and done.all() == (where == "text")
        assert np.isfinite(st.read("image/emb", verify=False)).all()
    monkeypatch.undo()
    again = extract(cfg, teacher=tiny_teacher, log=quiet)
    assert again.complete and np.isfinite(embedcache.open_store(cfg.out).class_emb("name")).all()


def test_non_finite_class_embeddings_are_refused_by_the_label_search():
    from embedcache.errors import EvaluationError
    from embedcache.evaluate.index import LabelIndex
    from embedcache.evaluate.metrics import nearest_label

    text = np.eye(3, 4, dtype=np.float32)
    text[2, 1] = np.nan
    for search in (lambda: LabelIndex(text), lambda: nearest_label(np.ones((2, 4), np.float32), text)):
        with pytest.raises(EvaluationError, match="1 of 3 class embeddings hold NaN or inf: the store's teacher"):
            search()


def test_a_manifest_whose_class_list_was_edited_is_refused(synthetic_store, tmp_path):
    """The manifest carries no checksum of its own; its class and domain lists must agree with the
    checksummed meta.parquet, or train_classes would pick the rows of other classes."""
    import shutil

    from embedcache.students.data import SplitConfig, StoreData

    path = str(tmp_path / "edited.zarr")
    shutil.copytree(synthetic_store, path)
    with Store(path, "a") as st:
        ds = st.manifest["dataset"]
        st.write_manifest({**st.manifest, "dataset": {**ds, "classes": ds["classes"][::-1]}})
    with pytest.raises(StoreError, match=r"manifest's class list disagrees with meta.parquet .*restore the manifest"):
        StoreData(path, "name", SplitConfig(train_classes=("circle",)))
    res = CliRunner().invoke(main, ["evaluate", "--store", path, "--out", str(tmp_path / "e.parquet")])
    assert res.exit_code == 2 and "class list disagrees" in res.output
    for repair in ([], ["--repair"]):  # verify said intact, the tool meant to find it (a trial)
        res = CliRunner().invoke(main, ["verify", path, "--no-progress", *repair])
        assert res.exit_code == 2 and "the manifest's class list disagrees with meta.parquet (edited by hand?); restore " \
            "the manifest" in res.output, res.output
    with Store(path, "a") as st:  # its checksums gone: nothing checked the tables and text arrays, verify said intact
        kept = st.manifest
        st.write_manifest({**{k: v for k, v in kept.items() if k != "checksums"}, "dataset": ds})
    res = CliRunner().invoke(main, ["verify", path, "--no-progress"])
    assert res.exit_code == 2 and "the manifest has lost the checksums of its tables and text arrays" in res.output, res.output
    for section, change in (("views", {"scale": [0.9, 1.0]}), ("canvas", {"size": 999})):  # inspect showed them as made so
        with Store(path, "a") as st:
            st.write_manifest({**kept, "dataset": ds, section: {**kept[section], **change}})
        res = CliRunner().invoke(main, ["verify", path, "--no-progress"])
        assert res.exit_code == 2 and f"the manifest's {section} section no longer gives the key it was made under" \
            in res.output, res.output
    with Store(path, "a") as st:
        st.write_manifest({**kept, "dataset": ds})
    assert CliRunner().invoke(main, ["verify", path, "--no-progress"]).exit_code == 0  # as made: intact


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_manifest_edited_anywhere_is_found_by_its_own_checksum(make_cfg, tiny_teacher, suffix, tmp_path):
    """An edit of the teacher or text section (or the key) was found nowhere: nothing else in the store
    says what they were (a trial). The manifest now carries a checksum of its own; a store made before
    it had one still verifies."""
    import json

    import h5py

    cfg = make_cfg("m" + suffix)
    extract(cfg, teacher=tiny_teacher, log=quiet)

    def edit(change):  # by hand, as a person would: the file itself, not through embedcache
        if suffix == ".zarr":
            meta = Path(cfg.out) / "zarr.json"
            doc = json.loads(meta.read_text())
            change(doc["attributes"]["manifest"])
            meta.write_text(json.dumps(doc))
        else:
            with h5py.File(cfg.out, "a") as f:
                m = json.loads(f.attrs["manifest"])
                change(m)
                f.attrs["manifest"] = json.dumps(m)

    assert CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"]).exit_code == 0
    edit(lambda m: m["teacher"].update(model="ViT-L-14"))
    res = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"])
    assert res.exit_code == 2 and "the manifest does not match its own checksum: it was changed since embedcache " \
        "wrote it (edited by hand?); restore the manifest" in res.output, res.output
    with pytest.raises(StoreError, match="the manifest does not match its own checksum"):  # readers refuse it too,
        embedcache.open_store(cfg.out)  # at opening: its classes and domains were answered from the edited manifest
    edit(lambda m: m["teacher"].update(model=tiny_teacher.describe()["model"]))  # put back as it was
    assert CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"]).exit_code == 0
    edit(lambda m: m.pop("manifest_crc32c"))  # deleted from a store made since manifests have one: found
    res = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"])
    assert res.exit_code == 2 and "the manifest has lost its own checksum (manifest_crc32c)" in res.output, res.output
    with pytest.raises(StoreError, match="the manifest has lost its own checksum"):
        embedcache.open_store(cfg.out)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_store_made_before_manifest_and_layout_checksums_still_verifies(make_cfg, tiny_teacher, suffix, monkeypatch):
    import embedcache.store.store as store_mod

    monkeypatch.setattr(store_mod, "sealed", lambda manifest: manifest)  # made as older versions made stores
    monkeypatch.setattr(store_mod, "new_marks", lambda layout: {})
    cfg = make_cfg("old" + suffix)
    extract(cfg, teacher=tiny_teacher, log=quiet)
    monkeypatch.undo()
    with Store(cfg.out) as st:
        assert not {"manifest_crc32c", "layout_crc32c", "block_sums_seeded"} & set(st.manifest)
    assert CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"]).exit_code == 0
    with embedcache.open_store(cfg.out) as s:
        assert s.image_emb().shape[0] == 30


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("field", ["views", "dim", "canvas", "store_pixels"])
def test_a_layout_edited_by_hand_is_refused(make_cfg, tiny_teacher, suffix, field):
    """The layout was checked only against the arrays' own metadata: an edited view count, embedding
    width or canvas size was read and reported as the store's (``views`` picks the views trained on)."""
    import json

    import h5py

    cfg = make_cfg("lay" + suffix)
    extract(cfg, teacher=tiny_teacher, log=quiet)
    change = {"views": 2, "dim": 16, "canvas": 32, "store_pixels": False}[field]
    if suffix == ".zarr":
        meta = Path(cfg.out) / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"]["layout"][field] = change
        meta.write_text(json.dumps(doc))
    else:
        with h5py.File(cfg.out, "a") as f:
            lay = json.loads(f.attrs["layout"])
            lay[field] = change
            f.attrs["layout"] = json.dumps(lay)
    for cmd in (["verify", cfg.out, "--no-progress"], ["inspect", cfg.out]):
        res = CliRunner().invoke(main, cmd)
        assert res.exit_code == 2 and "its layout (the store's 'layout' attribute) does not match the checksum its " \
            "manifest keeps" in res.output and res.output.strip().count("\n") == 0, res.output
    with pytest.raises(StoreDamagedError, match="its layout"):
        embedcache.open_store(cfg.out)


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_a_verified_read_is_exact_and_names_the_block_whose_bytes_changed(tmp_path, backend):
    """Store.read reads uncompressed chunks straight from the files: the whole array comes back exactly
    (blocks of 4 rows, a short last block, pixel chunks smaller than a block), and one flipped byte in
    the middle of a file is refused, naming its block."""
    path, arrays = block_store(tmp_path, backend)
    with Store(path) as st:
        for name, want in arrays.items():
            assert np.array_equal(st.read(name), want), name
    import h5py
    import zarr

    slow = (zarr.Array, "__getitem__") if backend == "zarr" else (h5py.Dataset, "read_direct")
    with pytest.MonkeyPatch.context() as mp, Store(path) as st:  # uncompressed arrays bypass the library
        mp.setattr(*slow, lambda *a, **k: pytest.fail("the library's own read was used"))
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])
    alter_emb(path, row=5, view=1, col=3)
    with Store(path) as st, pytest.raises(StoreDamagedError, match=r"image/emb: rows 4-7 \(block 1\) do not match"):
        st.read("image/emb")


def test_a_lost_table_is_named_and_rebuilt(make_cfg, tiny_teacher):
    cfg = make_cfg("t.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    before = _arrays(cfg.out)
    (Path(cfg.out) / "meta.parquet").unlink()
    raw = (Path(cfg.out) / "text.parquet").read_bytes()
    (Path(cfg.out) / "text.parquet").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(StoreDamagedError, match="meta.parquet: the file is missing"):
        embedcache.open_store(cfg.out)
    res = CliRunner().invoke(main, ["verify", "--repair", cfg.out, "--no-progress", ])
    assert res.exit_code == 0, res.output
    # what was re-done: it said "0 block(s) re-done" alone, which read as nothing (a trial)
    assert f"{cfg.out}: repaired (0 block(s) re-done, 2 file(s) written again (meta.parquet, text.parquet))" in res.output
    _same(before, _arrays(cfg.out))
    assert embedcache.open_store(cfg.out).text_table.equals(embedcache.open_store(cfg.out).text_table)


def test_verify_and_repair_from_python(make_cfg, tiny_teacher):
    """`embedcache verify [--repair]` is ``verify_store``: a notebook checks and repairs a store too."""
    from embedcache.errors import ConfigError
    from embedcache.extract.verify import verify_store

    cfg = make_cfg("py.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    before = _arrays(cfg.out)
    intact = verify_store(cfg.out, progress=False, log=quiet)
    assert intact.report.ok and intact.unfinished == "" and intact.files_checked > 0 and intact.repaired is None
    alter_emb(cfg.out, row=5, view=1, col=3)
    said = []
    with pytest.raises(StoreError, match="1 damaged block.*verify --repair"):
        verify_store(cfg.out, progress=False, log=said.append)
    assert said == ["damaged: block 0: image/emb"]  # the block holding row 5
    with pytest.raises(ConfigError, match="give them with a repair"):
        verify_store(cfg.out, overrides=["dataset.path=/elsewhere"], log=quiet)
    assert verify_store(cfg.out, repair=True, progress=False, log=quiet).repaired == 1
    _same(before, _arrays(cfg.out))
    assert verify_store(cfg.out, progress=False, log=quiet).report.ok
    # an intact store: --set was not looked at, even an unknown key, and "intact" was said (a trial)
    with pytest.raises(ConfigError, match="unknown config key viewz"):
        verify_store(cfg.out, repair=True, overrides=["viewz=2"], progress=False, log=quiet)
    said = []
    verify_store(cfg.out, repair=True, overrides=["num_workers=0"], progress=False, log=said.append)
    assert said == [f"note: {cfg.out} has nothing to repair, so --set num_workers=0 changed nothing"]


def test_a_truncated_hdf5_file_is_one_line(make_cfg, tiny_teacher, tmp_path):
    cfg = make_cfg("t.h5")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    data = Path(cfg.out).read_bytes()
    Path(cfg.out).write_bytes(data[: len(data) // 3])
    res = CliRunner().invoke(main, ["inspect", cfg.out])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0
    assert "damaged or truncated" in res.output and "rerun the command that made it (its extract or synthesize)" in res.output



@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_an_unwritable_out_folder_is_one_line_before_the_teacher(make_cfg, tmp_path, monkeypatch, suffix):
    """A read-only folder gave, once the teacher had loaded, "store rofs/.s.zarr.<hex>.creating cannot be
    opened; delete it" (nothing to delete) for Zarr and a traceback for HDF5 (a trial, on a read-only mount;
    here the folder's access check says so, as it does there: tests run as root, whom permissions let by)."""
    import embedcache.extract as ex

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro and mode == os.W_OK else real(p, mode, **kw))
    monkeypatch.setattr(ex, "build_teacher", lambda cfg: pytest.fail("the teacher was built"))
    for out in (ro / f"s{suffix}", ro / "new" / f"s{suffix}"):
        with pytest.raises(ConfigError, match=f"--out {out}: {ro} is not writable .*; choose another --out"):
            extract(make_cfg(str(out)), log=quiet)
    assert not any(ro.iterdir())


def test_a_file_that_is_not_hdf5_is_not_called_a_damaged_store(make_cfg, tiny_teacher, tmp_path):
    """A text file given as --out x.h5 was "a damaged or truncated HDF5 store; delete it": a user's own file."""
    other = tmp_path / "notes.h5"
    other.write_text("my notes\n")
    for cmd in (["inspect", str(other)], ["verify", str(other), "--no-progress"]):
        res = CliRunner().invoke(main, cmd)
        assert res.exit_code == 2 and "is not an HDF5 file (no HDF5 signature in it)" in res.output, res.output
        assert "delete" not in res.output
    with pytest.raises(StoreError, match="is not an HDF5 file"):
        extract(make_cfg(str(other)), teacher=tiny_teacher, log=quiet)
    assert other.read_text() == "my notes\n"


def test_an_hdf5_store_on_a_filesystem_without_locks_is_not_said_busy(make_cfg, tiny_teacher, monkeypatch):
    """HDF5's "unable to lock file" is also what NFS and Lustre give (errno 38 or 37, no other process there):
    said busy it exited 75, and a scheduler retrying on 75 would retry forever (a review)."""
    import h5py

    cfg = make_cfg("s.h5")
    extract(cfg, teacher=tiny_teacher, log=quiet)

    def no_locks(*a, **k):
        raise OSError(38, "Unable to synchronously open file (unable to lock file, errno = 38, error message = "
                          "'Function not implemented')")

    monkeypatch.setattr(h5py, "File", no_locks)
    res = CliRunner().invoke(main, ["inspect", cfg.out])
    assert res.exit_code == 2 and "cannot be locked on this filesystem" in res.output, res.output
    assert "HDF5_USE_FILE_LOCKING=FALSE" in res.output and res.output.strip().count("\n") == 0


def test_an_hdf5_store_open_for_writing_elsewhere_is_one_line(make_cfg, tiny_teacher):
    cfg = make_cfg("busy.h5")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); "
                               "print('open', flush=True); time.sleep(60)", cfg.out], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"open"
        res = CliRunner().invoke(main, ["inspect", cfg.out])
        assert res.exit_code == 75 and "is open in another process" in res.output  # try again later
        assert res.output.strip().count("\n") == 0
    finally:
        holder.kill()
        holder.wait()


# --- images decoded as they are meant to be seen -----------------------------------------------------
def _reference(mode: str, arr: np.ndarray) -> np.ndarray:
    """What each mode should become, computed by hand (not by the code under test)."""
    if mode in ("I;16", "I"):
        return np.repeat(np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "F":
        return np.repeat(np.rint(np.clip(arr, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "RGBA":
        a = arr[..., 3:4].astype(np.float64) / 255
        return np.rint(arr[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    if mode == "LA":
        a = arr[..., 1:2].astype(np.float64) / 255
        return np.repeat(np.rint(arr[..., :1] * a + 255 * (1 - a)).astype(np.uint8), 3, axis=2)
    raise AssertionError(mode)


def _image(mode: str, rng):
    if mode == "I;16":
        arr = rng.integers(0, 65536, (6, 7), dtype=np.uint16)
        return Image.frombytes("I;16", (7, 6), arr.astype("<u2").tobytes()), arr
    if mode == "I":
        arr = rng.integers(0, 65536, (6, 7)).astype(np.int32)
        return Image.frombytes("I", (7, 6), arr.astype("<i4").tobytes()), arr
    if mode == "F":
        arr = rng.random((6, 7)).astype(np.float32)
        return Image.frombytes("F", (7, 6), arr.astype("<f4").tobytes()), arr
    if mode == "RGBA":
        arr = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
        return Image.frombytes("RGBA", (7, 6), arr.tobytes()), arr
    if mode == "LA":
        arr = rng.integers(0, 256, (6, 7, 2), dtype=np.uint8)
        return Image.frombytes("LA", (7, 6), arr.tobytes()), arr
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGBA", "LA"])
def test_wide_and_transparent_modes_against_a_hand_reference(mode):
    from embedcache.images import to_rgb8

    img, arr = _image(mode, np.random.default_rng(0))
    got = np.asarray(to_rgb8(img))
    ref = _reference(mode, arr)
    assert got.shape == ref.shape and np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_a_16_bit_grey_png_with_a_transparent_value_shows_it_white(tmp_path):
    """Pillow opens it as I;16 with info["transparency"]: the 16-bit branch dropped it, so its transparent
    pixels were black where the 8-bit image's are white (a trial)."""
    import struct
    import zlib

    from embedcache.images import read_rgb8

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    a = np.full((8, 8), 40000, np.uint16)
    a[:, :4] = 0  # the transparent value
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in a)
    (tmp_path / "t16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 0, 0, 0, 0))
                                       + chunk(b"tRNS", struct.pack(">H", 0)) + chunk(b"IDAT", zlib.compress(raw))
                                       + chunk(b"IEND", b""))
    got = np.asarray(read_rgb8(tmp_path / "t16.png"))
    assert (got[:, :4] == 255).all() and (got[:, 4:] == round(40000 / 257)).all()


def test_an_image_past_the_decompression_bomb_limit_is_said_with_its_file(tmp_path, monkeypatch):
    """Pillow's warning named no file: a researcher could not tell which of 10,000 images it was (a trial)."""
    import warnings

    from embedcache.images import read_rgb8

    Image.new("RGB", (20, 10), (9, 9, 9)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 200 pixels: past the limit, not past twice it
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert read_rgb8(tmp_path / "big.png").size == (20, 10)
    assert [str(w.message).split(":")[0] for w in said] == [str(tmp_path / "big.png")]
    assert "20x10 pixels, past Pillow's decompression-bomb limit of 150: read and kept" in str(said[0].message)
    with warnings.catch_warnings(record=True) as said:  # Pillow's own, which named no file, kept quiet by the read
        warnings.simplefilter("always")  # (a command's catch_warnings had dropped the filter set at import)
        read_rgb8(tmp_path / "big.png")
    assert [w.category for w in said] == [UserWarning], [str(w.message) for w in said]


@pytest.mark.parametrize("mode", ["1", "L", "P", "P-transparency", "CMYK", "YCbCr", "RGB"])
def test_other_modes_match_pillows_own_conversion(mode):
    from embedcache.images import to_rgb8

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), "RGB")
    if mode == "P-transparency":
        img = rgb.convert("P")
        img.info["transparency"] = 0
        ref = np.asarray(img.convert("RGBA"), dtype=np.float64)
        a = ref[..., 3:4] / 255
        expected = np.rint(ref[..., :3] * a + 255 * (1 - a)).astype(np.uint8)  # transparent index -> white
    else:
        img = rgb.convert(mode)
        expected = np.asarray(img.convert("RGB"))
    assert np.array_equal(np.asarray(to_rgb8(img)), expected)


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    from embedcache.datasets import ImageDataset, Sample

    arr = np.full((8, 8), 20000, np.uint16)  # a dark grey in 16 bits
    Image.frombytes("I;16", (8, 8), arr.astype("<u2").tobytes()).save(tmp_path / "a.png")
    ds = ImageDataset("folder", tmp_path, [Sample("a.png", "x", "d", "train", 1)])
    px = np.asarray(ds.load(0))
    assert px.max() == px.min() == round(20000 / 257)  # 78, not 255 (white)


def test_exif_orientation_is_applied(tmp_path):
    from embedcache.datasets import ImageDataset, Sample

    arr = np.zeros((4, 8, 3), np.uint8)
    arr[:, :4] = 255  # left half white: a landscape image
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    img.save(tmp_path / "p.jpg", exif=exif, quality=100)
    ds = ImageDataset("folder", tmp_path, [Sample("p.jpg", "x", "d", "train", 1)])
    px = np.asarray(ds.load(0))
    assert px.shape == (8, 4, 3)  # shown upright: portrait
    assert px[:3].mean() > 200 and px[-3:].mean() < 50  # the white half is now on top


def test_refused_images_are_recorded_not_stored(tmp_path, make_cfg, tiny_teacher):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(np.full((20, 20, 3), 100, np.uint8)).save(root / "a" / "ok.png")
    Image.fromarray(np.full((20, 20, 3), 50, np.uint8)).save(root / "b" / "ok.png")
    Image.frombytes("F", (20, 20), np.full((20, 20), 1e6, "<f4").tobytes()).save(root / "a" / "wild.tif")
    res = extract(make_cfg("f.zarr", "dataset.name=folder", f"dataset.path={root}", "block_rows=2"), teacher=tiny_teacher,
                  log=quiet)
    with embedcache.open_store(res.path) as s:
        bad = s.meta[s.meta.status == "failed"]
        assert bad.path.tolist() == ["a/wild.tif"] and "outside [0, 1] and [0, 255]" in bad.reason.iloc[0]


# --- unreadable rows never score ------------------------------------------------------------------
def test_unreadable_rows_are_left_out_and_counted(tmp_path, make_cfg, tiny_teacher):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((24, 24, 3), 40 * k + (c == "dog") * 100, np.uint8)).save(root / c / f"{k}.png")
    (root / "dog" / "1.png").write_bytes(b"broken")
    res = extract(make_cfg("u.zarr", "dataset.name=folder", f"dataset.path={root}"), teacher=tiny_teacher, log=quiet)
    s = embedcache.open_store(res.path)
    with pytest.warns(UserWarning, match="1 unreadable image"):
        hits = s.nearest_images(np.ones(s.dim), k=10)
    assert len(hits) == 5 and "dog/1.png" not in hits.path.tolist()
    with pytest.warns(UserWarning, match="1 unreadable image"):
        df = s.frame(embeddings=True)
    assert np.isnan(df.emb.iloc[4]).all()
    with pytest.raises(StoreError, match="could not be read"):
        s.nearest_classes(4)
    emb = s.image_emb()
    with pytest.raises(ValueError):
        emb[0, 0, 0] = 1.0  # read-only: later calls cannot be changed by editing a result
    assert s.image_emb() is emb
    facts = s.facts()  # inspect: a domain's count says how many of its images failed (a trial: counted as images)
    assert facts["images_per_domain"] == {"imgs": 6} and facts["failed_per_domain"] == {"imgs": 1}
    assert "imgs (6, 1 failed)" in CliRunner().invoke(main, ["inspect", res.path]).output


def test_text_queries_load_the_teacher_once(synthetic_store, monkeypatch):
    import embedcache.teachers as teachers

    calls = []
    real = teachers.build_teacher
    monkeypatch.setattr(teachers, "build_teacher", lambda cfg, **kw: calls.append(cfg) or real(cfg, **kw))
    s = embedcache.open_store(str(synthetic_store))
    for q in ("a photo of a circle.", "a photo of a square."):
        s.nearest_images(q, k=2)
    s.nearest_classes("a photo of a ring.")
    assert len(calls) == 1


# --- settings checked before any work ---------------------------------------------------------------
@pytest.mark.parametrize("override,msg", [
    ("steps=-5", "steps=-5 is not valid: must be at least 1"),
    ("steps=0", "steps=0 is not valid: must be at least 1"),
    ("batch_size=0", "batch_size=0 is not valid: must be at least 1"),
    ("optim.lr=-1", "optim.lr=-1.0 is not valid: must be at least 0"),
    ("steps=abc", "steps='abc' is not valid: expected an integer"),
    ("split.val_fraction=2", "split.val_fraction=2.0 is not valid: must be at most 0.9"),
    ("averaging=ema", "averaging='ema' is not valid: choose one of none, swa, swad"),
])
def test_invalid_training_settings_are_refused_before_the_store_is_opened(override, msg, tmp_path):
    res = CliRunner().invoke(main, ["train", "--store", str(tmp_path / "no-such-store.zarr"), "--set", override])
    assert res.exit_code == 2 and msg in res.output and res.output.strip().count("\n") == 0, res.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override,msg", [
    ("views.count=four", "views.count='four' is not valid: expected an integer"),
    ("views.count=0", "views.count=0 is not valid: must be at least 1"),
    ("views.scale=[0.9,0.2]", "views.scale=[0.9, 0.2] is not valid"),
    ("canvas.size=abc", "canvas.size='abc' is not valid"),
    ("teacher.precision=fp8", "teacher.precision='fp8' is not valid: choose one of fp32, bf16, fp16"),
    ("batch_size=-1", "batch_size=-1 is not valid"),
])
def test_invalid_extraction_settings_are_refused_before_the_teacher_loads(override, msg, tmp_path):
    res = CliRunner().invoke(main, ["extract", "--out", str(tmp_path / "x.zarr"), "--set", override])
    assert res.exit_code == 2 and msg in res.output, res.output
    assert not (tmp_path / "x.zarr").exists()


def test_malformed_yaml_and_bad_set_values_name_the_place(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset:\n  name: synthetic\n views: [1\n")
    res = CliRunner().invoke(main, ["extract", "--config", str(bad)])
    assert res.exit_code == 2 and f"{bad} is not valid YAML at line" in res.output
    res = CliRunner().invoke(main, ["extract", "--set", "views.scale=[0.5,"])
    assert res.exit_code == 2 and "--set 'views.scale=[0.5,' is not valid YAML" in res.output


def test_an_empty_folder_made_for_the_store_is_used_and_one_with_files_refused(make_cfg, tiny_teacher):
    """`mkdir stores/x.zarr` before the extract was refused as 'exists and is not a Zarr store' (a trial)."""
    from embedcache.errors import ConfigError
    from embedcache.extract import extract

    cfg = make_cfg("made.zarr", "dataset.per_class=1")
    os.makedirs(cfg.out)
    assert extract(cfg, teacher=tiny_teacher, log=quiet).complete
    busy = make_cfg("busy.zarr", "dataset.per_class=1")
    os.makedirs(busy.out)
    (Path(busy.out) / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not a Zarr store"):
        extract(busy, teacher=tiny_teacher, log=quiet)
    assert (Path(busy.out) / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_store_of_another_schema_is_refused_by_its_readers(make_cfg, tiny_teacher, suffix):
    """DESIGN.md: readers check the schema before trusting a store. A manifest of another schema, sealed with
    its own checksum as a version that writes that schema would seal it, is refused in one line."""
    import json

    import h5py

    from embedcache.store import SCHEMA_VERSION
    from embedcache.store.store import sealed

    cfg = make_cfg("schema" + suffix)
    extract(cfg, teacher=tiny_teacher, log=quiet)
    if suffix == ".zarr":
        meta = Path(cfg.out) / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"]["manifest"] = sealed({**doc["attributes"]["manifest"], "schema": SCHEMA_VERSION + 1})
        meta.write_text(json.dumps(doc))
    else:
        with h5py.File(cfg.out, "a") as f:
            f.attrs["manifest"] = json.dumps(sealed({**json.loads(f.attrs["manifest"]), "schema": SCHEMA_VERSION + 1}))
    with pytest.raises(StoreMismatchError, match=f"has schema {SCHEMA_VERSION + 1}, this embedcache reads"):
        embedcache.open_store(cfg.out)
    res = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"])
    assert res.exit_code == 2 and f"has schema {SCHEMA_VERSION + 1}" in res.output, res.output


def test_a_store_url_is_refused_not_written_as_a_local_folder(tmp_path, monkeypatch):
    """DESIGN.md's fsspec stores are not built: `--out s3://bucket/x.zarr` wrote ./s3:/bucket/x.zarr and said
    "wrote s3://bucket/x.zarr" (an audit)."""
    monkeypatch.chdir(tmp_path)
    for command in (["extract", "--set", "dataset.per_class=1", "--out"], ["inspect"], ["verify"]):
        res = CliRunner().invoke(main, [*command, "s3://bucket/x.zarr"])
        assert res.exit_code == 2 and "s3://bucket/x.zarr is a URL, and stores are read and written at local paths" \
            in res.output, res.output
    assert not list(tmp_path.iterdir())


def test_out_pointing_at_a_file_is_one_line(tmp_path):
    f = tmp_path / "notes"
    f.write_text("keep me")
    for dry in ([], ["--dry-run"]):  # a dry run said what it would write there (a fuzz)
        res = CliRunner().invoke(main, ["extract", "--out", str(f), "--set", "dataset.per_class=1", *dry])
        assert res.exit_code == 2 and "exists and is not a Zarr store" in res.output, res.output
    for command in (["train", "--store", str(tmp_path / "s.zarr")], ["sweep", "demo", "--dry-run"]):
        res = CliRunner().invoke(main, [*command, "--out", str(f)])  # refused before the store is looked at
        assert res.exit_code == 2 and f"--out {f} exists and is not a folder" in res.output, res.output
    assert f.read_text() == "keep me"
    res = CliRunner().invoke(main, ["extract", "--out", str(tmp_path / "s.hd5"), "--set", "dataset.per_class=1"])
    assert res.exit_code == 2 and "ends in .zarr (a Zarr folder) or .h5/.hdf5 (one HDF5 file), not .hd5" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # a typo'd suffix made nothing


def test_a_nan_loss_stops_the_run_unfinished(synthetic_store, tmp_path):
    from dataclasses import replace

    from embedcache.students.config import OptimConfig, StudentConfig, TrainConfig
    from embedcache.students.train import train

    cfg = TrainConfig(store=str(synthetic_store), recipe="feat_kd", student=StudentConfig(name="test_resnet", input_size=32),
                      steps=20, batch_size=8, eval_every=5, ckpt_every=5, out=str(tmp_path / "nan"), progress=False,
                      device="cpu", optim=OptimConfig(name="sgd", lr=1e30, schedule="constant"))
    with pytest.raises(TrainingError, match="the loss became (nan|inf)") as err:
        train(cfg, log=quiet)
    # the fix it names works as said: a rerun in that folder at another lr was refused (a trial)
    assert f"lower optim.lr, with another --out or after deleting {tmp_path / 'nan'}" in str(err.value)
    with pytest.raises(TrainingError) as weighted:  # a loss setting given is named too (a tiny tau was blamed on the lr)
        train(replace(cfg, out=str(tmp_path / "nan2"), loss_weights={"cos": 2.0}), log=quiet)
    assert "lower optim.lr or check the loss_weights/loss_args given, with another --out" in str(weighted.value)
    assert not (tmp_path / "nan" / "done").exists() and not (tmp_path / "nan" / "model.safetensors").exists()
    # and the folder says why: evaluate called it "not finished", as if it were still training (a trial)
    from embedcache.students.rundir import RunDir
    assert RunDir(tmp_path / "nan").failure == f"TrainingError: {err.value}"
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nan"), "--out", str(tmp_path / "eval.parquet")])
    assert "its last attempt failed (TrainingError: run " in res.output and "the loss became" in res.output, res.output


def test_outputs_that_overflow_are_refused_in_training_and_in_scoring(synthetic_store, tmp_path):
    """One step at lr=1e30 leaves finite weights whose outputs overflow: the validation that follows
    refuses them; a run without validation rows finishes, and scoring refuses its embeddings."""
    from embedcache.errors import EvaluationError
    from embedcache.students.config import OptimConfig, SplitConfig, StudentConfig, TrainConfig
    from embedcache.students.scoring import score_run
    from embedcache.students.train import train

    def cfg(name, **split):
        return TrainConfig(store=str(synthetic_store), recipe="feat_kd", steps=1, batch_size=8, eval_every=1,
                           student=StudentConfig(name="test_resnet", input_size=32), ckpt_every=1, progress=False,
                           out=str(tmp_path / name), device="cpu", split=SplitConfig(holdout_domains=("solid",), **split),
                           optim=OptimConfig(name="sgd", lr=1e30, momentum=0.0, weight_decay=0.0, schedule="constant"))

    with pytest.raises(TrainingError, match="outputs on validation images became NaN or inf by step 1"):
        train(cfg("val"), log=quiet)
    assert not (tmp_path / "val" / "done").exists()
    train(cfg("noval", val_fraction=0.0), log=quiet)
    with pytest.raises(EvaluationError, match="of .* images' student embeddings hold NaN or inf"):
        score_run(str(tmp_path / "noval"), ["lodo"])


# --- the sweep lock ----------------------------------------------------------------------------------
CLAIMER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("claim", sys.argv[3])  # the module alone: starts in milliseconds
claim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claim)
Claim = claim.Claim
run, out = Path(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
go = float(sys.stdin.readline())  # one instant for both, sent once both have started
while time.time() < go:
    pass
with Claim(run) as mine:
    if mine:
        start = time.time()
        time.sleep(0.05)
        out.write_text(f"{start} {time.time()}")
"""


def test_two_processes_never_both_win_a_dead_owners_lock(tmp_path):
    """The takeover race, many times: the lock of a run whose owner died is claimed by two processes
    released at the same instant; they may win one after the other, never while the other holds it."""
    script = tmp_path / "claim.py"
    script.write_text(CLAIMER)
    for trial in range(60):
        run = tmp_path / f"run{trial}"
        run.mkdir()
        dead = subprocess.run([sys.executable, "-S", "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (run / ".lock").write_text(f"{os.uname().nodename} {dead.stdout.strip()}\n")  # a dead owner's lock
        procs = [subprocess.Popen([sys.executable, "-S", str(script), str(run), str(tmp_path / f"w{trial}-{k}"),
                                   str(ROOT / "students" / "sweep" / "claim.py")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for k in range(2)]
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go = f"{time.time() + 0.01}\n"
        for p in procs:
            p.stdin.write(go)
            p.stdin.close()
        for p in procs:
            assert p.wait(timeout=60) == 0
            p.stdout.close()
        held = [tuple(map(float, (tmp_path / f"w{trial}-{k}").read_text().split()))
                for k in range(2) if (tmp_path / f"w{trial}-{k}").exists()]
        assert held, f"trial {trial}: nobody took over the dead owner's lock"
        if len(held) == 2:
            (a0, a1), (b0, b1) = sorted(held)
            assert a1 <= b0, f"trial {trial}: both held the lock at once"


def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    from embedcache.students.sweep.claim import Claim

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from embedcache.students.sweep.claim import Claim; c = Claim(Path(sys.argv[1])); "
                               "assert c.__enter__(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    with Claim(tmp_path) as mine:
        assert not mine
    holder.kill()
    holder.wait()
    with Claim(tmp_path) as mine:
        assert mine


# --- make clean keeps what took compute --------------------------------------------------------------
def test_make_clean_says_what_it_removes_and_keeps_runs_and_stores():
    text = (ROOT / "Makefile").read_text()
    recipe = [ln for ln in text.split("\nclean:")[1].split("\n\n")[0].splitlines()[1:] if ln.startswith("\t")]
    assert recipe and not [ln for ln in recipe if any(w in ln for w in ("stores", "runs", "sweeps", "bench/results"))]
    help_out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "clean-runs" in help_out and "clean-stores" in help_out


def test_a_missing_store_says_where_a_relative_path_was_taken_from(tmp_path, monkeypatch):
    """A sweep file's relative store path, launched from another folder, read as 'make the store'."""
    from embedcache.errors import StoreError
    from embedcache.store import Store

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=rf"no zarr store at stores/x.zarr \(a relative path, taken from {tmp_path}\); "
                                         r"give its path, or run `embedcache extract` to make one"):
        Store("stores/x.zarr")
    # the store of a packaged config (a shipped train or sweep config names it): that config's command
    with pytest.raises(StoreError, match=r"run `embedcache extract --config pacs-conse-lite2` to make one"):
        Store("stores/pacs-conse-lite2.zarr")
    with pytest.raises(StoreError, match=r"run `embedcache synthesize --config pacs-contrastive` to make one"):
        Store("stores/pacs-contrastive.zarr")
    (tmp_path / "pacs-conse-lite2").write_text("#!/bin/sh\necho: [unclosed\n")  # a file named like the config
    with pytest.raises(StoreError, match=r"run `embedcache extract --config pacs-conse-lite2` to make one"):
        Store("stores/pacs-conse-lite2.zarr")


def test_a_damaged_derived_array_is_reported_apart_and_marked_for_recomputation(synthetic_store, tmp_path):
    """Damage to cached features was listed with the store's own files: `--repair` then re-encoded the
    text and rewrote the tables (every later extract too), claimed success, and the damage stayed."""
    import numpy as np

    from conftest import store_with_features
    from embedcache.errors import StoreDamagedError
    from embedcache.students.features import cache_features, has_features

    store, student, key = store_with_features(synthetic_store, tmp_path, 0)
    with Store(str(store), "a") as st:
        good = st.read_derived(key)
        st.b.write(f"derived/{key}", 0, np.zeros_like(good[:1]))
        st.b.flush()
        with pytest.raises(StoreDamagedError, match="verify --repair .* marks it to be recomputed"):
            st.read_derived(key)
        report = st.verify()
        assert report.ok and list(report.derived) == [key]  # the store's own data is intact
    seen = CliRunner().invoke(main, ["verify", str(store), "--no-progress"])
    assert seen.exit_code == 2 and f"damaged: derived/{key}" in seen.output and "1 damaged derived array" in seen.output
    # the fix it names: not the store's extract command, which finds the store intact and does nothing (a trial)
    assert (f"`embedcache verify --repair {store}` marks them to be recomputed, then the command that made them "
            "remakes them (`embedcache features` for cached features") in seen.output, seen.output
    assert "extract command" not in seen.output
    with Store(str(store)) as st:  # the store's own extraction, rerun, says so rather than only "intact"
        from embedcache.config import ExtractConfig, build_config, without_unread

        cfg = st.manifest["config"]
        cfg = build_config(ExtractConfig, {**cfg, "dataset": without_unread(cfg["dataset"]), "out": str(store),
                                           "progress": False, "shard": None, "num_shards": None})
    said = []
    from embedcache.extract import extract

    assert extract(cfg, log=said.append).skipped
    assert any(f"derived array(s) {key} of {store} are damaged" in line for line in said), said
    assert not any("intact" in line and "blocks and files" not in line for line in said), said  # not "intact" (a trial)
    fixed = CliRunner().invoke(main, ["verify", str(store), "--no-progress", "--repair"])
    assert fixed.exit_code == 0 and "marked to be recomputed" in fixed.output and "repaired" not in fixed.output
    with Store(str(store)) as st:
        assert not has_features(st, key)
    assert cache_features(str(store), student, device="cpu", progress=False, log=quiet) == key
    with Store(str(store)) as st:
        assert np.array_equal(st.read_derived(key), good) and st.verify().derived == {}


@pytest.mark.parametrize("name", ["blocks/done", "blocks/crc32c"])
def test_a_damaged_bookkeeping_chunk_is_a_block_to_redo(make_cfg, tiny_teacher, name):
    """An emptied blocks/done or blocks/crc32c chunk made inspect, verify and extract fail with a
    reshape traceback: its block now counts as not done (or unchecked), and a repair redoes it.
    Readers of the complete store check its rows against the blocks' summary (still intact), and
    refuse them once that is damaged too."""
    good = make_cfg("good.zarr")
    extract(good, teacher=tiny_teacher, log=quiet)
    cfg = make_cfg("hurt.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    chunk = next(p for p in (Path(cfg.out) / name / "c").rglob("*") if p.is_file() and p.relative_to(Path(cfg.out) / name / "c").parts[0] == "1")
    chunk.write_bytes(b"")
    assert np.array_equal(embedcache.open_store(cfg.out).image_emb(), embedcache.open_store(good.out).image_emb())
    res = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"])
    assert res.exit_code == 2 and "damaged: block 1" in res.output, res.output
    assert "damaged: blocks.npz: disagrees with the blocks' own blocks/done and blocks/crc32c" in res.output, res.output
    summary = Path(cfg.out) / "blocks.npz"
    summary.write_bytes(summary.read_bytes()[:-1])
    with pytest.raises(StoreDamagedError, match="embedcache verify"):
        embedcache.open_store(cfg.out).image_emb()
    assert "damaged: blocks.npz: truncated or altered" in CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"]).output
    fixed = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress", "--repair"])
    assert fixed.exit_code == 0 and "repaired (1 block(s) re-done, 1 file(s) written again (blocks.npz))" in fixed.output, \
        fixed.output
    _same(_arrays(good.out), _arrays(cfg.out))
    assert CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"]).exit_code == 0  # the summary rewritten


def test_damaged_store_metadata_is_one_line(make_cfg, tiny_teacher):
    """A truncated zarr.json of an array, and HDF5 headers overwritten with zeros, gave JSONDecodeError,
    KeyError, OSError or RuntimeError tracebacks from inspect, verify and extract."""
    z = make_cfg("meta.zarr")
    extract(z, teacher=tiny_teacher, log=quiet)
    meta = Path(z.out) / "image" / "emb" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    h = make_cfg("meta.h5")
    extract(h, teacher=tiny_teacher, log=quiet)
    raw = bytearray(Path(h.out).read_bytes())
    raw[1024:1024 + 4096] = bytes(4096)  # past the superblock: the root group's headers and B-tree
    Path(h.out).write_bytes(bytes(raw))
    for out in (z.out, h.out):
        for cmd in (["verify", out, "--no-progress"], ["verify", out, "--no-progress", "--repair"], ["inspect", out]):
            res = CliRunner().invoke(main, cmd)
            assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (cmd, res.output)
            assert res.output.strip().splitlines()[-1].startswith("error: "), (cmd, res.output)


@pytest.mark.parametrize("array,change", [("text/name/class_emb", {"data_type": "int32"}),
                                          ("image/emb", {"data_type": "int16"}),
                                          # the store's layout edited alike: passed every check (a trial)
                                          ("text/name/class_emb", {"data_type": "int32", "layout": True}),
                                          ("image/emb", {"data_type": "int16", "layout": True}),
                                          ("image/emb", {"shape": "wider"}),
                                          # read as damaged blocks, repaired by re-encoding all (a trial):
                                          ("image/emb", {"endian": "big"}),
                                          ("image/pixels", {"chunk_shape": "halved"})])
def test_an_array_whose_metadata_was_altered_is_refused(make_cfg, tiny_teacher, array, change):
    """An array's zarr.json given another type (the same bytes, so every checksum still held): verify
    said intact while label scores read as 1e10 or readers crashed; another shape sent `verify --repair`
    into re-encoding every block, failing, and doing it again on every rerun (a trial)."""
    cfg = make_cfg("alt.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    meta = Path(cfg.out) / array / "zarr.json"
    doc = json.loads(meta.read_text())
    if change.get("shape") == "wider":
        change = {"shape": doc["shape"][:-1] + [doc["shape"][-1] * 2]}
    if change.get("endian"):
        change = {"codecs": [{**c, "configuration": {"endian": "big"}} if c["name"] == "bytes" else c
                             for c in doc["codecs"]]}
    if change.get("chunk_shape"):
        grid = doc["chunk_grid"]["configuration"]["chunk_shape"]
        change = {"chunk_grid": {**doc["chunk_grid"], "configuration": {"chunk_shape": [grid[0] // 2, *grid[1:]]}}}
    said = f"array {array} reads as .*its metadata altered"
    if change.pop("layout", False):  # now found by the layout's own checksum first
        root = json.loads((Path(cfg.out) / "zarr.json").read_text())
        root["attributes"]["layout"]["arrays"][array]["dtype"] = change["data_type"]
        (Path(cfg.out) / "zarr.json").write_text(json.dumps(root))
        said = "its layout .* does not match the checksum its manifest keeps"
    meta.write_text(json.dumps({**doc, **change}))
    for cmd in (["verify", cfg.out, "--no-progress"], ["verify", cfg.out, "--no-progress", "--repair"], ["inspect", cfg.out]):
        res = CliRunner().invoke(main, cmd)
        assert res.exit_code == 2 and re.search(said, res.output), (cmd, res.output)
    with pytest.raises(StoreDamagedError, match=said):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    with pytest.raises(StoreDamagedError, match=said):
        embedcache.open_store(cfg.out)


def test_a_path_inside_a_store_names_the_store(make_cfg, tiny_teacher):
    """`verify s.zarr/image/emb` said "delete it and rerun its extract command", which would destroy a
    healthy store."""
    cfg = make_cfg("whole.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    for inner in ("image/emb", "image"):
        res = CliRunner().invoke(main, ["verify", str(Path(cfg.out) / inner), "--no-progress"])
        assert res.exit_code == 2 and f"is inside the store {Path(cfg.out).resolve()}; give the store's own path" in res.output
        assert "delete" not in res.output
    assert CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"]).exit_code == 0


def test_a_repair_stopped_part_way_is_finished_by_verify_repair(make_cfg, tiny_teacher, monkeypatch):
    """A `verify --repair` cut off part-way (its output piped to `head`) left the store incomplete, and a second
    `verify --repair` said "intact; incomplete ... rerun its extract command", exit 0 (a trial): it finishes it."""
    import embedcache.extract as extract_pkg
    from embedcache.extract.verify import verify_store

    cfg = make_cfg("stop.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    before = _arrays(cfg.out)
    _damage(cfg.out, "image/emb", 0)
    _damage(cfg.out, "image/emb", 2)
    real = extract_pkg.extract

    def stopped_after_a_block(c, **kw):
        def stop(_block):
            raise KeyboardInterrupt
        return real(c, on_block_done=stop, **kw)

    monkeypatch.setattr(extract_pkg, "extract", stopped_after_a_block)
    with pytest.raises(KeyboardInterrupt):
        verify_store(cfg.out, repair=True, progress=False, log=quiet)
    monkeypatch.setattr(extract_pkg, "extract", real)
    with pytest.raises(StoreError, match="is incomplete"):
        embedcache.open_store(cfg.out)
    said = []
    res = verify_store(cfg.out, repair=True, progress=False, log=said.append)
    assert said[0] == f"{cfg.out}: finishing the repair stopped part-way (block(s) 2 reopened)", said
    assert res.unfinished == "" and res.repaired == 1
    _same(before, _arrays(cfg.out))
    assert verify_store(cfg.out, progress=False, log=quiet).report.ok


def _stopped_repair(monkeypatch, path: str) -> None:
    """A `verify --repair` of ``path`` stopped once it has re-done its first block."""
    import embedcache.extract as extract_pkg
    from embedcache.extract.verify import verify_store

    real = extract_pkg.extract

    def stopped_after_a_block(c, **kw):
        def stop(_block):
            raise KeyboardInterrupt
        return real(c, on_block_done=stop, **kw)

    with monkeypatch.context() as m:
        m.setattr(extract_pkg, "extract", stopped_after_a_block)
        with pytest.raises(KeyboardInterrupt):
            verify_store(path, repair=True, progress=False, log=quiet)


def test_a_stopped_repair_of_a_block_with_an_unreadable_image_is_finished_by_verify_repair(make_cfg, tiny_teacher,
                                                                                           tmp_path, monkeypatch):
    """A block with an unreadable image is not held to what its files gave (that image may read now), so a
    stopped repair left no record of having reopened it: a second `verify --repair` said "intact; incomplete"."""
    from embedcache.extract.verify import verify_store

    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
    for k in range(4):
        Image.fromarray(np.full((24, 24, 3), 50 * k, np.uint8)).save(root / ("cat" if k < 2 else "dog") / f"{k}.png")
    (root / "dog" / "3.png").write_bytes(b"not a picture")  # row 3: block 1
    cfg = make_cfg("unreadable.zarr", "dataset.name=folder", f"dataset.path={root}", "block_rows=2")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    before = _arrays(cfg.out)
    _damage(cfg.out, "image/emb", 0)
    _damage(cfg.out, "image/emb", 1)
    _stopped_repair(monkeypatch, cfg.out)
    said = []
    res = verify_store(cfg.out, repair=True, progress=False, log=said.append)
    assert said[0] == f"{cfg.out}: finishing the repair stopped part-way (block(s) 1 reopened)", said
    assert res.unfinished == "" and res.repaired == 1
    _same(before, _arrays(cfg.out))
    with Store(cfg.out) as st:
        assert list(st.failures()) == [3]  # still recorded unreadable


def test_a_stopped_repair_is_finished_by_verify_repair_beside_a_damaged_derived_array(make_cfg, tiny_teacher,
                                                                                     monkeypatch):
    """verify --repair marked a damaged derived array to be recomputed and returned, leaving a stopped repair's
    reopened blocks for another command."""
    from embedcache.extract.verify import verify_store

    cfg = make_cfg("derived.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    before = _arrays(cfg.out)
    with Store(cfg.out, "a") as st:
        st.put_derived("features-x", np.ones((4, 3), np.float32), {"kind": "test"})
    _damage(cfg.out, "image/emb", 0)
    _damage(cfg.out, "image/emb", 2)
    _stopped_repair(monkeypatch, cfg.out)
    with Store(cfg.out, "a") as st:  # damaged after the stop (the stopped repair marked it once before)
        st.put_derived("features-x", np.ones((4, 3), np.float32), {"kind": "test"})
        st.b.write("derived/features-x", 0, np.zeros((1, 3), np.float32))  # behind its checksum's back
    said = []
    res = verify_store(cfg.out, repair=True, progress=False, log=said.append)
    assert any("derived/features-x" in line for line in said), said
    assert f"{cfg.out}: finishing the repair stopped part-way (block(s) 2 reopened)" in said, said
    assert res.unfinished == "" and res.repaired == 1
    _same(before, _arrays(cfg.out))
    with Store(cfg.out) as st:
        assert st.complete and not st.derived()["features-x"]["complete"]


def test_a_repair_takes_where_the_images_are_now(make_cfg, tiny_teacher, tmp_path):
    """The images moved since the store was made: `verify --repair` said to set dataset.path with
    --set, an option verify did not have."""
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
    for k in range(4):
        Image.fromarray(np.full((24, 24, 3), 50 * k, np.uint8)).save(root / ("cat" if k < 2 else "dog") / f"{k}.png")
    cfg = make_cfg("moved.zarr", "dataset.name=folder", f"dataset.path={root}", "block_rows=2")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    good = _arrays(cfg.out)
    (tmp_path / "elsewhere").mkdir()
    root.rename(tmp_path / "elsewhere" / "imgs")  # same folder name: a folder dataset's domain is its name
    _damage(cfg.out, "image/emb", 1)
    lost = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress", "--repair"])
    assert lost.exit_code == 2 and "--set dataset.path=" in lost.output
    res = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress", "--repair", "--set",
                                    f"dataset.path={tmp_path / 'elsewhere' / 'imgs'}"])
    assert res.exit_code == 0 and "repaired (1 block(s) re-done)" in res.output, res.output
    _same(good, _arrays(cfg.out))
    alone = CliRunner().invoke(main, ["verify", cfg.out, "--set", "dataset.path=x"])
    assert alone.exit_code == 2 and "give it with --repair" in alone.output


def test_an_existing_file_that_is_no_store_is_named_so(make_cfg, tiny_teacher, tmp_path):
    """--out on an empty file said 'has schema None, ... re-extract it with this version'."""
    from embedcache.errors import StoreMismatchError

    import h5py

    (tmp_path / "empty.h5").write_bytes(b"")
    with h5py.File(tmp_path / "other.h5", "w") as f:  # somebody else's HDF5 file
        f["x"] = np.zeros(3)
    for target in ("empty.h5", "other.h5"):
        with pytest.raises(StoreMismatchError, match=rf"{target} is not an embedcache store \(it has no manifest\); "
                                                     r"give a store's path, or another --out"):
            extract(make_cfg(str(tmp_path / target)), teacher=tiny_teacher, log=quiet)


def test_a_store_made_with_a_setting_its_dataset_ignored_still_repairs(make_cfg, tiny_teacher):
    """dataset.path on the seeded shapes is refused now; a store made before that check still repairs
    (the ignored setting is dropped from the manifest's config, the cache key never held it)."""
    from embedcache.extract.verify import verify_store
    from embedcache.store import Store

    cfg = make_cfg("old.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    before = _arrays(cfg.out)
    with Store(cfg.out, "a") as st:
        manifest = dict(st.manifest)
        manifest["config"] = {**manifest["config"], "dataset": {**manifest["config"]["dataset"], "path": "/data/pacs"}}
        st.write_manifest(manifest)
    alter_emb(cfg.out, row=5, view=1, col=3)
    assert verify_store(cfg.out, repair=True, progress=False, log=quiet).repaired == 1
    _same(before, _arrays(cfg.out))


@pytest.mark.parametrize("lost", ["image/view_params", "image/emb/zarr.json", "blocks/crc32c+blocks.npz"])
def test_a_whole_array_lost_is_one_line_everywhere(make_cfg, tiny_teacher, lost):
    """A deleted array (not a damaged block) was a KeyError traceback in open_store, evaluate, verify,
    `verify --repair` (which also un-finished the store) and the extract rerun. (The blocks' bookkeeping
    lost with its summary: nothing holds its checksums any more.)"""
    import shutil

    cfg = make_cfg("lost.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    for part in lost.split("+"):
        target = Path(cfg.out) / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    name = lost.split("+")[0].removesuffix("/zarr.json")
    says = rf"lost.zarr: array {name}\S* is missing .*delete the store and rerun the command that made it"
    with pytest.raises(StoreDamagedError, match=says):
        embedcache.open_store(cfg.out)
    with pytest.raises(StoreDamagedError, match=says):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    for args in (["verify", cfg.out, "--no-progress"], ["verify", "--repair", cfg.out, "--no-progress"],
                 ["evaluate", "--store", cfg.out]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert res.output.strip().splitlines()[-1].startswith("error: ") and "is missing" in res.output, res.output


def test_a_repair_refuses_a_source_image_changed_since_the_store_was_made(make_cfg, tiny_teacher, tmp_path):
    """An image edited in place (same size: the dataset's fingerprint the same) was re-encoded by a
    repair of its damaged block, and the store said intact, its rows no longer what the teacher saw
    (a new user's trial). The re-done block must give the pixels the store recorded."""
    from embedcache.errors import DatasetError

    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(np.full((24, 24, 3), 30 * k + (c == "dog") * 100, np.uint8)).save(root / c / f"{k}.bmp")
    cfg = make_cfg("src.zarr", "dataset.name=folder", f"dataset.path={root}", "block_rows=4")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    good = _arrays(cfg.out)
    original = (root / "cat" / "1.bmp").read_bytes()
    Image.fromarray(np.full((24, 24, 3), 222, np.uint8)).save(root / "cat" / "1.bmp")  # edited, same size
    assert len((root / "cat" / "1.bmp").read_bytes()) == len(original)
    _damage(cfg.out, "image/emb", 0)
    with pytest.raises(DatasetError, match=r"src.zarr: block 0 \(rows 0-3\) re-done from the source files gives other "
                                           r"image/pixels than the store recorded: a source image changed since .*restore"):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    held = r"a repair is re-doing block\(s\) 0 from the source files, held to what they gave when the store was made: " \
        r"restore any source image changed since first, or the rerun refuses it again"
    with pytest.raises(StoreError, match=held):
        embedcache.open_store(cfg.out)  # never read as complete meanwhile, and "rerun to finish" not said alone (a trial)
    for cmd in (["verify", cfg.out, "--no-progress"], ["inspect", cfg.out]):
        assert re.search(held, CliRunner().invoke(main, cmd).output.replace("\n", " ")), cmd
    Image.fromarray(np.full((30, 30, 3), 222, np.uint8)).save(root / "cat" / "1.bmp")  # another size: the
    # dataset's fingerprint changed, which was "made from other inputs: use another --out, or delete that store"
    with pytest.raises(StoreMismatchError, match=r"its dataset differs \(the same settings: image files were added, "
                                                 r"removed or changed in size since it was made\).*put the dataset's "
                                                 r"files back as they were to resume or repair it"):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(root, moved)  # another folder (a dataset moved), its files not those either: not "the same settings"
    with pytest.raises(StoreMismatchError, match=rf"its dataset differs \(its files, read from {moved}, are not those it "
                                                 rf"was made from, read from {root}\)"):
        extract(make_cfg("src.zarr", "dataset.name=folder", f"dataset.path={moved}", "block_rows=4"),
                teacher=tiny_teacher, log=quiet)
    (root / "cat" / "1.bmp").write_bytes(original)
    (root / "cat").rename(root / "kitten")  # a class folder renamed: its prompts differ too, and the advice was
    with pytest.raises(StoreMismatchError, match=r"its dataset and text differ \(the same settings: class folders "  # to
                                                 r"changed since it was made: cat gone, kitten new\).*put the "  # delete it
                                                 r"dataset's files back as they were to resume or repair it"):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    (root / "kitten").rename(root / "cat")  # the original back: the same repair completes, exactly
    assert extract(cfg, teacher=tiny_teacher, log=quiet).complete
    _same(good, _arrays(cfg.out))


def test_a_shards_rerun_repairs_a_finished_store_whole(make_cfg, tiny_teacher):
    """Shard 1's command on a finished store damaged in shard 0's blocks re-opened them, did none (not
    its own), said "shard 1/2 done" and left the finished store unfinished (a new user's trial). A
    finished store has no other writer: the call that finds its damage repairs all of it."""
    cfg = make_cfg("sh.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    good = _arrays(cfg.out)
    _damage(cfg.out, "image/emb", 0)  # block 0: shard 0's of 2
    from dataclasses import replace

    res = extract(replace(cfg, shard=1, num_shards=2), teacher=tiny_teacher, log=quiet)
    assert res.complete and res.repaired == 1
    _same(good, _arrays(cfg.out))


def test_a_repair_of_a_block_that_had_an_unreadable_image_is_not_held_to_it(make_cfg, tiny_teacher, tmp_path,
                                                                            monkeypatch):
    """An image that failed to read once (a passing I/O error) reads now: its block's status and pixels
    differ from the record, rightly; the repair refused forever and left the store unfinished (a review)."""
    import embedcache.datasets as datasets_mod

    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((24, 24, 3), 40 * k + (c == "dog") * 90, np.uint8)).save(root / c / f"{k}.png")
    cfg = make_cfg("flaky.zarr", "dataset.name=folder", f"dataset.path={root}", "block_rows=2", "num_workers=0")
    real = datasets_mod.read_rgb8

    def flaky(path):
        if Path(path).name == "1.png" and Path(path).parent.name == "cat":
            raise OSError("input/output error")
        return real(path)

    with monkeypatch.context() as mp:
        mp.setattr(datasets_mod, "read_rgb8", flaky)
        assert extract(cfg, teacher=tiny_teacher, log=quiet).failed == 1
    _damage(cfg.out, "image/emb", 0)
    res = extract(cfg, teacher=tiny_teacher, log=quiet)
    assert res.complete and res.failed == 0



@pytest.mark.parametrize("how", ["extract", "verify --repair"])
def test_lost_prompt_arrays_are_encoded_again(make_cfg, tiny_teacher, how):
    """The prompts' arrays are written whole at the finish: lost, they are made again there (with every
    image kept), not "delete the store and re-extract" (a review)."""
    import shutil

    from embedcache.extract.verify import verify_store

    cfg = make_cfg("text.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    good = _arrays(cfg.out)
    shutil.rmtree(Path(cfg.out) / "text" / "name")
    with pytest.raises(StoreDamagedError, match=r"text.zarr: array text/name/\S+ is missing \(the prompts' embeddings, "
                                                r"lost as a whole\); `embedcache verify --repair \S+text.zarr`"):
        embedcache.open_store(cfg.out)
    encoded = []
    if how == "extract":
        res = extract(cfg, teacher=tiny_teacher, log=quiet, on_block_done=encoded.append)
        assert res.complete
    else:  # said as a repair, not "incomplete (all blocks); rerun its extract command to finish" (a trial)
        res = CliRunner().invoke(main, ["verify", "--repair", cfg.out, "--no-progress"])
        assert res.exit_code == 0 and res.output.strip().splitlines()[-1] == (
            f"{cfg.out}: repaired (0 block(s) re-done, 2 prompt array(s) encoded again)"), res.output
    assert encoded == []  # no image encoded again
    _same(good, _arrays(cfg.out))
    assert verify_store(cfg.out, progress=False, log=quiet).report.ok


def test_a_lost_chunk_of_a_prompt_array_is_said_missing(make_cfg, tiny_teacher):
    """A text array's chunk file deleted read back as zarr's zeros and was said as "does not match its
    checksum": the damage is a missing file, which is what a user looks for."""
    cfg = make_cfg("chunk.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    chunks = sorted(p for p in (Path(cfg.out) / "text" / "name" / "class_emb" / "c").rglob("*") if p.is_file())
    chunks[0].unlink()
    with pytest.raises(StoreDamagedError, match=r"text/name/class_emb: its chunk file of rows 0-\d+ is missing"):
        embedcache.open_store(cfg.out).class_emb("name")
    report = Store(cfg.out, mode="r").verify()
    assert report.files["text/name/class_emb"].startswith("its chunk file of rows 0-"), report.files


@pytest.mark.parametrize("how", ["verify --repair", "extract"])
def test_lost_block_bookkeeping_is_restored_from_the_stores_summary(make_cfg, tiny_teacher, how):
    """A complete store whose blocks/ folder was deleted was condemned ("delete the store and rerun"),
    though its blocks.npz (checksummed in the manifest) holds the same done flags and checksums."""
    import shutil

    cfg = make_cfg("books.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    good = _arrays(cfg.out)
    with Store(cfg.out) as st:
        done, sums = st.b.read("blocks/done"), st.b.read("blocks/crc32c")
    shutil.rmtree(Path(cfg.out) / "blocks")
    with pytest.raises(StoreDamagedError, match=r"array blocks/\S+ is missing \(the blocks' bookkeeping, lost as a "
                                                r"whole\); `embedcache verify --repair \S+books.zarr` \(or the store's own "
                                                r"command\) restores it from its blocks.npz"):
        embedcache.open_store(cfg.out)
    if how == "extract":
        encoded = []
        assert extract(cfg, teacher=tiny_teacher, log=quiet, on_block_done=encoded.append).complete and not encoded
    else:
        res = CliRunner().invoke(main, ["verify", "--repair", cfg.out, "--no-progress"])
        assert res.exit_code == 0 and "restored from blocks.npz" in res.output, res.output
    with Store(cfg.out) as st:
        assert np.array_equal(st.b.read("blocks/done"), done) and np.array_equal(st.b.read("blocks/crc32c"), sums)
        assert st.complete and st.verify().ok
    _same(good, _arrays(cfg.out))
    res = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"])
    assert res.exit_code == 0, res.output


def test_lost_bookkeeping_of_a_store_reopened_for_a_repair_is_not_taken_from_its_old_summary(make_cfg, tiny_teacher):
    """blocks.npz is the bookkeeping of the store as it completed: a store reopened since (a block to
    re-do) would get that block back as done, its damage skipped (a review)."""
    import shutil

    cfg = make_cfg("reopened.zarr", "block_rows=8")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    with Store(cfg.out, "a") as st:
        st.reopen_blocks([0])
    shutil.rmtree(Path(cfg.out) / "blocks")
    with pytest.raises(StoreDamagedError, match="cannot be repaired block by block"):
        Store(cfg.out, "a", rebuild_text=True)


def test_prompts_and_bookkeeping_lost_together_are_both_named(make_cfg, tiny_teacher):
    import shutil

    cfg = make_cfg("both.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    shutil.rmtree(Path(cfg.out) / "blocks")
    shutil.rmtree(Path(cfg.out) / "text" / "name")
    with pytest.raises(StoreDamagedError, match=r"\(the prompts' embeddings and the blocks' bookkeeping, lost as a "
                                                r"whole\); .* encodes the prompts again and restores it from its "
                                                r"blocks.npz"):
        embedcache.open_store(cfg.out)
    res = CliRunner().invoke(main, ["verify", "--repair", cfg.out, "--no-progress"])
    assert res.exit_code == 0 and embedcache.open_store(cfg.out).store.verify().ok, res.output


def test_chunks_copied_from_another_store_with_its_bookkeeping_are_found_and_repaired(make_cfg, tiny_teacher):
    """Another store's image/emb chunks copied in together with its blocks/ and blocks.npz (a merge of
    two folders gone wrong) matched the copied bookkeeping: readers took the foreign embeddings, and
    `verify --repair` said "0 blocks re-done" and then passed. A block's checksums are now seeded by the
    store's key, the array and the block, so bookkeeping holds only for the rows it was written with."""
    import shutil

    cfg = make_cfg("mine.zarr")
    extract(cfg, teacher=tiny_teacher, log=quiet)
    other = make_cfg("other.zarr", "views.seed=7")
    extract(other, teacher=tiny_teacher, log=quiet)
    good = _arrays(cfg.out)
    for part in ("image/emb/c", "blocks"):
        shutil.rmtree(Path(cfg.out) / part)
        shutil.copytree(Path(other.out) / part, Path(cfg.out) / part)
    shutil.copy(Path(other.out) / "blocks.npz", Path(cfg.out) / "blocks.npz")
    with pytest.raises(StoreDamagedError, match=r"image/emb: rows 0-7 \(block 0\) do not match their checksum"):
        embedcache.open_store(cfg.out).image_emb()
    res = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"])
    assert res.exit_code == 2 and "block 0: image/emb" in res.output and "block 3: image/emb" in res.output, res.output
    encoded = []
    again = extract(cfg, teacher=tiny_teacher, log=quiet, on_block_done=encoded.append)
    assert again.complete and sorted(encoded) == [0, 1, 2, 3]
    _same(good, _arrays(cfg.out))
    assert CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"]).exit_code == 0


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_two_blocks_swapped_with_their_bookkeeping_are_found(tmp_path, backend):
    """Rows and checksums of block 0 and block 1 exchanged together still matched each other."""
    path, arrays = block_store(tmp_path, backend)
    with Store(path, "a") as st:
        emb, sums = st.b.read("image/emb"), st.b.read("blocks/crc32c")
        st.b.write("image/emb", 0, np.concatenate([emb[4:8], emb[0:4], emb[8:]]))
        st.b.write("blocks/crc32c", 0, sums[[1, 0, *range(2, len(sums))]])
        st.b.flush()
    with Store(path) as st:
        assert sorted(st.verify().damaged) == [0, 1]
        with pytest.raises(StoreDamagedError, match=r"rows 0-3 \(block 0\) do not match"):
            st.read("image/emb")


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_a_store_from_before_seeded_block_checksums_still_reads_and_repairs(tmp_path, backend, monkeypatch):
    """Its blocks' checksums start from 0: read as written, damage still found, a block re-done alike."""
    import embedcache.store.store as store_mod

    monkeypatch.setattr(store_mod, "SEEDED_KEY", "not_a_field_then")  # the store is made as older versions made it
    monkeypatch.setattr(Store, "_seed", lambda self, name, block: 0)
    path, arrays = block_store(tmp_path, backend)
    monkeypatch.undo()
    with Store(path, "a") as st:
        assert "block_sums_seeded" not in st.manifest and st._seed("image/emb", 1) == 0
        assert st.verify().ok and np.array_equal(st.read("image/emb"), arrays["image/emb"])
        st.write_block(1, {k: v[4:8] for k, v in arrays.items()})
    alter_emb(path, row=5, view=0, col=3)
    with Store(path) as st:
        assert sorted(st.verify().damaged) == [1]
        with pytest.raises(StoreDamagedError, match=r"rows 4-7 \(block 1\) do not match"):
            st.read("image/emb")


def test_a_broken_hdf5_chunk_index_is_said_unrepairable_and_nothing_is_cleared(tmp_path):
    """One bit of an HDF5 chunk address flipped (the file's own index, not the data): verify called every
    block damaged and offered --repair, which cleared the blocks' bookkeeping, then crashed in h5py ("addr
    overflow"), leaving an intact-looking store at 0 blocks that no rerun could finish (a trial). A block
    HDF5 cannot read is the file's structure, which no rewrite mends: said so, and nothing is changed."""
    import struct

    import h5py

    from embedcache.errors import StoreDamagedError

    path, _ = block_store(tmp_path, "hdf5")
    with h5py.File(path, "r") as f:
        at = f["image/emb"].id.get_chunk_info(0).byte_offset
    raw = bytearray(Path(path).read_bytes())
    i = raw.find(struct.pack("<Q", at))
    assert 0 <= i < at
    raw[i + 5] ^= 0x10
    Path(path).write_bytes(bytes(raw))
    from embedcache.extract.verify import verify_store

    with Store(path) as st:
        before = st.blocks_done().copy()
    for repair in (False, True):  # the repair cleared the blocks' bookkeeping, then crashed
        with pytest.raises(StoreDamagedError, match=r"structure is damaged.*cannot be repaired in place; delete it"):
            verify_store(path, repair=repair, progress=False, log=quiet)
    with Store(path) as st:
        assert (st.blocks_done() == before).all() and before.all()


def test_an_unfinished_store_renamed_is_told_to_finish_under_its_new_path(make_cfg, tiny_teacher, tmp_path):
    """"Rerun the same command" of a half-written store renamed since wrote a new store at the old path (a trial)."""
    cfg = make_cfg("half.zarr")
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, teacher=tiny_teacher, on_block_done=lambda block: (_ for _ in ()).throw(KeyboardInterrupt), log=quiet)
    os.rename(cfg.out, tmp_path / "renamed.zarr")
    with pytest.raises(StoreError, match=f"rerun the same `embedcache extract` command, with --out {tmp_path / 'renamed.zarr'}, "
                                         "to finish it"):
        embedcache.open_store(str(tmp_path / "renamed.zarr"))
    assert extract(make_cfg("renamed.zarr"), teacher=tiny_teacher, log=quiet).complete  # which it does


def test_a_store_being_written_is_said_so_by_readers_and_verify(make_cfg, tiny_teacher):
    """While an extraction or repair ran, readers said "rerun the same extract command to finish it",
    verify called its half-way blocks damage and offered --repair, and a second repair ran a whole check
    pass before being refused with extract's words (a trial): each says another process writes it."""
    from embedcache.extract.verify import verify_store
    from embedcache.fileio import try_exclusive_lock

    cfg = make_cfg("busy.zarr")

    def stop(block):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cfg, teacher=tiny_teacher, on_block_done=stop, log=quiet)
    with pytest.raises(StoreError, match="rerun the same `embedcache extract` command"):  # nobody writes it
        embedcache.open_store(cfg.out)
    held = try_exclusive_lock(os.path.join(cfg.out, ".writer-0-of-1.lock"))  # what a live writer holds
    try:
        with pytest.raises(StoreError, match=r"being written now by a live `embedcache extract` .*; wait for it") as busy:
            embedcache.open_store(cfg.out)
        assert busy.value.exit_code == 75
        with pytest.raises(StoreError, match=r"another process is writing or repairing .* now; wait for it") as busy:
            verify_store(cfg.out, repair=True, progress=False, log=quiet)
        assert busy.value.exit_code == 75
        alter_emb(cfg.out, 0, 0, 0)
        with pytest.raises(StoreError, match=r"do not check out while another process writes or repairs the store"):
            verify_store(cfg.out, progress=False, log=quiet)
    finally:
        os.close(held)
    with pytest.raises(StoreError, match=r"verify --repair"):  # the damage, once nobody writes
        verify_store(cfg.out, progress=False, log=quiet)
