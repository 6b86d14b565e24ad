"""A run directory: the one place that reads and writes what a training run leaves behind.

run/config.json        the resolved TrainConfig, the store's key and absolute path
run/split.json         what the run trained on (rows, held-out domains, seen classes, text source, and
                       for a run on cached features the key of their frozen backbone)
run/metrics.jsonl      one row per evaluation point (step, stage, lr, losses, validation top-1/loss, a
                       collapse onto one class where there was one)
run/checkpoint.pt      resume state (model, optimizer, schedule, averaging, selection, step); removed
                       when the run is done unless keep_checkpoint is set
run/model.safetensors  the kept weights (the selected checkpoint or the weight average); a run on
                       cached features keeps its head(s) only: its frozen backbone is the student
                       settings' own, named by split.json's backbone_key (checked on loading)
run/summary.json       validation top-1, which checkpoint was kept and why (and its collapse), timings
run/sweep.json         a sweep's run only: its variant and replicate (the grid's seed), the columns
                       its result rows carry however they are scored
run/done               written last: the run is finished
Every file is written atomically (a temporary file, then a rename), so a full disk or a kill never
leaves half a file behind.
"""
from __future__ import annotations

import json
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from embedcache.config import build_config, to_dict
from embedcache.errors import ConfigError, StoreError, TrainingError
from embedcache.fileio import atomic_write, atomic_write_json, atomic_write_text, file_crc32c, read_json, temp_files_of

from .config import TrainConfig
from .models import weights_file_sha

# written beside the TrainConfig fields in config.json (store_contents: the store's contents_digest, runs since
# 2026-12-06 on stores that keep canvas checksums; store_embeddings: its embeddings_digest, and student_weights:
# the student.pretrained file's content hash, runs since 2026-12-07)
CONFIG_EXTRAS = ("store_key", "store_path", "store_contents", "store_embeddings", "student_weights",
                 "recipe_definition")
MARKS = ("config.json", "error.txt")  # what makes a folder a run: its config, or a sweep's record of its failure


WEIGHTS_SUM = "weights_crc32c"  # summary.json: model.safetensors' checksum (safetensors keeps none)
SPLIT_SUM = "split_crc32c"  # summary.json: split.json's, as the finished run left it (an edit moves rows)


@contextmanager
def _zip_checksums():
    """torch.save writing each record's CRC-32 (its default, which a user may have turned off)."""
    from torch import serialization

    was = serialization.get_crc32_options() if hasattr(serialization, "get_crc32_options") else True
    if not was:
        serialization.set_crc32_options(True)
    try:
        yield
    finally:
        if not was:
            serialization.set_crc32_options(False)


def _damaged_record(f: Path) -> str:
    """The first record of a checkpoint (a zip) whose bytes do not match their CRC-32 ('' for none, or
    for a checkpoint written without CRCs: every one 0)."""
    with zipfile.ZipFile(f) as z:
        bad = z.testzip()
        if bad and all(i.CRC == 0 for i in z.infolist()):
            return ""
        return bad or ""


def _key_of(store: str) -> Optional[str]:
    """A store's key, or None where it cannot be read as a store."""
    from embedcache import open_store
    from embedcache.errors import EmbedcacheError

    try:
        return open_store(store, require_complete=False).key
    except EmbedcacheError:
        return None


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def done(self) -> bool:
        return self.file("done").exists()

    def require_done(self) -> "RunDir":
        if not self.done:
            raise TrainingError(f"run {self.path} has not finished (no done marker); finish it by rerunning the same "
                                "`embedcache train` or `embedcache sweep` command")
        return self

    # --- what the run is -------------------------------------------------------------------------
    def _json(self, name: str) -> Dict[str, Any]:
        f = self.file(name)
        if not f.is_file():
            raise TrainingError(f"run {self.path} has no {name}; is it a run directory?")
        return read_json(f, dict, "rerun the run's command to rewrite it", TrainingError)

    @property
    def config(self) -> Dict[str, Any]:
        """The raw config.json (TrainConfig fields plus store_key and store_path)."""
        return self._json("config.json")

    @property
    def train_config(self) -> TrainConfig:
        return build_config(TrainConfig, {k: v for k, v in self.config.items() if k not in CONFIG_EXTRAS})

    @property
    def split(self) -> Dict[str, Any]:
        """What the run trained on; a finished run's checked against the CRC-32C it recorded (a split.json
        edited into valid JSON, rows moved from training to validation, scored the run on its own rows)."""
        split = self._json("split.json")
        if self._altered_since_finished("split.json", SPLIT_SUM):
            raise TrainingError(f"run {self.path}: its split.json does not match the checksum its run recorded (edited "
                                "or damaged since it finished), so its rows cannot be trusted; delete the run's `done` "
                                "file and rerun its train or sweep command to train it again")
        return split

    def _altered_since_finished(self, name: str, key: str) -> bool:
        """Whether file ``name`` no longer matches the CRC-32C the run's summary recorded under ``key`` as it
        finished (False for a run not finished, or finished before the summary kept it: unchecked)."""
        if not self.file("summary.json").is_file():
            return False
        want = self.summary.get(key)
        return want is not None and file_crc32c(self.file(name)) != int(want)

    @property
    def summary(self) -> Dict[str, Any]:
        return self._json("summary.json")

    @property
    def store_key(self) -> str:
        return self.config["store_key"]

    def store_path(self) -> str:
        """The store the run was trained on: as written in the config if that path exists from here,
        else the absolute path recorded when the run started (so a run scores from any folder). Where
        both are there and differ, the one with the run's key (the config's relative path, met from
        another folder, named another store: the run was refused, pointed at --transfer)."""
        cfg = self.config
        there = [str(p) for p in (cfg.get("store"), cfg.get("store_path")) if p and Path(p).exists()]
        if len({Path(p).resolve() for p in there}) > 1:
            return next((p for p in there if _key_of(p) == self.store_key), there[0])
        if there:
            return there[0]
        raise StoreError(f"the store of run {self.path} ({cfg.get('store_path') or cfg.get('store')}) is not there; "
                         "pass --store with the store it was trained on")

    def store_differences(self, other: str) -> str:
        """How the store at ``other`` differs from the one this run trained on ("its views differ (this
        store: views.count=2; the run's store: views.count=3)"), told by the run's own store where it
        still is, with the run's key; '' where it is not, or where the manifests do not say."""
        from embedcache.api import how_it_differs

        try:
            return how_it_differs(other, self.store_path(), ("this store", "the run's store"), self.store_key)
        except (StoreError, OSError):
            return ""

    def other_images(self, store) -> str:
        """How a store of this run's key holds other images than the run's store did ('' where the same, or
        where either does not say): the key holds the files' paths and sizes, not their contents."""
        return images_differ(self.config.get("store_contents"), store.contents_digest(), "the run's store's")

    def student_weights(self) -> Optional[str]:
        """The content hash of the student.pretrained file the run began from: as recorded (runs since 2026-12-07),
        or, for a run from before, the file's own where it is no newer than the run (unchanged since), so that
        runs from one file before and after the record are one method in the tables; None where not known."""
        if "student_weights" in self.config:
            return self.config["student_weights"]
        path = (self.config.get("student") or {}).get("pretrained")
        try:
            if path and Path(path).is_file() and Path(path).stat().st_mtime <= self.file("config.json").stat().st_mtime:
                return weights_file_sha(path)
        except OSError:
            pass
        return None

    def other_embeddings(self, store) -> str:
        """How a store of this run's key and images holds other embeddings than the run's store did ('' where
        the same, or where the run does not say): one extracted again with other float rounding."""
        return embeddings_differ(self.config.get("store_embeddings"), store.embeddings_digest(), "the run's store's")

    @property
    def sweep_tags(self) -> Dict[str, Any]:
        """A sweep's run: its variant and replicate ({} for a run trained on its own)."""
        return self._json("sweep.json") if self.file("sweep.json").is_file() else {}

    # --- writing ---------------------------------------------------------------------------------
    def write_sweep_tags(self, tags: Dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.file("sweep.json"), tags)

    def write_config(self, cfg: TrainConfig, store, recipe_definition: Dict[str, Any]) -> None:
        """The run's settings, and the ``store`` it trains on (``CONFIG_EXTRAS`` beside them: `train --config` takes
        the file back, ``settings_of``)."""
        atomic_write_json(self.file("config.json"), {**to_dict(cfg), "store_key": store.key,
                                                     "store_path": str(Path(cfg.store).resolve()),
                                                     "store_contents": store.contents_digest(),
                                                     "store_embeddings": store.embeddings_digest(),
                                                     "student_weights": weights_file_sha(cfg.student.pretrained),
                                                     "recipe_definition": recipe_definition})

    def write_split(self, split: Dict[str, Any]) -> None:
        atomic_write_json(self.file("split.json"), split)

    def read_metrics(self, up_to: Optional[int] = None) -> List[Dict[str, Any]]:
        rows = []
        f = self.file("metrics.jsonl")
        for ln in (f.read_text().splitlines() if f.exists() else []):
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if up_to is None or row["step"] <= up_to:
                rows.append(row)
        return rows

    def write_metrics(self, rows: Iterable[Dict[str, Any]]) -> None:
        atomic_write_text(self.file("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))

    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        with _zip_checksums():
            atomic_write(self.file("checkpoint.pt"), lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, device) -> Optional[Dict[str, Any]]:
        """The resume state, its zip records checked against their CRC-32s first: damage that still
        loads (a tensor's bytes changed) would resume from other weights, silently."""
        f = self.file("checkpoint.pt")
        if not f.exists():
            return None
        fix = "delete it to restart the run from step 0"
        try:
            bad = _damaged_record(f)
        except Exception as exc:
            raise TrainingError(f"run {self.path}: checkpoint.pt cannot be read ({type(exc).__name__}); {fix}") from None
        if bad:
            raise TrainingError(f"run {self.path}: checkpoint.pt is damaged (its record {bad} does not match its "
                                f"checksum); {fix}")
        try:
            return torch.load(f, map_location=device, weights_only=True)
        except Exception as exc:
            raise TrainingError(f"run {self.path}: checkpoint.pt cannot be read ({type(exc).__name__}); {fix}") from None

    def drop_checkpoint(self) -> None:
        self.file("checkpoint.pt").unlink(missing_ok=True)

    def save_weights(self, state: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        atomic_write(self.file("model.safetensors"), lambda tmp: save_file(tensors, str(tmp)))

    def weights(self) -> Dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        f = self.file("model.safetensors")
        again = "delete the run's `done` file and rerun its train or sweep command to train it again"
        try:
            weights = load_file(str(f))
            if self._altered_since_finished(f.name, WEIGHTS_SUM):
                raise TrainingError(f"run {self.path}: its weights {f.name} do not match the checksum its run recorded "
                                    f"(altered or damaged on disk); {again}")
            return weights
        except (SafetensorError, OSError) as exc:  # truncated, altered or missing: the run must be trained again
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TrainingError(f"run {self.path}: its weights {f.name} cannot be read ({first}); {again}") from None

    def finish(self, summary: Dict[str, Any], keep_checkpoint: bool = False) -> None:
        """The summary (with the kept weights' CRC-32C, checked whenever they are loaded), then ``done``."""
        summary = {**summary, WEIGHTS_SUM: file_crc32c(self.file("model.safetensors")),
                   SPLIT_SUM: file_crc32c(self.file("split.json"))}
        atomic_write_json(self.file("summary.json"), summary)
        atomic_write_text(self.file("done"), "ok\n")  # last: the run is finished
        self.file("error.txt").unlink(missing_ok=True)  # an earlier attempt's failure, no longer the news
        if not keep_checkpoint:
            self.drop_checkpoint()
        for name in ("checkpoint.pt", "model.safetensors"):  # half files of an attempt killed mid-write (~100 MB)
            for f in temp_files_of(self.path, name):
                f.unlink(missing_ok=True)

    def record_failure(self, text: str) -> None:
        """Why the run stopped unfinished (a traceback, or a one-line error ending it), in error.txt:
        ``evaluate`` and ``report`` say a run failed, not just that it is not finished. Best effort:
        a failure to record it never hides the failure itself."""
        try:
            atomic_write_text(self.file("error.txt"), text if text.endswith("\n") else text + "\n")
        except OSError:
            pass

    # --- the trained student -----------------------------------------------------------------------
    def load_student(self, device="cpu") -> Tuple[torch.nn.Module, TrainConfig]:
        """The finished student (eval mode) and its config. A run on cached features saved no backbone:
        it is rebuilt from the run's student settings (built under the run's seed, as training built it)
        and must hash to the key the run recorded, else the run is refused in one line."""
        from .models import build_seeded, is_backbone, load_weights
        from .recipes import RECIPES

        self.require_done()
        cfg, split = self.train_config, self.split
        n_cls = len(split["seen_classes"]) if RECIPES.get(cfg.recipe).classifier else 0
        weights = self.weights()
        dim = int(weights["head.weight"].shape[0]) if "head.weight" in weights else int(split["dim"])
        model = build_seeded(cfg.student, dim, n_cls, cfg.seed)
        backbone_saved = any(is_backbone(k) for k in weights)
        if not backbone_saved:
            self._check_backbone(model, split.get("backbone_key"))
        load_weights(model, weights, backbone_saved)
        return model.to(device).eval(), cfg

    def load_heads(self, device="cpu") -> torch.nn.Module:
        """The finished run's head and classifier alone (eval mode, ``models.Heads``): all a run on
        cached features needs to be scored from them."""
        from .models import Heads

        self.require_done()
        return Heads.from_weights(self.weights()).to(device).eval()

    def _check_backbone(self, model, key: Optional[str]) -> None:
        from .features import features_key

        if key is None:
            raise TrainingError(f"run {self.path}: model.safetensors holds no backbone and the run names none; "
                                "the run is damaged: rerun it into another --out")
        got = features_key(model)
        if got != key:
            raise TrainingError(f"run {self.path} trained a head on the features of backbone {key}, whose weights runs "
                                f"on cached features do not save; its student settings now build {got} "
                                f"(student.pretrained={self.train_config.student.pretrained} changed or moved?): restore "
                                "that file, or retrain the run")

    # --- finding runs ------------------------------------------------------------------------------
    @staticmethod
    def find(paths: Iterable) -> List["RunDir"]:
        """Run directories among ``paths``: each path is a run (has config.json, or a sweep's error.txt
        from a run that failed before writing it) or a folder of runs (searched one level down, and in a
        sweep's runs/ folder)."""
        def runs_in(pattern: str, p: Path) -> List[Path]:
            return sorted({q.parent for mark in MARKS for q in p.glob(f"{pattern}/{mark}")})

        out: List[RunDir] = []
        for p in map(Path, paths):
            if any((p / mark).exists() for mark in MARKS):
                out.append(RunDir(p))
                continue
            out += [RunDir(q) for q in runs_in("*", p) or runs_in("runs/*", p)]
        return out

    @property
    def failure(self) -> Optional[str]:
        """The last line of the run's error.txt (a sweep's record of its failure), or None."""
        f = self.file("error.txt")
        if not f.is_file():
            return None
        lines = [ln.strip() for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else "no message"


def folder_kind(path) -> str:
    """"sweep" for a sweep's folder (its sweep.yaml and store.json, or its runs/ and results/), "run" for a
    run's (``MARKS``), else ""."""
    p = Path(path)
    if ((p / "sweep.yaml").is_file() and (p / "store.json").is_file()) or ((p / "runs").is_dir() and
                                                                           (p / "results").is_dir()):
        return "sweep"
    return "run" if any((p / mark).exists() for mark in MARKS) else ""


def distinct_runs(found: List[RunDir]) -> List[RunDir]:
    """Each run once (a folder given twice, or inside a folder also given), and no two runs of one name: a
    run's rows are named by its folder's name, so one replaced the other's rows in the results (a review)."""
    first: Dict[str, RunDir] = {}
    out = []
    for run in found:
        other = first.setdefault(run.name, run)
        if other is run:
            out.append(run)
        elif other.path.resolve() != run.path.resolve():
            raise ConfigError(f"runs {other.path} and {run.path} share the name {run.name!r}, which names a run's "
                              "rows in the results: rename one folder, or score them into separate --out files")
    return out


def require_folder_for(path, kind: str, option: str = "--out") -> None:
    """``path`` is not a folder of the other kind: a run trained into a sweep's folder (or a sweep into a run's)
    wrote its files among the other's, and `evaluate` of the folder then scored one of them alone (a trial);
    nor a file (a sweep's dry run took --out /etc/hosts, its launch failed on it: a fuzz)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{option} {path} exists and is not a folder; give the {kind} a folder of its own")
    found = folder_kind(path)
    if found and found != kind:
        raise ConfigError(f"{option} {path} is a {found}'s folder; a {kind} there would write its files among the "
                          f"{found}'s: give the {kind} a folder of its own")


def images_differ(recorded: Optional[str], now: Optional[str], whose: str) -> str:
    """Why a store's contents digest ``now`` is not the ``recorded`` one of a store of the same key, in words
    ('' where they agree, or where either is not known)."""
    if recorded is None or now is None or recorded == now:
        return ""
    return (f"contents digest {now}, {whose} {recorded}: an image file replaced by another of the same size, or "
            "images decoded otherwise (another Pillow), and the store extracted again")


def embeddings_differ(recorded: Optional[str], now: Optional[str], whose: str) -> str:
    """Why a store's embeddings digest ``now`` is not the ``recorded`` one of a store of the same key and images,
    in words ('' where they agree, or where either is not known)."""
    if recorded is None or now is None or recorded == now:
        return ""
    return (f"embeddings digest {now}, {whose} {recorded}: the store extracted again with other float rounding "
            "(another batch_size, device, CPU thread count or embedcache), or blocks of it re-encoded so by a repair; "
            "`embedcache inspect` lists each store's calls")


def settings_of(data: Dict[str, Any]) -> Dict[str, Any]:
    """A config file's settings; a run's config.json (``write_config``) gives its training settings, on
    the store it recorded by absolute path and without its folder (`train --config RUN/config.json
    --out NEW` trains the run again, where ``--out`` names the new one)."""
    if "store_key" not in data:
        return data
    settings = {k: v for k, v in data.items() if k not in CONFIG_EXTRAS and k != "out"}
    return {**settings, "store": data.get("store_path") or data.get("store")}
