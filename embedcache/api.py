"""Reading a store: ``open_store(path)`` for analysts, training and evaluation.

Arrays are loaded whole, once, checked against their checksums, and cached on the reader as
read-only arrays: editing one raises instead of silently changing what later calls return (copy
it first). Random row gathers from compressed chunks are 100-300x slower than indexing an
in-memory array, so nothing here reads row by row.
"""
from __future__ import annotations

import copy
import warnings
from functools import cached_property
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import pandas as pd

from .errors import StoreDamagedError, StoreError
from .fileio import json_digest
from .store import STATUS_OK, Store, names_disagree, teacher_model


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _top_k(k) -> int:
    """``k`` of a top-k, a whole number from 1 (-1 sliced off the last class, without a word: a review)."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise StoreError(f"k={k!r}: give the number of results, a whole number from 1")
    return int(k)


class StoreReader:
    """Read-only view of a complete store.

    manifest: dict. meta: DataFrame, one row per image. classes / domains: lists.
    image_emb(): (N, V, D) float16, L2-normalised; rows of unreadable images are NaN.
    pixels(): (N, S, S, 3) uint8. view_params(): (N, V, 5) int32 (11 with colour: views.param_fields). class_emb(source): (C, D) float32.
    text(source): prompts. Every array returned is read-only and shared between calls.
    """

    def __init__(self, path: Union[str, Store], backend: Optional[str] = None, require_complete: bool = True,
                 expect_key: Optional[str] = None, key_advice: str = "use the store that made it",
                 key_differs: str = "", key_whose: str = "this call's key"):
        self._own = not isinstance(path, Store)
        self._store = Store(path, "r", backend) if self._own else path
        try:
            self._store.require(expect_key, complete=require_complete, advice=key_advice, differs=key_differs,
                                whose=key_whose)
            self._store.quick_check()
            self._refuse_manifest(self._store.manifest_altered())  # before its classes or domains are answered
        except Exception:
            self.close()
            raise
        self.path = self._store.path
        self._manifest: Dict = self._store.manifest
        self.layout: Dict = self._store.layout
        self._teacher = None

    @property
    def manifest(self) -> Dict:
        """What made the store (a copy, yours to edit: sorting its class list in place had changed ``classes``
        and every label lookup after it, without a word; a review)."""
        return copy.deepcopy(self._manifest)

    @property
    def store(self) -> Store:
        """The underlying ``Store`` (derived arrays, verification)."""
        return self._store

    # --- tables --------------------------------------------------------------------------------
    @property
    def meta(self) -> pd.DataFrame:
        """One row per image (a copy: sorting or dropping rows of it in place had every later call of this
        reader pair rows with other images' embeddings, without a word: a trial)."""
        return self._meta.copy()

    @cached_property
    def _meta(self) -> pd.DataFrame:
        meta = self._store.table("meta.parquet")
        self._check_names(meta)
        return meta

    def _check_names(self, meta: pd.DataFrame) -> None:
        """The manifest must match its own checksum, and its class and domain lists the checksummed
        meta.parquet (a hand-edited class list would make train_classes pick other rows; an edit that
        rewrote the checksum too, or a store made before manifests had one, is still caught there)."""
        self._refuse_manifest(self._store.manifest_altered() or names_disagree(self._manifest, meta))

    def _refuse_manifest(self, why: str) -> None:
        if why:
            raise StoreError(f"store {self._store.path}: the manifest{why} (edited by hand?); restore the manifest, or "
                             "extract the store again")

    @property
    def text_table(self) -> pd.DataFrame:
        """One row per prompt of every text source (a copy, as ``meta`` is)."""
        return self._text_table.copy()

    def require_table_names(self) -> None:
        """Refuse to score a store whose domain or class names results tables would misread (``datasets.
        names_problem``; a store made before they were refused: its domain "all" read as every domain)."""
        from .datasets import names_problem

        why = names_problem(self.domains, self.classes)
        if why:
            raise StoreError(f"store {self.path}: {why} (it was made before such names were refused); rename it in the "
                             "dataset and extract it again into a new --out")

    @cached_property
    def _text_table(self) -> pd.DataFrame:
        return self._store.table("text.parquet")

    @property
    def classes(self) -> List[str]:
        return list(self._manifest["dataset"]["classes"])

    def class_ids(self, names, what: str = "class") -> np.ndarray:
        """Sorted ids of the class ``names``; a name the store lacks is a one-line error naming its classes."""
        classes = self.classes
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise StoreError(f"{what} {unknown[0]!r} is not in the store; its classes: {', '.join(classes)}")
        return np.unique([classes.index(n) for n in names]).astype(np.int64)

    @property
    def domains(self) -> List[str]:
        return list(self._manifest["dataset"]["domains"])

    @property
    def text_sources(self) -> List[str]:
        return list(self._manifest["text"]["sources"])

    @property
    def key(self) -> str:
        return self._store.key

    @property
    def dim(self) -> int:
        return int(self.layout["dim"])

    @property
    def views(self) -> int:
        return int(self.layout["views"])

    @cached_property
    def ok(self) -> np.ndarray:
        """(N,) bool: the image was read and embedded (False for unreadable files): meta.parquet's status, held to
        image/status (each checked against its checksums), which a plain reader reads: an edit of either, or a
        damaged one, had embedcache and h5py disagree on which rows failed, without a word (a trial)."""
        ok = (self._meta["status"] == "ok").to_numpy()
        written = self._store.read("image/status") == STATUS_OK
        if len(written) != len(ok) or (written != ok).any():
            rows = np.flatnonzero(written != ok) if len(written) == len(ok) else []
            where = f"{len(rows)} row(s), the first {rows[0]}" if len(rows) else "their lengths"
            raise StoreDamagedError(f"store {self._store.path}: meta.parquet's status and image/status disagree ({where}); "
                                    f"run `embedcache verify {self._store.path}` to see which is damaged")
        return _readonly(ok)

    @property
    def n_failed(self) -> int:
        return int((~self.ok).sum())

    def scoring_facts(self, source: str) -> Dict:
        """What a student trained on this store with text ``source`` asks of another store to be scored
        on it (``evaluate --transfer``): the same teacher, the same classes in the same order, the same
        prompts of ``source`` (their digest). Kept with the run, so it scores without this store."""
        prompts = self.text(source)[["label", "prompt"]].values.tolist() if source in self.text_sources else None
        return {"teacher": self._manifest["teacher"], "key_parts": {"teacher": self._manifest.get("key_parts", {}).get("teacher")},
                "classes": list(self.classes), "text": self._manifest.get("text", {}), "text_source": source,
                "prompts": json_digest(prompts) if prompts is not None else None, "producer": self._store.producer}

    def text(self, source: str = "name") -> pd.DataFrame:
        """One row per prompt of ``source``: source, label, class_name, prompt, n_tokens, truncated."""
        self._check_source(source)
        return self._text_table[self._text_table["source"] == source].reset_index(drop=True)

    # --- arrays (loaded whole, verified, cached, read-only) -------------------------------------------
    def _array(self, name: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_arrays", {})
        if name not in cache:
            cache[name] = _readonly(self._store.read(name))
        return cache[name]

    def image_emb(self, view: Optional[int] = None) -> np.ndarray:
        """(N, V, D) float16, or (N, D) for one view (view 0 = the centre view). Rows of unreadable
        images are NaN, so they can never pass for a real embedding; ``ok`` says which rows are real."""
        cache = self.__dict__.setdefault("_arrays", {})
        if "emb_nan" not in cache:
            emb = self._store.read("image/emb")
            emb[~self.ok] = np.nan
            cache["emb_nan"] = _readonly(emb)
        emb = cache["emb_nan"]
        return emb if view is None else emb[:, self._index(view, self.views, "view")]

    def _index(self, i, n: int, what: str) -> int:
        """``i`` as a row or view index, refused in one line outside 0..n-1 (a negative one counted from
        the end answered for another image, without a word: a trial)."""
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < n:
            raise StoreError(f"{what} {i!r} is not one of {self.path}'s {n} {what}s (0 to {n - 1})")
        return int(i)

    def view_params(self) -> np.ndarray:
        return self._array("image/view_params")

    def pixels(self) -> np.ndarray:
        if not self.layout.get("store_pixels"):
            raise StoreError(f"store {self.path} was made with canvas.store=false; rebuild canvases from the source "
                             "files with embedcache.views.make_canvas")
        return self._array("image/pixels")

    def _check_source(self, source: str) -> None:
        if source not in self.text_sources:
            raise StoreError(f"store {self.path} has no text source {source!r}; it has {', '.join(self.text_sources)}")

    def class_emb(self, source: str = "name") -> np.ndarray:
        """(C, D) float32, L2-normalised class embeddings of a text source."""
        self._check_source(source)
        return self._array(f"text/{source}/class_emb")

    def prompt_emb(self, source: str = "name") -> np.ndarray:
        """(P, D) float32, one row per prompt, rows aligned with ``text(source)``."""
        self._check_source(source)
        return self._array(f"text/{source}/emb")

    # --- analyst helpers -------------------------------------------------------------------------
    def _warn_failed(self, what: str) -> None:
        if self.n_failed:
            warnings.warn(f"{self.n_failed} unreadable image(s) of {self.path} {what} (meta.status == 'failed')",
                          stacklevel=3)

    def frame(self, embeddings: bool = False, view: int = 0) -> pd.DataFrame:
        """meta, optionally with an ``emb`` column holding each image's (D,) float32 view embedding
        (NaN for unreadable images, with a warning saying how many)."""
        df = self.meta
        if embeddings:
            self._warn_failed("have NaN embeddings in the frame")
            df["emb"] = list(self.image_emb(view).astype(np.float32))
        return df

    def _query(self, query: Union[str, np.ndarray, int], teacher=None, view: int = 0) -> np.ndarray:
        """A query as a unit vector: an image's view embedding (an index), a text's, or an embedding."""
        if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            query = self._index(query, len(self.ok), "image")
            if not self.ok[query]:
                raise StoreError(f"image {query} of {self.path} could not be read ({self._meta['reason'].iloc[query]}); "
                                 "it has no embedding")
            return self.image_emb(view)[query].astype(np.float32)
        if isinstance(query, str):
            teacher = self.require_teacher(teacher) if teacher is not None else self._loaded_teacher(said_at=4)
            return teacher.encode_text([query]).numpy()[0]
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise StoreError(f"query has dimension {q.shape[0]}, the store's teacher has {self.dim}")
        return q / max(float(np.linalg.norm(q)), 1e-12)

    def nearest_classes(self, query: Union[str, np.ndarray, int], source: str = "name", k: int = 5,
                        view: int = 0, teacher=None) -> pd.DataFrame:
        """Classes ranked by cosine to a query: an image index, an embedding, or a text."""
        scores = self.class_emb(source) @ self._query(query, teacher, view)
        top = np.argsort(-scores, kind="stable")[:_top_k(k)]
        return pd.DataFrame({"label": top, "class_name": [self.classes[i] for i in top], "score": scores[top]})

    def nearest_images(self, query: Union[str, np.ndarray, int], k: int = 5, view: int = 0, teacher=None) -> pd.DataFrame:
        """Readable images ranked by cosine between their view embedding and a query: an image index (itself
        first), a text or an embedding (unreadable images are left out, with a warning saying how many)."""
        self._warn_failed("are left out of the search")
        rows = np.flatnonzero(self.ok)
        scores = self.image_emb(view)[rows].astype(np.float32) @ self._query(query, teacher, view)
        top = np.argsort(-scores, kind="stable")[:_top_k(k)]
        out = self._meta.iloc[rows[top]].copy()
        out["score"] = scores[top]
        return out.reset_index(drop=True)

    def load_teacher(self):
        """The teacher that made this store, reloaded once from the source in the manifest and kept."""
        return self._loaded_teacher(said_at=3)

    def _loaded_teacher(self, said_at: int):
        """``load_teacher``; a paid teacher's warning points ``said_at`` frames up (the caller of load_teacher, or
        of nearest_classes / nearest_images)."""
        if self._teacher is not None:
            return self._teacher
        from .config import TeacherConfig
        from .extract.history import in_force
        from .teachers import build_teacher

        cfg = TeacherConfig(**in_force(self._manifest)["teacher"])
        made = build_teacher(cfg, embed_dim=self._manifest["teacher"].get("embed_dim"))  # a paid probe of it, spared
        teacher = self.require_teacher(made, "pass the original teacher or an embedding as the query")
        if callable(getattr(teacher, "budget_from", None)):  # a paid service: new prompts cost money
            warnings.warn(self._paid_queries(teacher, cfg.max_queries), stacklevel=said_at)
        self._teacher = teacher
        return teacher

    def _paid_queries(self, teacher, limit: Optional[int]) -> str:
        """The store's teacher.max_queries (what its extraction left of it) as the budget of this reader's text
        queries, and the line saying they are paid (they paid past the budget without a word: a review)."""
        said = (f"text queries of {self.path} are paid queries to {teacher.url} (each prompt its ledger has not "
                "answered is one)")
        if limit is None:
            return said + "; the store set no teacher.max_queries, so nothing caps them"
        from .extract.budget import ReaderBudget

        budget = ReaderBudget(self._store, limit, teacher.ledger)
        teacher.budget_from(budget)
        return (said + f", held within the {budget.left()} left of the store's teacher.max_queries={limit} (counted "
                f"in the ledger {teacher.ledger.path} over every reader that uses it; not written to the store's books)")

    def require_teacher(self, teacher, fix: str = "pass the teacher that made it"):
        """``teacher``, refused unless it is the one that made this store (same weights, model and precision)."""
        t = teacher.identity()
        if not self._made_by(t):
            raise StoreError(f"the teacher {t.get('name')}/{t.get('model')} differs from the one that made {self.path}; {fix}")
        expect = getattr(teacher, "expect_model", None)  # a paid service: its answers held to the store's model
        if callable(expect):
            expect((self._manifest.get("teacher_usage") or {}).get("answered_model"))
        return teacher

    def _made_by(self, identity: Dict) -> bool:
        """Whether a teacher of this identity made the store: the digest of the key's teacher part, or
        for a store made before manifests kept those digests, the identity's fields as the manifest
        records them (a remote teacher's ``server`` there describes the service, not its fingerprint)."""
        parts = self._manifest.get("key_parts", {})
        if "teacher" in parts:
            return json_digest(identity, 12) == parts["teacher"]
        recorded = self._manifest["teacher"]
        return all(recorded.get(k) == v for k, v in identity.items() if k not in _WHERE_REACHED)

    def view_policy(self) -> str:
        """How views 1..V-1 were drawn, in words (view 0 is the whole canvas); a store of one view draws none (its
        crop and colour settings were described as if used, a trial)."""
        if self.views == 1:
            return "one view: the whole canvas"
        v = self._manifest.get("views", {})
        lo, hi = v.get("scale", (0, 1))
        parts = [f"crops {lo:g}-{hi:g} of the canvas"] + (["flips"] if v.get("flip") else [])
        if v.get("color_jitter"):
            parts.append(f"colour jitter {v['color_jitter']:g}")
        if v.get("grayscale"):
            parts.append(f"grayscale p {v['grayscale']:g}")
        return ", ".join(parts) + f", seed {v.get('seed', 0)}"

    def facts(self) -> Dict:
        """What ``embedcache inspect --json`` prints: the store's description as data, the same keys
        for a finished store and one still being written (``complete`` false, with ``progress``): the
        teacher as its manifest records it, domain and text-source names, the extract calls and a paid
        teacher's usage so far; a finished store adds images per domain, prompts per source and its
        derived arrays."""
        st, m = self._store, self._manifest
        done = bool(st.complete)
        out = {
            "path": self.path, "backend": st.backend_name, "key": self.key, "complete": done, "teacher": m["teacher"],
            "embed_dim": self.dim, "images": int(self.layout["n"]), "views": self.views, "view_policy": self.view_policy(),
            "canvas": self.layout["canvas"], "pixels_stored": bool(self.layout.get("store_pixels")),
            "pipeline": m.get("pipeline"),  # the decoder and renderers that made the pixels (part of the key)
            "classes": len(self.classes), "domains": list(self.domains), "text_sources": list(self.text_sources),
            "failed": self.n_failed if done else len(st.failures()),
            "synthesis": _synthesis_facts(m),
        }
        if done:
            meta, text = self._meta, self._text_table
            failed = meta.loc[meta["status"] != "ok", "domain"].value_counts()
            out.update(images_per_domain={str(d): int(n) for d, n in meta["domain"].value_counts().sort_index().items()},
                       failed_per_domain={str(d): int(n) for d, n in failed.sort_index().items()},
                       prompts_per_source={s: int((text["source"] == s).sum()) for s in self.text_sources},
                       derived=list(st.derived()), calls=m.get("calls"))  # None: made before calls were recorded
            usage = m.get("teacher_usage")
        else:
            from .extract.history import calls_of

            out.update(progress=self._progress(),
                       calls=calls_of(st.call_history(), m))
            usage = st.usage()
            cut = st.calls_cut_short("")  # killed calls (not one running now): their books may be short, or absent
            if cut:
                usage = {**(usage or {}), "calls_cut_short": cut}
        return {**out, **({"teacher_usage": usage} if usage else {}), "disk_mb": round(st.disk_bytes() / 2**20, 2)}

    def summary(self) -> Dict:
        """What ``embedcache inspect`` prints, one line per key: ``facts`` in words."""
        f, t = self.facts(), self._manifest["teacher"]
        said = {k: v for k, v in f.items() if k not in ("progress", "images_per_domain", "failed_per_domain",
                                                        "prompts_per_source")}
        said["teacher"] = teacher_line(t)
        said["synthesis"] = _synthesis_line(f["synthesis"])
        if said["synthesis"] is None:
            del said["synthesis"]
        said["calls"] = _calls_line(f["calls"])
        said["pipeline"] = "; ".join(f"{k} {v}" for k, v in (f["pipeline"] or {}).items()) or "-"
        if "teacher_usage" in f:
            said["teacher_usage"] = _usage_line(f["teacher_usage"])
        if not f["complete"]:
            p = f["progress"]
            said["complete"] = (f"no: {p['blocks_written']} of {p['blocks']} blocks written ({p['images_written']} of "
                                f"{f['images']} images); if its `embedcache {self._store.producer}` command is no "
                                f"longer running, rerun it to finish{self._store.held_repair_note()}")
            return {**said, "domains": ", ".join(f["domains"]), "text_sources": ", ".join(f["text_sources"]),
                    "failed": f"{f['failed']} so far", "checked": self._checked_line()}
        failed = f["failed_per_domain"]
        said.update(domains=", ".join(f"{d} ({n}{f', {failed[d]} failed' if d in failed else ''})"
                                      for d, n in f["images_per_domain"].items()),
                    text_sources=", ".join(f"{s} ({n} prompts)" for s, n in f["prompts_per_source"].items()),
                    derived=", ".join(f["derived"]) or "-", checked=self._checked_line())
        return said

    def _checked_line(self) -> str:
        """What opening the store checked (``inspect`` reads no array: a damaged chunk is verify's to find)."""
        st = self._store
        there = [what for what, checked in (("its finished blocks' chunk files", st.backend_name == "zarr"),
                                            ("its tables", st.complete)) if checked]
        return (f"{' and '.join(there) + ' are there; ' if there else ''}no array is read here (`embedcache verify "
                f"{self.path}` checks every checksum)")

    def _progress(self) -> Dict:
        st = self._store
        done = st.blocks_done()
        rows = sum(b - a for a, b in map(st.block_range, np.flatnonzero(done).tolist()))
        return {"blocks_written": int(done.sum()), "blocks": int(st.num_blocks), "images_written": int(rows)}

    def close(self) -> None:
        if self._own:
            self._store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _synthesis_facts(m: Dict) -> Optional[Dict]:
    """A synthesised store's make (None for one of files): the prompt method, its styles, images per
    class, the evaluation domains its prompts name, and, once its plan is recorded, the styles' spread
    and class fidelity (``synthesis_plan``)."""
    syn = m.get("synthesis")
    if not syn:
        return None
    plan = m.get("synthesis_plan") or {}
    return {"method": syn.get("prompts", {}).get("method"), "styles": len(syn.get("styles") or []),
            "per_class": syn.get("per_class"), "leaks_test_domains": plan.get("leaks_test_domains"),
            "spread": plan.get("spread"), "class_fidelity": plan.get("class_fidelity")}


def _synthesis_line(f: Optional[Dict]) -> Optional[str]:
    if f is None:
        return None
    said = f"synthesised from class names: {f['method']} prompts, {f['styles']} style(s), {f['per_class']} images per class"
    if f["class_fidelity"] is not None:
        said += f"; style spread {f['spread']:.2f}, class fidelity {f['class_fidelity']:.2f}"
        if f["class_fidelity"] < 1.0:
            said += " (some styles pull their images towards another class)"
    if f["leaks_test_domains"]:
        said += f"; its prompts name evaluation domains: {', '.join(f['leaks_test_domains'])}"
    return said


def teacher_line(t: Dict) -> str:
    """A manifest's teacher in words: name, model (a local-dir's folder) and its weights: a tag, the
    weight file's digest, or random (an open_clip model built without teacher.pretrained)."""
    model = teacher_model(t)
    weights = t.get("pretrained")
    if isinstance(weights, dict):  # local files by content: the weights, not the config beside them
        files = {k: v for k, v in weights.items() if not k.endswith(".json")} or weights
        said = " (weights " + ", ".join(f"{k} {str(v)[:12]}" for k, v in files.items()) + ")"
    elif weights:
        said = f" {weights}"
    elif t.get("name") == "open_clip" and not str(model or "").startswith("hf-hub:"):
        said = " (random weights: no teacher.pretrained)"
    else:
        said = ""
    return f"{t.get('name')} {model or t.get('classifier', '')}".strip() + said


def _usage_line(usage: Dict) -> str:
    """A paid teacher's books (the manifest's ``teacher_usage``) in one line: what was paid (by how many
    extract calls: those that spent or looked anything up, fewer than ``calls`` lists when one had nothing
    to send), what may have been, and what was answered free."""
    said = [f"{usage.get('queries', 0):,} queries paid ({usage.get('images', 0):,} images, {usage.get('texts', 0):,} "
            f"texts, {usage.get('bytes', 0):,} bytes) in {usage.get('requests', 0):,} requests"
            + (f" by {usage['calls']} extract call{'s' if usage['calls'] != 1 else ''} that spent" if usage.get("calls") else "")]
    for key, what in (("possibly_paid", "possibly paid (answers lost)"), ("possibly_paid_twice", "possibly paid twice"),
                      ("calls_cut_short", "call(s) cut short (killed: what they paid after their last finished "
                                          "block is not counted; the service's bill is the exact figure)"),
                      ("cache_hits", "answered free by the ledger"), ("replayed_free", "replayed free"),
                      ("replayed_elsewhere", "answered free as replays of another client's requests")):
        if usage.get(key):
            said.append(f"{usage[key]:,} {what}")
    if usage.get("answered_model"):  # the model every answer named (a vendor's alias resolved)
        said.append(f"answers from model {usage['answered_model']!r}")
    return "; ".join(said)


def _calls_line(calls: Optional[List[Dict]]) -> str:
    """The extract calls that wrote a store (its manifest's ``calls``), on which devices, and the
    settings and versions in which any differed from the call that made it ('-': not recorded)."""
    if not calls:
        return "-"
    devices = sorted({str(c.get("device")) for c in calls})
    parts = [f"{len(calls)} on {', '.join(devices)}"]
    for c in calls:
        threads = {"threads": c.get("threads")} if c.get("threads") != calls[0].get("threads") else {}
        other = {**(c.get("settings") or {}), **(c.get("versions") or {}), **threads}
        if other:
            parts.append(f"{c.get('began')}: " + ", ".join(f"{k}={v}" if v is not None else f"{k} not set"
                                                           for k, v in other.items()))
    return "; ".join(parts)


def open_store(path: str, backend: Optional[str] = None, require_complete: bool = True,
               expect_key: Optional[str] = None) -> StoreReader:
    """Open a store for reading; refuses an incomplete store or one whose key differs."""
    return StoreReader(path, backend, require_complete, expect_key)


def how_it_differs(path: str, made_from: str, said: Tuple[str, str] = ("this store", "the other"),
                   made_from_key: Optional[str] = None) -> str:
    """How the store at ``path`` was made otherwise than the one at ``made_from`` ("its views differ (this
    store: views.count=2; the other: views.count=3)"), by their manifests; '' where they do not say, or
    where ``made_from`` no longer has ``made_from_key`` (made again since: it no longer tells)."""
    from .store.differences import differing_parts

    with Store(path, "r") as there, Store(made_from, "r") as own:
        if made_from_key is not None and own.key != made_from_key:
            return ""
        return differing_parts(there.manifest, own.manifest, said)


# Where a teacher was loaded from or reached (a checkpoint's path, a service's URL, limits and ledger):
# recorded in manifests, but not what the teacher is.
_WHERE_REACHED = ("source", "server", "url", "limits", "ledger")


def same_teacher(a: Dict, b: Dict) -> bool:
    """Whether the stores of manifests ``a`` and ``b`` were made by one teacher (one embedding space):
    the digests of their keys' teacher parts, or for stores made before manifests kept them, the
    recorded teachers but for where each was reached."""
    da, db = a.get("key_parts", {}).get("teacher"), b.get("key_parts", {}).get("teacher")
    if da and db:
        return da == db

    def what(m: Dict) -> Dict:
        return {k: v for k, v in m["teacher"].items() if k not in _WHERE_REACHED}

    return what(a) == what(b)
