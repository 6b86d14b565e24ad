"""Check a store against the checksums written with it, and repair it: damaged derived arrays are
marked to be recomputed by the command that made them, damaged blocks and files are re-done by the
store's own extraction (its manifest's config), exactly those and nothing else."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..config import ViewsConfig, build_config
from ..errors import ConfigError, StoreBusyError, StoreDamagedError, StoreError
from ..fileio import json_digest
from ..store import IntegrityReport, Store
from ..store.store import BLOCKS_SUMMARY


@dataclass
class Verified:
    """What ``verify_store`` found and did: the report, whether the store is complete, and with a
    repair the blocks re-done (None: no extraction ran)."""
    report: IntegrityReport
    files_checked: int
    unfinished: str  # "" for a complete store, else how far it got and how to finish it
    repaired: Optional[int] = None
    remade: List[str] = field(default_factory=list)  # prompt arrays lost as a whole, encoded again by the repair


def sections_apart(manifest: Dict[str, Any]) -> List[str]:
    """The manifest's sections (views, canvas, pipeline, the dataset's fingerprint) whose digest is no
    longer the one of the key part it recorded as the store was made: edited by hand since (``inspect``
    then shows views or a canvas the store was not made with). The teacher and text parts are recorded
    otherwise than the key takes them, and are not checked here; a store made before ``key_parts``
    existed has nothing to check."""
    parts = manifest.get("key_parts")
    if not parts:
        return []
    try:
        views = build_config(ViewsConfig, {k: v for k, v in manifest.get("views", {}).items()
                                           if k not in ("params", "view0")}).key()
    except ConfigError:
        views = None
    now = {"views": views, "canvas": manifest.get("canvas"), "pipeline": manifest.get("pipeline"),
           "dataset": (manifest.get("dataset") or {}).get("fingerprint")}
    return [name for name, part in now.items() if name in parts and json_digest(part, 12) != parts[name]]


def _apart_line(manifest: Dict[str, Any]) -> str:
    """"'s views section no longer gives the key it was made under" ('' when every section does)."""
    apart = sections_apart(manifest)
    if not apart:
        return ""
    many = len(apart) > 1
    return f"'s {' and '.join(apart)} section{'s' if many else ''} no longer give{'' if many else 's'} the key it was made under"


def verify_store(path: str, repair: bool = False, overrides: Sequence[str] = (), progress: bool = True,
                 log: Callable[[str], None] = print) -> Verified:
    """Verify ``path``; damage is said line by line through ``log``. Without ``repair`` damage raises
    StoreError naming the repair; with it, derived arrays are marked to be recomputed and an
    extracted store's damaged blocks and files re-done (``overrides``: ``key=value`` changes to the
    extraction it runs, e.g. where the images are now)."""
    if overrides and not repair:
        raise ConfigError("overrides change the extraction a repair runs; give them with a repair (verify --repair)")
    with Store(path, "a" if repair else "r", rebuild_text=repair) as st:
        busy = st.writing_now()  # an extraction or repair live: its blocks are half-way, not damage to repair
        if busy and repair:
            raise StoreBusyError(f"another process is writing or repairing {path} now; wait for it to finish, then "
                                 "run verify again")
        lost_text, restored = list(st.lost_text), list(st.lost_books)
        st.rebuild_lost()  # bookkeeping restored; prompts made again empty, the store unfinished: encoded below
        report = st.verify(progress=progress)
        manifest, producer, redoer = st.manifest, st.producer, st.redoer
        edited = ("" if "meta.parquet" in report.files else st.manifest_problem()) or _apart_line(st.manifest)
        unfinished = "" if st.complete else (f"incomplete ({int(st.blocks_done().sum())} of {st.num_blocks} blocks); "
                                             f"if its {producer} command is no longer running, rerun it to finish"
                                             f"{st.held_repair_note()}")
        held = st.held_repair_blocks() if repair and not st.complete else []  # reopened by a repair, not re-done yet
        stopped_repair = bool(held) or (repair and not st.complete and bool(st.blocks_done().all()))  # or its finish
    if edited:  # no repair re-does a manifest: the blocks and files are checked against it
        raise StoreDamagedError(f"{path}: the manifest{edited} (edited by hand?); restore the manifest (its store's "
                                "zarr.json or HDF5 attribute, from a copy), or extract the store again")
    cfg = _repair_config(manifest, producer, path, progress, overrides) if overrides else None  # checked now
    out = Verified(report, len(manifest.get("checksums", {})), unfinished, remade=lost_text if repair else [])
    for a in restored:
        log(f"repaired: {a}: lost as a whole (restored from {BLOCKS_SUMMARY}, which holds the same flags and checksums)")
    finish_stopped = report.ok and not lost_text and stopped_repair and producer == "extract"
    if finish_stopped and not report.derived:
        return _finish_stopped(out, held, cfg or _repair_config(manifest, producer, path, progress, overrides), log)
    if report.ok and not report.derived and not lost_text:
        if overrides:
            log(f"note: {path} has nothing to repair, so --set {' '.join(overrides)} changed nothing")
        return out
    for line in report.lines() + [f"{a}: lost as a whole (encoded again)" for a in lost_text]:
        log(f"damaged: {line}")
    for name, why in sorted(report.derived.items()):
        log(f"damaged: derived/{name}: {why} (computed from the store later: recomputed by the command that made it)")
    remake = (f"the command that made them remakes them (`embedcache features` for cached features, the store's "
              f"`embedcache {producer}` for its own)")
    if not repair:
        if busy:
            raise StoreBusyError(f"{path}: {len(report.damaged_blocks)} block(s) and {len(report.files)} file(s) do not "
                                 "check out while another process writes or repairs the store; wait for it to finish, "
                                 "then run verify again")
        fixes = []
        if not report.ok or lost_text:
            fixes.append(f"{redoer} re-does exactly the blocks and files")
        if report.derived:
            fixes.append(f"`embedcache verify --repair {path}` marks them to be recomputed, then {remake}")
        raise StoreError(f"{path}: {len(report.damaged_blocks)} damaged block(s), {len(report.files)} damaged file(s), "
                         f"{len(report.derived)} damaged derived array(s); " + "; ".join(fixes))
    if report.derived:
        with Store(path, "a") as st:
            st.forget_derived(report.derived)
        log(f"{path}: derived array(s) {', '.join(sorted(report.derived))} marked to be recomputed; rerun the "
            f"command that made them (`embedcache features` for cached features, the store's `embedcache "
            f"{producer}` for its own)")
    if finish_stopped:
        return _finish_stopped(out, held, cfg or _repair_config(manifest, producer, path, progress, overrides), log)
    if report.ok and not lost_text:
        return out
    if producer != "extract":  # the synthesiser's own command re-does its blocks (verify cannot rebuild its reader)
        raise StoreError(f"{path} was made by `embedcache {producer}`: rerun that command with the same config; it "
                         f"re-does exactly the {len(report.damaged_blocks)} damaged block(s) and file(s)")
    from . import extract

    cfg = cfg or _repair_config(manifest, producer, path, progress, overrides)
    out.repaired = extract(cfg, log=log).repaired
    return out


def _finish_stopped(out: Verified, held: List[int], cfg, log: Callable[[str], None]) -> Verified:
    """A repair stopped part-way (``held``: the blocks it reopened), or an extraction stopped with every block
    written, finished by the store's own extraction."""
    from . import extract

    log(f"{cfg.out}: finishing the repair stopped part-way (block(s) {', '.join(map(str, held))} reopened)" if held else
        f"{cfg.out}: finishing its stopped extraction (every block is written; its prompts and tables were not)")
    done = extract(cfg, log=log)
    out.repaired = len(held) + done.repaired
    out.unfinished = ""
    return out


def _repair_config(manifest: Dict[str, Any], producer: str, path: str, progress: bool, overrides: Sequence[str]):
    """The extraction that repairs ``path``: the config its last call ran with (``history.in_force``), less the
    settings its dataset and teacher do not read (a store made before they were refused), with ``overrides``;
    each checked."""
    from ..config import ExtractConfig, apply_overrides, build_config, teacher_without_unread, without_unread
    from .history import in_force

    if producer != "extract":
        raise ConfigError(f"--set changes the extraction a repair runs, and {path} was made by `embedcache "
                          f"{producer}`: that command re-does its blocks with its own config; leave --set out")
    ran = in_force(manifest)
    ran = {**ran, "dataset": without_unread(ran["dataset"]), "teacher": teacher_without_unread(ran["teacher"])}
    return build_config(ExtractConfig, apply_overrides({**ran, "out": path, "progress": progress,
                                                        "shard": None, "num_shards": None}, overrides))
