"""Data-free distillation with prompt diversification (Xuan et al., ACM MM 2023), the embedding-cache way.

``synthesize(cfg)`` turns class names into a store of synthesised images: diversified prompts
(``prompts.py``: plain, mix, random, contrastive), images optimised against the teacher's image
encoder in a generator's parameter space (``generators.py``: a decorrelated Fourier
parameterisation by default; ``image.py``: augmentations, squared spherical distance, Adam), written
by the ordinary extraction (``run.py``), so every recipe, sweep and evaluation reads it unchanged.
"""
from .config import ImageConfig, PromptsConfig, SynthesizeConfig
from .generators import GENERATORS, build_generator
from .image import SynthesisInterrupted, optimise, spherical_distance
from .prompts import PROMPTS, STYLE_WORDS, StylePlan, build_plan, leaked_words, style_spread
from .run import prepare, require_gradients, synthesize

__all__ = ["synthesize", "SynthesizeConfig", "PromptsConfig", "ImageConfig", "PROMPTS", "GENERATORS", "STYLE_WORDS",
           "StylePlan", "build_plan", "build_generator", "leaked_words", "style_spread", "spherical_distance",
           "optimise", "prepare", "require_gradients", "SynthesisInterrupted", "load_synthesize_config"]


def load_synthesize_config(path=None, overrides=(), values=None) -> SynthesizeConfig:
    """A synthesis config from a YAML file or packaged name (configs/synthesize/NAME.yaml) + overrides."""
    from ..config import load_config

    return load_config(SynthesizeConfig, path, overrides, "synthesize", values)
