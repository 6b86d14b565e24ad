"""A finished Zarr store holds its incompressible block arrays (the embeddings) in chunks of many
blocks, so a load-all read opens a few files instead of one per block (issue 12, part 4); they are
written a chunk per block (so a block is written once, by one writer) and packed as the store
completes. A damaged block stops the packing, a repair unpacks before blocks are rewritten, and a
kill at any point of the swap is put right by the next writer."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embedcache.errors import StoreDamagedError
from embedcache.store import Store
from embedcache.store import rechunk as rechunk_mod
from embedcache.store import store as store_mod

from conftest import alter_emb, block_store

N, BLOCK_ROWS, EMB_BLOCK_BYTES = 30, 4, 4 * 2 * 8 * 2  # block_store: (n, 2, 8) float16, blocks of 4 rows


@pytest.fixture(autouse=True)
def three_blocks_a_chunk(monkeypatch):
    monkeypatch.setattr(store_mod, "PACK_BYTES", 3 * EMB_BLOCK_BYTES)


def _chunk_files(path: str, name: str) -> list:
    return sorted(p for p in (Path(path) / name / "c").rglob("*") if p.is_file())


def _finished(tmp_path, backend: str = "zarr"):
    path, arrays = block_store(tmp_path, backend, n=N)
    with Store(path, "a") as st:
        _tables(st)
        st.finish()
    return path, arrays


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


def test_hdf5_stores_keep_a_chunk_per_block(tmp_path):
    path, arrays = _finished(tmp_path, "hdf5")
    with Store(path) as st:
        assert st.chunks("image/emb")[0] == BLOCK_ROWS
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])


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


@pytest.mark.parametrize("kill_at", [1, 2, 3])  # the renames: new -> ready, array -> old, ready -> array
def test_a_kill_during_the_swap_is_put_right_by_the_next_writer(tmp_path, monkeypatch, kill_at):
    path, arrays = block_store(tmp_path, "zarr", n=N)
    calls, real = [], rechunk_mod.os.rename

    def rename(src, dst):
        calls.append(src)
        if len(calls) == kill_at:
            raise KeyboardInterrupt  # killed right before this rename
        real(src, dst)

    monkeypatch.setattr(rechunk_mod.os, "rename", rename)
    with Store(path, "a") as st, pytest.raises(KeyboardInterrupt):
        _tables(st)
        st.finish()
    monkeypatch.setattr(rechunk_mod.os, "rename", real)
    with Store(path) as st:
        assert not st.complete  # nothing reads it as finished meanwhile
    with Store(path, "a") as st:  # the next writer (a rerun of the extraction) recovers, then finishes
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])
        st.finish()
    with Store(path) as st:
        assert st.complete and st.chunks("image/emb")[0] == 3 * BLOCK_ROWS and st.verify().ok
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])
    assert not (Path(path) / rechunk_mod.WORK).exists()


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
    with Store(path, "a") as st:
        report = st.verify()
        assert report.damaged_blocks == [3, 4, 5]
        st.reopen_blocks(report.damaged_blocks)  # unpacked with the lost rows as zeros, to be rewritten
        for blk in report.damaged_blocks:
            start, stop = st.block_range(blk)
            st.write_block(blk, {k: v[start:stop] for k, v in arrays.items()})
        st.finish()
    with Store(path) as st:
        assert st.verify().ok and np.array_equal(st.read("image/emb"), arrays["image/emb"])
