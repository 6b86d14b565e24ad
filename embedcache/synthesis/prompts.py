"""Prompt diversification (a registry): the text embeddings that synthesised images are pulled towards.

Each method turns the class names into K styles and returns a ``StylePlan`` whose ``targets[k, c]``
is the teacher's text embedding of class c in style k. Image j of a class is synthesised towards
style j mod K (round-robin, so classes stay balanced across styles).

- ``plain``: "a photo of a {c}", one style (the baseline).
- ``mix`` (Mix-Prompt): style k mixes J words of a style list with Dirichlet(1) weights, at the
  token-embedding level (default: the pseudo-word's embedding is sum_j w_j e(word_j), a word's
  embedding being the mean of its sub-word tokens) or at the sentence level (the class embedding
  is the normalised sum_j w_j T("a {word_j} style of a {c}")).
- ``random`` (Random-Prompt): the pseudo-word's embedding is drawn from N(0, sigma^2 I), sigma the
  spread of the encoder's own token embeddings.
- ``contrastive`` (Contrastive-Prompt): K pseudo-word embeddings learned with the text encoder only:
  an InfoNCE term makes style k recognisable across two classes (anchor T(s_k, m), positive
  T(s_k, m'), negatives T(s_j, m')), taken in both directions (m to m' and m' to m, averaged: the
  pair is unordered), a cross-entropy term keeps T(s_k, m) nearest to class m's content prompt
  (the class name alone, ``content_template``), and T(s_k, m') nearest to class m''s, tau 0.07 (PAPERS.md section 3,
  which writes one direction and the anchor only: equal in expectation over the randomly drawn pair;
  PromptStyler's family).

Style words that name an evaluation domain leak the test set: ``leaked_words`` finds them, the
default word list has none, and a store made with them lists them in its manifest.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import interrupt
from ..errors import ConfigError
from ..registry import Registry
from ..text import display_name
from .config import STYLE_WORDS, PromptsConfig
from .image import SynthesisInterrupted

PROMPTS = Registry("prompt diversification method")


@dataclass
class StylePlan:
    """targets: (K, C, D) float32, L2-normalised, CPU: the embedding image (class c, style k) is
    pulled towards. styles: (K, W) float32 pseudo-word embeddings (None when the method has none).
    describe: one human-readable line per style. info: method settings and statistics (manifest)."""
    method: str
    targets: torch.Tensor
    styles: Optional[torch.Tensor]
    describe: List[str]
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.targets.shape[0])

    def digest(self) -> str:
        """sha256 of the style vectors (or, without any, of the style descriptions): in the cache key."""
        h = hashlib.sha256()
        if self.styles is not None:
            h.update(np.ascontiguousarray(self.styles.detach().cpu().numpy(), dtype=np.float32).tobytes())
        h.update("\n".join(self.describe).encode())
        return h.hexdigest()[:16]


# --- leaks --------------------------------------------------------------------------------------------
def _tokens(text: str) -> List[str]:
    return re.findall(r"[a-z]+", text.lower())


def _same_stem(a: str, b: str) -> bool:
    """'paint'/'painting', 'photo'/'photograph', 'art'/'artistic': a shared prefix of 5 letters (or
    of the whole shorter word, when it has 3 or 4)."""
    if min(len(a), len(b)) < 3:
        return False
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n >= min(len(a), len(b), 5)


def leaked_words(words: Iterable[str], test_domains: Sequence[str]) -> List[str]:
    """The words (as given) that name an evaluation domain: one of their tokens shares a stem with a
    token of a domain name ('art_painting' -> art, painting)."""
    domain_tokens = {t for d in test_domains for t in _tokens(d)}
    out = set()
    for w in words:
        if any(_same_stem(t, d) for t in _tokens(w) for d in domain_tokens):
            out.add(w)
    return sorted(out)


def template_words(template: str, placeholder: str = "*") -> List[str]:
    return [t for t in re.findall(r"[A-Za-z][A-Za-z-]*", template.replace(placeholder, " ").replace("{}", " "))]


def prompt_vocabulary(cfg: PromptsConfig) -> List[str]:
    """Every word a method writes into its prompts (templates and style words), for the leak check."""
    if cfg.method == "plain":
        return template_words(cfg.plain_template)
    words = template_words(cfg.template, cfg.placeholder)
    if cfg.method == "mix":
        words += list(cfg.words or STYLE_WORDS)
    if cfg.method == "contrastive":
        words += template_words(cfg.content_template)
    return words


# --- shared pieces ------------------------------------------------------------------------------------
def styled_targets(teacher, classes: Sequence[str], template: str, styles: torch.Tensor, placeholder: str,
                   grad: bool = False, chunk: int = 256) -> torch.Tensor:
    """(K, C, D) float32 L2-normalised: T(template with style k, class c), on the teacher's device."""
    k, c = styles.shape[0], len(classes)
    texts = [template.format(display_name(name)) for _ in range(k) for name in classes]
    vecs = styles.repeat_interleave(c, dim=0)
    with torch.set_grad_enabled(grad):
        out = torch.cat([teacher.encode_text_styled(texts[i:i + chunk], vecs[i:i + chunk], placeholder)
                         for i in range(0, len(texts), chunk)])
    return out.view(k, c, -1)


def style_spread(targets: torch.Tensor) -> float:
    """How distinguishable the styles are: 1 - mean cosine between two different styles' embeddings
    of the same class, averaged over classes (0: every style gives the same text embedding)."""
    k = targets.shape[0]
    if k < 2:
        return 0.0
    t = F.normalize(targets.float(), dim=-1).transpose(0, 1)  # (C, K, D)
    cos = t @ t.transpose(1, 2)  # (C, K, K)
    off = cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)
    return float(1.0 - (off / (k * (k - 1))).mean())


def _table_sigma(teacher) -> float:
    return float(teacher.token_table().std())


def encode_plain(teacher, texts: List[str]) -> torch.Tensor:
    """(T, D) float32 CPU text embeddings, usable in autograd (a teacher may encode in inference mode)."""
    with torch.no_grad():
        return teacher.encode_text(list(texts)).float().cpu().clone()


# --- the methods --------------------------------------------------------------------------------------
def _mixtures(cfg: PromptsConfig):
    """Mix-Prompt's styles: (words, J, the J word indices of each style, their Dirichlet(1) weights)."""
    words = list(cfg.words or STYLE_WORDS)
    j = min(cfg.mix_words, len(words))
    picks, weights = [], []
    for k in range(cfg.k):
        rng = np.random.default_rng([cfg.seed, k, 11])
        picks.append(sorted(int(i) for i in rng.choice(len(words), size=j, replace=False)))
        weights.append(rng.dirichlet(np.ones(j)))
    return words, j, picks, weights


# what a plan does beyond its settings, in its record (PAPERS.md: every design choice in the manifest)
STYLE_TOKEN = "a style vector replaces the placeholder's input token embedding before the text encoder"
WORD_VECTOR = "a style word's vector is the mean of its sub-word tokens' input embeddings"
CONTRASTIVE_LOSS = ("InfoNCE at tau both ways between the K styles' prompts of two classes m and m' (style k of m "
                    "against style k of m', the other styles of m' its negatives, and the mirror), plus content_weight "
                    "x the cross-entropy at tau of both classes' styled prompts over the content prompts "
                    "(content_template); one seeded pair of classes per step")


def has_style_vectors(cfg: PromptsConfig) -> bool:
    """Whether a built-in method's plan has style vectors (pseudo-word embeddings) to keep."""
    return cfg.method in ("random", "contrastive") or (cfg.method == "mix" and cfg.mix_level == "token")


def style_lines(cfg: PromptsConfig) -> Optional[List[str]]:
    """A plan's ``describe`` (one line per style) from the settings alone, before any style is
    learned: the built-in methods' lines depend on nothing else. None for a method registered
    elsewhere, whose plan must be built to know them."""
    if cfg.method == "plain":
        return [cfg.plain_template]
    if cfg.method == "mix":
        words, _, picks, weights = _mixtures(cfg)
        return [" + ".join(f"{w:.3f} {words[i]}" for i, w in zip(p, ws)) for p, ws in zip(picks, weights)]
    named = {"random": "random style", "contrastive": "learned style"}.get(cfg.method)
    return [f"{named} {k}" for k in range(cfg.k)] if named else None


@PROMPTS.register("plain")
def plain(teacher, classes: Sequence[str], cfg: PromptsConfig, log: Callable[[str], None] = print) -> StylePlan:
    """One style: the teacher's embedding of 'a photo of a {c}' (the baseline, no diversification)."""
    texts = [cfg.plain_template.format(display_name(c)) for c in classes]
    targets = encode_plain(teacher, texts)[None]
    return StylePlan("plain", targets, None, style_lines(cfg), {"template": cfg.plain_template, "k": 1})


@PROMPTS.register("mix")
def mix(teacher, classes: Sequence[str], cfg: PromptsConfig, log: Callable[[str], None] = print) -> StylePlan:
    """Mix-Prompt: style k is a Dirichlet(1)-weighted mixture of J style words."""
    words, j, picks, weights = _mixtures(cfg)
    describe = style_lines(cfg)
    info = {"template": cfg.template, "k": cfg.k, "words": words, "mix_words": j, "level": cfg.mix_level,
            "mixtures": describe}
    if cfg.mix_level == "token":
        info.update(style_token=STYLE_TOKEN, word_vector=WORD_VECTOR)
        emb = teacher.word_embeddings(words).float().cpu()  # (n, W)
        styles = torch.stack([torch.from_numpy(ws).float() @ emb[p] for p, ws in zip(picks, weights)])
        targets = styled_targets(teacher, classes, cfg.template, styles, cfg.placeholder).cpu()
        return StylePlan("mix", targets, styles, describe, info)
    # sentence level: mix the embeddings of whole sentences, one per word
    used = sorted({i for p in picks for i in p})
    texts = [cfg.template.replace(cfg.placeholder, words[i]).format(display_name(c)) for i in used for c in classes]
    emb = encode_plain(teacher, texts).view(len(used), len(classes), -1)
    per_word = {i: emb[n] for n, i in enumerate(used)}  # word index -> (C, D)
    targets = torch.stack([F.normalize(sum(float(w) * per_word[i] for i, w in zip(p, ws)), dim=-1)
                           for p, ws in zip(picks, weights)])
    return StylePlan("mix", targets, None, describe, info)


@PROMPTS.register("random")
def random_styles(teacher, classes: Sequence[str], cfg: PromptsConfig, log: Callable[[str], None] = print) -> StylePlan:
    """Random-Prompt: K pseudo-word embeddings drawn from N(0, sigma^2 I)."""
    sigma = cfg.random_sigma if cfg.random_sigma is not None else _table_sigma(teacher)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 23]).generate_state(1)[0]))
    width = teacher.token_table().shape[1]
    styles = torch.randn(cfg.k, width, generator=gen) * sigma
    targets = styled_targets(teacher, classes, cfg.template, styles, cfg.placeholder).cpu()
    info = {"template": cfg.template, "k": cfg.k, "sigma": sigma, "style_token": STYLE_TOKEN}
    return StylePlan("random", targets, styles, style_lines(cfg), info)


def contrastive_loss(anchor: torch.Tensor, positive: torch.Tensor, content: torch.Tensor, m: int, m2: int,
                     tau: float, content_weight: float):
    """anchor, positive: (K, D) styled embeddings of classes m and m' (row k = style k); content:
    (C, D) class content embeddings. Returns (total, style term, content term), scalars."""
    k = anchor.shape[0]
    target = torch.arange(k, device=anchor.device)
    logits = anchor @ positive.T / tau
    l_style = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    both = torch.cat([anchor, positive]) @ content.T / tau
    labels = torch.cat([torch.full((k,), m), torch.full((k,), m2)]).to(anchor.device)
    l_content = F.cross_entropy(both, labels)
    return l_style + content_weight * l_content, l_style, l_content


def all_pairs_loss(targets: torch.Tensor, content: torch.Tensor, tau: float, content_weight: float) -> float:
    """The contrastive loss averaged over every ordered pair of different classes (a fixed yardstick:
    training draws one pair per step)."""
    c = targets.shape[1]
    vals = [contrastive_loss(targets[:, m], targets[:, m2], content, m, m2, tau, content_weight)[0]
            for m in range(c) for m2 in range(c) if m != m2]
    return float(torch.stack(vals).mean()) if vals else 0.0


@PROMPTS.register("contrastive")
def contrastive(teacher, classes: Sequence[str], cfg: PromptsConfig, log: Callable[[str], None] = print) -> StylePlan:
    """Contrastive-Prompt: K style vectors learned with the text encoder only (Adam, ``steps``)."""
    if len(classes) < 2:  # SynthesizeConfig refuses one class; this is for callers of build_plan
        raise ConfigError("contrastive styles are learned across pairs of classes; give at least two classes")
    dev = teacher.device
    width = teacher.token_table().shape[1]
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 29]).generate_state(1)[0]))
    styles = (torch.randn(cfg.k, width, generator=gen) * cfg.init_std).to(dev).requires_grad_(True)
    content = encode_plain(teacher, [cfg.content_template.format(display_name(c)) for c in classes]).to(dev)
    opt = torch.optim.Adam([styles], lr=cfg.lr)
    start = styled_targets(teacher, classes, cfg.template, styles.detach(), cfg.placeholder)
    loss0 = all_pairs_loss(start, content, cfg.tau, cfg.content_weight)
    history = []
    tpl = [cfg.template.format(display_name(c)) for c in classes]
    for step in range(cfg.steps):
        if interrupt.requested():  # Ctrl-C: the styles are learned again on the rerun, from the start
            raise SynthesisInterrupted(f"interrupted while learning the styles (step {step} of {cfg.steps}; no image "
                                       "was made yet): rerun the same command")
        rng = np.random.default_rng([cfg.seed, step, 31])
        m, m2 = (int(v) for v in rng.choice(len(classes), size=2, replace=False))
        a = teacher.encode_text_styled([tpl[m]] * cfg.k, styles, cfg.placeholder)
        p = teacher.encode_text_styled([tpl[m2]] * cfg.k, styles, cfg.placeholder)
        loss, _, _ = contrastive_loss(a, p, content, m, m2, cfg.tau, cfg.content_weight)
        (grad,) = torch.autograd.grad(loss, [styles])  # the teacher's weights get no gradient
        styles.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log(f"contrastive styles: step {step + 1}/{cfg.steps}, loss {np.mean(history[-50:]):.4f}")
    final = styles.detach().float().cpu()
    targets = styled_targets(teacher, classes, cfg.template, final, cfg.placeholder).cpu()
    table_norm = float(teacher.token_table().norm(dim=1).mean())
    info = {"template": cfg.template, "content_template": cfg.content_template, "k": cfg.k, "steps": cfg.steps,
            "lr": cfg.lr, "tau": cfg.tau, "content_weight": cfg.content_weight, "init_std": cfg.init_std,
            "optimizer": "adam", "loss": CONTRASTIVE_LOSS, "style_token": STYLE_TOKEN, "loss_start": loss0,
            "loss_end": all_pairs_loss(targets, content.cpu(), cfg.tau, cfg.content_weight),
            "spread_start": style_spread(start.cpu()), "spread_end": style_spread(targets),
            "style_norm_mean": float(final.norm(dim=1).mean()), "token_norm_mean": table_norm}
    return StylePlan("contrastive", targets, final, style_lines(cfg), info)


def drowned(targets: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """(K, C) bool: (style, class) targets whose nearest class prompt ((C, D), e.g. 'a photo of a {c}')
    is another class's."""
    nearest = (targets.float() @ class_emb.float().T).argmax(-1)  # (K, C)
    return nearest != torch.arange(targets.shape[1])[None]


def class_fidelity(targets: torch.Tensor, class_emb: torch.Tensor) -> float:
    """Share of (style, class) targets whose nearest class prompt is their own class: 1.0 when no style
    has drowned its class."""
    return 1.0 - float(drowned(targets, class_emb).float().mean())


def build_plan(teacher, classes: Sequence[str], cfg: PromptsConfig, log: Callable[[str], None] = print) -> StylePlan:
    """The method's plan, with its leak check and two diagnostics recorded in ``info``."""
    plan = PROMPTS.get(cfg.method)(teacher, list(classes), cfg, log)
    plain_emb = encode_plain(teacher, [cfg.plain_template.format(display_name(c)) for c in classes])
    plan.info.update(spread=style_spread(plan.targets), class_fidelity=class_fidelity(plan.targets, plain_emb),
                     drowned_per_style=[int(n) for n in drowned(plan.targets, plain_emb).sum(1)],
                     leaks_test_domains=leaked_words(prompt_vocabulary(cfg), cfg.test_domains))
    return plan
