"""Text sources (a registry): the prompts that describe each class, and their teacher embeddings.

Each source turns the class names into a list of prompts per class. Every prompt is embedded and
kept, and the class embedding is the mean of its L2-normalised prompt embeddings, renormalised.
Prompts longer than the teacher's context are truncated by its tokenizer; that is recorded per
prompt (``n_tokens``, ``truncated``) and reported, never silent.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from . import interrupt
from .registry import Registry
from .config import TextConfig
from .fileio import json_kind
from .errors import ConfigError

TEXT_SOURCES = Registry("text source")
Prompts = List[List[str]]  # prompts[c] = the prompts of class c


def display_name(class_name: str) -> str:
    return class_name.replace("_", " ").strip()


def prompt_key(class_name: str) -> str:
    """A class name as the teacher reads it in a prompt: underscores as spaces, case and runs of spaces lost."""
    return " ".join(display_name(class_name).split()).casefold()


def prompt_clash(classes: Sequence[str]) -> Optional[str]:
    """A one-line refusal when two different class names read as one prompt to the teacher (display
    names alike once its tokenizer has lowered the case and collapsed runs of spaces), else None: such
    classes get identical text embeddings, and nearest-label search could never predict the later one."""
    seen: Dict[str, str] = {}
    for c in classes:
        first = seen.setdefault(prompt_key(c), c)
        if first != c:
            return (f"classes {first!r} and {c!r} give the same prompt text ({display_name(c)!r}: the teacher's "
                    "tokenizer ignores case and extra spaces), so their text embeddings would be identical and one "
                    "could never be predicted; rename one of them (or merge them into one class)")
    return None


# labels that name nothing to a text encoder: numbers and WordNet ids (ImageNet's folder names)
_ID = re.compile(r"\d+|n\d{8}")
_NUMBERED = re.compile(r"\d+[._\- ]+[^\W\d_]")  # a numbered name: 001.Black_footed_Albatross


def id_names(classes: Sequence[str]) -> Optional[str]:
    """What is wrong when every class name is an id (a number, a WordNet id), else None: the teacher
    would embed the ids, not what they stand for, and zero-shot scores would mean nothing. Callers
    add the fix their settings take."""
    if not classes or not all(_ID.fullmatch(c.strip()) for c in classes):
        return None
    shown = ", ".join(repr(c) for c in classes[:3]) + (", ..." if len(classes) > 3 else "")
    return f"the class names are ids ({shown}), which the teacher's text encoder would embed as they are"


def _bundled(kind: str, name: str, suffix: str, fix: str) -> str:
    path = Path(name)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"text.{kind}={name} is not a text file (UTF-8); {fix}") from None
    res = resources.files("embedcache.data").joinpath(kind, f"{name}{suffix}")
    if not res.is_file():
        avail = sorted(p.name[: -len(suffix)] for p in resources.files("embedcache.data").joinpath(kind).iterdir()
                       if p.name.endswith(suffix))
        raise ConfigError(f"{kind} {name!r} is neither a file nor bundled; bundled: {', '.join(avail)}")
    return res.read_text()


def load_templates(name: str) -> List[str]:
    fix = "give a text file of one template per line, each with a {} slot for the class name"
    lines = [ln.strip() for ln in _bundled("templates", name, ".txt", fix).splitlines()]
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    if not templates:
        raise ConfigError(f"template file {name!r} holds no template; {fix}")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ConfigError(f"template file {name!r} needs one template per line with a {{}} slot; bad line: {bad[:1]}")
    repeated = sorted({t for t in templates if templates.count(t) > 1})
    if repeated:  # kept (a weighting may be meant), but said: it was silent (a trial)
        warnings.warn(f"template file {name!r} repeats {len(repeated)} template(s) (e.g. {repeated[0]!r}): each counts in "
                      "a class's mean embedding as often as it appears; remove the repeats for an ensemble of distinct "
                      "templates")
    return templates


@TEXT_SOURCES.register("name")
def name_source(classes: Sequence[str], cfg: TextConfig) -> Prompts:
    """One prompt per class: "a photo of a {c}."."""
    return [[f"a photo of a {display_name(c)}."] for c in classes]


@TEXT_SOURCES.register("templates")
def templates_source(classes: Sequence[str], cfg: TextConfig) -> Prompts:
    """A template ensemble (CLIP's 80 ImageNet templates, a short 7, or a file)."""
    templates = load_templates(cfg.templates)
    return [[t.format(display_name(c)) for t in templates] for c in classes]


@TEXT_SOURCES.register("attributes")
def attributes_source(classes: Sequence[str], cfg: TextConfig) -> Prompts:
    """Language enrichment (Li et al. 2023): "a photo of a {c}, {description}" per description."""
    if not cfg.attributes:
        raise ConfigError("text source 'attributes' needs text.attributes (bundled: pacs, synthetic; or a JSON file)")
    table = _attribute_table(cfg.attributes)
    _check_descriptions(cfg.attributes, table, classes)
    missing = [c for c in classes if not table.get(c)]
    if missing:
        fix = ("add them to the JSON file" if Path(cfg.attributes).is_file() else
               f"the bundled set describes other classes ({', '.join(sorted(table)[:3])}, ...): give "
               "text.attributes=FILE.json describing yours, or leave attributes out of text.sources")
        raise ConfigError(f"attributes {cfg.attributes!r} have no descriptions for class {missing[0]!r}; {fix}")
    return [[f"a photo of a {display_name(c)}, {d}" for d in table[c]] for c in classes]


_ATTRIBUTES_FIX = "give a JSON object of class name -> list of descriptions, e.g. {\"dog\": [\"a long snout\"]}"


def _attribute_table(name: str) -> Dict[str, Any]:
    """The attributes file (or bundled set) ``name``: a JSON object (a file that was not JSON died with a
    traceback: a fuzz)."""
    try:
        table = json.loads(_bundled("attributes", name, ".json", _ATTRIBUTES_FIX))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"text.attributes={name} is not JSON ({exc}); {_ATTRIBUTES_FIX}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"text.attributes={name} is a JSON {json_kind(table)}, not an object of class -> "
                          f"[descriptions]; {_ATTRIBUTES_FIX}")
    return table


def _check_descriptions(name: str, table: Dict[str, Any], classes: Sequence[str]) -> None:
    """The descriptions of ``classes`` in the attributes table ``name``: a list of non-empty strings each (one
    string made a prompt of each of its characters: a fuzz); entries of other classes are not read."""
    for c in classes:
        said = table.get(c)
        if said is None:
            continue  # said by the caller: no descriptions for it
        if not isinstance(said, list):
            raise ConfigError(f"text.attributes={name}: class {c!r} has a {json_kind(said)}, not a list of "
                              f"descriptions; {_ATTRIBUTES_FIX}")
        odd = next((d for d in said if not isinstance(d, str)), None)
        if odd is not None:
            raise ConfigError(f"text.attributes={name}: class {c!r} has a description that is not a string ({odd!r}); "
                              f"{_ATTRIBUTES_FIX}")
        if any(not d.strip() for d in said):
            raise ConfigError(f"text.attributes={name}: class {c!r} has an empty description; {_ATTRIBUTES_FIX}")


def build_prompts(classes: Sequence[str], cfg: TextConfig) -> Dict[str, Prompts]:
    if classes and all(_NUMBERED.match(c) for c in classes):  # CUB's folders: 001.Black_footed_Albatross
        warnings.warn(f"every class name starts with a number ({display_name(classes[0])!r}), which the prompts "
                      "keep; name the classes without it with dataset.class_names=FILE if that is not meant")
    return {src: TEXT_SOURCES.get(src)(classes, cfg) for src in cfg.sources}


def prompts_digest(prompts: Dict[str, Prompts]) -> str:
    """Hash of every prompt of every source: the text part of the cache key."""
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:16]


def aggregate(prompt_emb: np.ndarray, prompt_class: np.ndarray, num_classes: int) -> np.ndarray:
    """(P, D) prompt embeddings + (P,) class index -> (C, D) float32 class embeddings:
    mean of the L2-normalised prompt embeddings of each class, L2-normalised again."""
    e = prompt_emb.astype(np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    out = np.zeros((num_classes, e.shape[1]), dtype=np.float32)
    np.add.at(out, prompt_class, e)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


@dataclass
class TextTable:
    """One source: ``frame`` has one row per prompt (label, class_name, prompt, n_tokens,
    truncated); ``emb`` (P, D) float32 and ``class_emb`` (C, D) float32 are L2-normalised."""
    source: str
    frame: pd.DataFrame
    emb: np.ndarray
    class_emb: np.ndarray


def text_calls(flat: List[str], size: int = 256) -> List[List[str]]:
    """The prompts of one source in the calls ``encode_sources`` makes of them (a paid teacher's dry
    run costs these same calls)."""
    return [flat[i:i + size] for i in range(0, len(flat), size)]


FINISH_WITHIN_S = 2.0  # an encoding of the label prompts this short finishes after a stop request
_clock = time.monotonic  # (tests set it)


def encode_sources(encode: Callable[[List[str]], np.ndarray], count_tokens: Callable[[List[str]], List[int]],
                   context_length: int, classes: Sequence[str], prompts: Dict[str, Prompts]) -> Dict[str, TextTable]:
    """Each source's prompts, their embeddings (``encode``, in ``text_calls``) and class embeddings. A stop
    request ends an encoding that has run FINISH_WITHIN_S, between calls (a command that stops its loops on
    request, synthesize, waited out every call: minutes for a large template ensemble on a CPU); a shorter
    one finishes, so a store stopped as its images are done is not left unfinished over its prompts."""
    tables, started = {}, _clock()
    for src, per_class in prompts.items():
        flat = [p for ps in per_class for p in ps]
        labels = np.array([c for c, ps in enumerate(per_class) for _ in ps], dtype=np.int64)
        n_tok = np.array(count_tokens(flat), dtype=np.int64)
        truncated = n_tok > context_length
        if truncated.any():
            warnings.warn(f"text source {src!r}: {int(truncated.sum())} of {len(flat)} prompts exceed the teacher's "
                          f"{context_length}-token context and were truncated (see text.parquet, column truncated)")
        parts = []
        for chunk in text_calls(flat):
            if _clock() - started > FINISH_WITHIN_S:
                interrupt.check("encoding the label prompts")
            parts.append(np.asarray(encode(chunk), dtype=np.float32))
        emb = np.concatenate(parts)
        frame = pd.DataFrame({"source": src, "label": labels, "class_name": [classes[c] for c in labels],
                              "prompt": flat, "n_tokens": n_tok, "truncated": truncated})
        tables[src] = TextTable(src, frame, emb, aggregate(emb, labels, len(classes)))
    return tables
