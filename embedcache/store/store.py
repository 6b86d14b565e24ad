"""The ``Store``: the only door to a store, for writers (extraction, synthesis, features) and readers.

Layout (Zarr; HDF5 mirrors it):
  attrs ``manifest``       schema, key, teacher, dataset, views, canvas, text, versions, complete,
                           and ``checksums`` of the tables and text arrays once complete
  attrs ``layout``         N, V, D, canvas size, block_rows, number of blocks, array specs
  ``image/emb``            (N, V, D) float16, L2-normalised teacher view embeddings, raw, in chunks of
                           whole blocks of ~8 MB (Zarr: a chunk per block until finished, then packed,
                           rechunk.py; HDF5: from the start, written in place)
  ``image/view_params``    (N, V, 5) int32 (top, left, height, width, flip) on the canvas; 11 with colour
  ``image/pixels``         (N, S, S, 3) uint8 canvas (absent when canvas.store is false)
  ``image/status``         (N,) uint8: 1 ok, 2 failed (0: not written yet)
  ``text/<source>/emb``    (P, D) float32 prompt embeddings; ``text/<source>/class_emb`` (C, D)
  ``blocks/done``          (num_blocks,) uint8, one chunk per block, set after its rows are written
  ``blocks/crc32c``        (num_blocks, A) uint32: CRC-32C of each block array's rows in that block,
                           started from a seed of the key, the array and the block (``SEEDED_KEY``)
  ``blocks.npz``           both of the above in one file, written as the store completes (readers of a
                           complete store read it instead of two files per block)
  ``derived/<name>``       arrays computed from the store later (cached student features), each
                           with its own completeness flag and checksum in attrs ``derived``
  ``meta.parquet``         one row per image (index, path, class_name, [class_id,] label, domain, split, status, reason)
  ``text.parquet``         one row per prompt (source, label, class_name, prompt, n_tokens, truncated)
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd

from ..errors import DatasetError, StoreBusyError, StoreDamagedError, StoreError, StoreMismatchError, first_line
from ..fileio import exclusive_lock, try_exclusive_lock, utc_now
from .backends import BACKENDS, REMAKE, backend_name_for
from .books import CallBooks, json_or
from .integrity import IntegrityReport, checksum
from .layout import SCHEMA_VERSION, WRITTEN_DTYPES, block_range, packable, packed_rows, written_dtype
from .pieces import bytes_of, plan_pieces

TABLES = ("meta.parquet", "text.parquet")
# every block's done flag and checksums in one file, written as a store completes: a reader of a
# complete store reads it instead of two files per block (blocks/done, blocks/crc32c). Its checksum has
# a manifest key of its own: versions before it look up every name in "checksums" as a table or array.
BLOCKS_SUMMARY, SUMMARY_KEY = "blocks.npz", "blocks_summary_crc32c"
MANIFEST_KEY = "manifest_crc32c"  # the manifest's own checksum, of every other field (stores since 2026-12-06)
# a block's checksums start from a seed of the store's key, the array and the block (stores since 2026-12-06): its
# bookkeeping holds only for the rows it was written with, not for another store's (or block's) copied in with theirs
SEEDED_KEY = "block_sums_seeded"
LAYOUT_KEY = "layout_crc32c"  # the layout's checksum (stores since 2026-12-06): every array is read by the layout


def sealed(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """``manifest`` with its own checksum (``MANIFEST_KEY``), of its other fields as canonical JSON."""
    return {**manifest, MANIFEST_KEY: _manifest_sum(manifest)}


def _manifest_sum(manifest: Dict[str, Any]) -> int:
    body = {k: v for k, v in manifest.items() if k != MANIFEST_KEY}
    return checksum(json.dumps(body, sort_keys=True).encode())


def _layout_sum(layout: Dict[str, Any]) -> int:
    return checksum(json.dumps(layout, sort_keys=True).encode())


def new_marks(layout: Dict[str, Any]) -> Dict[str, Any]:
    """What a store made now records in its manifest beyond what it was given: its block checksums are
    seeded, and its layout's checksum. A store without them was made before them: read as it was made
    (the seeds cannot be removed unseen: every block's checksum would then disagree)."""
    return {SEEDED_KEY: True, LAYOUT_KEY: _layout_sum(layout)}


def _run_folder_store(path: str) -> str:
    """The store a run's folder at ``path`` trained on ('' when ``path`` holds no run's config.json)."""
    try:
        with open(Path(path) / "config.json") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return ""
    if not isinstance(config, dict) or "store_key" not in config:
        return ""
    return str(config.get("store_path") or config.get("store") or f"the store of key {config['store_key']}")


def _store_above(path: str) -> Optional[Path]:
    """The Zarr store a path lies inside (a folder above it whose zarr.json holds a manifest), or None."""
    for p in Path(path).resolve().parents:
        meta = p / "zarr.json"
        if meta.is_file():
            try:
                if '"manifest"' in meta.read_text(errors="replace"):
                    return p
            except OSError:
                return None
        else:
            return None  # a store's folders each have their zarr.json: above the first without, no store
    return None


class _PartChecks:
    """The checksums of an array's parts (row blocks; None: unchecked) continued as its pieces come in,
    in row order (``rows``: the array's bytes), each part compared as it ends; ``mismatch(part, crc)``
    is told of one that does not match. ``busy``: an error came from inside a check (a bug, not damage)."""

    def __init__(self, rows: memoryview, row_bytes: int, parts: list, sums: list, mismatch,
                 seeds: Optional[list] = None):
        """``seeds``: each part's checksum's starting value (none: 0)."""
        self.rows, self.row_bytes, self.mismatch = rows, row_bytes, mismatch
        self.seeds = seeds or [0] * len(parts)
        self.parts, self.sums, self.first, self.busy = parts, sums, 0, False
        self.crc = self.seeds[0] if parts else 0

    def __call__(self, lo: int, hi: int) -> None:
        self.busy = True
        parts, sums, rows, row_bytes, first = self.parts, self.sums, self.rows, self.row_bytes, self.first
        while first < len(parts):
            start, stop = parts[first]
            want = sums[first]
            if stop > hi:  # a part that goes on in the next piece
                if want is not None and start < hi:
                    self.crc = checksum(rows[(start if start > lo else lo) * row_bytes:hi * row_bytes], self.crc)
                break
            if want is not None:
                crc = checksum(rows[(start if start > lo else lo) * row_bytes:stop * row_bytes], self.crc)
                if crc != want:
                    self.mismatch(first, crc)
            first += 1
            self.crc = self.seeds[first] if first < len(parts) else 0
        self.first, self.busy = first, False


def names_disagree(manifest: Dict, meta: pd.DataFrame) -> str:
    """'' when the manifest's class and domain lists agree with a store's meta.parquet, else which does not."""
    classes, labels = np.asarray(manifest["dataset"]["classes"], dtype=object), meta["label"].to_numpy()
    inside = (labels >= 0) & (labels < len(classes))
    wrong = ~inside | (classes[np.where(inside, labels, 0)] != meta["class_name"].to_numpy())
    what = "class" if wrong.any() else "domain" if not set(meta["domain"]) <= set(manifest["dataset"]["domains"]) else ""
    return f"'s {what} list disagrees with meta.parquet" if what else ""


def teacher_model(t: Dict) -> Optional[str]:
    """A manifest's teacher model as ``teacher.model`` takes it: a local-dir's own folder
    (``local-dir:/path``, recorded apart from the key, which names only ``local-dir``)."""
    return (t.get("source") or {}).get("model") if t.get("model") == "local-dir" else t.get("model")


WRITERS_GATE = ".writers.lock"  # held while a writer looks for others and takes its own shard's lock


def live_writers(path: str) -> List[int]:
    """The shard count of each extraction writing the Zarr store at ``path`` now (holding its lock)."""
    live = []
    for name in sorted(os.listdir(path)):
        found = re.fullmatch(r"\.writer-\d+-of-(\d+)\.lock", name)
        if found is None:
            continue
        probe = try_exclusive_lock(os.path.join(path, name), probe=True)
        if probe is None:
            live.append(int(found.group(1)))
        else:
            os.close(probe)
    return live


class Store(CallBooks):
    """A store on disk. ``Store(path)`` opens for reading, ``Store(path, "a")`` for writing;
    ``Store.create`` makes a new one. Analysts use ``embedcache.open_store``, which wraps this."""

    def __init__(self, path: str, mode: str = "r", backend: Optional[str] = None, rebuild_text: bool = False):
        """``rebuild_text`` (the store's own command, a repair): prompt arrays, and a complete store's
        block bookkeeping, lost as a whole are let through, for ``rebuild_lost`` to make again once the
        store is known to be the one wanted."""
        self.lost_text: List[str] = []
        self.lost_books: List[str] = []  # the blocks' bookkeeping lost as a whole, restored from the summary
        self.path = str(path)
        self.mode = mode
        self.backend_name = backend_name_for(path, backend)
        cls = BACKENDS.get(self.backend_name)
        if not cls.exists(self.path):
            from ..config import packaged_maker

            if Path(self.path).is_file() and self.backend_name == "zarr":  # a config, a table: not a store at all
                raise StoreError(f"{self.path} is a file, not a store (a Zarr store is a folder, an HDF5 one a .h5 "
                                 "file); give a store's path")
            if Path(self.path).is_dir() and self.backend_name == "hdf5":  # said "no store", yet something is there
                raise StoreError(f"{self.path} is a folder, not a store (an HDF5 store is a .h5 file, a Zarr one a "
                                 "folder holding zarr.json); give a store's path")
            made_by = _run_folder_store(self.path)
            if made_by:  # a run's folder given for its store
                raise StoreError(f"{self.path} is a run's folder, not a store; its store is {made_by}")
            where = "" if Path(self.path).is_absolute() else f" (a relative path, taken from {Path.cwd()})"
            raise StoreError(f"no {self.backend_name} store at {self.path}{where}; give its path, or run "
                             f"`{packaged_maker(self.path) or 'embedcache extract'}` to make one")
        root = _store_above(self.path)
        if root is not None:
            raise StoreError(f"{self.path} is inside the store {root}; give the store's own path")
        self.b = cls(self.path, mode)
        self._contents: Optional[str] = None  # contents_digest, once read
        self._embeddings: Optional[str] = None  # embeddings_digest, once read
        try:  # a refusal (or a failure) closes the backend: an HDF5 file left open stays locked in the process
            self._read_and_check(mode, rebuild_text)
        except BaseException:
            self.close()
            raise

    def _read_and_check(self, mode: str, rebuild_text: bool) -> None:
        self.manifest: Dict[str, Any] = self.b.get_attr("manifest") or {}
        self.layout: Dict[str, Any] = self.b.get_attr("layout") or {}
        if mode != "r":  # a re-chunk a kill cut off, put right first
            self.b.recover(self.layout.get("block_arrays", ()))
        if not self.manifest:
            raise StoreMismatchError(f"{self.path} is not an embedcache store (it has no manifest); give a store's path, "
                                     "or another --out for a new one (a store whose creation was cut off: delete it)")
        if self.manifest.get("schema") != SCHEMA_VERSION:
            raise StoreMismatchError(f"store {self.path} has schema {self.manifest.get('schema')!r}, this embedcache reads "
                                     f"schema {SCHEMA_VERSION}; re-extract it with this version (use a new --out)")
        self._refuse_altered_layout()
        self._refuse_missing_arrays(rebuild_text and mode != "r")

    def _refuse_altered_layout(self) -> None:
        """A layout edited since the store was made (its views, dim or canvas, an array's spec): every
        array is read by it, so every value read would be wrong."""
        want = self.manifest.get(LAYOUT_KEY)
        if want is not None and _layout_sum(self.layout) != int(want):
            raise StoreDamagedError(f"{self.path}: its layout (the store's 'layout' attribute) does not match the "
                                    "checksum its manifest keeps: it was changed since embedcache wrote it, and every "
                                    "array is read by it; put it back, or delete the store and rerun the command "
                                    "that made it")

    def rebuild_lost(self) -> None:
        """The arrays lost as a whole that can be made again: the blocks' bookkeeping written back from a
        complete store's summary (checksummed in its manifest); the prompt arrays made again, empty, and
        the store marked unfinished: finishing it encodes the prompts again (a paid teacher's answers
        come from its ledger)."""
        kept = self._load_summary() if self.lost_books else None
        for a in self.lost_books:
            spec = self.layout["arrays"][a]
            self.b.create_array(a, spec["shape"], spec["dtype"], spec["chunks"], spec.get("codec", "zstd"))
            self.b.write(a, 0, np.asarray(kept[a], spec["dtype"]))
        for a in self.lost_text:
            spec = self.layout["arrays"][a]
            self.b.create_array(a, spec["shape"], spec["dtype"], spec["chunks"], spec.get("codec", "zstd"))
        if self.lost_text:
            self.write_manifest({**self.manifest, "complete": False})
        if self.lost_text or self.lost_books:
            self.b.flush()
        self.lost_text, self.lost_books = [], []

    def _refuse_missing_arrays(self, rebuild_text: bool = False) -> None:
        """An array of the layout gone as a whole (deleted, its metadata lost) cannot be re-done block by
        block: refused in one line (a re-chunk's swap seen midway is waited out under its lock first)."""
        missing = [a for a in self.layout.get("arrays", {}) if not self.b.has(a)]
        if missing and self.b.swap_pending():  # a re-chunk a kill cut off: the next writer puts it back
            return
        if missing:
            try:
                with self.b.exclusive():
                    self.refresh()
                    missing = [a for a in missing if not self.b.has(a)]
            except OSError:  # read-only storage: no lock to take, and nothing moves there either
                pass
        text = [a for a in missing if a.startswith("text/")]  # the prompts: encoded again at the finish
        # the bookkeeping of a complete store: from its summary (an unfinished one's blocks may since have been
        # reopened for a repair, which the summary does not know)
        books = [a for a in missing if a.startswith("blocks/")] if (
            missing and self.complete and self._load_summary() is not None) else []
        if missing and len(text) + len(books) == len(missing):
            if rebuild_text:
                self.lost_text, self.lost_books = text, books
                return
            said = [part for part, lost in ((("the prompts' embeddings", "encodes the prompts again"), text),
                                            (("the blocks' bookkeeping", f"restores it from its {BLOCKS_SUMMARY}"), books))
                    if lost]
            raise StoreDamagedError(f"{self.path}: array {missing[0]} is missing ({' and '.join(w for w, _ in said)}, lost "
                                    f"as a whole); `embedcache verify --repair {self.path}` (or the store's own command) "
                                    f"{' and '.join(f for _, f in said)}")
        if missing:
            raise StoreDamagedError(f"{self.path}: array {missing[0]} is missing ({len(missing)} of the store's "
                                    f"{len(self.layout['arrays'])} arrays lost as a whole), so it cannot be repaired "
                                    "block by block; delete the store and rerun the command that made it (a paid "
                                    "teacher's answers come from its ledger free)")
        self._refuse_altered_arrays()

    def _refuse_altered_arrays(self) -> None:
        """An array whose own metadata gives another type or shape than the store's layout (its zarr.json
        edited): the bytes, and so their checksums, are unchanged, but every value read would be wrong."""
        blocks = set(self.layout.get("block_arrays", ()))
        for a, spec in self.layout.get("arrays", {}).items():
            if not self.b.has(a):
                continue  # a prompt array lost as a whole, remade when the store finishes
            # stores are little-endian ('<' and the native '=' compare equal on a little-endian machine); the
            # type embedcache writes, not the layout's alone (edited with the array's zarr.json, it passed)
            want = (np.dtype(written_dtype(a, spec["dtype"])).newbyteorder("<"), tuple(spec["shape"]))
            got = (self.b.dtype(a), tuple(self.b.shape(a)))
            why = "every value read would be wrong"
            if got == want and a in blocks:  # block arrays: in chunks of a block, or of whole blocks once packed
                chunks, rows = tuple(self.b.chunks(a)), {int(spec["chunks"][0]), packed_rows(self.layout, a)}
                if chunks[0] not in rows or list(chunks[1:]) != list(spec["chunks"][1:]):
                    got, want = (got[0], f"{got[1]} in chunks of {chunks}"), (want[0], f"{want[1]} in chunks of "
                                                                                     f"{tuple(spec['chunks'])}")
                    why = "its rows would be read from other chunks"
            if got != want:
                raise StoreDamagedError(
                    f"{self.path}: array {a} reads as {got[0]} {got[1]}, but it was written as {want[0]} "
                    f"{want[1]} (its metadata altered: {why}); put its metadata back, or "
                    "delete the store and rerun the command that made it")

    # --- making one ---------------------------------------------------------------------------------
    @staticmethod
    def exists(path: str, backend: Optional[str] = None) -> bool:
        return BACKENDS.get(backend_name_for(path, backend)).exists(str(path))

    @classmethod
    def create(cls, path: str, manifest: Dict[str, Any], layout: Dict[str, Any], backend: Optional[str] = None) -> "Store":
        """A new, empty store with every array created (or the one another worker just made)."""
        name = backend_name_for(path, backend)

        cls_b = BACKENDS.get(name)
        in_place = {a: rows for a in (packable(layout) if cls_b.packs_in_place else ())
                    if (rows := packed_rows(layout, a)) > int(layout["block_rows"])}

        def init(b):
            for arr, spec in layout["arrays"].items():
                chunks = [in_place[arr], *spec["chunks"][1:]] if arr in in_place else spec["chunks"]
                b.create_array(arr, spec["shape"], spec["dtype"], chunks, spec.get("codec", "zstd"), fill=arr not in in_place)
            b.set_attr("layout", layout)
            b.set_attr("manifest", sealed({**manifest, **new_marks(b.get_attr("layout"))}))

        cls_b.create_atomic(str(path), init)
        return cls(path, "a", name)

    # --- identity -------------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        return self.manifest.get("key", "")

    def contents_digest(self) -> Optional[str]:
        """A digest of the images a finished store holds (each row's status and canvas CRC-32C), which its key
        does not: the key holds the files' paths and sizes, so a store re-extracted after an image was replaced
        by another of the same size has the same key. None for a store that keeps no canvas checksums (one
        with pixels made before 2026-12-06) or is unfinished."""
        if not self.complete or not self.has("image/canvas_crc32c"):
            return None
        if self._contents is None:
            h = hashlib.blake2b(digest_size=8)
            for name in ("image/status", "image/canvas_crc32c"):
                h.update(np.ascontiguousarray(self.read(name), dtype=WRITTEN_DTYPES[name]).tobytes())
            self._contents = h.hexdigest()
        return self._contents

    def embeddings_digest(self) -> Optional[str]:
        """A digest of the teacher's numbers a finished store holds (each block's checksum of ``image/emb`` and
        the text arrays' checksums), which neither its key nor ``contents_digest`` holds: a store extracted again
        at another batch size, on another device or CPU thread count has the same key and images, and
        embeddings that differ by float rounding. None for an unfinished store."""
        if not self.complete:
            return None
        if self._embeddings is None:
            h = hashlib.blake2b(digest_size=8)
            column = self.layout["block_arrays"].index("image/emb")
            h.update(np.ascontiguousarray(self._bookkeeping("blocks/crc32c")[:, column], dtype=np.uint32).tobytes())
            text = sorted((k, int(v)) for k, v in self.manifest.get("checksums", {}).items() if k.startswith("text/"))
            h.update(json.dumps(text).encode())
            self._embeddings = h.hexdigest()
        return self._embeddings

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def num_blocks(self) -> int:
        return int(self.layout["num_blocks"])

    def _seed(self, name: str, block: int) -> int:
        """Where block ``block``'s checksum of array ``name`` starts (0 in stores from before the seeds)."""
        if not self.manifest.get(SEEDED_KEY) or not self._is_block_array(name):
            return 0
        return int.from_bytes(hashlib.blake2b(f"{self.key}/{name}/{block}".encode(), digest_size=4).digest(), "little")

    def block_range(self, block: int) -> Tuple[int, int]:
        return block_range(self.layout, block)

    def require(self, key: Optional[str] = None, complete: bool = True, advice: str = "use another --out path",
                differs: str = "", whose: str = "this call's key") -> "Store":
        """Refuse a store made from other inputs (``differs``: which, when known; ``whose``: what ``key``
        is said to be), or one whose extraction has not finished."""
        if key is not None and key != self.key:
            t = self.manifest.get("teacher", {})
            raise StoreMismatchError(
                f"store {self.path} was made from other inputs ({differs + '; ' if differs else ''}the store's key "
                f"{self.key}, teacher {t.get('name')}/{teacher_model(t) or t.get('classifier')}); {whose} {key}: "
                f"{advice}")
        if complete and not self.complete:
            done = int(self.blocks_done().sum())
            if self.writing_now():  # "rerun the command" told of one still running
                raise StoreBusyError(f"store {self.path} is incomplete ({done} of {self.num_blocks} blocks written) and "
                                     f"being written now by a live `embedcache {self.producer}` (or a repair); wait for "
                                     "it to finish")
            raise StoreError(f"store {self.path} is incomplete ({done} of {self.num_blocks} blocks written); "
                             f"{self.rerun_to_finish()}{self.held_repair_note()}")
        return self

    def writing_now(self) -> bool:
        """Whether an extraction or a repair writes this Zarr store now (holding a writer's lock; an HDF5 store
        being written cannot be opened beside its writer)."""
        gate = os.path.join(self.path, WRITERS_GATE)
        if self.backend_name != "zarr" or not os.path.exists(gate):  # the first writer makes the gate
            return False
        try:
            with exclusive_lock(gate, probe=True):  # a probe outside the gate could make a writer taking its lock refuse
                return bool(live_writers(self.path))
        except OSError:  # read-only storage: no lock can be probed, and nothing writes there
            return False

    def _repair_marks(self) -> Dict[int, Dict[str, int]]:
        """The blocks a repair reopened and has not re-done yet -> the checksums their files gave when the store
        was made, which the re-done block is held to ({}: none kept, as for a block with an unreadable image)."""
        done, marks = self.blocks_done(), {}
        for name in self.b.list_blobs("repair"):  # repair/block_000000.json, emptied once re-done
            block = name.removeprefix("repair/block_").removesuffix(".json")
            raw = self.b.get_blob(name) if block.isdigit() and int(block) < len(done) and not done[int(block)] else None
            if raw:
                marks[int(block)] = json_or(raw, {})
        return marks

    def held_repair_blocks(self) -> List[int]:
        """The blocks a repair reopened and has not re-done yet."""
        return sorted(self._repair_marks())

    def held_repair_note(self) -> str:
        """' (a repair is re-doing block(s) 0 from the source files, held to ...)' for an unfinished store
        whose blocks a repair reopened ('' if none); where it holds them to what their files first gave, its
        rerun refuses a source image changed since, again, until the original is back."""
        marks = self._repair_marks()
        if not marks:
            return ""
        held = sorted(marks)
        shown = ", ".join(map(str, held[:5])) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        if not any(marks.values()):
            return f" (a repair is re-doing block(s) {shown} from the source files)"
        return (f" (a repair is re-doing block(s) {shown} from the source files, held to what they gave when the store "
                "was made: restore any source image changed since first, or the rerun refuses it again)")

    @property
    def producer(self) -> str:
        """The command that writes (and resumes) this store: ``synthesize`` or ``extract``."""
        return "synthesize" if "synthesis" in self.manifest else "extract"

    # --- row blocks -------------------------------------------------------------------------------------
    def blocks_done(self) -> np.ndarray:
        return self._bookkeeping("blocks/done").astype(bool)

    def _bookkeeping(self, name: str, summary: bool = True) -> np.ndarray:
        """``blocks/done`` or ``blocks/crc32c``: from a complete store's summary when it is intact
        (``summary``), else block by block (one chunk per block). A chunk that no longer decodes
        reads as zeros: its block counts as not done (or unchecked), so a repair redoes it, and
        writing the block rewrites the chunk whole."""
        kept = self._summary() if summary and self.complete else None
        if kept is not None:
            return kept[name]
        try:
            return self.b.read(name)
        except Exception:
            out = np.zeros(self.b.shape(name), np.uint8 if name == "blocks/done" else np.uint32)
            for blk in range(len(out)):
                try:
                    out[blk] = self.b.read(name, blk, blk + 1)[0]
                except Exception:
                    pass
            return out

    def _summary(self) -> Optional[Dict[str, np.ndarray]]:
        """The bookkeeping a complete store summarised as it completed, read once per summary written;
        None where it is missing, does not match its checksum, or was found stale (the blocks' own
        arrays are read then, and ``verify`` names the file)."""
        want = self.manifest.get(SUMMARY_KEY)
        cached = self.__dict__.get("_kept")
        if cached is None or cached[0] != want:
            self.__dict__["_kept"] = cached = (want, self._load_summary())
        return cached[1]

    def _distrust_summary(self) -> None:
        """The summary was found stale: this Store reads the blocks' own bookkeeping from now on."""
        self.__dict__["_kept"] = (self.manifest.get(SUMMARY_KEY), None)

    def _load_summary(self) -> Optional[Dict[str, np.ndarray]]:
        want = self.manifest.get(SUMMARY_KEY)
        raw = self.b.get_blob(BLOCKS_SUMMARY) if want is not None else None
        if raw is None or checksum(raw) != int(want):
            return None
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            kept = {"blocks/done": z["done"], "blocks/crc32c": z["crc32c"]}
        for a in kept.values():
            a.flags.writeable = False
        return kept

    def _own_sum(self, name: str, block: int) -> Optional[int]:
        """A finished block's checksum of ``name`` as the block's own bookkeeping records it (None if
        not done or unreadable): what a row block is held to when the summary disagrees (a store a
        repair by an older version re-did a block of, a repair by another process since opening)."""
        try:
            if not self.b.read("blocks/done", block, block + 1)[0]:
                return None
            return int(self.b.read("blocks/crc32c", block, block + 1)[0, self.layout["block_arrays"].index(name)])
        except Exception:
            return None

    @staticmethod
    def _summary_bytes(sums: np.ndarray, done: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, done=done, crc32c=sums)
        return buf.getvalue()

    def _unmarked(self, done: np.ndarray) -> np.ndarray:
        """Blocks a complete store has not marked done: every block of a complete store was finished,
        so these lost their done flag, and their rows would go unchecked."""
        return np.flatnonzero(~done) if self.complete else np.empty(0, np.int64)

    def _refuse_unmarked(self, done: np.ndarray) -> None:
        lost = self._unmarked(done)
        if len(lost):
            start, stop = self.block_range(int(lost[0]))
            raise self._damaged("blocks/done", f"block {lost[0]} (rows {start}-{stop - 1}) is not marked done in a "
                                               "complete store, so its rows cannot be trusted")

    def write_block(self, block: int, arrays: Dict[str, np.ndarray], failures: Optional[Dict[int, str]] = None) -> None:
        """Write one row block of every block array, its failure records and checksums, then mark
        it done (last, so a block is either durable or redone on resume)."""
        names = self.layout["block_arrays"]
        missing = set(names) - set(arrays)
        if missing:
            raise ValueError(f"block {block} lacks arrays {sorted(missing)}")
        start, stop = self.block_range(block)
        sums = np.zeros((1, len(names)), np.uint32)
        for j, name in enumerate(names):
            data = arrays[name]
            if len(data) != stop - start:
                raise ValueError(f"block {block} of {name} has {len(data)} rows, expected {stop - start}")
            self.b.write(name, start, data)
            sums[0, j] = checksum(data, self._seed(name, block))
        held = self._hold_to_expected(block, sums)  # a repaired block: what its source files gave the first time
        blob = f"failures/block_{block:06d}.json"
        if failures or self.b.get_blob(blob) is not None:  # a block redone clean clears its old records
            self.b.put_blob(blob, json.dumps({str(k): v for k, v in (failures or {}).items()}, sort_keys=True).encode())
        self.b.flush()
        self.b.write("blocks/crc32c", block, sums)
        self.b.flush()
        self.b.write("blocks/done", block, np.ones(1, np.uint8))
        if held:
            self.b.put_blob(_expected_blob(block), b"")  # held to it: done
        self.b.flush()

    def reopen_blocks(self, blocks: Iterable[int], recheck: bool = False) -> List[int]:
        """Mark blocks as not done (and the store as not complete) so extraction redoes them; returns
        them. Under the store's re-chunk lock, with its metadata read again; ``recheck`` (a repair):
        blocks that check out now were seen mid-swap while another process packed the store, and are
        left alone (all of them: nothing is changed). Packed arrays get a chunk per block again first,
        so that each block is rewritten alone (by separate processes, if sharded)."""
        with self.b.exclusive():
            self.refresh()
            redo = [int(b) for b in blocks]
            sums, done = self._own_bookkeeping() if redo else (None, None)  # none: only tables are redone
            if recheck and redo:
                redo = [b for b in redo if self._block_damage(b, sums, done)]
                if not redo:
                    return []
                self._expect_inputs(redo, sums, done)
            self.write_manifest({**self.manifest, "complete": False})  # first: no reader trusts it meanwhile
            if redo:
                self._rechunk(False, sums, done, unchecked=frozenset(redo))
            for blk in redo:
                self.b.write("blocks/done", blk, np.zeros(1, np.uint8))
            self.b.flush()
            return redo

    def _expect_inputs(self, blocks: List[int], sums: np.ndarray, done: np.ndarray) -> None:
        """A repair re-does blocks from the source files: what those files gave when the store was made
        (each finished block's checksums of every block array but the embeddings, where the complete
        store's summary confirms them) is kept, and ``write_block`` holds the re-done block to it."""
        if self.producer == "synthesize":  # synthesised images are made anew, as valid as the first (not a dataset's)
            return
        summary = self._summary() if self.complete else None  # None: no second record to confirm the block's own
        names = self.layout["block_arrays"]
        for blk in blocks:  # each marked reopened, so that a repair stopped before it re-did them is finished later
            failures = self.b.get_blob(f"failures/block_{blk:06d}.json")
            failed = bool(failures) and bool(json_or(failures, {"unreadable": True}))
            # an image that failed to read may read now (a passing I/O error): nothing to hold that block to
            want = {} if summary is None or failed else {
                name: int(sums[blk, j]) for j, name in enumerate(names)
                if name != "image/emb" and done[blk] and int(summary["blocks/crc32c"][blk, j]) == int(sums[blk, j])}
            self.b.put_blob(_expected_blob(blk), json.dumps(want, sort_keys=True).encode())

    def _hold_to_expected(self, block: int, sums: np.ndarray) -> bool:
        """Refuse a re-done block whose checksums differ from those a repair kept; whether any were kept."""
        raw = self.b.get_blob(_expected_blob(block))
        want = json_or(raw, {}) if raw else {}
        for j, name in enumerate(self.layout["block_arrays"]):
            if name in want and int(sums[0, j]) != int(want[name]):
                start, stop = self.block_range(block)
                raise DatasetError(f"{self.path}: block {block} (rows {start}-{stop - 1}) re-done from the source files "
                                   f"gives other {name} than the store recorded: a source image changed since the store "
                                   f"was made (an edit in place, bit rot), or this machine decodes it otherwise"
                                   f"{self._read_by_pil_note()}; restore the original files and rerun (the repair then "
                                   "re-does the block as it was), or delete the store and re-extract")
        return bool(raw)  # a block marked reopened, with or without checksums to hold it to

    def _read_by_pil_note(self) -> str:
        """' (files the device decoder rejected when the store was made, read by PIL: a, b)' where its calls
        recorded any: a decoder that accepts them now gives other pixels."""
        paths = sorted({p for c in self.manifest.get("calls") or [] for p in c.get("decoded_by_pil") or []})
        if not paths:
            return ""
        return (f" (when it was made, the device decoder rejected {', '.join(paths[:5])}"
                f"{f' and {len(paths) - 5} more' if len(paths) > 5 else ''}, which PIL read; a decoder that accepts "
                "them gives other pixels)")

    def refresh(self) -> None:
        """The store's metadata read again (another process may have packed or finished it)."""
        self.b.refresh()
        self.manifest = self.b.get_attr("manifest") or {}
        self.__dict__.pop("_kept", None)
        self._contents = self._embeddings = None

    def _own_bookkeeping(self) -> Tuple[np.ndarray, np.ndarray]:
        """Every block's checksums and done flag from the blocks' own arrays (not the summary)."""
        return self._bookkeeping("blocks/crc32c", summary=False), self._bookkeeping("blocks/done", summary=False)

    def _block_damage(self, blk: int, sums: np.ndarray, done: np.ndarray) -> List[str]:
        """The block arrays whose rows in block ``blk`` do not match their checksum (a block a complete
        store has not marked done: all of them)."""
        names = self.layout["block_arrays"]
        if not done[blk]:
            return list(names) if self.complete else []
        start, stop = self.block_range(blk)
        bad = []
        for j, name in enumerate(names):
            try:
                ok = checksum(self.b.read(name, start, stop), self._seed(name, blk)) == int(sums[blk, j])
            except Exception as exc:
                if not self.b.rewrites_unreadable:
                    raise StoreDamagedError(f"{self.backend_name.upper()} store {self.path}: its structure is damaged "
                                            f"({name} rows {start}-{stop - 1} cannot be read: {first_line(exc)}), "
                                            f"which cannot be repaired in place; delete it and rerun {REMAKE}") from None
                ok = False
            if not ok:
                bad.append(name)
        return bad

    # --- packing: a chunk per block while blocks are written, chunks of many blocks once finished ----
    def _rechunk(self, packed: bool, sums: np.ndarray, done: np.ndarray, unchecked: frozenset = frozenset()) -> None:
        """Packable arrays in chunks of whole blocks (``packed``: layout.packed_rows) or of one block,
        every finished block but ``unchecked`` checked against its checksum as it is copied (backends
        that pack in place keep their chunks)."""
        for name in packable(self.layout):
            rows = packed_rows(self.layout, name) if packed else int(self.layout["block_rows"])
            self.b.rechunk(name, rows, partial(self._copied_rows, name, sums, done, unchecked))

    def _copied_rows(self, name: str, sums: np.ndarray, done: np.ndarray, unchecked: frozenset, lo: int,
                     hi: int) -> np.ndarray:
        """Rows lo:hi (whole blocks) of ``name`` as a re-chunk copies them: every finished block but
        ``unchecked`` held to its checksum; a chunk that no longer decodes is read block by block, and
        the rows of blocks to be redone that cannot be read are zeros."""
        try:
            data = self.b.read(name, lo, hi)
        except Exception:
            data = None
        spec, j = self.layout["arrays"][name], self.layout["block_arrays"].index(name)
        out = np.zeros((hi - lo, *spec["shape"][1:]), spec["dtype"]) if data is None else data
        br = int(self.layout["block_rows"])
        for blk in range(lo // br, -(-hi // br)):
            if blk in unchecked or not done[blk]:  # to be redone, or never written
                continue
            start, stop = self.block_range(blk)
            block = out[start - lo:stop - lo]
            if data is None:
                try:
                    block[...] = self.b.read(name, start, stop)
                except Exception:
                    raise self._damaged(name, f"rows {start}-{stop - 1} (block {blk}) cannot be decoded") from None
            if checksum(block, self._seed(name, blk)) != int(sums[blk, j]):
                raise self._damaged(name, f"rows {start}-{stop - 1} (block {blk}) do not match their checksum")
        return out

    def failures(self) -> Dict[int, str]:
        out: Dict[int, str] = {}
        for name in self.b.list_blobs("failures"):
            out.update({int(k): v for k, v in json.loads(self.b.get_blob(name)).items()})
        return out

    # --- arrays -------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return self.b.has(name)

    def shape(self, name: str) -> tuple:
        return self.b.shape(name)

    def chunks(self, name: str) -> tuple:
        return self.b.chunks(name)

    def read(self, name: str, verify: bool = True) -> np.ndarray:
        """The whole array, checked against its checksums (refused with a one-line error if damaged):
        read in pieces, each checked right after it is read (pieces.py)."""
        self._require_readable(name)
        out = np.empty(self.b.shape(name), self.b.dtype(name))
        parts, sums = self._checked_parts(name, len(out), verify)
        seeds = [self._seed(name, part) for part in range(len(parts))]
        check = _PartChecks(bytes_of(out).toreadonly(), out[:1].nbytes, parts, sums,
                            lambda part, crc: self._mismatch(name, parts, part, crc), seeds)
        try:
            self.b.read_into(name, 0, out, plan_pieces(parts, out[:1].nbytes, self.b.chunks(name)[0],
                                                       self.b.compressed(name)), check)
        except StoreDamagedError:
            raise
        except Exception as exc:  # a chunk that no longer decodes (an error inside the check is a bug: raised)
            if check.busy:
                raise
            raise self._damaged(name, self._undecodable(name, parts, exc)) from None
        return out

    def _undecodable(self, name: str, parts: list, exc: BaseException, part: Optional[int] = None) -> str:
        """What of ``name`` no longer decodes, and the error that said so (``exc``: a file the process may not
        read is no damage): the rows and block of a block array (``part``, else found by reading each
        block, once the whole read has failed), or the array."""
        why = f"({type(exc).__name__})"
        if self._is_block_array(name) and part is None:
            part = next((k for k, (start, stop) in enumerate(parts) if not self._decodes(name, start, stop)), None)
        if not self._is_block_array(name) or part is None:
            return f"it cannot be decoded {why}"
        start, stop = parts[part]
        return f"rows {start}-{stop - 1} (block {part}) cannot be decoded {why}"

    def _decodes(self, name: str, start: int, stop: int) -> bool:
        try:
            self.b.read(name, start, stop)
            return True
        except Exception:
            return False

    def _require_readable(self, name: str) -> None:
        if not self.b.has(name):
            raise StoreError(f"store {self.path} has no array {name}")
        if name.startswith("text/") and not self.complete and name not in self._pending_sums:
            raise self._unfinished(name)  # written as the store finishes: zeros till then (read as scores of 0)

    def read_blocks(self, name: str) -> Iterator[Tuple[int, np.ndarray]]:
        """(first row, rows) of an array one row block at a time, each block checked against its
        checksum as ``read`` checks it: for an array too large to hold whole (a large store's pixels)."""
        self._require_readable(name)
        shape, dtype = self.b.shape(name), self.b.dtype(name)
        parts, sums = self._checked_parts(name, shape[0], True)
        for part, (start, stop) in enumerate(parts):
            out = np.empty((stop - start, *shape[1:]), dtype)
            try:
                self.b.read_into(name, start, out)
            except Exception as exc:  # a chunk that no longer decodes
                raise self._damaged(name, self._undecodable(name, parts, exc, part)) from None
            if sums[part] is not None:
                crc = checksum(out, self._seed(name, part))
                if crc != sums[part]:
                    self._mismatch(name, parts, part, crc)
            yield start, out

    def _mismatch(self, name: str, parts: list, part: int, crc: int) -> None:
        """Part ``part`` of array ``name`` read back as ``crc``, not its checksum: refused, unless only the
        blocks' summary was wrong (the block's own checksum then matches: the summary is distrusted)."""
        if not self._is_block_array(name):
            raise self._damaged(name, self._absent_chunks(name) or "it does not match its checksum")
        if self._own_sum(name, part) != crc:
            start, stop = parts[part]
            raise self._damaged(name, f"rows {start}-{stop - 1} (block {part}) do not match their checksum")
        self._distrust_summary()

    def _is_block_array(self, name: str) -> bool:
        return name in self.layout.get("block_arrays", ())

    def _checked_parts(self, name: str, n: int, verify: bool) -> Tuple[list, list]:
        """The parts an array is checked by, and each one's expected CRC-32C (None: not checked): a
        block array's row blocks (unfinished ones unchecked), or the whole array against the
        manifest's checksum."""
        if not self._is_block_array(name):
            want = self.manifest.get("checksums", {}).get(name) if verify else None
            return [(0, n)], [None if want is None else int(want)]
        if n != int(self.layout["n"]):  # rows past n would never be read or checked
            raise self._damaged(name, f"it holds {n} rows where the store has {self.layout['n']} (its zarr.json or "
                                      "HDF5 header was altered)")
        if self.num_blocks != -(-n // int(self.layout["block_rows"])):  # blocks that do not cover the rows
            raise self._damaged("layout", f"{self.num_blocks} blocks of {self.layout['block_rows']} rows do not hold "
                                          f"its {n} rows (its zarr.json or HDF5 attributes were altered)")
        parts = [block_range(self.layout, b) for b in range(self.num_blocks)]
        if not verify:
            return parts, [None] * len(parts)
        sums, done = self._bookkeeping("blocks/crc32c"), self.blocks_done()
        self._refuse_unmarked(done)
        col = self.layout["block_arrays"].index(name)
        return parts, [int(sums[b, col]) if done[b] else None for b in range(self.num_blocks)]

    def write_array(self, name: str, data: np.ndarray) -> None:
        """A whole non-block array (text embeddings), recorded for the manifest's checksums."""
        self.b.write(name, 0, data)
        self._pending_sums[name] = checksum(data)

    @property
    def _pending_sums(self) -> Dict[str, int]:
        return self.__dict__.setdefault("_sums", {})

    def _damaged(self, name: str, why: str) -> StoreDamagedError:
        return StoreDamagedError(f"store {self.path} is damaged: {name}: {why}; run `embedcache verify {self.path}` "
                                 f"to list what is damaged, then {self.redoer} redoes exactly that")

    @property
    def redoer(self) -> str:
        """What re-does a damaged store's blocks and files: a repair, or (a synthesised store, whose images
        only its own command can make again) that command."""
        if self.producer == "extract":
            return f"`embedcache verify --repair {self.path}` (or the store's extract command)"
        return f"rerunning the store's `embedcache {self.producer}` command with the same config"

    # --- tables -------------------------------------------------------------------------------------
    def put_table(self, name: str, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        data = buf.getvalue()
        self.b.put_blob(name, data)
        self._pending_sums[name] = checksum(data)

    def table(self, name: str) -> pd.DataFrame:
        raw = self.b.get_blob(name)
        if raw is None:
            if self.complete:
                raise self._damaged(name, "the file is missing")
            raise self._unfinished(name)
        want = self.manifest.get("checksums", {}).get(name)
        if want is not None and checksum(raw) != int(want):
            raise self._damaged(name, "the file is truncated or altered")
        return pd.read_parquet(io.BytesIO(raw))

    def _unfinished(self, name: str) -> StoreError:
        return StoreError(f"store {self.path} has no {name} yet: it is not finished; {self.rerun_to_finish()}")

    def rerun_to_finish(self) -> str:
        """The fix for an unfinished store, naming its path as --out takes it: a store renamed since was
        told to rerun "the same command", which wrote a new store at the old path (a trial)."""
        return f"rerun the same `embedcache {self.producer}` command, with --out {self.path}, to finish it"

    def manifest_problem(self) -> str:
        """What is wrong with a complete store's manifest ('' if nothing): it does not match its own checksum
        (stores made since it has one); or, for an edit that rewrote that too or a store made before, where
        it disagrees with what its data shows: its checksums gone
        (nothing then checks the tables and text arrays), its class or domain list against the checksummed
        meta.parquet (train_classes would pick other rows)."""
        if not self.complete:
            return ""
        altered = self.manifest_altered()
        if altered:
            return altered
        if not self.manifest.get("checksums"):
            return " has lost the checksums of its tables and text arrays"
        return names_disagree(self.manifest, self.table("meta.parquet"))

    def manifest_altered(self) -> str:
        """' does not match its own checksum...' when the manifest was changed since embedcache wrote it
        ('' if not, or for a store made before manifests had a checksum)."""
        want = self.manifest.get(MANIFEST_KEY)
        if want is None and self.manifest.get(SEEDED_KEY):  # made since manifests have one: it was deleted
            return f" has lost its own checksum ({MANIFEST_KEY}): it was changed since embedcache wrote it"
        if want is None or _manifest_sum(self.manifest) == int(want):
            return ""
        return " does not match its own checksum: it was changed since embedcache wrote it"

    # --- finishing -------------------------------------------------------------------------------------
    def write_manifest(self, manifest: Dict[str, Any]) -> None:
        manifest = sealed(manifest)
        self.b.set_attr("manifest", manifest)
        self.manifest = manifest

    def finish(self, **fields: Any) -> None:
        """Pack the raw block arrays, summarise the blocks' bookkeeping, record the checksums of the
        tables and arrays written since opening, then complete=True (last)."""
        self.b.flush()
        with self.b.exclusive():  # a shard that checks the store meanwhile waits, then finds it complete
            sums, done = self._own_bookkeeping()
            self._rechunk(True, sums, done)
            summary = self._summary_bytes(sums, done)
            self.b.put_blob(BLOCKS_SUMMARY, summary)
            sums = {**self.manifest.get("checksums", {}), **self._pending_sums}
            self.write_manifest({**self.manifest, **fields, "checksums": sums, SUMMARY_KEY: checksum(summary),
                                 "complete": True, "finished": utc_now()})
            self.b.flush()

    # --- verification ---------------------------------------------------------------------------------
    def quick_check(self) -> None:
        """Cheap structural check readers make on opening (a file listing, no data read): every
        finished block's chunks exist and every table is there. ``verify`` checks the contents."""
        flags = self.blocks_done()
        self._refuse_unmarked(flags)
        done = np.flatnonzero(flags)
        for name in self.layout.get("block_arrays", ()):
            present = self.b.chunk_rows_present(name)
            if present is None:
                continue
            rows = int(self.b.chunks(name)[0])
            for blk in done:
                start, stop = self.block_range(int(blk))
                missing = set(range(start // rows, -(-stop // rows))) - present
                if missing:
                    raise self._damaged(name, f"the chunk files of rows {start}-{stop - 1} (block {blk}) are missing")
        if self.complete:
            for name in TABLES:
                if self.b.get_blob(name) is None:
                    raise self._damaged(name, "the file is missing")

    def verify(self, progress: bool = False, on_block: Optional[Callable[[int], None]] = None) -> IntegrityReport:
        """Check every finished block of every block array, every text array and table, block by block."""
        from tqdm.auto import tqdm

        report = IntegrityReport(self.path)
        sums, done = self._own_bookkeeping()
        done = done.astype(bool)
        blocks = np.flatnonzero(done)
        for blk in self._unmarked(done):  # redone by a repair like any damaged block
            report.damaged[int(blk)] = ["blocks/done"]
        for blk in tqdm(blocks, desc=f"verify {self.path}", unit="block", disable=not progress, dynamic_ncols=True):
            bad = self._block_damage(int(blk), sums, done)
            if bad:
                report.damaged[int(blk)] = bad
            report.blocks_checked += 1
            if on_block is not None:
                on_block(int(blk))
        if self.complete:
            for name, want in self.manifest.get("checksums", {}).items():
                why = self._file_problem(name, int(want))
                if why:
                    report.files[name] = why
            for name in TABLES:
                if name not in self.manifest.get("checksums", {}) and self.b.get_blob(name) is None:
                    report.files[name] = "missing"
            why = self._summary_problem(done, sums)
            if why:
                report.files[BLOCKS_SUMMARY] = why
        for name, info in self.derived().items():
            if info.get("complete"):
                why = self._file_problem(f"derived/{name}", int(info["crc32c"]))
                if why:
                    report.derived[name] = why
        return report

    def _summary_problem(self, done: np.ndarray, sums: np.ndarray) -> str:
        """What is wrong with a complete store's blocks.npz against the blocks' own bookkeeping ("" if
        nothing, or if the store was finished before it existed)."""
        if self.manifest.get(SUMMARY_KEY) is None:
            return ""
        kept = self._load_summary()
        if kept is None:
            return self._file_problem(BLOCKS_SUMMARY, int(self.manifest[SUMMARY_KEY]))
        if not (np.array_equal(kept["blocks/done"], done.astype(np.uint8)) and np.array_equal(kept["blocks/crc32c"], sums)):
            return "disagrees with the blocks' own blocks/done and blocks/crc32c"
        return ""

    def _file_problem(self, name: str, want: int) -> str:
        if name in TABLES or name == BLOCKS_SUMMARY:
            raw = self.b.get_blob(name)
            return "missing" if raw is None else ("truncated or altered" if checksum(raw) != want else "")
        if not self.b.has(name):
            return "missing"
        try:
            return "" if checksum(self.b.read(name)) == want else (self._absent_chunks(name) or
                                                                    "does not match its checksum")
        except Exception as exc:
            return f"cannot be decoded ({type(exc).__name__})"

    def _absent_chunks(self, name: str) -> str:
        """Which chunk files of a whole array are gone ('' if none, or the backend keeps no files):
        zarr reads a lost chunk back as zeros, which the checksum then finds, said as what it is."""
        present = self.b.chunk_rows_present(name)
        if present is None:
            return ""
        n, rows = self.b.shape(name)[0], self.b.chunks(name)[0]
        gone = sorted(set(range(-(-n // rows))) - present)
        if not gone:
            return ""
        first, last = gone[0] * rows, min(n, (gone[-1] + 1) * rows) - 1
        return (f"its chunk file of rows {first}-{last} is missing" if len(gone) == 1 else
                f"{len(gone)} of its chunk files (rows {first}-{last}) are missing")

    # --- derived arrays (computed from a finished store, e.g. cached student features) ---------------------
    def derived(self) -> Dict[str, Dict[str, Any]]:
        """name -> info (shape, what made it, ``complete``) of every derived array."""
        return dict(self.b.get_attr("derived") or {})

    def put_derived(self, name: str, data: np.ndarray, info: Dict[str, Any]) -> str:
        """Write ``derived/<name>`` whole, then mark it complete with its checksum (last)."""
        path = f"derived/{name}"
        if self.b.has(path):  # written again in place: a cast would hold other numbers than its checksum's
            held = (tuple(self.b.shape(path)), np.dtype(self.b.dtype(path)))
            if held != (tuple(data.shape), data.dtype):
                raise StoreError(f"derived array {name} in {self.path} is {held[0]} {held[1]}, not {tuple(data.shape)} "
                                 f"{data.dtype}")
        meta = self.derived()
        meta[name] = {**info, "shape": list(data.shape), "dtype": str(data.dtype), "complete": False}
        self.b.set_attr("derived", meta)
        if not self.b.has(path):
            rows = max(1, min(len(data), (8 << 20) // max(1, data[:1].nbytes)))
            self.b.create_array(path, data.shape, data.dtype, (rows,) + tuple(data.shape[1:]), "none")
        self.b.write(path, 0, data)
        self.b.flush()
        meta[name].update(complete=True, crc32c=checksum(data))
        self.b.set_attr("derived", meta)
        self.b.flush()
        return path

    def read_derived(self, name: str) -> np.ndarray:
        info = self.derived().get(name)
        if not info or not info.get("complete"):
            raise StoreError(f"store {self.path} has no complete derived array {name}")
        data = self.read(f"derived/{name}", verify=False)
        if checksum(data) != int(info["crc32c"]):
            raise StoreDamagedError(f"store {self.path}: derived/{name} does not match its checksum; `embedcache verify "
                                    f"--repair {self.path}` marks it to be recomputed, then rerun the command that made "
                                    "it (`embedcache features`, or the store's own)")
        return data

    def forget_derived(self, names: Iterable[str]) -> None:
        """Mark derived arrays not complete, so the command that made them computes them again."""
        meta = self.derived()
        for name in names:
            if name in meta:
                meta[name] = {**meta[name], "complete": False}
        self.b.set_attr("derived", meta)
        self.b.flush()

    # --- housekeeping -------------------------------------------------------------------------------------
    def disk_bytes(self) -> int:
        return self.b.disk_bytes()

    def close(self) -> None:
        self.b.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _expected_blob(block: int) -> str:
    return f"repair/block_{block:06d}.json"
