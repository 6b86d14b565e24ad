"""Whole-array reads check each piece right after reading it, blocks on a few threads (issue 12's
load-all read): the array comes back exactly, every finished block is still checked, compressed
chunks are read whole, and a damaged block, a chunk that does not decode or Ctrl-C stops every
reading thread."""
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from embedcache.errors import StoreDamagedError
from embedcache.store import Store, readahead
from embedcache.store.integrity import checksum
from embedcache.store.readahead import Piece, plan_pieces, read_parts

from conftest import block_store


def _crc32c_reference(data: bytes, crc: int = 0) -> int:
    """CRC-32C bit by bit (reflected polynomial 0x82F63B78), the definition the fast one must meet."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_a_checksum_continued_piece_by_piece_is_the_whole_arrays():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 3)).astype(np.float16)
    assert checksum(a) == _crc32c_reference(a.tobytes())
    assert checksum(a[4:], checksum(a[:4])) == checksum(a) == _crc32c_reference(a[4:].tobytes(), _crc32c_reference(a[:4].tobytes()))
    assert checksum(a[:0], 12345) == 12345
    assert checksum(b"123456789") == 0xE3069283  # the standard check value of CRC-32C


@pytest.mark.parametrize("seed", range(20))
def test_pieces_tile_each_part_and_keep_chunks_whole(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(readahead, "PIECE_BYTES", int(rng.integers(1, 400)))
    chunk_rows, row_bytes = int(rng.integers(1, 6)), int(rng.integers(1, 50))
    block_rows = chunk_rows * int(rng.integers(1, 5))  # blocks tile chunks
    n = int(rng.integers(1, 60))
    parts = [(s, min(n, s + block_rows)) for s in range(0, n, block_rows)]
    whole = bool(seed % 2)
    pieces = plan_pieces(parts, row_bytes, chunk_rows, whole)
    assert len(pieces) == len(parts)
    for i, ((start, stop), mine) in enumerate(zip(parts, pieces)):
        assert {p.part for p in mine} == {i}
        assert mine[0].lo == start and mine[-1].hi == stop and all(a.hi == b.lo for a, b in zip(mine, mine[1:]))
        assert [p.last for p in mine] == [False] * (len(mine) - 1) + [True]
        if whole:  # a piece ends on a chunk boundary or at the array's end
            assert all(p.lo % chunk_rows == 0 and (p.hi % chunk_rows == 0 or p.hi == n) for p in mine)
        else:
            assert all(p.hi - p.lo <= max(1, readahead.PIECE_BYTES // row_bytes) for p in mine)


def _no_reader_left():
    return not any(t.name.startswith("embedcache-read") for t in threading.enumerate())


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_a_read_in_many_pieces_is_exact_reads_on_a_thread_and_names_the_damaged_block(tmp_path, backend, monkeypatch):
    path, arrays = block_store(tmp_path, backend)
    monkeypatch.setattr(readahead, "PIECE_BYTES", 40)  # an embedding row is 32 bytes: one row per piece
    calls = []
    with Store(path) as st:
        real = st.b.read_into

        second = threading.Event()

        def spy(name, start, out):
            calls.append((name, start, start + len(out), threading.current_thread().name))
            if name == "image/emb":  # the first thread waits a little for the second to take a block
                if len({c[3] for c in calls if c[0] == name}) > 1:
                    second.set()
                second.wait(2)
            real(name, start, out)

        st.b.read_into = spy
        for name, want in arrays.items():
            assert np.array_equal(st.read(name), want), name
    emb = [c for c in calls if c[0] == "image/emb"]
    assert sorted((lo, hi) for _, lo, hi, _ in emb) == [(i, i + 1) for i in range(10)]
    assert len({t for *_, t in emb}) == 2 and all(t.startswith("embedcache-read") for *_, t in emb)  # blocks in turn
    px = sorted((lo, hi) for name, lo, hi, _ in calls if name == "image/pixels")
    assert px == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]  # a compressed chunk is decoded once, whole
    if backend == "zarr":
        chunk = Path(path) / "image" / "emb" / "c" / "2" / "0" / "0"  # rows 8-9, the short last block
        raw = bytearray(chunk.read_bytes())
        raw[2 * 32 - 1] ^= 0x01  # the last byte of row 9 (the chunk is padded to 4 rows)
        chunk.write_bytes(bytes(raw))
    else:
        import h5py

        with h5py.File(path, "a") as f:
            f["image/emb"][9, 1, 7] = -f["image/emb"][9, 1, 7] - 1
    with Store(path) as st, pytest.raises(StoreDamagedError, match=r"image/emb: rows 8-9 \(block 2\) do not match"):
        st.read("image/emb")
    assert _no_reader_left()


def test_a_chunk_that_does_not_decode_is_one_damaged_line_and_stops_the_reader(tmp_path, monkeypatch):
    path, _ = block_store(tmp_path, "zarr")
    monkeypatch.setattr(readahead, "PIECE_BYTES", 40)
    with Store(path) as st:
        real = st.b.read_into

        def broken(name, start, out):
            if start >= 5:
                raise ValueError("zstd: corrupted frame")
            real(name, start, out)

        st.b.read_into = broken
        with pytest.raises(StoreDamagedError, match=r"image/emb: it cannot be decoded \(ValueError\); run `embedcache verify"):
            st.read("image/emb")
    assert _no_reader_left()


def _slow_parts(parts=10, per_part=10, on_fill=lambda n: None):
    filled = []

    def fill(lo, hi):
        time.sleep(0.01)
        filled.append(lo)
        on_fill(len(filled))

    return [[Piece(i, i * per_part + j, i * per_part + j + 1, j == per_part - 1) for j in range(per_part)]
            for i in range(parts)], fill, filled


def test_an_error_on_one_thread_stops_the_others_and_the_lowest_failed_parts_error_is_raised():
    parts, fill, filled = _slow_parts()
    part0_failed = threading.Event()

    def check(p):
        if p.lo == 3:  # part 0, on one thread
            part0_failed.set()
            raise ValueError("part 0")
        if p.lo == 10:  # part 1, on the other: fails after part 0 has
            part0_failed.wait(2)
            raise ValueError("part 1")

    with pytest.raises(ValueError, match="part 0"):
        read_parts(parts, fill, check, threads=2)
    # parts 2-9 never start (part 1 may not have started either when part 0 failed, on a loaded machine)
    assert _no_reader_left() and sorted(filled) in ([0, 1, 2, 3, 10], [0, 1, 2, 3]), filled


def test_ctrl_c_while_waiting_stops_every_reading_thread_within_a_piece():
    main = threading.main_thread().ident
    parts, fill, filled = _slow_parts(on_fill=lambda n: n == 5 and signal.pthread_kill(main, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        read_parts(parts, fill, lambda p: None, threads=2)
    assert _no_reader_left() and 5 <= len(filled) <= 20, filled  # of 100: the threads stop at their next piece


def test_an_unverified_read_reads_blocks_in_turn_unchecked_and_an_empty_one_needs_no_thread(tmp_path, monkeypatch):
    path, arrays = block_store(tmp_path, "zarr")
    with Store(path) as st:
        monkeypatch.setattr("embedcache.store.store.checksum", lambda *a: pytest.fail("an unverified read was checked"))
        assert np.array_equal(st.read("image/emb", verify=False), arrays["image/emb"])
    seen = []
    read_parts([], lambda lo, hi: seen.append(lo), seen.append)
    assert seen == [] and _no_reader_left()
