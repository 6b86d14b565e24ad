"""Image datasets (a registry): DomainBed folders, flat class folders, CSV manifests, synthetic.

A dataset is a list of samples (relative path, class, domain, split) plus a way to load sample i
as a PIL image. Its fingerprint hashes relative paths, file sizes, labels and domains, never
absolute paths or modification times, so moving a dataset keeps its stores valid.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from PIL import Image

from .registry import Registry
from .config import DatasetConfig
from .errors import DatasetError
from .images import read_rgb8, to_rgb8
from .text import prompt_clash, prompt_key

DATASETS = Registry("dataset")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# domain names results tables give other meanings: rows of no one domain or of --transfer scores
# (evaluate.results: NOT_ONE_DOMAIN, TRANSFER, a blank "-"), and a summary table's own columns ("avg",
# "replicates"): a domain so named dropped out of every avg, or overwrote the avg cell, with exit 0
RESERVED_DOMAINS = ("all", "training_domains", "transfer", "-", "avg", "replicates")
# the separators of a results row's holdout ("; " between its parts, "," between held-out names), and the
# prefixes of its parts (evaluate.results: UNSEEN, TRAINED_WITHOUT)
HOLDOUT_SEPARATORS = (";", ",")
HOLDOUT_PREFIXES = ("unseen:", "trained without:")


@dataclass(frozen=True)
class Sample:
    path: str          # relative to the dataset root (posix separators)
    class_name: str
    domain: str
    split: str
    size: int          # bytes on disk; -1 when the file is missing


class ImageDataset:
    """Samples plus a loader. ``classes`` is sorted, or in ``class_order`` (the order of the labels a
    class-names file names) where given; ``label`` is the index into it. ``class_ids`` maps each name to
    the dataset's own label for it (folder name, CSV label, id) where a class-names file renamed them."""

    def __init__(self, name: str, root: Optional[Path], samples: Sequence[Sample],
                 loader: Optional[Callable[[int], Image.Image]] = None,
                 extra_fingerprint: Optional[dict] = None, class_order: Optional[Sequence[str]] = None,
                 class_ids: Optional[Dict[str, str]] = None, hidden_images: int = 0):
        if not samples:
            raise DatasetError(f"dataset {name!r} at {root} holds no images; point dataset.path at a folder or CSV with images")
        self.name = name
        self.root = root
        self.samples = list(samples)
        present = {s.class_name for s in self.samples}
        self.classes = [c for c in class_order if c in present] if class_order is not None else sorted(present)
        self._class_order = self.classes != sorted(self.classes)
        clash = prompt_clash(self.classes)
        if clash:
            raise DatasetError(f"dataset {name!r} at {root}: {clash}")
        self.domains = sorted({s.domain for s in self.samples})
        _require_names(name, root, self.domains, self.classes)
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        self._loader = loader
        self._extra = extra_fingerprint or {}
        self._class_ids = class_ids
        self.hidden_images = hidden_images  # image files a folder scan left out as hidden (in the manifest)

    def __len__(self) -> int:
        return len(self.samples)

    def require_files(self) -> None:
        """Refuse a dataset none of whose files exists (before a teacher is paid for nothing but failures)."""
        if self.has_files and all(s.size < 0 for s in self.samples):
            raise DatasetError(f"dataset {self.name!r} at {self.root}: none of its {len(self.samples)} image files "
                               f"exists (first: {self.source_path(0)}); paths in a CSV are read relative to the "
                               "CSV's folder unless absolute: fix the paths or dataset.path")

    def label(self, i: int) -> int:
        return self._class_index[self.samples[i].class_name]

    @property
    def has_files(self) -> bool:
        """Samples are files on disk (not generated in memory)."""
        return self._loader is None

    def source_path(self, i: int) -> Path:
        return source_file(self.root, self.samples[i].path)

    def load(self, i: int) -> Image.Image:
        """Sample i as an 8-bit RGB PIL image, decoded faithfully (``images.to_rgb8``: EXIF
        orientation, 16-bit and transparent modes); raises on a missing, corrupt or refused file."""
        if self._loader is not None:
            return to_rgb8(self._loader(i))
        return read_rgb8(self.source_path(i))

    def failure(self, i: int, exc: BaseException) -> str:
        """Why sample i was not read, as its store records it: the error's type and first line, the file
        named by its path in the dataset (the absolute one made meta.parquet depend on where the
        dataset sits)."""
        first = str(exc).splitlines()[0] if str(exc) else ""
        if self.has_files:
            first = first.replace(str(self.source_path(i)), self.samples[i].path)
        return f"{type(exc).__name__}: {first}"[:300]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"name": self.name, **self._extra}, sort_keys=True).encode())
        if self._class_order:  # the order gives the labels (classes out of name order make a store of their own)
            h.update(json.dumps(self.classes).encode())
        for s in self.samples:
            h.update(f"{s.path}\t{s.size}\t{s.class_name}\t{s.domain}\t{s.split}\n".encode())
        return h.hexdigest()[:16]

    def frame(self) -> pd.DataFrame:
        """One row per image: index, path, class_name, [class_id,] label, domain, split (class_id: the
        dataset's own label, where a class-names file renamed it)."""
        ids = {"class_id": [self._class_ids[s.class_name] for s in self.samples]} if self._class_ids else {}
        return pd.DataFrame({
            "index": np.arange(len(self), dtype=np.int64),
            "path": [s.path for s in self.samples],
            "class_name": [s.class_name for s in self.samples],
            **ids,
            "label": np.array([self._class_index[s.class_name] for s in self.samples], dtype=np.int64),
            "domain": [s.domain for s in self.samples],
            "split": [s.split for s in self.samples],
        })


def _require_names(name: str, root, domains: Sequence[str], classes: Sequence[str]) -> None:
    why = names_problem(domains, classes)
    if why:
        raise DatasetError(f"dataset {name!r} at {root}: {why}; rename it (a domain: its folder; a csv dataset's: its "
                           "rows' domain, or the CSV file itself, whose name is the domain of a CSV without a domain "
                           "column; a class: its folder, or give it another name in a class-names file)")


def names_problem(domains: Sequence[str], classes: Sequence[str]) -> str:
    """What results tables would misread in these domain and class names ('' for nothing): a domain named
    as no one domain, a --transfer row or a table's column, a separator or prefix of the holdout column in a
    domain name, or ";" in a class name (the unseen classes of a class split are one part of it)."""
    for d in domains:
        if (d.strip() in RESERVED_DOMAINS or d != d.strip() or not d.strip() or any(c in d for c in HOLDOUT_SEPARATORS)
                or d.startswith(HOLDOUT_PREFIXES)):
            return (f"domain {d!r} cannot be told apart in results tables (the names {', '.join(RESERVED_DOMAINS)} are "
                    "taken, and a domain name holds no ';' or ',', begins with no holdout prefix, and neither begins "
                    "nor ends with a space)")
    bad = [c for c in classes if ";" in c]
    if bad:
        return f"class {bad[0]!r} has a ';', which separates the parts of a results row's holdout"
    return ""


def source_file(root, path: str) -> Path:
    """Where a sample's file is: its path as listed, under the dataset's root unless absolute."""
    p = Path(path)
    return p if p.is_absolute() or root is None else Path(root) / p


def _limit(samples: List[Sample], k: Optional[int]) -> List[Sample]:
    if k is None:
        return samples
    seen: Dict[tuple, int] = {}
    out = []
    for s in samples:
        key = (s.domain, s.class_name)
        if seen.get(key, 0) < k:
            seen[key] = seen.get(key, 0) + 1
            out.append(s)
    return out


def _require_dir(path: Optional[str], what: str) -> Path:
    if not path:
        raise DatasetError(f"{what} needs dataset.path; set it with --set dataset.path=/path/to/images")
    root = Path(path).expanduser()
    if root.is_file():
        fix = ("a CSV manifest takes --set dataset.name=csv" if root.suffix.lower() == ".csv" else
               "point dataset.path at the folder of the images")
        raise DatasetError(f"dataset.path {root} is a file, not the folder {what} needs; {fix}")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist (relative paths are taken from the working folder "
                           f"{Path.cwd()}); set it with --set dataset.path=/path/to/images")
    return root


class _Scan:
    """What a folder scan leaves out: files of other types, and image files that are hidden or lie in
    hidden folders (.ipynb_checkpoints, .git: never a domain, class or image)."""

    def __init__(self):
        self.others: List[Path] = []
        self.hidden: List[Path] = []
        self.stray: List[Path] = []  # image files beside the domain or class folders, not in one
        self.empty: List[Path] = []  # class folders that hold no image file
        self.empty_domains: List[Path] = []  # domain folders that hold no class folder
        self.dangling: List[Path] = []  # image-named symlinks whose target is gone (or a loop)
        self.linked_folders: List[Path] = []  # symlinked folders inside a class folder (not entered, as rglob)

    def subfolders(self, folder: Path) -> List[Path]:
        """The visible sub-folders of ``folder`` (a hidden one's images counted as left out; image
        files beside them kept to be said)."""
        out = []
        for d in sorted(folder.iterdir()):
            if not d.is_dir():
                if d.is_file() and d.suffix.lower() in IMAGE_EXTENSIONS and not d.name.startswith("."):
                    self.stray.append(d)
            elif d.name.startswith("."):
                self.hidden += [Path(e.path) for e, _ in _walk(str(d), hidden=True)
                                if _is(e, "file") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
            else:
                out.append(d)
        return out

    def images(self, folder: Path, root: Path) -> List[Tuple[str, int]]:
        """(path relative to ``root``, POSIX style; bytes) of the visible image files under ``folder``,
        in the order of ``sorted(folder.rglob("*"))``."""
        images, cut = [], len(os.path.join(str(folder), ""))  # entry.path[cut:]: the path below folder
        above = folder.relative_to(root).as_posix()
        for entry, hidden in _walk(str(folder)):
            if not _is(entry, "file"):
                if entry.is_symlink() and not hidden:  # left out without a word (a trial): said in ``dataset``
                    if _is(entry, "dir"):
                        self.linked_folders.append(Path(entry.path))
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                        self.dangling.append(Path(entry.path))
                continue
            image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            if hidden:
                if image:
                    self.hidden.append(Path(entry.path))
            elif image:
                images.append((f"{above}/{entry.path[cut:]}".replace(os.sep, "/"), entry.stat().st_size))
            else:
                self.others.append(Path(entry.path))
        return images

    def images_of(self, folder: Path, root: Path) -> List[Tuple[str, int]]:
        """``images`` of a class folder, one of none remembered (``empty``)."""
        found = self.images(folder, root)
        if not found:
            self.empty.append(folder)
        return found

    def dataset(self, name: str, root: Path, samples: List["Sample"], max_per_class: Optional[int]) -> "ImageDataset":
        """The dataset of ``samples`` (the layout checked), what was left out said or recorded."""
        _say_left_out(root, self.others)
        _say_links(root, self.dangling, self.linked_folders)
        _say_empty(root, self.empty, self.empty_domains, {s.class_name for s in samples})
        if self.stray:
            names = ", ".join(p.relative_to(root).as_posix() for p in self.stray[:3]) + (", ..." if len(self.stray) > 3 else "")
            layout = "domain/class/image" if name == "domainbed" else "class/image"
            warnings.warn(f"{root}: {len(self.stray)} image file{'s' if len(self.stray) != 1 else ''} outside the class "
                          f"folders left out ({names}); images are read as {layout}: move them into their class's folder")
        if name == "domainbed":
            _say_uneven_classes(root, samples)
        return ImageDataset(name, root, _limit(samples, max_per_class), hidden_images=len(self.hidden))


def _walk(folder: str, hidden: bool = False) -> Iterator[Tuple[os.DirEntry, bool]]:
    """(entry, whether it or a folder above it up to ``folder`` is hidden) of everything under
    ``folder``, in the order of ``sorted(Path(folder).rglob("*"))`` (each folder's entries by name,
    a folder's contents right after it), symlinked folders not entered, as rglob does not: a tenth
    of its time on a 10,000-file tree (``rglob`` builds and compares a Path per file). A visible folder
    that cannot be listed is refused (rglob skipped it, and its images, without a word); a hidden one,
    or a file system's ``lost+found``, holds no image of the dataset and is skipped."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except PermissionError as exc:
        if hidden or os.path.basename(folder) == "lost+found":
            return
        raise DatasetError(f"{folder} cannot be read ({exc.strerror}), so its images cannot be listed; give read "
                           f"access to it (its owner: chmod -R a+rX {shlex.quote(folder)}), or move it out of the "
                           "dataset folder") from None
    for entry in entries:
        inside = hidden or entry.name.startswith(".")
        yield entry, inside
        if _is(entry, "dir") and not entry.is_symlink():
            yield from _walk(entry.path, inside)


def _is(entry: os.DirEntry, kind: str) -> bool:
    """``entry.is_file()`` or ``is_dir()``, False where the link cannot be followed (a symlink loop),
    as ``Path.is_file`` says."""
    try:
        return entry.is_file() if kind == "file" else entry.is_dir()
    except OSError:
        return False


# image formats a folder may hold that are not read (annotation files beside images are not said)
UNREAD_IMAGES = {".heic", ".heif", ".avif", ".jfif", ".jxl", ".jp2", ".j2k", ".ppm", ".pgm", ".pbm", ".ico", ".svg",
                 ".psd", ".dng", ".cr2", ".nef", ".arw", ".exr", ".hdr"}


def _say_empty(root: Path, empty: List[Path], empty_domains: List[Path], classes: set) -> None:
    """Class (or domain) folders without an image file: a class none of whose folders holds one is not a
    class of the store, which changes every nearest-label score (they vanished without a word: a trial); said."""
    if not (empty or empty_domains) or not classes:  # no image at all: refused elsewhere
        return
    gone = sorted({p.name for p in empty} - classes)
    folders = sorted(empty + empty_domains)
    names = ", ".join(p.relative_to(root).as_posix() for p in folders[:4]) + (", ..." if len(folders) > 4 else "")
    lost = (f"; so class{'es' if len(gone) > 1 else ''} {', '.join(repr(c) for c in gone)} {'are' if len(gone) > 1 else 'is'} "
            "not in the store's class list (every nearest-label score is over the classes it has)") if gone else ""
    warnings.warn(f"{root}: {len(folders)} folder{'s' if len(folders) != 1 else ''} with no image file ({names}){lost}; "
                  "add its images, or remove the folder to silence this")


def _say_left_out(root: Path, others: List[Path]) -> None:
    unread = [p for p in others if p.suffix.lower() in UNREAD_IMAGES]
    if unread:
        names = ", ".join(p.name for p in unread[:3]) + (", ..." if len(unread) > 3 else "")
        warnings.warn(f"{root}: {len(unread)} image file{'s' if len(unread) != 1 else ''} of a type not read left out "
                      f"({names}); images are read from {', '.join(sorted(IMAGE_EXTENSIONS))} files: convert the "
                      "others to one of these to include them")


def _say_links(root: Path, dangling: List[Path], linked: List[Path]) -> None:
    """Symlinks a scan leaves out: links whose target is gone, and linked folders inside a class folder
    (not entered, as ``rglob`` does not; a linked class or domain folder is read)."""
    def names(paths: List[Path]) -> str:
        return ", ".join(p.relative_to(root).as_posix() for p in paths[:3]) + (", ..." if len(paths) > 3 else "")

    if dangling:
        warnings.warn(f"{root}: {len(dangling)} image symlink{'s' if len(dangling) != 1 else ''} whose target is gone "
                      f"left out ({names(dangling)}); restore the target{'s' if len(dangling) != 1 else ''}, or remove "
                      "the links to silence this")
    if linked:
        warnings.warn(f"{root}: {len(linked)} symlinked folder{'s' if len(linked) != 1 else ''} inside a class folder "
                      f"not read ({names(linked)}); copy {'them' if len(linked) != 1 else 'it'} in, or link the images "
                      "one by one, to include their images")


def _say_uneven_classes(root: Path, samples: List["Sample"]) -> None:
    """A class missing from some domains (a folder name misspelt in one domain makes a class of its own
    there): said, not refused (a dataset may be uneven on purpose)."""
    where: Dict[str, set] = {}
    for s in samples:
        where.setdefault(s.class_name, set()).add(s.domain)
    domains = sorted(set().union(*where.values())) if where else []
    said = []
    for c, present in sorted(where.items()):
        if len(present) == len(domains):
            continue
        missing = [d for d in domains if d not in present]
        said.append(f"class {c!r} is only in domain{'s' if len(present) > 1 else ''} {', '.join(sorted(present))}"
                    if len(present) <= len(missing) else f"{c!r} is not in {', '.join(missing)}")
    if said:
        warnings.warn(f"{root}: not every class is in every domain: {'; '.join(said)} (a misspelt folder name? rename it "
                      "and extract again; a dataset uneven on purpose can ignore this)")


@DATASETS.register("domainbed")
def domainbed(cfg: DatasetConfig) -> ImageDataset:
    """DomainBed layout ``root/domain/class/image`` (PACS, VLCS, OfficeHome, ...)."""
    root = _require_dir(cfg.path, "the domainbed dataset")
    scan, samples = _Scan(), []
    for dom in scan.subfolders(root):
        classes = scan.subfolders(dom)
        if not classes:
            scan.empty_domains.append(dom)  # a domain folder of no class folder: no domain of the store either
        for cls in classes:
            for path, size in scan.images_of(cls, root):
                samples.append(Sample(path, cls.name, dom.name, "train", size))
    if samples and min(_depth(s) for s in samples) > 3 and any(_like_domains(d) for d in root.iterdir() if d.is_dir()):
        # root/x/domain/class/image: the domains read as classes
        top = root / Path(samples[0].path).parts[0]
        raise DatasetError(f"dataset.path {root} holds its images one level deeper than domain/class/image (e.g. "
                           f"{samples[0].path}); point it at the folder holding the domain folders: "
                           f"--set dataset.path={top}")
    if not samples and _has_images_at_depth(root, 2):
        raise DatasetError(f"dataset.path {root} holds class folders of images (class/image), not domain folders "
                           f"(domain/class/image): --set dataset.path={root.parent} for all domains, or "
                           "--set dataset.name=folder for this one")
    return scan.dataset("domainbed", root, samples, cfg.max_per_class)


def _like_domains(folder: Path) -> bool:
    """Whether ``folder``'s sub-folders look like domain folders: two of them hold at least two
    sub-folders of the same names (the classes, repeated per domain). Class folders that keep their
    images in a sub-folder of their own (Tiny-ImageNet's class/images/) share at most one name."""
    names = [{c.name for c in d.iterdir() if c.is_dir()} for d in folder.iterdir() if d.is_dir()]
    return any(len(a & b) >= 2 for i, a in enumerate(names) for b in names[i + 1:])


def _depth(sample: Sample) -> int:
    return sample.path.count("/") + 1  # a POSIX path relative to the root (a Path per sample took 0.1 s on PACS)


def _has_images_at_depth(root: Path, depth: int) -> bool:
    """Whether some image file lies exactly ``depth`` folders-and-file deep under ``root``."""
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in root.glob("/".join(["*"] * depth)))


@DATASETS.register("folder")
def folder(cfg: DatasetConfig) -> ImageDataset:
    """Flat layout ``root/class/image``: one domain, named after the root folder."""
    root = _require_dir(cfg.path, "the folder dataset")
    scan, samples = _Scan(), []
    for cls in scan.subfolders(root):
        for path, size in scan.images_of(cls, root):
            samples.append(Sample(path, cls.name, root.name, "train", size))
    if samples and min(_depth(s) for s in samples) > 2 and _like_domains(root):  # root/domain/class/image
        raise DatasetError(f"dataset.path {root} holds domain/class/image folders (e.g. {samples[0].path}), not "
                           "class/image: --set dataset.name=domainbed, or point dataset.path at one domain's folder")
    return scan.dataset("folder", root, samples, cfg.max_per_class)


# a sample's split: trained on (train), the validation rows (val), or never trained on nor selected with (test)
SPLITS = ("train", "val", "test")


@DATASETS.register("csv")
def csv_manifest(cfg: DatasetConfig) -> ImageDataset:
    """CSV with header ``path,label[,domain][,split]``; paths relative to the CSV's folder."""
    if not cfg.path or not Path(cfg.path).is_file():
        found = "is a folder, not a file" if cfg.path and Path(cfg.path).is_dir() else "not found"
        raise DatasetError(f"CSV manifest {cfg.path} {found}; set it with --set dataset.path=/path/to/manifest.csv "
                           "(a CSV with columns path,label)")
    csv_path = Path(cfg.path)
    try:
        return _csv_dataset(csv_path, cfg)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"CSV manifest {csv_path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _csv_dataset(csv_path: Path, cfg: DatasetConfig) -> ImageDataset:
    root = csv_path.parent
    samples, listed, blank_domain = [], {}, []
    for line, row in csv_rows(csv_path, ("path", "label"), "CSV manifest"):
        if (row.get("split") or "train") not in SPLITS:
            raise DatasetError(f"CSV manifest {csv_path} row {line}: split {row['split']!r}; use train, val or test "
                               "(empty means train)")
        rel = row["path"]
        f = source_file(root, rel)
        first = listed.setdefault(os.path.abspath(f), line)
        if first != line:  # a test image also trained on, or one image under two labels
            raise DatasetError(f"CSV manifest {csv_path} rows {first} and {line} both list {rel}; list each image "
                               "once, with one label and one split")
        size = f.stat().st_size if f.is_file() else -1
        if not (row.get("domain") or "").strip():
            blank_domain.append(line)
        samples.append(Sample(rel, str(row["label"]), row.get("domain") or csv_path.stem,
                              row.get("split") or "train", size))
    if blank_domain and len(blank_domain) < len(samples):  # one blank cell made a domain of its own, in every avg
        raise DatasetError(f"CSV manifest {csv_path} row {blank_domain[0]}: no domain, where other rows have one "
                           f"({len(blank_domain)} such row(s)); give every row its domain (a manifest with no domain "
                           f"column, or none filled, puts every image in one domain named {csv_path.stem!r})")
    return ImageDataset("csv", root, _limit(samples, cfg.max_per_class))


def csv_rows(path: Path, needed: Sequence[str], what: str, hint: str = "") -> Iterator[Tuple[int, Dict[str, str]]]:
    """(line, row) of a UTF-8 CSV file with a header naming at least ``needed``, each row holding a
    value for each of them and no more fields than the header (an unquoted comma in a value would
    otherwise split it silently); ``what`` names the file in errors, ``hint`` adds what else it may be."""
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's byte-order mark is no column name
        reader = csv.DictReader(fh)
        cols = list(reader.fieldnames or [])
        if not set(needed) <= set(cols):
            raise DatasetError(f"{what} {path} has columns {cols}; it needs a header with {','.join(needed)}{hint}")
        for line, row in enumerate(reader, start=2):
            short = [k for k in needed if not (row.get(k) or "").strip()]
            extra = [v for v in row.get(None) or [] if (v or "").strip()]  # a trailing comma adds an empty one
            if short or extra:  # a short row (missing fields read None) or one with more fields than the header
                said = f"no {' and no '.join(short)}" if short else f"{len(extra)} field(s) more than the header"
                raise DatasetError(f"{what} {path} row {line}: {said}; give every row its {','.join(cols)}"
                                   f"{' (quote a value that holds a comma)' if extra else ''}")
            yield line, row


# --- synthetic: coloured shapes whose domains differ in style (no files, no download) ---------
SYNTH_CLASSES = ["circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star"]
SYNTH_DOMAINS = ["solid", "outline", "noisy", "inverted"]


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill, width: Optional[int]):
    kw = {"outline": fill, "width": width} if width else {"fill": fill}
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, **kw)
    elif shape == "square":
        draw.rectangle(box, **kw)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], **kw)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], **kw)
    elif shape == "star":
        pts = [(cx + (r if k % 2 == 0 else r / 2.5) * math.cos(math.pi * k / 5 - math.pi / 2),
                cy + (r if k % 2 == 0 else r / 2.5) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)]
        draw.polygon(pts, **kw)
    elif shape == "cross":
        t = r / 3
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif shape == "bar":
        draw.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=fill)


def synthetic_image(seed: int, index: int, shape: str, domain: str, size: int) -> Image.Image:
    """Deterministic image of one shape in one domain style, from (seed, index) alone."""
    from PIL import ImageDraw

    rng = np.random.default_rng([seed, index])
    bg = tuple(int(v) for v in rng.integers(0, 90, 3))
    fg = tuple(int(v) for v in rng.integers(150, 256, 3))
    if domain == "noisy":
        arr = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
        im = Image.fromarray(arr)
    else:
        im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    r = size * rng.uniform(0.2, 0.35)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12) * size, size / 2 + rng.uniform(-0.12, 0.12) * size
    _draw_shape(draw, shape, cx, cy, r, fg, max(2, size // 24) if domain == "outline" else None)
    if domain == "inverted":
        im = Image.fromarray(255 - np.asarray(im))
    return im


@DATASETS.register("synthetic")
def synthetic(cfg: DatasetConfig) -> ImageDataset:
    """Seeded shapes: ``num_classes`` shapes x ``num_domains`` styles x ``per_class`` images."""
    if not 1 <= cfg.num_classes <= len(SYNTH_CLASSES) or not 1 <= cfg.num_domains <= len(SYNTH_DOMAINS):
        raise DatasetError(f"synthetic data has up to {len(SYNTH_CLASSES)} classes and {len(SYNTH_DOMAINS)} domains; "
                           f"got {cfg.num_classes} and {cfg.num_domains}")
    classes, domains = SYNTH_CLASSES[:cfg.num_classes], SYNTH_DOMAINS[:cfg.num_domains]
    samples = [Sample(f"{d}/{c}/{k:05d}.png", c, d, "train", 0)
               for d in domains for c in classes for k in range(cfg.per_class)]
    samples = _limit(samples, cfg.max_per_class)

    def load(i: int) -> Image.Image:
        s = samples[i]
        return synthetic_image(cfg.seed, i, s.class_name, s.domain, cfg.image_size)

    extra = {"seed": cfg.seed, "image_size": cfg.image_size, "generator": 1}
    return ImageDataset("synthetic", None, samples, loader=load, extra_fingerprint=extra)


def build_dataset(cfg: DatasetConfig) -> ImageDataset:
    dataset = DATASETS.get(cfg.name)(cfg)
    return named_classes(dataset, cfg.class_names) if cfg.class_names else dataset


# --- class names: what a dataset's labels (ids, folder names) stand for --------------------------
def read_class_names(path: str) -> Dict[str, str]:
    """label -> name: a CSV with columns label,name or a JSON object {label: name}. A label named twice,
    or two labels named alike (to the teacher's eye), is refused."""
    f = Path(path).expanduser()
    if not f.is_file():
        where = "" if f.is_absolute() else f" (a relative path, taken from the working folder {Path.cwd()})"
        found = "is a folder, not a file" if f.is_dir() else f"not found{where}"
        raise DatasetError(f"class-names file {f} {found}; set dataset.class_names to a CSV (label,name) or "
                           "JSON ({label: name}) file")
    try:
        pairs = _json_names(f) if f.suffix.lower() == ".json" else _csv_names(f)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"class-names file {f} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    names: Dict[str, str] = {}
    for label, name in pairs:
        label, name = str(label).strip(), str(name).strip()
        if not label or not name:
            raise DatasetError(f"class-names file {f}: label {label!r} has no name ({name!r}); give every label a name")
        if names.setdefault(label, name) != name:
            raise DatasetError(f"class-names file {f} names label {label!r} twice ({names[label]!r} and {name!r}); "
                               "keep one")
    if not names:
        raise DatasetError(f"class-names file {f} names no label; give one label,name per line")
    first: Dict[str, str] = {}
    for label, name in names.items():
        other = first.setdefault(prompt_key(name), label)
        if other != label:
            raise DatasetError(f"class-names file {f} gives labels {other!r} and {label!r} the same name "
                               f"({names[other]!r}, {name!r}); their text embeddings would be identical: give them "
                               "different names")
    return names


def _json_names(f: Path) -> List[tuple]:
    try:  # pairs, not a dict: a label given twice must not silently keep its last name
        table = json.loads(f.read_text(encoding="utf-8-sig"), object_pairs_hook=lambda pairs: pairs)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"class-names file {f} is not valid JSON (line {exc.lineno}: {exc.msg}); fix it") from None
    if not isinstance(table, list) or not all(isinstance(p, tuple) and isinstance(p[1], str) for p in table):
        raise DatasetError(f"class-names file {f} must hold one JSON object {{label: name}} with string names")
    return table


def _csv_names(f: Path) -> List[tuple]:
    rows = csv_rows(f, ("label", "name"), "class-names file", " (or use a .json file {label: name})")
    return [(row["label"], row["name"]) for _, row in rows]


def label_order(labels: Iterable[str]) -> List[str]:
    """Labels in the order of their indices: by number when every label is a whole number (ids 0..C-1
    keep their values; 1..C become 0..C-1), else as text (WordNet ids: ImageNet's class order)."""
    labels = sorted(set(labels))
    if all(re.fullmatch(r"[+-]?\d+", c) for c in labels):
        by_number = sorted(labels, key=int)
        same = next(((a, b) for a, b in zip(by_number, by_number[1:]) if int(a) == int(b)), None)
        if same:  # two classes of one id: every later id's index moved up by one
            raise DatasetError(f"labels {same[0]!r} and {same[1]!r} are the same number; give each class one id (a "
                               "spreadsheet may have added or dropped a leading zero)")
        return by_number
    return labels


def named_classes(dataset: ImageDataset, path: str) -> ImageDataset:
    """``dataset`` with each label replaced by its name from the class-names file at ``path``; the
    classes keep the order of their labels (``label_order``), whatever the order of the file."""
    names = read_class_names(path)
    labels = label_order(s.class_name for s in dataset.samples)
    missing = [c for c in labels if c not in names]
    if missing:
        add = f'"{missing[0]}": "<name>"' if Path(path).suffix.lower() == ".json" else f"a line {missing[0]},<name>"
        raise DatasetError(f"class-names file {path} has no name for label {missing[0]!r} ({len(missing)} of the "
                           f"dataset's {len(labels)} labels unnamed); add {add}")
    samples = [dataclasses.replace(s, class_name=names[s.class_name]) for s in dataset.samples]
    return ImageDataset(dataset.name, dataset.root, samples, loader=dataset._loader,
                        extra_fingerprint=dataset._extra, class_order=[names[c] for c in labels],
                        class_ids={names[c]: c for c in labels}, hidden_images=dataset.hidden_images)
