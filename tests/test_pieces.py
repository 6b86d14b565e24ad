"""Whole arrays are read in pieces, each checked right after it is read (issue 12's load-all read):
the array comes back exactly, every finished block is still checked (a large block over several
pieces, small blocks sharing one), compressed chunks are read whole, and what cannot be trusted is
refused in one line."""
import os
import re
from pathlib import Path

import numpy as np
import pytest

from embedcache.errors import StoreDamagedError
from embedcache.store import Store
from embedcache.store import integrity
from embedcache.store import pieces as planner
from embedcache.store.integrity import checksum
from embedcache.store.pieces import plan_pieces

from conftest import alter_emb, block_store


def _crc32c_reference(data: bytes, crc: int = 0) -> int:
    """CRC-32C bit by bit (reflected polynomial 0x82F63B78), the definition the fast one must meet."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("impl", sorted(integrity.CRC32C))
def test_a_checksum_continued_piece_by_piece_is_the_whole_arrays(impl, monkeypatch):
    monkeypatch.setattr(integrity, "_extend", integrity.CRC32C[impl]())  # each library the store may use
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 3)).astype(np.float16)
    big = rng.integers(0, 256, 3 << 20, dtype=np.uint8)  # past the libraries' small-buffer paths
    assert checksum(big) == int(integrity.CRC32C["google_crc32c"]()(0, big.tobytes()))
    assert checksum(memoryview(big).toreadonly()[7:]) == checksum(big[7:])
    assert checksum(big[100:], checksum(big[:100])) == checksum(big)
    assert checksum(bytearray(b"123456789")) == checksum(np.frombuffer(b"123456789", np.uint8))
    assert checksum(a) == _crc32c_reference(a.tobytes())
    assert checksum(a[4:], checksum(a[:4])) == checksum(a) == _crc32c_reference(a[4:].tobytes(), _crc32c_reference(a[:4].tobytes()))
    assert checksum(a[:0], 12345) == 12345
    assert checksum(b"123456789") == 0xE3069283  # the standard check value of CRC-32C


@pytest.mark.parametrize("seed", range(40))
def test_pieces_tile_the_array_in_order_and_each_block_lies_in_one_piece_or_is_cut_into_whole_pieces(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(planner, "PIECE_BYTES", int(rng.integers(1, 400)))
    monkeypatch.setattr(planner, "DECODED_PIECE_BYTES", int(rng.integers(1, 400)))
    chunk_rows, row_bytes = int(rng.integers(1, 6)), int(rng.integers(1, 50))
    block_rows = chunk_rows * int(rng.integers(1, 5))  # blocks tile chunks
    n = int(rng.integers(1, 60))
    parts = [(s, min(n, s + block_rows)) for s in range(0, n, block_rows)]
    whole = bool(seed % 2)
    pieces = plan_pieces(parts, row_bytes, chunk_rows, whole)
    assert pieces[0][0] == 0 and pieces[-1][1] == n and all(a[1] == b[0] and a[0] < a[1] for a, b in zip(pieces, pieces[1:]))
    for start, stop in parts:  # inside one piece, or exactly the union of the pieces inside it
        holding = [(lo, hi) for lo, hi in pieces if lo < stop and hi > start]
        assert len(holding) == 1 or (holding[0][0] == start and holding[-1][1] == stop)
    most = max(1, (planner.DECODED_PIECE_BYTES if whole else planner.PIECE_BYTES) // row_bytes)
    if whole:  # a piece starts and ends on a chunk boundary (or at the array's end)
        most = max(chunk_rows, most // chunk_rows * chunk_rows)
        assert all(lo % chunk_rows == 0 and (hi % chunk_rows == 0 or hi == n) for lo, hi in pieces)
    assert all(hi - lo <= most for lo, hi in pieces)
    if most >= 2 * block_rows and len(parts) > 1:  # small blocks are read together
        assert len(pieces) < len(parts)


@pytest.mark.parametrize("seed", range(30))
def test_part_checks_over_any_pieces_find_exactly_the_parts_whose_bytes_differ(seed, monkeypatch):
    """Against a brute-force reference: each checked part's CRC of its own rows, whatever pieces the
    rows come in (parts cut over several pieces, several parts in one, empty parts, unchecked ones)."""
    from embedcache.store.store import _PartChecks

    rng = np.random.default_rng(seed)
    monkeypatch.setattr(planner, "PIECE_BYTES", int(rng.integers(1, 300)))
    row_bytes, block_rows = int(rng.integers(1, 20)), int(rng.integers(1, 9))
    n = int(rng.integers(0, 50))
    data = rng.integers(0, 256, n * row_bytes, dtype=np.uint8)
    parts = [(s, min(n, s + block_rows)) for s in range(0, n, block_rows)] or [(0, 0)]
    sums = [None if rng.random() < 0.2 else checksum(data[a * row_bytes:b * row_bytes]) for a, b in parts]
    wrong = {i for i, want in enumerate(sums) if want is not None and rng.random() < 0.3}
    sums = [(want ^ 1) if i in wrong else want for i, want in enumerate(sums)]
    found = []
    check = _PartChecks(memoryview(data).toreadonly(), row_bytes, parts, sums, lambda part, crc: found.append(part))
    for lo, hi in plan_pieces(parts, row_bytes, 1, False):
        check(lo, hi)
    assert found == sorted(wrong) and check.first == len(parts)


def test_many_small_blocks_are_read_in_one_call(tmp_path):
    path, arrays = block_store(tmp_path, "zarr", n=40)  # 10 blocks of 4 rows; status is zstd-compressed
    calls = []
    with Store(path) as st:
        real = st.b.read_into
        st.b.read_into = lambda name, start, out, pieces=None, after=None: (calls.append((name, pieces)),
                                                                           real(name, start, out, pieces, after))
        assert np.array_equal(st.read("image/status"), arrays["image/status"])
        assert [c for c in calls if c[0] == "image/status"] == [("image/status", [(0, 40)])]
        import zarr

        zarr.open_array(str(Path(path) / "image" / "status"), mode="r+")[21] = 7  # still checked block by block
        with pytest.raises(StoreDamagedError, match=r"image/status: rows 20-23 \(block 5\) do not match"):
            st.read("image/status")


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_a_read_in_many_pieces_is_exact_and_names_the_damaged_block(tmp_path, backend, monkeypatch):
    path, arrays = block_store(tmp_path, backend)
    monkeypatch.setattr(planner, "PIECE_BYTES", 40)  # an embedding row is 32 bytes: one row per piece
    monkeypatch.setattr(planner, "DECODED_PIECE_BYTES", 40)
    calls = []
    with Store(path) as st:
        real = st.b.read_into

        def spy(name, start, out, pieces=None, after=None):
            calls.extend((name, lo, hi) for lo, hi in pieces)
            real(name, start, out, pieces, after)

        st.b.read_into = spy
        for name, want in arrays.items():
            assert np.array_equal(st.read(name), want), name
    assert [(lo, hi) for name, lo, hi in calls if name == "image/emb"] == [(i, i + 1) for i in range(10)]
    px = [(lo, hi) for name, lo, hi in calls if name == "image/pixels"]
    compressed = backend == "zarr"  # HDF5 stores are not compressed: pixel pieces need not be whole chunks
    assert px == ([(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)] if compressed else [(i, i + 1) for i in range(10)])
    alter_emb(path, row=9, view=1, col=7)  # in the short last block
    with Store(path) as st, pytest.raises(StoreDamagedError, match=r"image/emb: rows 8-9 \(block 2\) do not match"):
        st.read("image/emb")


def test_a_chunk_that_does_not_decode_is_one_damaged_line(tmp_path, monkeypatch):
    path, _ = block_store(tmp_path, "zarr")
    monkeypatch.setattr(planner, "PIECE_BYTES", 40)
    with Store(path) as st:
        real = st.b.read_into

        def broken(name, start, out, pieces=None, after=None):
            def failing(lo, hi):
                if hi > 5:
                    raise ValueError("zstd: corrupted frame")
                after(lo, hi)

            real(name, start, out, pieces, failing)

        st.b.read_into = broken
        with pytest.raises(StoreDamagedError, match=r"image/emb: rows 0-3 \(block 0\) cannot be decoded \(ValueError\); "
                                                    r"run `embedcache verify"):
            st.read("image/emb")


def test_an_error_inside_the_check_is_raised_as_the_bug_it_is_not_reported_as_damage(tmp_path, monkeypatch):
    path, _ = block_store(tmp_path, "zarr")

    def buggy(*args):
        raise TypeError("a bug in the check")

    with Store(path) as st:
        monkeypatch.setattr("embedcache.store.store.checksum", buggy)
        with pytest.raises(TypeError, match="a bug in the check"):
            st.read("image/emb")


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_each_piece_is_checked_as_it_comes_in_and_each_chunk_file_is_opened_once_per_read(tmp_path, backend, monkeypatch):
    """Raw pieces are small (checked while their bytes are in the CPU's cache), so the chunk files stay
    open across a read's pieces: an open per piece cost more than the piece."""
    from embedcache.store import backends

    path, arrays = block_store(tmp_path, backend, n=40)
    with Store(path, "a") as st:
        st.finish()  # packed: Zarr's 10 blocks of 4 rows in chunks of whole blocks
    monkeypatch.setattr(planner, "PIECE_BYTES", 100)  # an embedding row is 32 bytes: three rows per piece
    events, opened = [], []
    real_read, real_open = backends._pread_exact, os.open
    monkeypatch.setattr(backends, "_pread_exact", lambda fd, view, offset: (events.append("read"), real_read(fd, view, offset))[1])
    monkeypatch.setattr("embedcache.store.store.checksum", lambda data, crc=0: (events.append("check"), checksum(data, crc))[1])
    with Store(path) as st:
        monkeypatch.setattr(backends.os, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1])
        events.clear()
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])
        files = st.b.chunks("image/emb")[0]
    pieces = plan_pieces([(s, min(40, s + 4)) for s in range(0, 40, 4)], 32, files, False)
    assert len(pieces) == 20  # each block of 4 rows in a piece of 3 and one of 1
    runs = "".join("r" if e == "read" else "c" for e in events)  # the blocks' summary checked first, then:
    assert re.fullmatch(r"c?(rc){20}", runs), runs  # each piece checked as it comes in
    want = -(-40 // files) if backend == "zarr" else 1  # Zarr: a file per chunk; HDF5: the one file
    assert files > 4 and len(opened) == want and len(set(opened)) == want, opened


@pytest.fixture
def few_fds():
    """A soft open-file limit 40 above what the process holds (1024 is a common default, 256 on macOS)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 40, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_array_of_more_chunk_files_than_the_open_file_limit_reads_back(tmp_path, monkeypatch, few_fds):
    """A read keeps one chunk file open at a time: holding them all open until the read ended made an
    intact store of large arrays "damaged: it cannot be decoded (OSError)"."""
    from embedcache.store import layout as layout_mod

    monkeypatch.setattr(layout_mod, "PACK_BYTES", 4 * 2 * 8 * 2)  # packed chunks of one block: 100 chunk files
    path, arrays = block_store(tmp_path, "zarr", n=400)
    with Store(path, "a") as st:
        st.finish()
    with Store(path) as st:
        assert st.complete and st.chunks("image/emb")[0] == 4
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])
        assert st.b.read("blocks/done").all()  # a chunk per block


def test_pieces_that_do_not_tile_the_rows_are_refused():
    from embedcache.store.backends import _tiling

    out = np.empty((10, 2))
    assert _tiling(0, out, [(0, 4), (4, 4), (4, 10)]) == [(0, 4), (4, 4), (4, 10)]
    for bad in ([(0, 4), (5, 10)], [(0, 4)], [(0, 6), (4, 10)], [(1, 10)], [(0, 4), (4, 3), (3, 10)]):
        with pytest.raises(ValueError, match="do not tile"):
            _tiling(0, out, bad)


def test_an_unverified_read_is_not_checked(tmp_path, monkeypatch):
    path, arrays = block_store(tmp_path, "zarr")
    with Store(path) as st:
        monkeypatch.setattr("embedcache.store.store.checksum", lambda *a: pytest.fail("an unverified read was checked"))
        assert np.array_equal(st.read("image/emb", verify=False), arrays["image/emb"])


def test_rows_past_the_stores_n_or_a_checksummed_array_cut_to_nothing_are_refused(tmp_path):
    """A block array longer than the store's n would return rows never read nor checked; a text array
    whose shape was cut to 0 rows would read back as an empty array (an empty part is still checked)."""
    import zarr

    from embedcache.store.layout import SCHEMA_VERSION, add_text_arrays, plan_layout

    path = str(tmp_path / "t.zarr")
    layout = plan_layout(6, 1, 8, 8, False, 4)
    add_text_arrays(layout, {"names": 3}, 3, 8)
    with Store.create(path, {"schema": SCHEMA_VERSION, "key": "t", "complete": False}, layout, "zarr") as st:
        for b in range(st.num_blocks):
            start, stop = st.block_range(b)
            st.write_block(b, {"image/emb": np.ones((stop - start, 1, 8), np.float16), "image/status": np.ones(stop - start, np.uint8),
                               "image/view_params": np.zeros((stop - start, 1, 5), np.int32),
                               "image/canvas_crc32c": np.zeros(stop - start, np.uint32)})
        st.write_array("text/names/emb", np.ones((3, 8), np.float32))
        st.finish()
    with Store(path) as st:
        assert st.read("text/names/emb").shape == (3, 8)
    emb = zarr.open_array(str(Path(path) / "image" / "emb"), mode="r+")
    emb.resize((9, 1, 8))  # refused as the store opens: its shape is not the layout's
    with pytest.raises(StoreDamagedError, match=r"array image/emb reads as float16 \(9, 1, 8\), but it was written "
                                                r"as float16 \(6, 1, 8\)"):
        Store(path)
    emb.resize((6, 1, 8))
    zarr.open_array(str(Path(path) / "text" / "names" / "emb"), mode="r+").resize((0, 8))
    with pytest.raises(StoreDamagedError, match=r"array text/names/emb reads as float32 \(0, 8\)"):
        Store(path)


def test_a_complete_store_is_checked_against_its_blocks_summary_and_an_older_one_block_by_block(tmp_path):
    """Reading a complete store reads one summary of every block's done flag and checksums, not two
    files per block; a store finished before the summary existed is read and checked block by block."""
    path, arrays = block_store(tmp_path, "zarr", n=40)
    with Store(path, "a") as st:
        st.finish()
    bookkeeping = []
    with Store(path) as st:
        real = st.b.read_into
        st.b.read_into = lambda name, start, out, pieces=None, after=None: (
            bookkeeping.append(name) if name.startswith("blocks/") else None, real(name, start, out, pieces, after))
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"]) and bookkeeping == []
        report = st.verify()  # reads the blocks' own bookkeeping (this store has no tables: those are missing)
        assert sorted(bookkeeping) == ["blocks/crc32c", "blocks/done"] and not report.damaged and "blocks.npz" not in report.files
    (Path(path) / "blocks.npz").unlink()
    with Store(path, "a") as st:
        assert "blocks.npz" not in st.manifest["checksums"]  # earlier versions look up every name there as a table or array
        st.write_manifest({k: v for k, v in st.manifest.items() if k != "blocks_summary_crc32c"})
    with Store(path) as st:
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"])
        import zarr

        zarr.open_array(str(Path(path) / "image" / "emb"), mode="r+")[13] = 0  # block 3
        with pytest.raises(StoreDamagedError, match=r"rows 12-15 \(block 3\) do not match"):
            st.read("image/emb")


def _blocks_of(arrays, b, emb=None):
    rows = slice(4 * b, 4 * b + 4)
    return {k: (emb if emb is not None and k == "image/emb" else v[rows]) for k, v in arrays.items()}


def test_a_block_redone_behind_the_summarys_back_is_held_to_its_own_checksum(tmp_path, monkeypatch):
    """The summary stale (an older version's repair re-did a block without rewriting it, or another
    process repaired the store since this one opened it): the block is held to its own bookkeeping,
    not refused; verify names the stale summary. Re-finished within the same second, a store's new
    summary is read, not the one cached."""
    path, arrays = block_store(tmp_path, "zarr", n=12)
    new = (arrays["image/emb"][4:8] * -1).astype(np.float16)
    with Store(path, "a") as st:
        st.finish()
    with Store(path) as reader:
        assert np.array_equal(reader.read("image/emb"), arrays["image/emb"])
        with Store(path, "a") as other:  # re-does block 1 with other bytes, the summary left as it was
            other.write_block(1, _blocks_of(arrays, 1, new))
        got = reader.read("image/emb")
        assert np.array_equal(got[4:8], new) and np.array_equal(got[8:], arrays["image/emb"][8:])
        assert reader.verify().files.get("blocks.npz") == "disagrees with the blocks' own blocks/done and blocks/crc32c"
    monkeypatch.setattr("embedcache.store.store.utc_now", lambda: "2026-12-03T00:00:00Z")
    with Store(path, "a") as st:
        st.finish()
        assert np.array_equal(st.read("image/emb")[4:8], new)
        st.reopen_blocks([1])
        st.write_block(1, _blocks_of(arrays, 1))
        st.finish()  # the same `finished` time as before
        assert np.array_equal(st.read("image/emb"), arrays["image/emb"]) and "blocks.npz" not in st.verify().files


@pytest.mark.parametrize("made", ["now", "before layout checksums"])
def test_a_layout_whose_blocks_do_not_cover_the_rows_is_refused(tmp_path, made, monkeypatch):
    import zarr

    import embedcache.store.store as store_mod

    if made != "now":
        monkeypatch.setattr(store_mod, "new_marks", lambda layout: {})
    path, arrays = block_store(tmp_path, "zarr")
    monkeypatch.undo()
    group = zarr.open_group(path, mode="r+")
    group.attrs["layout"] = {**group.attrs["layout"], "num_blocks": 2}  # rows 8-9 would be left unread
    if made == "now":  # refused at opening, by the layout's checksum
        with pytest.raises(StoreDamagedError, match=r"its layout .* does not match the checksum its manifest keeps"):
            Store(path)
        return
    with Store(path) as st, pytest.raises(StoreDamagedError, match=r"layout: 2 blocks of 4 rows do not hold its 10 rows"):
        st.read("image/emb")


def test_hdf5_chunk_offsets_are_listed_once_both_ways_alike_and_unwritten_chunks_read_as_unwritten(tmp_path):
    """The HDF5 raw read takes every chunk's offset from one listing per dataset (a lookup per chunk
    cost as much as the read itself at 256-row blocks); chunks never written go through h5py."""
    import h5py

    from embedcache.store.backends import _chunk_table

    path, arrays = block_store(tmp_path, "hdf5", n=12)
    with h5py.File(path, "a") as f:  # block 1 never written: its chunk is absent from the file
        del f["image/emb"]
        f.create_dataset("image/emb", shape=(12, 2, 8), dtype="float16", chunks=(4, 2, 8), fillvalue=0)
        f["image/emb"][0:4], f["image/emb"][8:12] = arrays["image/emb"][0:4], arrays["image/emb"][8:12]
    with h5py.File(path, "r") as f:
        dsid = f["image/emb"].id
        table = _chunk_table(dsid, iterate=True)
        assert table == _chunk_table(dsid, iterate=False) and sorted(table) == [0, 8]
    with Store(path) as st:
        got = st.read("image/emb", verify=False)
        assert np.array_equal(got[0:4], arrays["image/emb"][0:4]) and np.array_equal(got[8:], arrays["image/emb"][8:])
        assert not got[4:8].any()
        listed = st.b._offsets["image/emb"]
        st.read("image/emb", verify=False)
        assert st.b._offsets["image/emb"] is listed  # not listed again


@pytest.mark.parametrize("cut", ["short", "missing"])
def test_a_zarr_chunk_file_cut_short_or_lost_is_refused_not_read_as_garbage(tmp_path, cut):
    """The raw read takes chunk files straight into the output; a file that ends early (or is gone)
    goes through zarr, which cannot decode it (short) or reads zeros the block's checksum refuses (lost)."""
    path, _ = block_store(tmp_path, "zarr")
    chunk = Path(path) / "image" / "emb" / "c" / "1" / "0" / "0"
    if cut == "short":
        chunk.write_bytes(chunk.read_bytes()[:20])
    else:
        chunk.unlink()
    # the block that no longer decodes is named, as a mismatch names it (it said only "it cannot be
    # decoded (RuntimeError)", where HDF5's raw chunks named the rows: a trial)
    why = r"rows 4-7 \(block 1\) cannot be decoded \(\w+\)" if cut == "short" else r"rows 4-7 \(block 1\) do not match"
    with Store(path) as st, pytest.raises(StoreDamagedError, match=f"damaged: image/emb: {why}"):
        st.read("image/emb")


def test_a_warning_during_a_progress_bar_is_a_line_of_its_own():
    """A run's warning printed while a sweep's bar was drawn ran on at the end of the bar's line, where a
    `grep -v run/s` of the log hid it (a trial)."""
    import io

    from tqdm import tqdm

    from embedcache.errors import one_line_warning

    out = io.StringIO()
    bar = tqdm(total=3, file=out, desc="sweep")
    bar.update(1)
    one_line_warning("run x: the model predicts 'c' for 100% of the images", UserWarning, "f.py", 1, file=out)
    bar.close()
    lines = out.getvalue().replace("\r", "\n").split("\n")
    assert "warning: run x: the model predicts 'c' for 100% of the images" in lines, lines
