"""What identifies a run: its name, the settings that make runs replicates of one method (the results'
``settings`` column), and the checks that a run folder is resumed only with its own settings, store and
student weights. The sweep seeds and names its runs from the same definitions."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from embedcache.config import flatten, to_dict, without_defaults
from embedcache.errors import StoreMismatchError, TrainingError
from embedcache.fileio import json_digest

from .config import TrainConfig
from .models import weights_file_sha
from .recipes import definition_change
from .rundir import RunDir


NOT_IN_NAME = ("out", "progress", "keep_checkpoint")  # settings that cannot change the result
# settings a run may be resumed (or found finished) with other values of: where it is written and
# shown, and where it runs (the store is checked by its key)
RESUMABLE_WITH = NOT_IN_NAME + ("device", "store")
# settings added after runs were named: in a run's name only when not at their default, so a sweep
# started before them still finds its finished runs
NAMED_WHEN_SET = {"batch_per_domain": False, "loss_weights": {}, "loss_args": {}, "skip_plain_view": False,
                  "split.val_by_domain": False, "plain_targets": False, "freeze_bn": False}


def settings_identity(cfg: TrainConfig, leave_out: Tuple[str, ...], omitted_at_default: Dict[str, Any]) -> Dict:
    """A run's settings to hash (its name, a sweep's seed for it): ``leave_out`` dropped, and settings
    added after such hashes were first taken dropped while at their default (``omitted_at_default``:
    name -> default), so runs named or seeded before them keep their names and seeds."""
    return without_defaults({k: v for k, v in to_dict(cfg).items() if k not in leave_out}, omitted_at_default)


def settings_digest(cfg: TrainConfig, recorded_definition: Any = None, weights: Optional[str] = None) -> str:
    """``settings_record`` as a short digest: the results' ``settings`` column."""
    return digest_of_settings(settings_record(cfg, recorded_definition, weights))


def digest_of_settings(record: Dict) -> str:
    return json_digest(record, 8)


def settings_record(cfg: TrainConfig, recorded_definition: Any = None, weights: Optional[str] = None) -> Dict:
    """What makes runs replicates of one method: every setting that changes the result but the seeds
    (the run's, its validation split's) and what it held out (domains, classes: in the results' own
    columns), and how its recipe's definition differs from today's when it does (``recorded_definition``:
    the run's record; a naive_kd run from before the records ran another KD), and the contents of its
    student.pretrained file where recorded (``weights``: two files saved at one path are two methods)."""
    d = settings_identity(cfg, RESUMABLE_WITH + ("seed",), NAMED_WHEN_SET)
    d["split"] = {k: v for k, v in d["split"].items() if k not in ("holdout_domains", "train_classes", "seed")}
    changed = definition_change(cfg, recorded_definition)
    if changed:
        d["recipe_definition_differs"] = changed
    if weights is not None:
        d["student_weights"] = weights
    return d


def run_name(cfg: TrainConfig) -> str:
    """<recipe>-<student>-<hash of the sorted-key JSON config, output and display settings excluded>."""
    d = settings_identity(cfg, NOT_IN_NAME, NAMED_WHEN_SET)
    return f"{cfg.recipe}-{cfg.student.name.replace(':', '_')}-{json_digest(d, 10)}"


def default_out(cfg: TrainConfig) -> str:
    """Where a run without ``out`` goes: runs/<name>, named with the store's key for its path and
    without the device, so the same run started from another folder (``./stores/x.zarr``, an absolute
    path, a copy) or on another device is found again, not trained twice. A folder named the
    earlier way (by the path as spelled) is used when it exists."""
    from embedcache.store import Store

    earlier = Path("runs") / run_name(cfg)
    if earlier.exists():
        return str(earlier)
    with Store(cfg.store) as st:
        key = st.key
    return str(Path("runs") / run_name(by_store_key(cfg, key)))


STORE_KEY = "key:"  # a run named by its store's key: its config's store is written so for its name (and a sweep's seed)
UNIDENTIFYING = ("device", "keep_checkpoint")  # settings that change no result, held at their defaults to identify a run


def by_store_key(cfg: TrainConfig, key: str) -> TrainConfig:
    """``cfg`` as a run is identified (its name; a sweep run's seed) whatever the store's path and the
    settings that change no result: the store by its key, ``UNIDENTIFYING`` at their defaults."""
    return replace(cfg, store=STORE_KEY + key, **{k: getattr(TrainConfig, k) for k in UNIDENTIFYING})


def require_same_settings(run_dir: RunDir, cfg: TrainConfig) -> None:
    """A run directory holds one run: resuming it with other settings would mix two runs in one
    student (another held-out domain: trained on what it claims to hold out), and a finished one
    would hand back its result for settings it was not trained with."""
    if not run_dir.file("config.json").exists():
        return
    old, new = flatten(to_dict(run_dir.train_config)), flatten(to_dict(cfg))
    changed = [k for k in sorted(set(old) | set(new)) if k.split(".")[0] not in RESUMABLE_WITH and old.get(k) != new.get(k)]
    if changed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise TrainingError(f"run {run_dir.path} was made with other settings ({shown}{more}); use another --out, "
                            "or its own settings to resume it")
    changed = definition_change(cfg, run_dir.config.get("recipe_definition"))
    if changed:
        raise TrainingError(f"run {run_dir.path} was trained under another definition of recipe {cfg.recipe} "
                            f"({changed}); use another --out to train it as the recipe is now")
    _require_same_store(run_dir, cfg)
    _require_same_weights(run_dir, cfg)


def _require_same_weights(run_dir: RunDir, cfg: TrainConfig) -> None:
    """The student.pretrained file holds the weights the run began from: its settings hold the path, and
    weights saved over that file answered "already done" with the earlier ones' result (a trial)."""
    recorded, now = run_dir.config.get("student_weights"), weights_file_sha(cfg.student.pretrained)
    if recorded is not None and now is not None and recorded != now:
        raise TrainingError(f"run {run_dir.path} began from other weights in student.pretrained={cfg.student.pretrained} "
                            f"(content hash {recorded}; the file now holds {now}); use another --out to train from the "
                            "file as it is, or restore the file the run began from")


def _require_same_store(run_dir: RunDir, cfg: TrainConfig) -> None:
    """The store given is the one the run was trained on, by key and by its images (a finished run answered
    "already done" for a store re-extracted since, another teacher's, or one of other images of the same sizes)."""
    from embedcache.store import Store

    recorded = run_dir.config.get("store_key")
    if recorded is None:
        return
    with Store(cfg.store) as st:
        key = st.key
        other_images = run_dir.other_images(st) if key == recorded else ""
        other_numbers = run_dir.other_embeddings(st) if key == recorded and not other_images else ""
    if key != recorded:
        differs = run_dir.store_differences(cfg.store)
        raise StoreMismatchError(f"run {run_dir.path} was trained on another store ({differs + '; ' if differs else ''}"
                                 f"key {recorded}; {cfg.store} has "
                                 f"key {key}: another store, or re-extracted since); use another --out, or the store "
                                 "the run was trained on")
    if other_images:
        raise StoreMismatchError(f"run {run_dir.path} was trained on another store of the same key: {cfg.store}'s images "
                                 f"differ ({other_images}); use another --out to train on this store, or the store "
                                 "the run was trained on")
    if other_numbers:  # a resume would train on both stores' numbers; a finished run was "already done" here
        raise StoreMismatchError(f"run {run_dir.path} was trained on another store of the same key and images: "
                                 f"{cfg.store}'s embeddings differ ({other_numbers}); use the store the run was "
                                 "trained on, or another --out to train on this store")
