"""Synthesis as an extraction: ``synthesize(cfg)`` writes an ordinary store from class names alone.

The "dataset" is a list of class names, ``per_class`` rows each (class-major, classes sorted as
every store sorts them); row j of a class is synthesised towards style j mod K, and its domain says
which style (``contrastive-03``). The reader (``SynthesisReader``) synthesises each batch's canvases
and hands them to ``embedcache.extract.extract``, which draws and embeds the views, writes the row
blocks, the class text embeddings and the manifest exactly as for real images. Row i depends on
(seed, i) alone and batches never straddle a row block, so a killed synthesis resumes block-wise
and ends with the same arrays. Every setting that changes the images is in the manifest's
``synthesis`` section, which is part of the cache key; batch size and block size are not.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .. import interrupt
from ..config import DatasetConfig, ExtractConfig, build_config, to_dict
from ..datasets import ImageDataset, Sample
from ..errors import ConfigError, StoreDamagedError, StoreError
from ..extract import Batch, ExtractResult, ViewPolicy, extract, policy_of, require_out
from ..extract.resume import made_so
from ..extract.manifest import build_manifest
from ..store import Store, backend_name_for
from ..teachers import TEACHERS, Teacher, build_teacher, check_new
from ..text import build_prompts
from ..views import to_uint8
from .config import ImageConfig, PromptsConfig, SynthesizeConfig
from .generators import build_generator
from .image import DETAILS as IMAGE_DETAILS, optimise
from .prompts import StylePlan, build_plan, has_style_vectors, leaked_words, prompt_vocabulary, style_lines

SYNTHESIS_VERSION = 1  # bump when the same settings would make other images


def require_gradients(teacher_or_name: Any) -> None:
    """One line refusing a teacher without gradients (a black box), before it is loaded when given a name."""
    cls = TEACHERS.get(teacher_or_name) if isinstance(teacher_or_name, str) else teacher_or_name
    if not getattr(cls, "differentiable", False):
        name = getattr(cls, "registry_name", "") or str(teacher_or_name)
        reason = getattr(cls, "no_gradients_reason", "it gives no gradients")
        raise ConfigError(f"teacher {name!r} cannot synthesise images: {reason}, and synthesis optimises images "
                          "through the teacher's image encoder; use a local teacher (open_clip or conse)")


def style_of(per_class: int, k: int, row: int) -> int:
    return (row % per_class) % k


@dataclass(frozen=True)
class Outline:
    """What the cache key needs of a style plan: its method, one line per style, and the evaluation
    domains its prompts name. The built-in methods' are known from the settings alone
    (``of_settings``), so a complete store is found without learning its styles again."""
    method: str
    describe: Tuple[str, ...]
    leaks: Tuple[str, ...]
    vectors: bool  # whether the plan has style vectors (kept as ``synthesis_styles``)

    @property
    def k(self) -> int:
        return len(self.describe)

    @classmethod
    def of_plan(cls, plan: StylePlan) -> "Outline":
        return cls(plan.method, tuple(plan.describe), tuple(plan.info.get("leaks_test_domains", [])),
                   plan.styles is not None)

    @classmethod
    def of_settings(cls, cfg: PromptsConfig) -> Optional["Outline"]:
        lines = style_lines(cfg)
        if lines is None:
            return None
        return cls(cfg.method, tuple(lines), tuple(leaked_words(prompt_vocabulary(cfg), cfg.test_domains)),
                   has_style_vectors(cfg))


def class_dataset(cfg: SynthesizeConfig, outline: Outline, section: Dict[str, Any]) -> ImageDataset:
    """One sample per synthesised image: path '<method>/<class>/<j>.png' (no file), its class, and its
    style as the domain."""
    classes = sorted(c.strip() for c in cfg.classes)
    width = max(2, len(str(outline.k - 1)))
    method = outline.method
    samples = [Sample(f"{method}/{c}/{j:05d}.png", c, f"{method}-{j % outline.k:0{width}d}", "train", 0)
               for c in classes for j in range(cfg.per_class)]

    def no_file(i: int):
        raise ConfigError("a synthesised store has no source images; its pixels are in the store (image/pixels)")

    return ImageDataset("synthesis", None, samples, loader=no_file, extra_fingerprint={"synthesis": section})


def key_settings(cfg: SynthesizeConfig, outline: Outline, generator, cut_size: int) -> Dict[str, Any]:
    """The manifest's ``synthesis`` section: every setting that changes the images (in the cache key).
    Settings only, never computed numbers: learned styles and their statistics differ in their last
    bits with the thread count, as teacher embeddings do, and must not make a resumed run's store
    "made from other inputs". They are recorded beside it (``plan_record``), outside the key."""
    im = cfg.image
    return {
        "version": SYNTHESIS_VERSION,
        "classes": sorted(c.strip() for c in cfg.classes),
        "per_class": cfg.per_class,
        "assignment": "rows class-major; image j of a class -> style j mod k",
        "prompts": {**to_dict(cfg.prompts), "k": outline.k, "method": outline.method,
                    "words": list(cfg.prompts.words) if cfg.prompts.words else None},
        "styles": list(outline.describe),
        "leaks_test_domains": list(outline.leaks),
        "image": {"generator": generator.identity(), "synthesis_size": cfg.canvas.size,
                  "iterations": im.iterations, "lr": im.lr, "optimizer": "adam", "seed": im.seed,
                  "loss": "squared spherical distance, mean over cutouts, summed over images",
                  "augment": {"cutouts": im.cutouts, "cut_size": cut_size, "cut_scale": list(im.cut_scale),
                              "cut_ratio": list(im.cut_ratio), "flip": im.flip, "rotate_deg": im.rotate,
                              "translate": im.translate, "noise": im.noise, "padding": "reflection",
                              "resample": "bilinear"}},
    }


class SynthesisReader:
    """An extraction reader: for each batch of rows, synthesise the canvases ((B, S, S, 3) uint8)
    and draw the view parameters with the store's view policy, as ``LoaderReader`` does for files."""

    def __init__(self, teacher: Teacher, plan: Callable[[], StylePlan], labels: np.ndarray, cfg: SynthesizeConfig,
                 policy: ViewPolicy, generator, cut_size: int,
                 on_batch: Optional[Callable[[np.ndarray, Any], None]] = None):
        self.teacher, self.plan, self.labels, self.cfg, self.policy = teacher, plan, labels, cfg, policy
        self.generator, self.cut_size, self.on_batch = generator, cut_size, on_batch

    def batches(self, batches: List[List[int]]) -> Iterator[Batch]:
        for rows in batches:
            plan = self.plan()  # learned on first use: a complete store never asks for it
            rows = np.asarray(rows, dtype=np.int64)
            styles = np.array([style_of(self.cfg.per_class, plan.k, int(r)) for r in rows])
            targets = plan.targets[torch.from_numpy(styles), torch.from_numpy(self.labels[rows])]
            out = optimise(self.teacher, self.generator, targets, rows.tolist(), self.cfg.image, self.cut_size,
                           should_stop=interrupt.requested, progress=self.cfg.progress)
            if self.on_batch is not None:
                self.on_batch(rows, out)
            canvas = to_uint8(out.images.clamp(0, 1)).permute(0, 2, 3, 1).contiguous().cpu()
            require_pictures(canvas, rows, self.cfg.image)
            params = torch.from_numpy(np.stack([self.policy.params(int(i)) for i in rows]))
            yield Batch(rows=rows, canvas=canvas, params=params, errors=[""] * len(rows))


FLAT_STD = 2.0  # an image's pixel spread (of 255) below which it is said to be no picture
SATURATED = (0.95, 0.99)  # shares of pure black or white pixels in a batch: said from the first, refused from the second


def require_pictures(canvas: torch.Tensor, rows: np.ndarray, image: ImageConfig) -> None:
    """Refuse images of one value everywhere or of black and white alone, and say images of little else or
    nearly flat grey: the image settings out of the range that makes pictures (image.decay=1e12 gave all-black
    images, image.lr=1e12 and 1e30 saturated noise, each stored as a complete store with exit 0: trials)."""
    flat = canvas.reshape(len(canvas), -1)
    blank = np.flatnonzero((flat.amax(1) == flat.amin(1)).numpy())
    extreme = float(((flat == 0) | (flat == 255)).float().mean())
    grey = int((flat.float().std(1) < FLAT_STD).sum())  # near the generator's starting grey (a trial: 125-130)
    if not len(blank) and extreme < SATURATED[0] and not grey:
        return
    defaults = ImageConfig()
    moved = [f"image.{k}={getattr(image, k)}" for k in ("lr", "decay", "init_std", "noise", "iterations")
             if getattr(image, k) != getattr(defaults, k)] or [f"image.lr={image.lr}", f"image.decay={image.decay}"]
    fix = f"the image settings ({', '.join(moved)}) make no picture; bring them back towards their defaults"
    if len(blank):
        raise ConfigError(f"synthesised image(s) of one value everywhere (row {int(rows[blank[0]])} and "
                          f"{len(blank) - 1} more of this batch): {fix}")
    if extreme >= SATURATED[1]:
        raise ConfigError(f"synthesised images of rows {int(rows[0])}-{int(rows[-1])} are {extreme:.1%} pure black or "
                          f"white pixels: {fix}")
    if grey:
        warnings.warn(f"{grey} of the synthesised images of rows {int(rows[0])}-{int(rows[-1])} are nearly flat grey "
                      f"(pixel standard deviation under {FLAT_STD:g} of 255): {fix}", stacklevel=2)
    if extreme >= SATURATED[0]:
        warnings.warn(f"synthesised images of rows {int(rows[0])}-{int(rows[-1])} are {extreme:.0%} pure black or "
                      f"white pixels: {fix}", stacklevel=2)


def extract_config(cfg: SynthesizeConfig) -> ExtractConfig:
    """The extraction settings of a synthesis (its dataset section is unused: the rows are class names)."""
    return ExtractConfig(dataset=DatasetConfig(), teacher=cfg.teacher, views=cfg.views, canvas=cfg.canvas,
                         text=cfg.text, out=cfg.out, backend=cfg.backend, batch_size=cfg.batch_size,
                         num_workers=0, block_rows=cfg.block_rows, progress=cfg.progress)


class Prepared:
    """Everything a synthesis needs before it writes: the manifest's ``synthesis`` section, the
    class-name dataset, the extraction config, the reader, and the style plan (``plan``, learned
    once, when first asked for)."""

    def __init__(self, cfg: SynthesizeConfig, teacher: Teacher, outline: Outline, generator, cut_size: int,
                 log: Callable[[str], None], on_batch=None, plan: Optional[StylePlan] = None):
        self.cfg, self.teacher, self.outline, self.log, self._plan = cfg, teacher, outline, log, plan
        self._manifest: Optional[Dict[str, Any]] = None  # the one extraction will build (its key)
        self.section = key_settings(cfg, outline, generator, cut_size)
        self.dataset = class_dataset(cfg, outline, self.section)
        self.ecfg = extract_config(cfg)
        labels = np.array([self.dataset.label(i) for i in range(len(self.dataset))], dtype=np.int64)
        self.reader = SynthesisReader(teacher, lambda: self.plan, labels, cfg, policy_of(self.ecfg), generator,
                                      cut_size, on_batch)

    @property
    def plan(self) -> StylePlan:
        """The plan an unfinished store of these settings began with (kept in it), else learned."""
        if self._plan is None:
            self._plan = self._kept() or self.learn()
        return self._plan

    def learn(self) -> StylePlan:
        plan = build_plan(self.teacher, sorted(c.strip() for c in self.cfg.classes), self.cfg.prompts, self.log)
        say_drowned_classes(plan, self.cfg.per_class)
        if Outline.of_plan(plan) != self.outline:  # the key was made from the outline
            raise RuntimeError(f"bug: the {plan.method!r} plan's styles differ from those its settings "
                               "announced (prompts.style_lines)")
        self._plan = plan
        return plan

    def _kept(self) -> Optional[StylePlan]:
        backend = backend_name_for(self.cfg.out, self.cfg.backend)
        if not Store.exists(self.cfg.out, backend):
            return None
        try:
            with Store(self.cfg.out, "r", backend) as st:
                return kept_plan(st) if st.key == self.key() else None
        except StoreError:  # damaged or another store: extraction says what is wrong with it
            return None

    def pin(self, store: Store) -> None:
        """``extract``'s ``on_open``: the plan the store began with, kept in it, is the one its blocks are
        made with (learned again, its last bits follow the thread count); a new store keeps this one."""
        kept = kept_plan(store)
        if kept is None:  # arrays a store made before kept (with no record of its plan) are not overwritten
            keep_plan(store, self._plan or self.learn(), missing_only=True)  # (``plan`` would open the store again)
            return
        if self._plan is not None and self._plan.digest() != kept.digest():
            self.log("note: the styles learned now differ from those the store began with (another thread count "
                     "or device); its images are made with the store's")
        self._plan = kept

    def key(self) -> str:
        """The cache key the store will have (without writing anything; built once: a prepare asks
        whether the store is made, then for the plan it keeps)."""
        return self.manifest()["key"]

    def manifest(self) -> Dict[str, Any]:
        if self._manifest is None:
            prompts = build_prompts(self.dataset.classes, self.ecfg.text)
            self._manifest = build_manifest(self.ecfg, self.dataset, self.teacher, prompts,
                                            extra={"synthesis": self.section})
        return self._manifest

    def already_made(self) -> bool:
        """Whether the store is there and complete (extraction still verifies it); a store of other
        inputs there is refused now, as extraction refuses it (naming what differs), before the styles
        are learned (minutes, for nothing)."""
        backend = backend_name_for(self.cfg.out, self.cfg.backend)
        if not Store.exists(self.cfg.out, backend):
            return False
        try:
            st = Store(self.cfg.out, "r", backend)
        except StoreError:  # damaged: extraction says what is wrong with it
            return False
        with st:
            return bool(made_so(st, self.manifest()).complete)


def say_drowned_classes(plan: StylePlan, per_class: int) -> None:
    """A warning when some (style, class) targets that make images (image j of a class takes style j mod
    k: the first ``per_class`` styles) are nearer another class's plain prompt than their own: the images
    made for them are pulled towards that class, under their own label (recorded in the manifest's
    ``synthesis_plan``, where no one would look)."""
    per_style = plan.info.get("drowned_per_style")
    if per_style is None:
        return
    used, classes = min(len(per_style), per_class), int(plan.targets.shape[1])
    off, total = sum(per_style[:used]), used * classes
    if not off:
        return
    fidelity = 1.0 - off / total
    some = f" (the {used} of its {len(per_style)} styles that make images at per_class={per_class})" if used < len(
        per_style) else ""
    warnings.warn(f"{off} of {total} (style, class) targets of the {plan.method!r} styles{some} are nearer another "
                  f"class's plain prompt than their own (class fidelity {fidelity:.2f}): their images are pulled towards "
                  "another class under their own label; diversify the styles less (the prompts settings), or check "
                  "the teacher (a random one drowns every class)")


def _refuse_out_of_another_kind(out: str, backend: Optional[str]) -> None:
    """An --out that can never hold this synthesis, refused before the teacher loads: a store of real images
    (a file or a folder of other files: ``require_out``; any other mismatch needs the teacher's key)."""
    name = backend_name_for(out, backend)
    if Store.exists(out, name):
        try:
            with Store(out, "r", name) as st:
                made_by = st.producer
        except StoreDamagedError:  # damaged: the store's own command re-does it, once its key is known
            return
        if made_by != "synthesize":
            raise ConfigError(f"--out {out} is a store of real images made by `embedcache {made_by}`, not a synthesised "
                              "one; give another --out")
        return


def prepare(cfg: SynthesizeConfig, teacher: Optional[Teacher] = None, log: Callable[[str], None] = print,
            on_batch: Optional[Callable[[np.ndarray, Any], None]] = None,
            on_loaded: Callable[[], None] = lambda: None) -> Prepared:
    """Check the config and the teacher, plan the styles (learning them for ``contrastive``) and build
    the parts; a teacher without gradients is refused before it is loaded. ``on_loaded()``: the teacher
    is there (loaded, or given)."""
    cfg = build_config(SynthesizeConfig, to_dict(cfg))  # every rule, nested ones too, for configs built in code
    if not cfg.out:
        raise ConfigError("no output store given; pass --out PATH (e.g. stores/pacs-contrastive.zarr)")
    backend = backend_name_for(cfg.out, cfg.backend, new=True)  # a path the store cannot have: before styles are learned
    _refuse_out_of_another_kind(cfg.out, cfg.backend)
    require_out(cfg.out, backend)  # before the teacher loads and the styles are learned
    build_prompts(sorted(c.strip() for c in cfg.classes), cfg.text)  # text settings that cannot make them: now
    require_gradients(teacher if teacher is not None else cfg.teacher.name)
    if teacher is None and not Store.exists(cfg.out, backend):
        check_new(cfg.teacher)  # a store made before a rule on teacher settings came resumes as it was made
    teacher = teacher or build_teacher(cfg.teacher)
    on_loaded()
    require_gradients(teacher)
    own = type(teacher)
    if has_style_vectors(cfg.prompts) and (own.encode_text_styled is Teacher.encode_text_styled or (
            own.token_table is Teacher.token_table and own._token_embedding is Teacher._token_embedding)):
        raise ConfigError(teacher._no_styles())  # before anything is learned (it was a NotImplementedError: a trial)
    cut_size = cfg.image.cut_size or teacher.input_size
    generator = build_generator(cfg.image, cfg.canvas.size, teacher.device)
    outline, plan = Outline.of_settings(cfg.prompts), None
    if outline is None:  # a method registered elsewhere: its styles are known once its plan is built
        plan = build_plan(teacher, sorted(c.strip() for c in cfg.classes), cfg.prompts, log)
        outline = Outline.of_plan(plan)
    if cfg.per_class < outline.k:  # image j of a class takes style j mod k: the later styles make no image
        log(f"note: per_class={cfg.per_class} uses {cfg.per_class} of the {outline.k} styles (image j of a class "
            f"takes style j mod k); per_class={outline.k} or more uses them all, or lower prompts.k")
    if outline.leaks:
        log(f"note: the prompts name evaluation domains ({', '.join(outline.leaks)}); "
            "the manifest records it (synthesis.leaks_test_domains)")
    prepared = Prepared(cfg, teacher, outline, generator, cut_size, log, on_batch, plan)
    if not prepared.already_made():
        prepared.plan  # the styles are learned now, before the store is opened
    return prepared


def synthesize(cfg: SynthesizeConfig, teacher: Optional[Teacher] = None,
               on_block_done: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = print,
               on_batch: Optional[Callable[[np.ndarray, Any], None]] = None,
               on_stage: Optional[Callable[[str], None]] = None) -> ExtractResult:
    """Write (resume, repair or skip) the store of synthesised images ``cfg`` describes.
    ``on_batch(rows, Synthesised)`` sees each batch's images and losses (tests, benchmarks);
    ``on_stage`` is told "teacher" as the config is checked and the teacher loaded (nothing is held yet),
    "styles" as the styles are planned, then "images"."""
    stage = on_stage or (lambda _name: None)
    stage("teacher")
    p = prepare(cfg, teacher, log, on_batch, on_loaded=lambda: stage("styles"))
    stage("images")
    res = extract(p.ecfg, teacher=p.teacher, reader=p.reader, dataset=p.dataset,
                  manifest_extra={"synthesis": p.section}, on_block_done=on_block_done, log=log, on_open=p.pin)
    if res.complete:
        _keep_styles(res.path, cfg.backend, p.outline, lambda: p._plan or p.learn(), log)
    return res


def plan_record(plan: StylePlan) -> Dict[str, Any]:
    """What the style plan computed (statistics, a digest of the style vectors): the manifest's
    ``synthesis_plan``, recorded but not in the cache key."""
    return {**plan.info, "styles_digest": plan.digest(), "styles": plan.describe, "image_details": IMAGE_DETAILS}


def keep_plan(st: Store, plan: StylePlan, missing_only: bool = False) -> None:
    """The plan as derived arrays, for analysts and for the calls that resume the store: the style
    vectors (K, W), then the targets (K, C, D) with the plan's method, lines and statistics (last: a
    store with complete targets has the whole plan). ``missing_only``: those the store lacks."""
    have = st.derived() if missing_only else {}
    if plan.styles is not None and not have.get("synthesis_styles", {}).get("complete"):
        st.put_derived("synthesis_styles", plan.styles.detach().cpu().numpy().astype(np.float32),
                       {"what": "style pseudo-word token embeddings"})
    if have.get("synthesis_targets", {}).get("complete"):
        return
    st.put_derived("synthesis_targets", plan.targets.detach().cpu().numpy().astype(np.float32),
                   {"what": "text embedding each (style, class) image was pulled towards", "method": plan.method,
                    "describe": list(plan.describe), "info": plan.info, "styles": plan.styles is not None})


def kept_plan(st: Store) -> Optional[StylePlan]:
    """The plan kept in ``st`` (``keep_plan``), or of a store made before the plan's lines were kept
    with its targets, the plan its arrays and manifest record hold (checked against the record's
    digest); None when there is none, or an array of it is damaged or marked to be redone."""
    info = st.derived().get("synthesis_targets") or {}
    if not info.get("complete"):
        return None
    has_styles = info["styles"] if "styles" in info else bool(st.derived().get("synthesis_styles", {}).get("complete"))
    try:
        targets = torch.from_numpy(st.read_derived("synthesis_targets"))
        styles = torch.from_numpy(st.read_derived("synthesis_styles")) if has_styles else None
    except StoreError:
        return None
    if "describe" in info:
        return StylePlan(info["method"], targets, styles, list(info["describe"]), dict(info["info"]))
    record = st.manifest.get("synthesis_plan")
    if not record:
        return None
    plan = StylePlan(st.manifest["synthesis"]["prompts"]["method"], targets, styles, list(record["styles"]),
                     {k: v for k, v in record.items() if k not in ("styles", "styles_digest", "image_details")})
    return plan if plan.digest() == record.get("styles_digest") else None


def _keep_styles(path: str, backend: Optional[str], outline: Outline, plan: Callable[[], StylePlan],
                 log: Callable[[str], None] = print) -> None:
    """The plan's derived arrays (``keep_plan``) and its record in the manifest (last: a store with the
    record has its arrays), where missing. The plan is the one kept in the store, or asked for
    (learned again) when none is."""
    with Store(path, "a", backend) as st:
        have = st.derived()
        wanted = ["synthesis_targets"] + (["synthesis_styles"] if outline.vectors else [])
        if "synthesis_plan" in st.manifest and all(have.get(n, {}).get("complete") for n in wanted):
            return
        made = kept_plan(st)
        if made is None:  # learned again: what the store has of its own plan stays
            made = plan()
            keep_plan(st, made, missing_only=True)
            redone = [n for n in wanted if not have.get(n, {}).get("complete")]
            if redone:
                log(f"{path}: {' and '.join(redone)} made again (the styles planned again; a store's images keep theirs)")
        if "synthesis_plan" not in st.manifest:
            st.write_manifest({**st.manifest, "synthesis_plan": plan_record(made)})
