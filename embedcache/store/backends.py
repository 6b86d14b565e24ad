"""Storage backends (a registry): the few operations the store contract needs, for Zarr v3 and HDF5.

Arrays are addressed by slash paths ("image/emb"), written in whole-row slabs and read whole or by
row range. Blobs are small byte strings (parquet tables, per-block failure records): files inside a
Zarr store's folder, uint8 datasets inside an HDF5 file. Attributes hold JSON. Nothing outside
``embedcache.store`` touches a backend: the ``Store`` is the only door to a store.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np

from ..errors import DiskFullError, StoreBusyError, StoreDamagedError, StoreError, StoreMismatchError, first_line
from ..fileio import atomic_write_bytes, disk_full_error, exclusive_lock, file_size_limit
from ..registry import Registry
from .pieces import bytes_of

BACKENDS = Registry("store backend")


def _pread_exact(fd: int, view: memoryview, offset: int) -> bool:
    """Fill ``view`` (bytes) from byte ``offset`` of an open file; False if the file ends early. No file
    object and no seek: a whole-array read makes a call per piece, so what a call costs besides its
    copy counts."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            return False
        got += n
    return True


class _Rechunked(Exception):
    """A chunk file missing or of another size than the array's chunk: perhaps re-chunked by another
    process since this one read the array's metadata."""


REFRESHES = 3  # metadata re-reads a whole-array read may make (a store re-chunked under it; a missing file)
ZSTD_LEVEL = 1  # zstd level of compressed Zarr arrays (pixels, small bookkeeping): see ZarrBackend.create_array


Range = Tuple[int, int]  # rows lo:hi


def _tiling(start: int, out: np.ndarray, pieces: Optional[Sequence[Range]]) -> Sequence[Range]:
    """The pieces a read comes in, checked to tile rows ``start:start + len(out)`` in order."""
    if pieces is None:
        return [(start, start + len(out))]
    ends = [start] + [b for piece in pieces for b in piece] + [start + len(out)]
    if any(a != b for a, b in zip(ends[::2], ends[1::2])) or any(lo > hi for lo, hi in pieces):
        raise ValueError(f"pieces {list(pieces)[:4]}... do not tile rows {start}:{start + len(out)} in order")
    return pieces


class _ChunkFiles:
    """Raw reads of an array whose chunks span whole rows, straight from the bytes on disk: Zarr (a
    file per chunk, each a whole chunk: zarr pads the last one; a file of another size raises
    _Rechunked) or HDF5 (one file; ``offsets``: each written chunk's byte offset and filter mask by its
    first row). Each file is opened once while a read lasts: a whole array comes in pieces of about
    1 MB, and an open per piece cost more than its read. Pieces come in row order, so a Zarr chunk's
    file is closed as the next one opens: one file open at a time, however many chunks."""

    def __init__(self, path_of: Callable[[int], str], rows: int, row_bytes: int, offsets: Optional[dict] = None):
        self.path_of, self.rows, self.row_bytes, self.offsets = path_of, rows, row_bytes, offsets
        self.key: Optional[int] = None  # the open file's chunk (Zarr) or 0 (HDF5's one file)
        self.fd = -1

    def read(self, lo: int, hi: int, out: memoryview, start: int) -> bool:
        """Rows ``lo:hi`` into their place in ``out`` (the bytes of rows ``start:``); False if a chunk was
        never written, is filtered, or its file ends early (the caller's library then reads them)."""
        rows, row_bytes = self.rows, self.row_bytes
        for c in range(lo // rows, -(-hi // rows)):
            a, b = max(lo, c * rows), min(hi, (c + 1) * rows)
            offset = 0
            if self.offsets is not None:
                offset, mask = self.offsets.get(c * rows, (None, 0))
                if offset is None or mask:
                    return False
            view = out[(a - start) * row_bytes:(b - start) * row_bytes]
            if not _pread_exact(self._open(c), view, offset + (a - c * rows) * row_bytes):
                return False
        return True

    def _open(self, c: int) -> int:
        """The file descriptor of chunk ``c``'s file, the one before it closed."""
        key = c if self.offsets is None else 0
        if key != self.key:
            self.close()
            try:
                fd = os.open(self.path_of(c), os.O_RDONLY)
            except FileNotFoundError:
                if self.offsets is not None:  # HDF5's one file
                    raise
                raise _Rechunked(self.path_of(c)) from None
            if self.offsets is None and os.fstat(fd).st_size != self.rows * self.row_bytes:
                os.close(fd)
                raise _Rechunked(self.path_of(c))
            self.key, self.fd = key, fd
        return self.fd

    def close(self) -> None:
        if self.key is not None:
            os.close(self.fd)
            self.key, self.fd = None, -1


REMAKE = "the command that made it (its extract or synthesize)"  # how a damaged store is made again


def _read_rows(backend, arr, name: str, start: Optional[int], stop: Optional[int]) -> np.ndarray:
    """Rows ``start:stop`` of array ``arr`` (a zarr array or h5py dataset), through ``backend.read_into``."""
    start, stop = 0 if start is None else start, arr.shape[0] if stop is None else min(stop, arr.shape[0])
    out = np.empty((max(0, stop - start),) + tuple(arr.shape[1:]), dtype=arr.dtype)
    backend.read_into(name, start, out)
    return out


@BACKENDS.register("zarr")
class ZarrBackend:
    """A folder: zarr v3 group + ``meta.parquet`` / ``text.parquet`` files beside ``zarr.json``."""
    multi_writer = True  # disjoint chunk-aligned row blocks can be written by separate processes
    rewrites_unreadable = True  # a chunk that cannot be read is a file of its own: writing the block replaces it

    packs_in_place = False  # separate writers would write one chunk: a finished store packs its raw arrays

    def __init__(self, path: str, mode: str = "r"):
        import zarr

        self.path = Path(path)
        self.mode = mode
        self._arrays: dict = {}
        self._exclusive = False  # holding the re-chunk lock
        try:
            self.group = zarr.open_group(str(self.path), mode="r" if mode == "r" else "a")
        except Exception as exc:  # an unreadable zarr.json
            raise StoreDamagedError(f"store {path} cannot be opened ({type(exc).__name__}: {first_line(exc)}); "
                                    f"delete it and rerun {REMAKE}") from None

    @staticmethod
    def exists(path: str) -> bool:
        return (Path(path) / "zarr.json").is_file()

    @classmethod
    def create_atomic(cls, path: str, init) -> bool:
        """Build a new store in a temporary folder with ``init(backend)``, then rename it into
        place, so concurrent workers never see half a store. False if another worker won."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.creating")
        try:
            b = cls(str(tmp), "a")
            init(b)
            b.close()
            os.rename(tmp, target)
            return True
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if cls.exists(path):
                return False
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def create_array(self, name: str, shape: Sequence[int], dtype, chunks: Sequence[int], codec: str = "zstd",
                     fill: bool = True) -> None:
        from zarr.codecs import ZstdCodec

        parent, _, leaf = name.rpartition("/")
        g = self.group.require_group(parent) if parent else self.group
        # write_empty_chunks: skip zarr's per-chunk "is it all fill value?" scan (1.4 s of a 10 s
        # GPU extraction when measured); every chunk we write holds data, and a chunk that is
        # missing on disk must stay missing (the checksums then find it), never "equal to zeros".
        # zstd level 1, not its default 3: on PACS canvases 2.1 to 2.5x faster to write (470 against 190 MB/s on one
        # core, which a CPU teacher's forward shares with the writer thread) for a few points of size (photos
        # to 0.88 of raw, not 0.84; cartoons 0.47, not 0.45); reading about as fast (550 to 860 MB/s, against 610 to 810).
        g.create_array(leaf, shape=tuple(shape), dtype=np.dtype(dtype), chunks=tuple(chunks), fill_value=0,
                       compressors=None if codec == "none" else ZstdCodec(level=ZSTD_LEVEL),
                       config={"write_empty_chunks": True})

    def has(self, name: str) -> bool:
        try:
            self._array(name)
            return True
        except KeyError:
            return False

    def _array(self, name: str):
        """The array's handle, opened once (opening one reads its metadata: milliseconds each)."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except KeyError:
                raise
            except Exception as exc:  # its zarr.json truncated or altered
                raise StoreDamagedError(f"store {self.path}: the metadata of {name} (its zarr.json) cannot be read "
                                        f"({type(exc).__name__}); delete the store and rerun {REMAKE}") from None
        return self._arrays[name]

    def shape(self, name: str) -> tuple:
        return tuple(self._array(name).shape)

    def chunks(self, name: str) -> tuple:
        return tuple(self._array(name).chunks)

    def dtype(self, name: str) -> np.dtype:
        """Its type with its byte order: Zarr keeps that in the bytes codec, not the data type."""
        arr = self._array(name)
        endian = next((getattr(getattr(c, "endian", None), "value", None) for c in getattr(arr.metadata, "codecs", ())
                       if type(c).__name__ == "BytesCodec"), None)
        dtype = np.dtype(arr.dtype)
        return dtype.newbyteorder(">" if endian == "big" else "<") if endian and dtype.itemsize > 1 else dtype

    def compressed(self, name: str) -> bool:
        """Whether chunks are decoded whole (a codec besides the plain bytes one)."""
        return bool(self._array(name).compressors)

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        # write_empty_chunks is a runtime setting, not stored with the array: without it, a chunk of
        # zeros (black canvases, a block of unreadable images) is never written and reads as "lost"
        arr = self._array(name).with_config({"write_empty_chunks": True})
        arr[start:start + len(data)] = data

    def read(self, name: str, start: Optional[int] = None, stop: Optional[int] = None) -> np.ndarray:
        return _read_rows(self, self._array(name), name, start, stop)

    def read_into(self, name: str, start: int, out: np.ndarray, pieces: Optional[Sequence[Range]] = None,
                  after: Optional[Callable[[int, int], None]] = None) -> None:
        """Rows ``start:start + len(out)`` into ``out`` (C-contiguous, the array's dtype), piece by piece
        (``pieces``: row ranges tiling them in order; default one), ``after(lo, hi)`` called as each piece
        is in. Uncompressed arrays whose chunks span whole rows (the embeddings) are read straight from
        their chunk files (each file holds its rows' little-endian bytes in C order, the zarr v3 bytes
        codec; zarr's own path reached 0.4x of np.load here), each file opened once per call; other
        arrays, and a chunk file still missing or of another size once the metadata is read again, go
        through zarr (whose rows the checksums then judge)."""
        files, view, refreshes = self._chunk_files(name, out), bytes_of(out), REFRESHES
        try:
            for lo, hi in _tiling(start, out, pieces):
                raw = False
                while files is not None:
                    try:
                        raw = files.read(lo, hi, view, start)
                        break
                    except _Rechunked:  # perhaps by another process since this one read the metadata: read it again
                        if not refreshes:
                            break  # a file missing or of the wrong size after all: zarr (and the checksums) decide
                        files.close()
                        self.refresh()
                        files, refreshes = self._chunk_files(name, out), refreshes - 1
                if not raw:
                    out[lo - start:hi - start] = self._array(name)[lo:hi]
                if after is not None:
                    after(lo, hi)
        finally:
            if files is not None:
                files.close()

    def _chunk_files(self, name: str, out: np.ndarray) -> Optional[_ChunkFiles]:
        """The raw reader of an uncompressed array whose chunks span whole rows, little-endian; None for
        any other."""
        arr = self._array(name)
        meta = arr.metadata
        codecs = getattr(meta, "codecs", ())
        if (len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec"
                or getattr(codecs[0].endian, "value", "little") != "little" or tuple(arr.chunks[1:]) != tuple(arr.shape[1:])
                or arr.dtype.byteorder == ">"):
            return None
        # paths as strings: building a path object per chunk cost more than the chunk's read
        folder, encode, tail = f"{self.path}/{name}/", meta.chunk_key_encoding.encode_chunk_key, (0,) * (arr.ndim - 1)
        return _ChunkFiles(lambda c: folder + encode((c,) + tail), int(arr.chunks[0]), out[:1].nbytes)

    def refresh(self) -> None:
        """Metadata read again: another process may have re-chunked arrays or finished the store since."""
        import zarr

        self._arrays.clear()
        self.group = zarr.open_group(str(self.path), mode="r" if self.mode == "r" else "a")

    @contextmanager
    def exclusive(self):
        """The store's re-chunk lock, held by one process at a time (re-entrant within this one)."""
        from . import rechunk as work

        if self._exclusive:
            yield
            return
        with exclusive_lock(self.path / work.LOCK):
            self._exclusive = True
            try:
                yield
            finally:
                self._exclusive = False

    def rechunk(self, name: str, rows: int, source) -> bool:
        """Rewrite array ``name`` in chunks of ``rows`` rows with the rows ``source(lo, hi)`` gives
        (rechunk.py: safe against a kill); False if it already has them. One process at a time: shards
        finishing together wait for each other, and the later one finds the work done."""
        from . import rechunk as work

        with self.exclusive():
            work.recover(self.path, name)
            self._arrays.pop(name, None)  # another process may have re-chunked it since this one opened it
            arr = self._array(name)
            if int(arr.chunks[0]) == rows:
                return False
            try:
                work.rechunk(self.path, name, arr, rows, source)
            finally:
                self._arrays.pop(name, None)
            return True

    def swap_pending(self) -> bool:
        """A re-chunk a kill cut off, its arrays still mid-swap (the next writer puts them back)."""
        from . import rechunk as work

        return (self.path / work.WORK).is_dir()

    def recover(self, names) -> None:
        """Arrays left mid-swap by a kill during a re-chunk put back (a writer's first step)."""
        from . import rechunk as work

        if (self.path / work.WORK).is_dir():
            with self.exclusive():
                for name in names:
                    work.recover(self.path, name)
                self._arrays.clear()

    def chunk_rows_present(self, name: str) -> Optional[set]:
        """Indices along axis 0 of the chunks that exist on disk (a listing, no data read): a chunk
        file that was lost would otherwise read back silently as zeros."""
        folder = self.path / name / "c"
        if not folder.is_dir():
            return set()
        # chunk files only: c/<i>[/<j>...], every part a number (zarr's own `.partial` files left by a
        # kill, or a copy's `._name`, are not chunks)
        parts = (p.relative_to(folder).parts for p in folder.rglob("*") if p.is_file())
        return {int(q[0]) for q in parts if all(x.isdigit() for x in q)}

    def set_attr(self, key: str, value: Any) -> None:
        self.group.attrs[key] = json.loads(json.dumps(value))

    def get_attr(self, key: str, default: Any = None) -> Any:
        return self.group.attrs.get(key, default)

    def put_blob(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.path / name, data)

    def get_blob(self, name: str) -> Optional[bytes]:
        p = self.path / name
        return p.read_bytes() if p.is_file() else None

    def list_blobs(self, prefix: str) -> list:
        folder = self.path / prefix
        return sorted(f"{prefix}/{p.name}" for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []

    def flush(self) -> None:
        pass

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def close(self) -> None:
        pass


HDF5_RESERVE = 8 * 2**20  # bytes an HDF5 store leaves free on its disk: room to write its metadata and close


def _lock_errno(text: str) -> Optional[int]:
    """The errno of HDF5's "unable to lock file, errno = N" (11: another process holds the file; 37 or 38: the
    filesystem takes no locks), or None."""
    found = re.search(r"unable to lock file, errno = (\d+)", text)
    return int(found.group(1)) if found else None


def _chunk_table(dsid, iterate: bool) -> dict:
    """First row of each written chunk of an HDF5 dataset -> (byte offset, filter mask): in one pass in
    C (``iterate``), else chunk by chunk."""
    found: dict = {}
    if iterate:
        dsid.chunk_iter(lambda info: found.__setitem__(info.chunk_offset[0], (info.byte_offset, info.filter_mask)))
    else:
        for i in range(dsid.get_num_chunks()):
            info = dsid.get_chunk_info(i)
            found[info.chunk_offset[0]] = (info.byte_offset, info.filter_mask)
    return found


@BACKENDS.register("hdf5")
class HDF5Backend:
    """One .h5 file; blobs are uint8 datasets under ``_blobs/``. One writer process at a time."""
    multi_writer = False
    # raw chunks read whatever bytes they hold: a block that cannot be read is the file's own index (its
    # B-tree, a chunk address), which writing the block again does not mend (h5py fails mid-write)
    rewrites_unreadable = False
    # one writer, whose file has no chunk cache (rdcc_nbytes=0): a block's rows go straight to their place
    # in a chunk of several blocks, so raw block arrays are made packed (layout.packed_rows)
    packs_in_place = True

    def __init__(self, path: str, mode: str = "r"):
        import h5py

        self.path = Path(path)
        self.mode = mode
        self.file = None
        self._datasets: dict = {}
        self._offsets: dict = {}  # dataset -> {first row of a chunk: (byte offset, filter mask)}, read-only files
        try:
            # a writer caches no chunk: a cached chunk of several blocks would be written whole at every
            # block's flush (measured 4-10x slower), where uncached its block's rows alone are written
            self.file = h5py.File(self.path, "r") if mode == "r" else h5py.File(self.path, "a", rdcc_nbytes=0)
        except (OSError, BlockingIOError) as exc:
            text = str(exc).lower()
            if isinstance(exc, BlockingIOError) or _lock_errno(text) in (errno.EAGAIN, errno.EACCES):
                raise StoreBusyError(f"HDF5 store {path} is open in another process (HDF5 allows one writer and no "
                                     "reader beside it); wait for that process to finish, or use a .zarr store") from None
            if "unable to lock" in text:  # not held by another: a filesystem that takes no locks (errno 37, 38)
                raise StoreError(f"HDF5 store {path} cannot be locked on this filesystem ({first_line(exc)}; NFS and "
                                 "Lustre may take no locks); set HDF5_USE_FILE_LOCKING=FALSE with no other process "
                                 "writing it, or use a .zarr store") from None
            if os.path.isfile(path) and not h5py.is_hdf5(path):  # no store to delete: some other file
                raise StoreMismatchError(f"{path} is not an HDF5 file (no HDF5 signature in it), so not a store; give a "
                                         "store's path, or another --out for a new one") from None
            raise StoreDamagedError(f"HDF5 store {path} is damaged or truncated ({first_line(exc)}); delete it and "
                                    f"rerun {REMAKE} to rebuild it") from None

    @staticmethod
    def exists(path: str) -> bool:
        return Path(path).is_file()

    @classmethod
    def create_atomic(cls, path: str, init) -> bool:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.creating")
        try:
            b = cls(str(tmp), "a")
            init(b)
            b.close()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if target.exists():
            tmp.unlink()
            return False
        os.replace(tmp, target)
        return True

    def create_array(self, name: str, shape: Sequence[int], dtype, chunks: Sequence[int], codec: str = "zstd",
                     fill: bool = True) -> None:
        """h5py has no zstd without plugins: arrays stay uncompressed (embeddings do not compress anyway).
        ``fill=False`` (arrays packed in place): a chunk of several blocks, allocated at its first block,
        gets only that block's rows written, no fill around them. Such an array's unwritten rows (and a
        chunk never written) read as whatever the file holds, not zeros: only finished blocks, held to
        their checksums, are read from it."""
        make = dict(shape=tuple(shape), dtype=np.dtype(dtype), chunks=tuple(chunks), fillvalue=0)
        try:
            self.file.create_dataset(name, **make, **({} if fill else {"fill_time": "never"}))
        except TypeError:  # h5py < 3.12 has no fill_time: a chunk's fill is written once, as it is allocated
            self.file.create_dataset(name, **make)

    @contextmanager
    def _reading(self, what: str):
        """HDF5's own structures (the B-trees and headers that find a dataset or attribute) damaged:
        one line, not h5py's KeyError, OSError or RuntimeError."""
        try:
            yield
        except (KeyError, OSError, RuntimeError, ValueError) as exc:
            raise StoreDamagedError(f"HDF5 store {self.path}: {what} cannot be read ({first_line(exc)}): the file's "
                                    f"own structure is damaged; delete it and rerun {REMAKE}") from None

    def has(self, name: str) -> bool:
        with self._reading(name):
            return name in self.file

    def shape(self, name: str) -> tuple:
        with self._reading(name):
            return tuple(self.file[name].shape)

    def chunks(self, name: str) -> tuple:
        with self._reading(name):
            return tuple(self.file[name].chunks)

    def dtype(self, name: str) -> np.dtype:
        with self._reading(name):
            return np.dtype(self.file[name].dtype)

    def compressed(self, name: str) -> bool:
        with self._reading(name):
            return bool(self.file[name]._filters)

    def _dataset(self, name: str):
        """The dataset's handle, kept open: a write through a handle freed at once left its chunks to be
        written when h5py dropped it, where a full disk's error was swallowed (and later segfaulted)."""
        if name not in self._datasets:
            self._datasets[name] = self.file[name]
        return self._datasets[name]

    def _room_for(self, nbytes: int) -> None:
        """Refuse a write the disk, or the process's file-size limit (`ulimit -f`), has no room for, before
        it starts: HDF5 does not recover from a write cut short (its error surfaces when a handle is freed,
        and closing the file then crashes, exit 139, leaving a file that cannot be opened to resume)."""
        free = shutil.disk_usage(self.path.parent).free
        if free < nbytes + HDF5_RESERVE:  # the reserve said: a nearly empty small disk is "full" here
            raise DiskFullError(f"disk full while writing {self.path}: {free / 2**20:.1f} MiB free for a write of "
                                f"{nbytes / 2**20:.1f} MiB, and an HDF5 store keeps {HDF5_RESERVE // 2**20} MiB "
                                "free to close its file cleanly; free space or "
                                "choose --out on a larger disk, then rerun the same command to resume")
        limit = file_size_limit()
        if limit is not None and self.path.stat().st_size + nbytes + HDF5_RESERVE > limit:
            raise disk_full_error(f"{self.path} (an HDF5 store keeps {HDF5_RESERVE // 2**20} MiB below the limit, "
                                  f"{limit / 2**20:.1f} MiB, to close its file cleanly)", size_limit=True)

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        ds = self._dataset(name)
        chunk = int(np.prod(ds.chunks)) * ds.dtype.itemsize if ds.chunks else 0
        self._room_for(max(data.nbytes, chunk))  # a chunk first written takes its whole size in the file
        ds[start:start + len(data)] = data

    def read(self, name: str, start: Optional[int] = None, stop: Optional[int] = None) -> np.ndarray:
        return _read_rows(self, self.file[name], name, start, stop)

    def read_into(self, name: str, start: int, out: np.ndarray, pieces: Optional[Sequence[Range]] = None,
                  after: Optional[Callable[[int, int], None]] = None) -> None:
        """Rows ``start:start + len(out)`` into ``out`` (C-contiguous, the dataset's dtype), piece by
        piece (``pieces``: row ranges tiling them in order; default one), ``after(lo, hi)`` called as
        each piece is in. Unfiltered datasets whose chunks span whole rows, in a file opened read-only,
        are read straight from the file at the offset HDF5 reports for each chunk (HDF5's own
        chunk-by-chunk copy reached 0.3x of np.load here); anything else, and a chunk never written,
        goes through h5py."""
        ds = self._dataset(name)
        raw, view = self._raw_chunks(ds, name, out), bytes_of(out)
        try:
            for lo, hi in _tiling(start, out, pieces):
                if hi > lo and out.size and not (raw is not None and raw.read(lo, hi, view, start)):
                    ds.read_direct(out[lo - start:hi - start], np.s_[lo:hi])
                if after is not None:
                    after(lo, hi)
        finally:
            if raw is not None:
                raw.close()

    def _raw_chunks(self, ds, name: str, out: np.ndarray) -> Optional[_ChunkFiles]:
        """The raw reader of an unfiltered dataset whose chunks span whole rows, little-endian, in a file
        opened read-only (its chunks cannot move); None for any other."""
        if (self.mode != "r" or ds.chunks is None or ds._filters or tuple(ds.chunks[1:]) != tuple(ds.shape[1:])
                or ds.dtype.byteorder == ">"):
            return None
        rows, offsets = int(ds.chunks[0]), self._chunk_offsets(ds, name)
        return _ChunkFiles(lambda c: str(self.path), rows, out[:1].nbytes, offsets=offsets)

    def _chunk_offsets(self, ds, name: str) -> dict:
        """Every written chunk's file offset by its first row, listed once per dataset (the file is open
        read-only, so they cannot move): one pass in C instead of a lookup per chunk."""
        if name not in self._offsets:
            self._offsets[name] = _chunk_table(ds.id, iterate=hasattr(ds.id, "chunk_iter"))  # chunk_iter: HDF5 >= 1.12.3
        return self._offsets[name]

    def chunk_rows_present(self, name: str) -> Optional[set]:
        return None  # chunks live inside one file: damage shows as a checksum or decode error

    # One writer, its raw block arrays packed in place from the start (packs_in_place): nothing is ever
    # re-chunked, so there is no re-chunk lock to take, no swap to recover and no metadata to re-read.
    def refresh(self) -> None:
        pass

    def exclusive(self):
        return nullcontext()

    def rechunk(self, name: str, rows: int, source) -> bool:
        return False

    def recover(self, names) -> None:
        pass

    def swap_pending(self) -> bool:
        return False

    def set_attr(self, key: str, value: Any) -> None:
        self.file.attrs[key] = json.dumps(value)

    def get_attr(self, key: str, default: Any = None) -> Any:
        with self._reading(f"its {key}"):
            raw = self.file.attrs.get(key)
            return default if raw is None else json.loads(raw)

    def put_blob(self, name: str, data: bytes) -> None:
        self._room_for(len(data))
        key = f"_blobs/{name}"
        if key in self.file:
            del self.file[key]
        self.file.create_dataset(key, data=np.frombuffer(data, dtype=np.uint8))
        self.file.flush()

    def get_blob(self, name: str) -> Optional[bytes]:
        key = f"_blobs/{name}"
        with self._reading(name):
            return self.file[key][()].tobytes() if key in self.file else None

    def list_blobs(self, prefix: str) -> list:
        key = f"_blobs/{prefix}"
        with self._reading(prefix):
            return sorted(f"{prefix}/{n}" for n in self.file[key]) if key in self.file else []

    def flush(self) -> None:
        self.file.flush()

    def disk_bytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        if self.file:
            self._datasets.clear()
            self._offsets.clear()
            self.file.close()
            self.file = None


def a_store_of(backend: str) -> str:
    """'a Zarr store' / 'an HDF5 store', as messages name one."""
    return "an HDF5 store" if backend == "hdf5" else "a Zarr store"


SUFFIXES = {".zarr": "zarr", ".h5": "hdf5", ".hdf5": "hdf5"}  # a store path's suffix -> its backend


def _is_hdf5_file(path: Path) -> bool:
    """A file that starts with HDF5's signature (another file: judged by its name, and refused there)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:  # not a file, or unreadable
        return False


def backend_name_for(path: str, backend: Optional[str] = None, new: bool = False) -> str:
    """The backend named, else what is at ``path`` (an HDF5 file, a Zarr folder, whatever its name),
    else HDF5 for .h5/.hdf5 paths and Zarr for others. A ``new`` store's path with another suffix is
    refused (a typo such as .hd5 would silently make a Zarr folder), as is a URL."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(path)):  # s3://b/x.zarr was written to ./s3:/b/x.zarr (an audit)
        from ..errors import ConfigError

        earlier = Path(path)  # where a version before the refusal wrote it: ./s3:/bucket/x.zarr
        was = f" (an earlier embedcache wrote this one to the local path {earlier})" if earlier.exists() else ""
        raise ConfigError(f"{path} is a URL, and stores are read and written at local paths (object storage through "
                          f"fsspec is not built){was}; give a local path, or a bucket mounted as a folder")
    stem, suffix = os.path.splitext(str(path).rstrip("/"))
    if backend:
        backend = BACKENDS.check(backend)
        named = SUFFIXES.get(suffix)
        if new and named and named != backend and not os.path.exists(path):  # one made so before still opens
            from ..errors import ConfigError

            kinds = {"zarr": "Zarr", "hdf5": "HDF5"}
            fix = stem + (".h5" if backend == "hdf5" else ".zarr")
            raise ConfigError(f"--out {path} names a {kinds[named]} store, but backend={backend}: give --out {fix}, or "
                              f"leave backend out")
        return backend
    if _is_hdf5_file(Path(path)):
        return "hdf5"
    if Path(path).is_dir() and (Path(path) / "zarr.json").is_file():
        return "zarr"
    if new and suffix and suffix not in SUFFIXES:
        from ..errors import ConfigError

        raise ConfigError(f"--out {path}: a store path ends in .zarr (a Zarr folder) or .h5/.hdf5 (one HDF5 file), "
                          f"not {suffix}; rename it, or choose the format with --set backend=zarr|hdf5")
    return SUFFIXES.get(suffix, "zarr")
