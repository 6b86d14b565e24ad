"""What every teacher provides: image and text encoders into one L2-normalised space."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

import torch

from ..device import resolve_device  # noqa: F401  (re-exported for the teachers)
from ..fileio import file_sha256  # noqa: F401  (re-exported for the teachers)
from ..registry import Registry
from ..views import normalize

TEACHERS = Registry("teacher")


class Teacher:
    """Base class. Subclasses set the attributes below in ``__init__``.

    embed_dim: D. input_size: square side the image encoder takes. mean/std: per-channel
    normalisation applied to [0, 1] pixels. interpolation: 'bicubic' or 'bilinear'.
    context_length: most tokens the text encoder reads; longer prompts are truncated.
    computes_here: whether its forward runs on this machine's ``device`` (a remote teacher's does not).
    """

    registry_name: str = ""
    computes_here: bool = True
    embed_dim: int
    input_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str = "bicubic"
    context_length: int
    device: torch.device

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float, already normalised. Returns (B, D) float32, L2-normalised, CPU."""
        raise NotImplementedError

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) uint8 views at ``input_size``. Returns (B, D) float32, L2-normalised, CPU.
        Extraction calls this: the teacher's input is an 8-bit image (a remote teacher sends it as
        PNG, losslessly), normalised here with the teacher's own mean and std."""
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        return self.encode_image(normalize(x, self.mean, self.std))

    def encode_text(self, texts: List[str]) -> torch.Tensor:
        """Returns (T, D) float32, L2-normalised, CPU."""
        raise NotImplementedError

    def count_tokens(self, texts: List[str]) -> List[int]:
        """Tokens each text needs (special tokens included), before any truncation."""
        raise NotImplementedError

    def identity(self) -> Dict[str, Any]:
        """What makes this teacher's outputs what they are: goes into the cache key."""
        raise NotImplementedError

    def preprocessing(self) -> Dict[str, Any]:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    def describe(self) -> Dict[str, Any]:
        """Manifest entry: identity, embedding dimension, preprocessing and how to reload it."""
        return {**self.identity(), "embed_dim": self.embed_dim, "preprocessing": self.preprocessing(),
                "context_length": self.context_length}

    # --- gradients, for data-free synthesis (embedcache.synthesis) --------------------------------------
    # Synthesis optimises images, and learns style pseudo-words, through the teacher's encoders, so it
    # needs gradients. A teacher that gives them sets ``differentiable = True`` and implements the
    # methods below; a black box (a remote teacher answers with embeddings only) keeps the default and
    # synthesis refuses it, saying ``no_gradients_reason``.
    differentiable: bool = False
    no_gradients_reason: str = "it gives no gradients through its encoders"

    def _no_styles(self) -> str:
        """Why style pseudo-words cannot be learned: no gradients at all, or none through the text encoder's tokens
        (a teacher giving image gradients only was said to give none: a trial)."""
        if not self.differentiable:
            return f"teacher {self.registry_name!r}: {self.no_gradients_reason}"
        return (f"teacher {self.registry_name!r} gives image gradients but not its text encoder's token embeddings, "
                "which style vectors replace (prompts.method contrastive, random, or mix at token level); use "
                "prompts.method=plain, or mix with prompts.mix_level=sentence")

    def encode_image_grad(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float on ``device``, normalised. Returns (B, D) float32, L2-normalised, on
        ``device``, differentiable in x (any size the encoder takes; its weights are not trained)."""
        raise NotImplementedError(f"teacher {self.registry_name!r}: {self.no_gradients_reason}")

    def _token_embedding(self) -> torch.nn.Module:
        """The text encoder's input token embedding layer."""
        raise NotImplementedError(self._no_styles())

    def _word_ids(self, word: str) -> List[int]:
        """The token ids of one word, without special tokens."""
        raise NotImplementedError(self._no_styles())

    def token_table(self) -> torch.Tensor:
        """(vocab, W) float32, detached: the text encoder's input token embeddings."""
        return self._token_embedding().weight.detach().float()

    def word_embeddings(self, words: List[str]) -> torch.Tensor:
        """(len(words), W) float32, detached: each word's input token embedding (the mean of its
        sub-word tokens' embeddings when the tokenizer splits it)."""
        table = self.token_table()
        return torch.stack([table[self._word_ids(w)].mean(0) for w in words])

    def encode_text_styled(self, texts: List[str], styles: torch.Tensor, placeholder: str = "*") -> torch.Tensor:
        """Texts with one pseudo-word each: the input token embedding of ``placeholder`` in texts[t]
        is replaced by styles[t] ((T, W) float). Returns (T, D) float32, L2-normalised, on ``device``,
        differentiable in ``styles``."""
        raise NotImplementedError(self._no_styles())


@contextmanager
def replaced_tokens(embedding: torch.nn.Module, ids: torch.Tensor, placeholder_id: int,
                    styles: torch.Tensor) -> Iterator[None]:
    """While inside, ``embedding`` (the text encoder's token embedding layer) returns ``styles[t]``
    at the position of ``placeholder_id`` in row t of ``ids`` ((T, L) token ids; one placeholder
    per row), so gradients reach the styles and the rest of the encoder runs unchanged."""
    mask = ids == placeholder_id
    counts = mask.sum(1)
    if not bool((counts == 1).all()):
        bad = int((counts != 1).nonzero()[0, 0])
        raise ValueError(f"text {bad} holds the style placeholder {int(counts[bad])} times; it needs it exactly once")
    if styles.shape[0] != ids.shape[0]:
        raise ValueError(f"{styles.shape[0]} style vectors for {ids.shape[0]} texts")

    def hook(_module, _inputs, out):
        if out.shape[:2] != mask.shape:  # not our call
            return out
        m = mask.to(out.device)[..., None]
        return torch.where(m, styles.to(out.device, out.dtype)[:, None, :], out)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# libraries that print through handlers of their own rather than the root logger's
OWN_HANDLERS = ("huggingface_hub",)


@contextmanager
def held_log_records() -> Iterator[List[logging.LogRecord]]:
    """Log records inside are held, not shown: a library reports a failed download itself in several
    lines before it raises, and the caller turns the raise into one line of its own (the records are
    then dropped). After a success the caller passes them on with ``release``, so a library's warnings
    about a model that did load are still seen."""
    held: List[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in OWN_HANDLERS if logging.getLogger(n).handlers]
    saved = [lg.handlers for lg in loggers]
    for lg in loggers:
        lg.handlers = [_Hold()]
    try:
        yield held
    finally:
        for lg, handlers in zip(loggers, saved):
            lg.handlers = handlers


def release(held: List[logging.LogRecord]) -> None:
    for record in held:
        logging.getLogger(record.name).handle(record)
