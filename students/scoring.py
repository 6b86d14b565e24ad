"""One way to score a finished run: ``score_run`` (the CLI and sweeps both call it), and ``score_runs``
for many (`evaluate`'s: each protocol alone where one cannot score a run, so the others' rows are kept).

It checks the store's key *before* any work (a run scored on a store made by another teacher is
refused in one line), loads the store's arrays once, embeds every image's centre view with the
student, runs the evaluation protocols on those embeddings, optionally fine-tunes on few-shot
episodes, and returns rows in the results schema (``embedcache.evaluate.results``).
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from embedcache import interrupt
from embedcache.api import StoreReader, same_teacher, teacher_model
from embedcache.device import resolve_device
from embedcache.errors import EvaluationError, StoreError, StoreMismatchError
from embedcache.evaluate.metrics import require_finite
from embedcache.evaluate.protocols import DEFAULT_SHOTS, named_warnings, rows_read
from embedcache.evaluate.results import conform, holdout_tag
from embedcache.evaluate.store_eval import eval_data, run_protocols

from .config import SplitConfig
from .data import StoreData
from .leakage import seen_rows
from .providers import student_views
from .rundir import RunDir
from .identity import digest_of_settings, settings_record


@torch.no_grad()
def embed_rows(model, data: StoreData, seen_classes: Sequence[int], linear: bool, device: torch.device,
               batch: int = 256, rows: Optional[np.ndarray] = None,
               features: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Student outputs for view 0 (the centre view) of every readable image (or of ``rows``): (N, D)
    float32 embeddings (NaN for rows not embedded), and for runs that predict with a linear classifier
    (N, C) logits over the store's classes (-inf for classes the run never saw), else None.
    ``features``: the store's cached (N, V, F) features of this model's own frozen backbone; the heads
    then run on them instead of the backbone on rendered views (the same view, the same weights)."""
    n = len(data.labels)
    emb = np.full((n, data.dim), np.nan, np.float32)
    scores = np.full((n, len(data.classes)), -np.inf, np.float32) if linear else None
    seen = np.asarray(seen_classes)
    rows = np.flatnonzero(data.ok) if rows is None else np.asarray(rows, dtype=np.int64)
    for i in range(0, len(rows), batch):
        interrupt.check("scoring a run")
        idx = rows[i:i + batch]
        if features is not None:
            out = model.from_features(torch.from_numpy(features[idx, 0]).to(device))
        else:
            x = student_views(data, idx, np.zeros(len(idx), int), model.input_size, model.mean, model.std, device)
            out = model(x)
        emb[idx] = out["emb"].float().cpu().numpy()
        if linear:
            scores[np.ix_(idx, seen)] = out["logits"].float().cpu().numpy()
    require_finite(emb[rows], "images' student embeddings")
    if linear:
        require_finite(scores[np.ix_(rows, seen)], "images' classifier outputs")
    return emb, scores


def cached_features(reader: StoreReader, key: Optional[str]) -> Optional[np.ndarray]:
    """The store's cached features named ``key`` (a run on cached features records its backbone's),
    or None: the run is then scored through its backbone on the rendered views."""
    from .features import has_features

    if key is None or not has_features(reader.store, key):
        return None
    return reader.store.read_derived(key)


def run_tags(run: RunDir, reader: StoreReader, transfer: bool = False) -> Dict:
    """The run's columns of its result rows on ``reader``'s store (with ``transfer``: another store,
    every image of it unseen, so its ``holdout`` says ``transfer`` and the domains the run held out of
    its own store)."""
    cfg, split = run.config, run.split
    held = split.get("holdout_domains") or []
    return {"run": run.name, "recipe": cfg["recipe"], "student": cfg["student"]["name"], "run_seed": cfg["seed"],
            "replicate": cfg["seed"], "source": split["text_source"], "store_key": reader.key,
            "holdout": holdout_tag(held, reader.classes, split["seen_classes"], transfer),
            "settings": digest_of_settings(run_settings(run)),
            "trained_on": run.store_key,
            **run.sweep_tags}


def run_settings(run: RunDir) -> Dict:
    """The settings behind a run's ``settings`` digest (``settings_record``)."""
    return settings_record(run.train_config, run.config.get("recipe_definition"), run.student_weights())


LEGEND_KEYS = 6  # settings named per digest in a legend line; more are counted
SAID_AS = {"store_key": "store {}", "unseen": "unseen: {}", "trained_on": "trained on {}"}  # a legend's method name


def settings_legend(runs: Sequence[RunDir], results: pd.DataFrame) -> List[str]:
    """What tells apart the ``settings`` digests the tables of ``results`` show for one method name (the
    tables' own keys: ``NAMED_BY``, and trained_on where they show it), from the finished ``runs`` that made
    them: a line per such method, naming for each digest the settings in which its runs differ from the
    others' (a table row labelled 817e1022 said nothing of what was trained otherwise)."""
    from embedcache.config import flatten
    from embedcache.evaluate.store_eval import NAMED_BY, method_frame, method_keys

    framed = method_frame(results)
    shown = method_keys(framed)
    if "settings" not in shown:
        return []
    records = {}
    for run in runs:
        if run.done:
            record = run_settings(run)
            records[digest_of_settings(record)] = flatten(record, keep_empty=True)
    by = NAMED_BY + (["trained_on"] if "trained_on" in shown else [])  # as the tables tell methods apart
    lines = []
    for named, digests in framed.groupby(by)["settings"].unique().items():
        known = sorted(d for d in digests if d in records)  # "-": rows scored before the digest, of no record
        if len(known) < 2:
            continue
        tag = dict(zip(by, named))
        keys = sorted(set().union(*(records[d] for d in known)))
        differ = [k for k in keys if len({repr(records[d].get(k, "(unset)")) for d in known}) > 1]
        more = f" and {len(differ) - LEGEND_KEYS} more" if len(differ) > LEGEND_KEYS else ""
        said = [f"{d} = " + ", ".join(f"{k}={records[d].get(k, '(unset)')}" for k in differ[:LEGEND_KEYS]) + more
                for d in known]
        method = " / ".join(SAID_AS.get(k, "{}").format(tag[k]) for k in shown if k != "settings")  # the tables' order
        lines.append(f"settings of {method}: " + "; ".join(said))
    return lines


def _open_for(run: RunDir, path: str, transfer: bool) -> StoreReader:
    """The store to score on: the run's own (same key, same images), or with ``transfer`` any store made by
    the same teacher with the same classes (a student trained on synthesised images, scored on real ones)."""
    reader = _open_any(run, path, transfer)
    other_images = run.other_images(reader.store) if reader.key == run.store_key else ""
    if other_images:  # scored with its own split on other images, its rows said to be on its own store
        reader.close()
        raise StoreMismatchError(f"run {run.name} cannot be scored on {path}: a store of its key, but its images differ "
                                 f"({other_images}); score it on the store it was trained on, or train it again on "
                                 "this one with another --out")
    return reader


def _open_any(run: RunDir, path: str, transfer: bool) -> StoreReader:
    if not transfer:
        trained_on = run.config.get("store_path")
        if trained_on and Path(path).resolve() == Path(trained_on).resolve():  # the same path, another store now
            advice = (f"the store at {path} has changed since run {run.name} was trained on it (re-extracted?); "
                      "score the run on a store with its key, or train it again with another --out")
        else:
            advice = (f"score run {run.name} on the store it was trained on ({trained_on}), or pass --transfer to "
                      "score it on another store of the same teacher (on the images of it the run never trained on)")
        whose = "the run's store's key"
        try:
            return StoreReader(path, expect_key=run.store_key, key_advice=advice, key_whose=whose)
        except StoreMismatchError:
            differs = run.store_differences(path)
            if not differs:
                raise
        return StoreReader(path, expect_key=run.store_key, key_advice=advice, key_differs=differs,  # refused, saying how
                           key_whose=whose)
    reader = StoreReader(path)
    if reader.key == run.store_key:  # its own store by another path: scored with its own split
        return reader
    try:
        source = run.split["text_source"]
        own = run.split.get("trained_on") or _facts_of_own_store(run, path, source)
        differ = transfer_differences(own, reader, source)
    except Exception:
        reader.close()
        raise
    if differ:
        reader.close()
        what, fix = differ[0]
        raise StoreMismatchError(f"run {run.name} cannot be scored on {path}: {what}; {fix}")
    return reader


def _facts_of_own_store(run: RunDir, path: str, source: str) -> Dict:
    """A run from before runs kept their store's ``scoring_facts``: read from that store, which must be
    where the run recorded it."""
    try:
        own_path = run.store_path()
    except StoreError:
        raise StoreMismatchError(
            f"run {run.name} was trained before runs kept what --transfer checks, and its store is not at "
            f"{run.config.get('store_path') or run.config.get('store')}: put that store back there (or link it "
            f"there) to score the run on {path}") from None
    with StoreReader(own_path) as own:
        return own.scoring_facts(source)


def transfer_differences(own: Dict, reader: StoreReader, source: str) -> List[Tuple[str, str]]:
    """(what differs, how to make a store the run can be scored on), for each way ``reader``'s store
    differs from the run's (``own``: its ``scoring_facts``)."""
    out = []
    made = {"teacher": own["teacher"], **({"key_parts": own["key_parts"]} if own["key_parts"].get("teacher") else {})}
    if not same_teacher(made, reader.manifest):
        out.append(("its teacher differs from that of the store the run was trained on",
                    f"extract the store to score on with the run's teacher ({_teacher_words(made)}; a remote "
                    "teacher and the model behind it count as two)"))
    if own["classes"] != reader.classes:
        out.append(_classes_differ(own["classes"], reader.classes, own.get("producer")))
    settings = _text_words(own.get("text", {}), source)
    if source not in reader.text_sources:
        out.append((f"it has no {source!r} text source, which the run predicts with",
                    f"extract it with the text settings of the run's store ({settings})"))
    elif own["prompts"] != reader.scoring_facts(source)["prompts"]:
        out.append((f"its {source!r} prompts differ from those of the store the run was trained on",
                    f"extract it with the text settings of the run's store ({settings})"))
    return out


def _text_words(text: Dict, source: str) -> str:
    """The text settings that make ``source``'s prompts, as --set spells them."""
    words = [f"text.sources including {source}"]
    if source == "templates" and text.get("templates"):
        words.append(f"text.templates={text['templates']}")
    if source == "attributes" and text.get("attributes"):
        words.append(f"text.attributes={text['attributes']}")
    return ", ".join(words)


def _classes_differ(own: List[str], other: List[str], producer: Optional[str]) -> Tuple[str, str]:
    """What differs between the run's store's classes and another's, and how to make a store the run
    can be scored on (the run predicts indices into its own store's classes, so the order counts too)."""
    if sorted(own) == sorted(other):
        shown = ", ".join(own[:3]) + (", ..." if len(own) > 3 else "")
        return ("its classes are the run's store's in another order",
                f"the run's store has {shown} (all in its manifest's dataset.classes); extract it with labels "
                "that dataset.class_names names in that order")
    lacks, extra = [c for c in own if c not in other], [c for c in other if c not in own]
    said = "its classes differ from the run's store's: " + "; ".join(
        part for part in (f"the run's store has {_few(lacks)}, which it lacks" if lacks else "",
                          f"it has {_few(extra)}, which the run's store lacks" if extra else "") if part)
    if not lacks:
        return said, "score the run on a store of the run's classes alone (a csv dataset listing only their images)"
    if producer == "synthesize":
        return said, (f"synthesise the run's store again with this store's class names (classes=[{', '.join(other)}]) "
                      "and train again")
    return said, "extract both with the same class names (dataset.class_names renames a dataset's labels)"


def _few(names: List[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _teacher_words(manifest: Dict) -> str:
    """A store's teacher as a user names it: its registered name and model, where it has one."""
    t = manifest.get("teacher", {})
    model = teacher_model(t)
    said = f", teacher.model={model}" if model else (f", classifier {t['classifier']}" if t.get("classifier") else "")
    return f"teacher.name={t.get('name')}" + said


def _unseen_only(run: RunDir, reader: StoreReader, path: str) -> np.ndarray:
    """The transfer store's usable rows less the images the run trained or validated on (a
    warning says how many were left out); refused when that leaves none."""
    seen = seen_rows(run, reader)
    if seen is None or not seen.any():
        return reader.ok
    left = reader.ok & ~seen
    if not left.any():
        raise StoreMismatchError(f"every image of {path} is one run {run.name} trained or validated on; score it "
                                 "on its own store without --transfer (its split scores the images it never saw)")
    domains = reader.meta["domain"].to_numpy()
    gone = sorted(set(domains[reader.ok]) - set(domains[left]))  # a domain of nothing else has no cell at all
    said = (f"; no image of domain(s) {', '.join(map(str, gone))} is left, so its transfer tables have no such column"
            if gone else "")
    warnings.warn(f"run {run.name}: {int(seen.sum())} of {int(reader.ok.sum())} images of {path} are images it trained "
                  f"or validated on (the same canvases); its transfer scores leave them out{said}")
    return left


def _embedding_trained(run: RunDir, model, protocols: Sequence[str] = ("distill",)) -> bool:
    """Whether the run trained the embedding the distill protocol and few_shot's Tip-Adapter compare with
    the teacher's: a loss of it does, or the embedding is the backbone's own output (an identity head)
    and a stage trains the backbone. If not, a warning says those rows of ``protocols`` are left out
    (they measured a projection as it was initialised)."""
    from .recipes import definition, recipe_of, trains_embedding

    cfg = run.train_config
    recorded = run.config.get("recipe_definition") or definition(recipe_of(cfg), cfg.averaging, cfg.select)
    moved_backbone = getattr(model, "head_kind", "random") == "identity" and any(
        st["train"] in ("all", "backbone") for st in recorded["stages"])
    if trains_embedding(recorded) or moved_backbone:
        return True
    which = " and ".join(w for p, w in (("distill", "the distill rows"), ("few_shot", "few_shot's tip_adapter, li_retrieval and text_only rows"))
                         if p in protocols)
    warnings.warn(f"no loss of recipe {cfg.recipe} trains its embedding (it trains a linear classifier; "
                  f"the projection to the embedding stays as initialised), so {which}, which compare that "
                  "embedding with the teacher's, are left out")
    return False


def score_run(run: Union[str, RunDir], protocols: Sequence[str] = ("lodo",), store: Optional[str] = None,
              device: str = "auto", options: Optional[Dict] = None, finetune_steps: int = 0,
              finetune_mode: str = "shots", tags: Optional[Dict] = None, transfer: bool = False) -> pd.DataFrame:
    """Tidy result rows of one finished run on its own store (or ``store``, which must have its key).
    With ``transfer``, ``store`` may be another store of the same teacher and classes: every image
    there is unseen by the run, so protocols score it as the teacher's are scored (every domain a
    test domain) and the rows say ``transfer`` in their ``holdout`` column; the run's own store (its
    key), by whatever path, keeps the run's split."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    run.require_done()
    path = store or run.store_path()
    with _open_for(run, path, transfer) as reader:
        if transfer and reader.key == run.store_key:  # its own store, by any path: never a transfer
            warnings.warn(f"run {run.name}: --transfer: {path} is the store the run trained on (its key), so it is "
                          "scored with its own split, as without --transfer")
        transfer = transfer and reader.key != run.store_key
        dev = resolve_device(device)
        split = run.split
        features = cached_features(reader, split.get("backbone_key"))
        finetune = "few_shot" in protocols and finetune_steps > 0  # trains the whole student
        # scored from the very features the run trained on: its heads are all that is needed
        model, cfg = (run.load_heads(dev), run.train_config) if features is not None and not finetune else run.load_student(dev)
        if finetune:  # before the protocols' work, not after it
            from .finetune import mixed_on_transfer, require_trainable_batches

            shots = (options or {}).get("few_shot", {}).get("shots", DEFAULT_SHOTS)
            if transfer and finetune_mode == "mixed":
                raise EvaluationError(mixed_on_transfer())
            require_trainable_batches(model, shots, len(reader.classes) - len(split["seen_classes"]), finetune_mode,
                                      transfer)
        if transfer:  # none of these images was trained on or used for selection
            split = {"text_source": split["text_source"], "predict": split["predict"],
                     "seen_classes": split["seen_classes"], "holdout_domains": [], "train_idx": []}
        data = StoreData(reader, split["text_source"], SplitConfig(val_fraction=0.0), training=False)
        if transfer:
            data.ok = _unseen_only(run, reader, path)
        needed = rows_read(protocols, reader.meta["domain"].to_numpy(), data.ok, split.get("holdout_domains"),
                           split.get("val_idx"))  # lodo: the held-out and validation rows, not the training images
        emb, scores = embed_rows(model, data, split["seen_classes"], split["predict"] == "linear", dev, rows=needed,
                                 features=features)
        all_tags = {**run_tags(run, reader, transfer), **(tags or {})}
        with named_warnings(f"run {run.name}"):
            compared = [p for p in ("distill", "few_shot") if p in protocols]  # with the teacher's embedding
            trained = not compared or _embedding_trained(run, model, compared)  # warns as the run's
            scored = replace(eval_data(reader, split["text_source"], emb, split, scores, trained), ok=data.ok,
                             student=True, embedding_trained=trained)
            frames = [run_protocols(scored, protocols, all_tags, options)]
        if finetune:
            from .finetune import few_shot_finetune

            episodes = {k: v for k, v in (options or {}).get("few_shot", {}).items() if k in ("shots", "episodes", "seed")}
            ft = few_shot_finetune(model, cfg, data, split, steps=finetune_steps, device=dev, mode=finetune_mode,
                                   **episodes)  # the episodes the few_shot protocol scored
            frames.append(conform(ft.assign(protocol="few_shot", **all_tags)))
    return pd.concat(frames, ignore_index=True)


def score_runs(runs: Iterable[RunDir], protocols: Sequence[str], log: Callable[[str], None] = print,
               **options) -> Tuple[List[pd.DataFrame], List[str]]:
    """(frames, unscored): every finished run of ``runs`` scored under ``protocols`` (``options`` as
    ``score_run`` takes them). A run not finished is skipped and said through ``log``. A protocol that
    cannot score a run is said and listed in ``unscored`` ("run PATH[, PROTOCOL]: why"), and the run's
    other protocols still scored; where that run is the only finished one and nothing of it scored, its
    error is raised (a lone run's partial failure is left to the caller to say, after its table)."""
    runs = list(runs)
    finished = sum(run.done for run in runs)
    frames, unscored = [], []
    for run in runs:
        if not run.done:
            why = (f"not finished; its last attempt failed ({run.failure}; more in its error.txt)"
                   if run.failure else "not finished")
            log(f"skipping {run.path}: {why}")
            continue
        scored, failed = _score_each(run, protocols, **options)
        frames += scored
        for protocol, exc in failed:
            what = f"{run.path}: {exc}" if len(failed) == len(protocols) else f"{run.path}, {protocol}: {exc}"
            if finished == 1 and not scored:
                raise EvaluationError(f"run {what}")
            unscored.append(f"run {what}")
            if finished > 1:  # a lone run's is its error, for the caller to say once, after the table of what it scored
                log(f"skipping {what}")
    return frames, unscored


def _score_each(run: RunDir, protocols: Sequence[str], **options) -> Tuple[List[pd.DataFrame], List[Tuple[str, Exception]]]:
    """(frames, [(protocol, error)]): the run scored under every protocol at once, or, when one of
    them cannot score it, under each alone, so the others' rows are kept."""
    try:
        with warnings.catch_warnings(record=True) as said:  # said again below when scored one by one
            warnings.simplefilter("always")
            frame = score_run(run, list(protocols), **options)
    except EvaluationError as exc:
        if len(protocols) == 1:
            _resay(said)
            return [], [(protocols[0], exc)]
    else:
        _resay(said)
        return [frame], []
    frames, failed = [], []
    for protocol in protocols:
        try:
            frames.append(score_run(run, [protocol], **options))
        except EvaluationError as exc:
            failed.append((protocol, exc))
    return frames, failed


def _resay(said: list) -> None:
    for w in said:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
