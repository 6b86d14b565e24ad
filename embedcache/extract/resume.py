"""What a store made or begun before says to this extract call: refused when it was made from other inputs
(``made_so``: naming which, and the fix), said when it is resumed under other settings (a batch size, a
decoder, a version whose numbers a later fix changed, a service that moved)."""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..config import ExtractConfig
from ..errors import EmbedcacheError
from ..store import Store
from ..store.differences import differing_parts
from ..versions import STORE_NUMBERS, store_numbers_between
from .device import device_pipeline
from .history import in_force


def _classes_moved(was: Dict, now: Dict) -> Tuple[List[str], List[str]]:
    """The class names a store's dataset had and this call's has not, and the other way (a few of each)."""
    old, new = (set((m.get("dataset") or {}).get("classes") or ()) for m in (was, now))
    return sorted(old - new)[:3], sorted(new - old)[:3]


def made_so(store: Store, manifest: Dict) -> Store:
    """``store``, refused in one line unless it was made from the inputs of ``manifest`` (naming what
    differs): the one check of the real run and its dry run."""
    differs = differing_parts(store.manifest, manifest)
    hidden = manifest["dataset"].get("hidden_images_left_out", 0)
    why = "" if "dataset" not in differs or not hidden or "hidden_images_left_out" in store.manifest["dataset"] else (
        f" (this version leaves out the {hidden} hidden image file(s) of the dataset folder, e.g. in "
        ".ipynb_checkpoints, which the version that made this store read as images)")
    advice = "use another --out path, or delete that store if it is no longer needed"
    was_dec, now_dec = (str(m.get("pipeline", {}).get("decoder", "pil")) for m in (store.manifest, manifest))
    if differs.startswith("its pipeline differs") and was_dec != now_dec:  # this call's decoder: the store's resumes it
        advice = f"{resumed_by(was_dec, now_dec)}, or {advice}"
    was_hw, now_hw = (m.get("pipeline", {}).get("decoder_device") for m in (store.manifest, manifest))
    if differs.startswith("its pipeline differs") and was_dec == now_dec and was_hw != now_hw:
        advice = f"{_decoded_on(was_hw)}, or {advice}"
    was, now = (m.get("config", {}).get("dataset", {}).get("path") for m in (store.manifest, manifest))
    if differs == "its dataset differs" and not why and was != now:  # another folder, which a moved dataset may be
        differs += f" (its files, read from {now}, are not those it was made from, read from {was})"
    elif differs in ("its dataset differs", "its dataset and text differ") and not why:  # the same settings: the
        gone, new = _classes_moved(store.manifest, manifest)                          # folder's files changed
        if differs == "its dataset differs" or gone or new:  # a class folder renamed: its prompts differ too (a trial)
            differs += (f" (the same settings: class folders changed since it was made: {', '.join(gone) or 'none'} "
                        f"gone, {', '.join(new) or 'none'} new)" if gone or new else
                        " (the same settings: image files were added, removed or changed in size since it was made)")
            advice = ("put the dataset's files back as they were to resume or repair it; or use another --out path for "
                      "a store of the files as they are now (or delete that store if it is no longer needed)")
    return store.require(manifest["key"], complete=False, differs=differs + why, advice=advice)


def _decoded_on(was_hw: Optional[str]) -> str:
    """How a store the same decoder made on another GPU (or torchvision) resumes."""
    if was_hw:
        return f"resume it where it was decoded ({was_hw}: another GPU's or torchvision's decoder gives other pixels)"
    return "it was made before the GPU that decodes was part of the key (2026-12-07): extract it again"


def resumed_by(was: str, now: str) -> str:
    """How a store made with decoder ``was`` resumes, said to a call that would decode with ``now``."""
    if was.startswith("pil"):
        return "give --set decoder=pil to resume it with the decoder that made it"
    made_on = re.match(r"torchvision-decode_jpeg-(\w+)\+", was)
    where = made_on.group(1) if made_on else None
    try:
        today = device_pipeline(torch.device(where))["decoder"] if where else None
    except RuntimeError:  # a device name this torch does not know (a foreign manifest)
        today = None
    if today != was:  # another version's routing to PIL, or a decoder this version never had
        return f"it was decoded by {was}, which this version does not run; resume it with the version that made it"
    if where == "cuda":
        return ("resume it where its decoder runs, with the teacher on a CUDA GPU (--set teacher.device=cuda) and "
                "--set decoder=device")
    return f"give --set decoder=device with the teacher on {where} (--set teacher.device={where}) to resume it"


def block_batch_sizes(store: Store) -> List[int]:
    """The batch sizes the store's finished blocks were encoded with: of each call that finished a block
    (its history, since 2026-12-05), else of the call that made the store."""
    history = [e for e in store.call_history() if e.get("blocks") and isinstance(e.get("config"), dict)
               and e["config"].get("batch_size")]
    sizes = {int(e["config"]["batch_size"]) for e in history}
    first = store.manifest.get("config", {}).get("batch_size")
    if first and sum(int(e["blocks"]) for e in history) < int(store.blocks_done().sum()):
        sizes.add(int(first))  # blocks no history lists: a store made before it, or an entry lost, by its maker
    return sorted(sizes)


def say_resuming(store: Store, done: np.ndarray, todo: int, shard: int, num_shards: int,
                  log: Callable[[str], None]) -> None:
    """A rerun after a stop says what it keeps (training says its step, a sweep its finished runs)."""
    kept = np.flatnonzero(done)
    images = sum(stop - start for start, stop in map(store.block_range, kept))
    rest = f"encoding the other {todo}" if num_shards == 1 else f"shard {shard}/{num_shards} encodes {todo} of the rest"
    log(f"resuming {store.path}: {len(kept)} of {len(done)} blocks ({images} images) already done and checked; {rest}")


def say_resumed_otherwise(store: Store, cfg: ExtractConfig, now: Dict, log: Callable[[str], None]) -> None:
    """A store resumed with another batch size or on another kind of device keeps its key, but the
    blocks encoded now may differ from the earlier ones by float rounding (a synthesis's images far
    more: the rounding grows over its iterations): said, with what keeps it byte-identical."""
    began = store.manifest
    what = ("images synthesised now will differ from theirs (the rounding grows over the iterations)"
            if "synthesis" in now else "blocks encoded now may differ from theirs by float rounding")
    sizes, first = block_batch_sizes(store), began.get("config", {}).get("batch_size")
    others = [n for n in sizes if n != cfg.batch_size]
    if others:
        paid = (" (and a paid teacher's cut-off request is replayed free only at the same batching)"
                if now["teacher"].get("name") == "remote" else "")
        if sizes == [first]:
            log(f"resuming with batch_size={cfg.batch_size}; the store began with {first}: {what}{paid}; "
                f"--set batch_size={first} keeps the store byte-identical")
        else:
            keep = (f"the store already holds blocks of batch_size={cfg.batch_size} too" if cfg.batch_size in sizes
                    else f"--set batch_size={others[0]} keeps the store byte-identical" if len(others) == 1
                    else "the store already holds blocks of each")
            log(f"resuming with batch_size={cfg.batch_size}; blocks of the store were encoded with batch_size="
                f"{', '.join(map(str, others))}: {what}{paid}; {keep}")
    _say_other_numbers(began, now, log)
    if now["teacher"].get("name") == "remote":  # the service computes: this machine rounds nothing
        _say_moved_service(began, now, log)
        return
    device, threads = began.get("device"), began.get("threads")
    if device not in (None, now["device"]):
        log(f"resuming on {now['device']}; the store began on {device}: blocks encoded now may differ from theirs by "
            f"float rounding (another device's kernels); resuming on {device} keeps the store byte-identical")
    elif device == "cpu" and threads not in (None, now["threads"]):
        log(f"resuming with {now['threads']} CPU threads; the store began with {threads}: {what}; "
            f"OMP_NUM_THREADS={threads} keeps the store byte-identical")


def _say_other_numbers(began: Dict, now: Dict, log: Callable[[str], None]) -> None:
    """A store begun by a version whose numbers a later fix changed (``STORE_NUMBER_CHANGES``), resumed by
    another: its blocks would be of both, with the same key. Said, naming the changes."""
    changes = store_numbers_between(began, now)
    if changes:
        was = (began.get("versions") or {}).get("embedcache_store_numbers", "unsaid (before 2026-12-07)")
        log(f"resuming a store begun by an embedcache whose numbers differ from this one's (store numbers {was}; "
            f"this version {STORE_NUMBERS}): {'; '.join(changes)}. Its blocks encoded then and now will differ where "
            "these touch them; extract into another --out for a store wholly of one version")


def _say_moved_service(began: Dict, now: Dict, log: Callable[[str], None]) -> None:
    """A paid store resumed at another teacher.url keeps its key (the same service may have moved), but
    the ledger keeps answers by URL: views paid at the old one are not looked up there, and requests a
    stopped call sent there are not replayed free; they are paid again (a trial: 712 for 616). Said."""
    was, url = (in_force(m).get("teacher", {}).get("url") for m in (began, now))  # a finished store: its last call's
    if was and url and was != url:
        where = "was last extracted" if began.get("calls") else "began"
        log(f"note: resuming at teacher.url={url}; the store {where} at {was}. The ledger keeps answers by URL, so views "
            f"paid at {was} are not looked up here and requests cut off there are not replayed free: they are paid "
            f"again. --set teacher.url={was} reuses them, where it still reaches the same service")


def recorded_dim(out: str, backend: str) -> Optional[int]:
    """The teacher's dimension the store at ``out`` records (None where there is none): a rerun, resume or repair
    asks a service that does not say its own no paid probe for it (``build_teacher``); a store of another
    teacher is refused by its key all the same."""
    if not Store.exists(out, backend):
        return None
    try:
        with Store(out, "r", backend) as st:
            dim = (st.manifest.get("teacher") or {}).get("embed_dim")
    except (EmbedcacheError, OSError):  # refused once it is opened for writing, in its own words
        return None
    return int(dim) if isinstance(dim, int) and dim > 0 else None
