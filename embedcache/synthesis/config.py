"""The synthesis stage's frozen, validated config (``embedcache synthesize --config NAME``).

Everything that changes the synthesised images goes into the store's cache key (the manifest's
``synthesis`` section, see ``run.key_settings``); batch size, block size, output path and progress do not.
"""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from typing import Optional, Tuple

from ..config import (CanvasConfig, TeacherConfig, TextConfig, ViewsConfig, away_from_defaults, lazy_registry,
                      only_read, seed_setting, set_but_unread, setting)
from ..errors import ConfigError
from ..text import id_names, prompt_clash

# Domain names of the usual domain-generalisation benchmarks (PACS, DomainNet, OfficeHome): a style
# word naming one of them describes a test domain, so a store made with it says so in its manifest.
# The default is part of every default synthesised store's cache key (prompts.test_domains): adding a
# domain here refuses those stores on resume, so it waits for a key that leaves it out.
DEFAULT_TEST_DOMAINS = ("art_painting", "cartoon", "photo", "sketch", "clipart", "infograph", "quickdraw",
                        "painting", "product")


def _registry(module: str, name: str):
    return lazy_registry(f"embedcache.synthesis.{module}", name)


def _fills(key: str, given: str, text: str) -> None:
    """A prompt template whose braces a class name cannot fill ('{style}', '{0} {1}') is refused now, not
    with a KeyError once the teacher has loaded."""
    try:
        text.format("dog")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"prompts.{key}={given!r} cannot be filled with a class name ({type(exc).__name__}: {exc}); "
                          "give one {} for the name and no other braces") from None


def _no_braces(key: str, text: str) -> None:
    """A word set into a template (the placeholder, a style word) cannot hold braces: the template's
    class slot {} would take them."""
    if "{" in text or "}" in text:
        raise ConfigError(f"prompts.{key}={text!r} holds a brace, which the template's class slot {{}} would take; "
                          "give it without braces")


# Style descriptors for Mix-Prompt: materials, crafts, techniques, colour schemes and moods. No word
# names or paraphrases a domain of PACS, DomainNet or OfficeHome (no sketch, drawing, cartoon, comic,
# painting, watercolour, photo, clipart...); tests check it against config.DEFAULT_TEST_DOMAINS.
STYLE_WORDS = (
    "mosaic", "origami", "embroidery", "stained glass", "graffiti", "neon", "pixelated", "woodcut",
    "engraving", "tapestry", "ceramic", "marble", "bronze", "clay", "plush", "knitted", "lego", "papercraft",
    "low poly", "blueprint", "x-ray", "thermal", "infrared", "silhouette", "sepia", "monochrome", "pastel",
    "psychedelic", "vaporwave", "steampunk", "cyberpunk", "gothic", "baroque", "minimalist", "abstract",
    "surreal", "vintage", "retro", "glitch", "holographic", "chrome", "crystal", "ice", "sand", "wooden",
    "golden", "candy", "tattoo",
)


@dataclass(frozen=True)
class PromptsConfig:
    """How prompts are diversified (``prompts.py``). Every method but ``plain`` puts a style
    pseudo-word ``placeholder`` into ``template``; its token embedding is a style vector."""
    method: str = setting("contrastive", choices=_registry("prompts", "PROMPTS"))
    k: int = setting(16, min=1)                    # styles (plain: 1); image j of a class gets style j mod k
    template: str = "a * style of a {}"            # '*' is the style pseudo-word, {} the class name
    placeholder: str = "*"
    plain_template: str = "a photo of a {}"        # the `plain` method's prompt
    words: Optional[Tuple[str, ...]] = None        # mix: style words (None: prompts.STYLE_WORDS, no domain names)
    mix_words: int = setting(2, min=1)             # mix: words per mixture, weights ~ Dirichlet(1)
    mix_level: str = setting("token", choices=("token", "sentence"))  # mix token embeddings, or sentence embeddings
    random_sigma: Optional[float] = setting(None, gt=0.0)  # random: N(0, sigma^2 I); None: the token table's std
    steps: int = setting(200, min=0)               # contrastive: Adam steps of the style vectors
    lr: float = setting(0.01, gt=0.0)
    tau: float = setting(0.07, gt=0.0)
    content_weight: float = setting(1.0, min=0.0)  # weight of the term keeping each styled prompt its class
    content_template: str = "{}"                   # contrastive: the class prompt the content term aims at
    init_std: float = setting(0.02, gt=0.0)        # contrastive: styles start ~ N(0, init_std^2 I) (PromptStyler)
    test_domains: Tuple[str, ...] = DEFAULT_TEST_DOMAINS  # words naming these are flagged as leaks
    seed: int = seed_setting()

    def check(self) -> None:
        self._check_read()
        _no_braces("placeholder", self.placeholder)
        if self.template.count(self.placeholder) != 1 or self.template.count("{}") != 1:
            raise ConfigError(f"prompts.template={self.template!r} needs the placeholder {self.placeholder!r} once "
                              "and one {} for the class name, e.g. 'a * style of a {}'")
        for key in ("plain_template", "content_template"):
            if getattr(self, key).count("{}") != 1:
                raise ConfigError(f"prompts.{key}={getattr(self, key)!r} needs one {{}} for the class name")
        for key, text in (("template", self.template.replace(self.placeholder, "x")),
                          ("plain_template", self.plain_template), ("content_template", self.content_template)):
            _fills(key, getattr(self, key), text)
        self._check_words()

    def _check_read(self) -> None:
        """A setting the method does not read is refused (pacs-plain's k: 8 made one style; mix ignored
        steps), as the dataset's and the teacher's are."""
        reads = PROMPT_READS.get(self.method)
        if reads is None:  # a method registered elsewhere
            return
        for name in set_but_unread(self, PromptsConfig(method=self.method), ("method", "test_domains") + reads):
            raise ConfigError(f"prompts.{name}={getattr(self, name)} is not read by prompts.method={self.method}; "
                              f"remove it (that method reads {', '.join(reads)})")

    def _check_words(self) -> None:
        if self.words is not None and not self.words:
            raise ConfigError("prompts.words is empty; give style words, or leave it unset for the default list")
        for i, w in enumerate(self.words or ()):
            _no_braces(f"words[{i}]", w)
            if list(self.words).count(w) > 1:
                raise ConfigError(f"prompts.words lists {w!r} twice; give each style word once")
        if self.method != "mix":
            return
        if self.words is None:
            if self.mix_words > len(STYLE_WORDS):  # a mixture of every word: the setting is not what made it
                raise ConfigError(f"prompts.mix_words={self.mix_words} is more than the {len(STYLE_WORDS)} default style "
                                  f"words; set mix_words to at most {len(STYLE_WORDS)}, or give prompts.words")
            return
        if len(self.words) == 1:
            raise ConfigError(f"prompts.words holds one word: every mix style would be {self.words[0]!r} alone, the "
                              f"{self.k} styles one; give two or more words (or prompts.method=plain)")
        if self.mix_words > len(self.words):
            raise ConfigError(f"prompts.mix_words={self.mix_words} is more than the {len(self.words)} prompts.words; "
                              f"set mix_words to at most {len(self.words)}, or give more words")


# what each built-in prompt method reads besides method and test_domains (the rest is refused when set)
_STYLED = ("k", "template", "placeholder", "seed")
PROMPT_READS = {"plain": ("plain_template",),
                "mix": _STYLED + ("words", "mix_words", "mix_level"),
                "random": _STYLED + ("random_sigma",),
                "contrastive": _STYLED + ("steps", "lr", "tau", "content_weight", "content_template", "init_std")}


def prompts_without_unread(prompts: dict) -> dict:
    """A prompts section less the settings its method does not read."""
    reads = PROMPT_READS.get(prompts.get("method", PromptsConfig.method))
    return only_read(prompts, None if reads is None else ("method", "test_domains") + reads)


FOURIER_ONLY = ("decay", "decorrelate", "init_std")  # the settings of the Fourier generator's own parametrisation


@dataclass(frozen=True)
class ImageConfig:
    """How each image is made and optimised (``image.py``, ``generators.py``)."""
    generator: str = setting("fourier", choices=_registry("generators", "GENERATORS"))
    decay: float = setting(1.0, min=0.0)           # fourier: spectrum scaled by 1 / frequency^decay
    decorrelate: bool = True                       # fourier: colour-decorrelated channels
    init_std: float = setting(0.01, min=0.0)       # fourier: initial spectrum ~ N(0, init_std^2)
    iterations: int = setting(200, min=1)          # (0 stored the generator's starting grey: a fuzz)
    lr: float = setting(0.05, gt=0.0)              # Adam on the generator's parameters
    cutouts: int = setting(8, min=1, max=1024)     # augmented views per image per iteration
    cut_size: Optional[int] = setting(None, min=16, max=5656)  # side the teacher sees them at (None: its input
    # size); at most canvas.size's limit
    cut_scale: Tuple[float, float] = setting((0.5, 1.0), gt=0.0, max=1.0)  # crop area fraction
    cut_ratio: Tuple[float, float] = setting((3 / 4, 4 / 3), gt=0.0)
    flip: bool = True
    rotate: float = setting(10.0, min=0.0, max=180.0)  # degrees, uniform in +-rotate
    translate: float = setting(0.05, min=0.0, max=0.5)  # fraction of the side, uniform in +-translate
    noise: float = setting(0.05, min=0.0)          # Gaussian pixel noise, std ~ U(0, noise) per cutout
    model: Optional[str] = None                    # diffusers_vae: a local diffusers folder (or its vae/ subfolder)
    seed: int = seed_setting()

    def check(self) -> None:
        if self.model is not None and self.generator != "diffusers_vae":
            raise ConfigError(f"image.model is read by image.generator=diffusers_vae only; the {self.generator} "
                              "generator has no use for it: leave it out, or set image.generator=diffusers_vae")
        if self.generator == "diffusers_vae":  # (a generator registered elsewhere may read them)
            for name in away_from_defaults(self, ImageConfig(), FOURIER_ONLY):
                raise ConfigError(f"image.{name}={json.dumps(getattr(self, name))} is read by image.generator=fourier "
                                  f"only; the {self.generator} generator has no use for it: leave it out")
        for name, (lo, hi) in (("cut_scale", self.cut_scale), ("cut_ratio", self.cut_ratio)):
            if lo > hi:
                raise ConfigError(f"image.{name}={[lo, hi]} is not valid: the first value must not exceed the second")


@dataclass(frozen=True)
class SynthesizeConfig:
    classes: Tuple[str, ...] = ()                  # the class names: the only "data"
    per_class: int = setting(16, min=1)            # images per class (balanced)
    prompts: PromptsConfig = setting(factory=PromptsConfig)
    image: ImageConfig = setting(factory=ImageConfig)
    teacher: TeacherConfig = setting(factory=TeacherConfig)
    views: ViewsConfig = setting(factory=ViewsConfig)
    canvas: CanvasConfig = setting(factory=lambda: CanvasConfig(size=96))  # images are synthesised at this side
    text: TextConfig = setting(factory=TextConfig)
    out: Optional[str] = None
    backend: Optional[str] = setting(None, choices=("zarr", "hdf5"))
    # settings below never change the data, so they stay out of the cache key
    batch_size: int = setting(8, min=1)            # images optimised together (each on its own)
    block_rows: int = setting(64, min=1)           # rows written and marked done together (resume granularity)
    progress: bool = True

    def _made(self) -> bool:
        from ..store import Store

        try:
            return bool(self.out) and Store.exists(self.out, self.backend)
        except ConfigError:  # an --out of no store format: said where the store is made
            return False

    def check(self) -> None:
        names = [c.strip() for c in self.classes]
        if not names:
            raise ConfigError("classes is empty; give the class names to synthesise, e.g. --set classes=[dog,horse]")
        if any(not c for c in names):
            raise ConfigError("classes holds an empty name; every class needs a name")
        if len(names) == 1 and not self._made():  # a store made before one class was refused still resumes
            raise ConfigError(f"classes={names} is one class: every nearest-label score over its store would be 100% "
                              "by construction; give at least two classes")
        seen = set()
        for c in names:
            if c in seen:
                raise ConfigError(f"classes lists {c!r} twice; each class once (images per class: per_class)")
            control = [ch for ch in c if unicodedata.category(ch) in ("Cc", "Zl", "Zp")]  # a tab went into every
            if control:                                                                 # prompt as typed (a trial)
                raise ConfigError(f"class {c!r} holds the control character {control[0]!r} (a tab or a line break); "
                                  "give each class name in plain words")
            if self.prompts.placeholder in c:
                raise ConfigError(f"class {c!r} holds the style placeholder {self.prompts.placeholder!r} of the prompts; "
                                  "rename the class, or set prompts.placeholder (and prompts.template) to another symbol")
            seen.add(c)
        clash = prompt_clash(names)
        if clash:
            raise ConfigError(clash)
        ids = [c for c in names if id_names([c])]  # one is enough: these names are typed, not a dataset's
        if ids:
            raise ConfigError(f"class {ids[0]!r} is an id, not a name: the teacher's text encoder would embed it as it "
                              "is; give the classes by what they are (--set classes=[dog,horse,...])")
        if not self.canvas.store:
            raise ConfigError("canvas.store=false would drop the synthesised pixels, their only copy; keep canvas.store=true")
