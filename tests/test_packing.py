"""A finished Zarr store holds its incompressible block arrays (the embeddings) in chunks of many
blocks, so a load-all read opens a few files instead of one per block (issue 12, part 4); they are
written a chunk per block (so a block is written once, by one writer) and packed as the store
completes. A damaged block stops the packing, a repair unpacks before blocks are rewritten, and a
kill at any point of the swap is put right by the next writer."""
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embedcache.errors import StoreDamagedError
from embedcache.store import Store
from embedcache.store import rechunk as rechunk_mod
from embedcache.store import layout as layout_mod

from conftest import alter_emb, block_store, quiet

N, BLOCK_ROWS, EMB_BLOCK_BYTES = 30, 4, 4 * 2 * 8 * 2  # block_store: (n, 2, 8) float16, blocks of 4 rows


@pytest.fixture(autouse=True)
def three_blocks_a_chunk(monkeypatch):
    monkeypatch.setattr(layout_mod, "PACK_BYTES", 3 * EMB_BLOCK_BYTES)


def _chunk_files(path: str, name: str) -> list:
    return sorted(p for p in (Path(path) / name / "c").rglob("*") if p.is_file())


def _finished(tmp_path, backend: str = "zarr"):
    path, arrays = block_store(tmp_path, backend, n=N)
    with Store(path, "a") as st:
        _tables(st)
        st.finish()
    return path, arrays


def _repair(path: str, arrays: dict, damaged: list) -> None:
    """What a repair does: verify, reopen the damaged blocks (re-checked), rewrite them, finish; then
    the store reads back exactly."""
    with Store(path, "a") as st:
        report = st.verify()
        assert report.damaged_blocks == damaged
        assert st.reopen_blocks(report.damaged_blocks, recheck=True) == damaged
        for blk in damaged:
            start, stop = st.block_range(blk)
            st.write_block(blk, {k: v[start:stop] for k, v in arrays.items()})
        st.finish()
    with Store(path) as st:
        assert st.verify().ok and np.array_equal(st.read("image/emb"), arrays["image/emb"])


def _tables(st: Store) -> None:
    for name in ("meta.parquet", "text.parquet"):
        st.put_table(name, pd.DataFrame({"i": range(3)}))


def test_finishing_packs_the_embeddings_into_chunks_of_whole_blocks_and_they_read_back_exactly(tmp_path):
    path, arrays = _finished(tmp_path)
    with Store(path) as st:
        assert st.chunks("image/emb")[0] == 3 * BLOCK_ROWS
        assert st.chunks("image/view_params")[0] == BLOCK_ROWS  # compressed: read block by block by verify
        assert st.chunks("image/pixels")[0] == 2  # pixels keep their own chunks
        for name, want in arrays.items():
            assert np.array_equal(st.read(name), want), name
        assert st.verify().ok
        st.quick_check()
    assert len(_chunk_files(path, "image/emb")) == 3  # 30 rows: 12 + 12 + 6
    assert not (Path(path) / rechunk_mod.WORK).exists()
    with Store(path, "a") as st:  # finishing again changes nothing
        st.finish()
        assert st.chunks("image/emb")[0] == 3 * BLOCK_ROWS


def test_an_hdf5_store_is_made_packed_and_each_block_writes_its_own_rows_in_place(tmp_path):
    """One writer: chunks of three blocks from the start, a block's rows written in part of its chunk
    (no fill written around them), resumed by another writer half way; every row reads back exactly."""
    path, arrays = block_store(tmp_path, "hdf5", n=N)  # written block by block
    with Store(path) as st:
        assert st.chunks("image/emb")[0] == 3 * BLOCK_ROWS and st.chunks("image/status")[0] == BLOCK_ROWS
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"]) and not st.verify().damaged
    import h5py

    with h5py.File(path, "a") as f:  # blocks 4 and 6 lost, as a killed writer leaves them
        f["blocks/done"][4] = f["blocks/done"][6] = 0
        f["image/emb"][16:20] = f["image/emb"][24:28] = 7.0
    with Store(path, "a") as st:  # the resume rewrites them alone, and leaves their neighbours as they are
        for blk in (4, 6):
            start, stop = st.block_range(blk)
            st.write_block(blk, {k: v[start:stop] for k, v in arrays.items()})
        _tables(st)
        st.finish()
    with Store(path) as st:
        assert st.verify().ok and np.array_equal(st.read("image/emb"), arrays["image/emb"])


def test_an_hdf5_store_made_by_an_h5py_without_fill_time_is_packed_alike(tmp_path, monkeypatch):
    import h5py

    real = h5py.Group.create_dataset

    def old_h5py(self, name, *args, **kwargs):  # before h5py 3.12
        if "fill_time" in kwargs:
            raise TypeError("unexpected keyword argument 'fill_time'")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", old_h5py)
    path, arrays = block_store(tmp_path, "hdf5", n=N)
    with Store(path) as st:
        assert st.chunks("image/emb")[0] == 3 * BLOCK_ROWS and np.array_equal(st.read("image/emb"), arrays["image/emb"])


def test_a_block_damaged_before_finishing_stops_the_packing_and_the_array_is_left_as_it_was(tmp_path):
    path, _ = block_store(tmp_path, "zarr", n=N)
    alter_emb(path, row=5, view=1, col=3)
    with Store(path, "a") as st, pytest.raises(StoreDamagedError, match=r"image/emb: rows 4-7 \(block 1\) do not match"):
        st.finish()
    with Store(path) as st:
        assert st.chunks("image/emb")[0] == BLOCK_ROWS and not st.complete
    assert not (Path(path) / rechunk_mod.WORK).exists()


def test_a_repair_unpacks_before_rewriting_a_block_and_finishing_packs_again(tmp_path):
    path, arrays = _finished(tmp_path)
    alter_emb(path, row=5, view=1, col=3)
    with Store(path, "a") as st:
        report = st.verify()
        assert report.damaged_blocks == [1]
        st.reopen_blocks(report.damaged_blocks)
        assert st.chunks("image/emb")[0] == BLOCK_ROWS and not st.complete
        assert len(_chunk_files(path, "image/emb")) == 8  # a chunk per block again
        start, stop = st.block_range(1)
        st.write_block(1, {k: v[start:stop] for k, v in arrays.items()})
        st.finish()
    with Store(path) as st:
        assert st.chunks("image/emb")[0] == 3 * BLOCK_ROWS and st.verify().ok
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])


KILLED_AT_RENAME = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import embedcache.store.layout as layout_mod
from embedcache.store import Store, rechunk
layout_mod.PACK_BYTES = {pack}
calls, real = [], os.rename
def rename(src, dst):
    calls.append(src)
    if len(calls) == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as kill -9 leaves it
    real(src, dst)
rechunk.os.rename = rename
from test_packing import _tables
with Store({path!r}, "a") as st:
    _tables(st)
    st.finish()
"""


@pytest.mark.parametrize("kill_at", [1, 2, 3])  # the renames: new -> ready, array -> old, ready -> array
def test_a_kill_9_during_the_packing_is_put_right_by_the_next_writer(tmp_path, kill_at):
    path, arrays = block_store(tmp_path, "zarr", n=N)
    code = KILLED_AT_RENAME.format(tests=str(Path(__file__).parent), pack=3 * EMB_BLOCK_BYTES, kill_at=kill_at, path=path)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert (Path(path) / rechunk_mod.WORK).is_dir()  # the work was left as the kill found it
    with Store(path) as st:
        assert not st.complete  # nothing reads it as finished meanwhile
    with Store(path, "a") as st:  # the next writer (a rerun of the extraction) recovers, then finishes
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])
        st.finish()
    with Store(path) as st:
        assert st.complete and st.chunks("image/emb")[0] == 3 * BLOCK_ROWS and st.verify().ok
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])
    assert not (Path(path) / rechunk_mod.WORK).exists()


def test_ctrl_c_while_copying_leaves_the_array_as_it_was(tmp_path, monkeypatch):
    path, arrays = block_store(tmp_path, "zarr", n=N)
    monkeypatch.setattr(rechunk_mod, "_read_back", lambda staged, lo, hi: (_ for _ in ()).throw(KeyboardInterrupt))
    with Store(path, "a") as st, pytest.raises(KeyboardInterrupt):
        st.finish()
    assert not (Path(path) / rechunk_mod.WORK).exists()
    with Store(path) as st:
        assert st.chunks("image/emb")[0] == BLOCK_ROWS and np.array_equal(st.read("image/emb"), arrays["image/emb"])


FINISH = """
import sys
import embedcache.store.layout as layout_mod
from embedcache.store import Store
layout_mod.PACK_BYTES = {pack}
with Store({path!r}, "a") as st:
    st.finish()
"""


def test_shards_finishing_at_once_pack_the_store_once_and_it_reads_back_exactly(tmp_path):
    path, arrays = block_store(tmp_path, "zarr", n=240)  # 20 packed chunks: time for the processes to meet
    with Store(path, "a") as st:
        _tables(st)
    code = FINISH.format(pack=3 * EMB_BLOCK_BYTES, path=path)
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    with Store(path) as st:
        assert st.complete and st.chunks("image/emb")[0] == 3 * BLOCK_ROWS and st.verify().ok
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])
    assert not (Path(path) / rechunk_mod.WORK).exists()


def test_a_store_opened_before_another_process_packed_or_unpacked_it_still_reads_the_right_rows(tmp_path):
    path, arrays = block_store(tmp_path, "zarr", n=N)
    with Store(path, "a") as st:
        _tables(st)
    early = Store(path, "a")  # as a shard that started while another finishes
    assert np.array_equal(early.b.read("image/emb", 4, 8), arrays["image/emb"][4:8])  # its chunk size now known
    with Store(path, "a") as st:
        st.finish()
    assert np.array_equal(early.b.read("image/emb", 4, 8), arrays["image/emb"][4:8])
    assert early.verify().damaged == {}
    assert early.reopen_blocks([1], recheck=True) == []  # seen intact under the lock: nothing reopened
    with Store(path) as st:
        assert st.complete and st.chunks("image/emb")[0] == 3 * BLOCK_ROWS
    alter_emb(path, row=5, view=1, col=3)
    with Store(path, "a") as st:
        assert st.reopen_blocks([1], recheck=True) == [1]  # unpacked
    assert np.array_equal(early.b.read("image/emb", 12, 16), arrays["image/emb"][12:16])
    early.close()


@pytest.mark.parametrize("direction", ["pack", "unpack"])
@pytest.mark.parametrize("swap_after", [1, 3, 7])
def test_a_store_packed_or_unpacked_in_the_middle_of_a_read_still_reads_the_right_rows(tmp_path, monkeypatch, direction,
                                                                                       swap_after):
    """Files a read opened before the swap hold their old rows; one it opens after it is missing or of
    another size, and the metadata is read again (a missing one used to go to zarr, whose zeros for a
    chunk packed away were reported as damage in an intact store)."""
    from embedcache.store import pieces as planner

    monkeypatch.setattr(planner, "PIECE_BYTES", 100)  # an embedding row is 32 bytes: 3 rows a piece
    path, arrays = block_store(tmp_path, "zarr", n=N)
    with Store(path, "a") as st:
        _tables(st)
        if direction == "unpack":
            st.finish()

    def swap():
        with Store(path, "a") as other:  # as another process would
            other.finish() if direction == "pack" else other.reopen_blocks([1])

    with Store(path) as st:
        before, real = st.chunks("image/emb")[0], st.b.read_into

        def swapping(name, start, out, pieces=None, after=None):
            done = []

            def hook(lo, hi):
                after(lo, hi)
                done.append(hi)
                if len(done) == swap_after:
                    swap()

            real(name, start, out, pieces, hook if name == "image/emb" else after)

        st.b.read_into = swapping
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])
    with Store(path) as st:
        assert st.chunks("image/emb")[0] != before  # the swap happened mid-read


def test_a_repair_of_the_tables_alone_leaves_the_embeddings_packed(tmp_path):
    path, _ = _finished(tmp_path)
    with Store(path, "a") as st:
        assert st.reopen_blocks([]) == [] and not st.complete
        assert st.chunks("image/emb")[0] == 3 * BLOCK_ROWS


def test_a_packed_chunk_file_cut_short_is_repaired(tmp_path):
    """Unpacking for the repair read the short chunk through zarr, which cannot decode it: every
    repair failed with a ValueError."""
    path, arrays = _finished(tmp_path)
    chunk = Path(path) / "image" / "emb" / "c" / "1" / "0" / "0"  # blocks 3, 4 and 5
    chunk.write_bytes(chunk.read_bytes()[:100])
    _repair(path, arrays, [3, 4, 5])


def test_a_chunk_that_no_longer_decodes_stops_the_packing_in_one_line(tmp_path):
    path, _ = block_store(tmp_path, "zarr", n=N)
    chunk = Path(path) / "image" / "emb" / "c" / "4" / "0" / "0"  # block 4, a chunk of its own before packing
    chunk.write_bytes(chunk.read_bytes()[:10])
    with Store(path, "a") as st, pytest.raises(StoreDamagedError, match=r"rows 16-19 \(block 4\) cannot be decoded"):
        st.finish()


def test_a_chunk_that_reads_back_differently_from_what_was_written_stops_the_packing(tmp_path, monkeypatch):
    path, arrays = block_store(tmp_path, "zarr", n=N)
    real = rechunk_mod._read_back
    monkeypatch.setattr(rechunk_mod, "_read_back", lambda staged, lo, hi: real(staged, lo, hi) + 1)
    with Store(path, "a") as st, pytest.raises(StoreDamagedError, match="read back differently"):
        st.finish()
    with Store(path) as st:
        assert st.chunks("image/emb")[0] == BLOCK_ROWS
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])


def test_a_lost_packed_chunk_file_is_found_on_opening_and_every_block_in_it_is_redone(tmp_path):
    path, arrays = _finished(tmp_path)
    (Path(path) / "image" / "emb" / "c" / "1" / "0" / "0").unlink()  # rows 12-23: blocks 3, 4 and 5
    with Store(path) as st, pytest.raises(StoreDamagedError, match=r"rows 12-15 \(block 3\) are missing"):
        st.quick_check()
    _repair(path, arrays, [3, 4, 5])  # unpacked with the lost rows as zeros, to be rewritten


@pytest.mark.parametrize("suffix", ["zarr", "h5"])
def test_an_extraction_killed_and_resumed_ends_packed_and_byte_identical(make_cfg, tiny_teacher, suffix, monkeypatch):
    """The embeddings packed (Zarr as it finishes, HDF5 from the start) by a real extraction, killed
    half way through a chunk and resumed: the same arrays as one uninterrupted run."""
    from embedcache.extract import extract

    monkeypatch.setattr(layout_mod, "PACK_BYTES", 2 * 8 * 3 * tiny_teacher.embed_dim * 2)  # 2 blocks of 8 images, 3 views

    full = make_cfg(f"full.{suffix}")
    extract(full, teacher=tiny_teacher, log=quiet)
    cut, calls = make_cfg(f"cut.{suffix}"), []

    def kill(block):
        calls.append(block)
        if len(calls) == 3:  # the second chunk half written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cut, teacher=tiny_teacher, on_block_done=kill, log=quiet)
    assert extract(cut, teacher=tiny_teacher, log=quiet).complete
    with Store(full.out) as a, Store(cut.out) as b:
        assert a.chunks("image/emb")[0] == b.chunks("image/emb")[0] == 16
        for name in a.layout["block_arrays"]:
            assert np.array_equal(a.read(name), b.read(name)), name
        assert b.verify().ok
