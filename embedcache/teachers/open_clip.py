"""open_clip teachers: built-in names with a pretrained tag, 'hf-hub:' names, 'local-dir:' folders,
or a local weights file. Normalisation, input size and interpolation come from the model."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from ..config import TeacherConfig
from ..device import ieee_fp32
from ..errors import ConfigError, TeacherLoadError
from ..fileio import json_kind
from ..openclip_weights import resampled_positions
from ..pretrained import weights_only_refusal
from ..views import normalize
from ._base import TEACHERS, Teacher, file_sha256, held_log_records, release, replaced_tokens, resolve_device

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# bf16 / fp16 mean the weights themselves in that dtype (open_clip's pure_* modes): measured on an
# H100, pure bf16 weights run ViT-B/16 at 10,000 images/s against 5,300-6,500 under autocast.
PURE = {"bf16": "pure_bf16", "fp16": "pure_fp16"}


def _load_hint(pretrained) -> str:
    """The fix when open_clip could not load: a weights path that is not there said first."""
    if pretrained and (Path(pretrained).suffix in WEIGHT_SUFFIXES or "/" in pretrained) and not Path(pretrained).exists():
        return f"no file {pretrained}: check teacher.pretrained's path"
    return ("without a model hub, pass local weights (--set teacher.pretrained=/path/weights.safetensors, "
            "or teacher.model=local-dir:/folder) or use the offline teacher (--set teacher.name=conse "
            "--set teacher.model=null --set teacher.pretrained=null)")


def _file_hint(exc: BaseException, model: str) -> str:
    """The fix when a weights file that is there did not load: damaged, pickled objects embedcache never unpickles,
    or tensors of another architecture (named, where torch names them)."""
    text = str(exc)
    if isinstance(exc, PermissionError):
        return "the file cannot be read: check its permissions"
    if isinstance(exc, EOFError) or type(exc).__name__ == "SafetensorError" or isinstance(exc, OSError) or any(
            s in text for s in ("PytorchStreamReader", "central directory", "invalid load key",
                                "Unsupported operand")):  # (the last: torch met no pickle there)
        return "the file is damaged or cut short (or not a weights file): copy or save it again"
    if "Weights only load failed" in text or "Unpickl" in type(exc).__name__:
        return ("the file holds pickled objects beyond tensors (a whole model, or a TorchScript archive such as "
                "OpenAI's own ViT-B-16.pt), which embedcache never unpickles: give a file of the model's state_dict "
                "(open_clip's open_clip_pytorch_model.bin, or safetensors)")
    named = re.findall(r'(Missing key\(s\)|Unexpected key\(s\)|size mismatch for) (?:in state_dict: )?"?([\w.]+)', text)
    kinds = {"Missing key(s)": "missing", "Unexpected key(s)": "unexpected", "size mismatch for": "another shape"}
    said = "; ".join(f"{kinds[kind]}: {key}" for kind, key in named[:2])
    return (f"the file does not fit teacher.model={model!r}{f' ({said})' if said else ''}: set teacher.model to the "
            "architecture it was saved from (or local-dir:/folder for a folder with its config), or save the CLIP's "
            "own state_dict where a wrapper holds it")


def _require_known_model(name: str, known: list) -> None:
    """An architecture open_clip has no config for is one line naming the closest ones (open_clip's own
    error lists all of them, a few thousand characters)."""
    if name.startswith(("hf-hub:", "local-dir:")) or name.replace("/", "-") in known:  # open_clip reads ViT-B/32
        return                                                                            # as ViT-B-32
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    raise TeacherLoadError(f"open_clip has no model {name!r}" + (f" (closest: {', '.join(close)})" if close else "")
                           + "; `python -c \"import open_clip; print(open_clip.list_models())\"` lists them, or "
                           "teacher.model=local-dir:/folder loads a saved one")


def _json_of(path: Path) -> Any:
    """``path`` read as JSON: a file that is not is one line (open_clip's own read died with a traceback)."""
    said = f"teacher.model_config={path}"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TeacherLoadError(f"{said} is not a text file (UTF-8); give a JSON architecture file") from None
    except json.JSONDecodeError as exc:
        raise TeacherLoadError(f"{said} is not JSON ({exc}); give a JSON architecture file") from None


def _not_found(path: Path) -> TeacherLoadError:
    return TeacherLoadError(f"teacher.model_config={path} not found; give a JSON architecture file")


def _named_otherwise(path: Path, model: str) -> TeacherLoadError:
    return TeacherLoadError(f"teacher.model_config={path} registers its architecture as {path.stem!r} (open_clip "
                            f"names it by the file's name), not {model!r}; set teacher.model={path.stem}")


def _require_architecture(path: Path, model: str) -> None:
    """teacher.model_config as open_clip uses it: a .json file of an object with embed_dim, vision_cfg and
    text_cfg, registered under the file's name, which teacher.model must be. open_clip skips any other file
    without a word, and one for another architecture was ignored beside a built-in teacher.model (a fuzz)."""
    said = f"teacher.model_config={path}"
    if not path.is_file():
        raise _not_found(path)
    if path.suffix != ".json":
        raise TeacherLoadError(f"{said} is not a .json file, so open_clip would skip it; name it {path.stem}.json")
    arch = _json_of(path)
    if not isinstance(arch, dict):
        raise TeacherLoadError(f"{said} is a JSON {json_kind(arch)}, not an open_clip "
                               "architecture (an object with embed_dim, vision_cfg and text_cfg)")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in arch]
    if missing:
        raise TeacherLoadError(f"{said} lacks {', '.join(missing)}, so open_clip would skip it; give an open_clip "
                               "architecture file (embed_dim, vision_cfg, text_cfg)")
    if model != path.stem:
        raise _named_otherwise(path, model)


@TEACHERS.register("open_clip")
class OpenClipTeacher(Teacher):
    registry_name = "open_clip"
    differentiable = True  # image and text towers are local torch modules

    @staticmethod
    def check_new(cfg: TeacherConfig) -> None:
        """A teacher.model_config open_clip would not use, refused for new work (``teachers.check_new``); a
        store made before 2026-12-07 with one, the file ignored, reloads and repairs as it was made."""
        if cfg.model_config:
            _require_architecture(Path(cfg.model_config), cfg.model)

    def __init__(self, cfg: TeacherConfig):
        import open_clip

        if not cfg.model:
            raise TeacherLoadError("open_clip teacher needs teacher.model (e.g. ViT-B-16, hf-hub:org/repo, local-dir:/path)")
        self.model_name, self.pretrained, self.precision = cfg.model, cfg.pretrained, cfg.precision
        self.device = resolve_device(cfg.device, fix="--set teacher.device=cpu")
        self._config_hash, self._config_path = None, cfg.model_config
        if cfg.model_config:  # (a file open_clip would skip is refused for new work: ``check_new``)
            cfg_path = Path(cfg.model_config)
            if not cfg_path.is_file():
                raise _not_found(cfg_path)
            if cfg_path.suffix == ".json":
                _json_of(cfg_path)
            open_clip.add_model_config(cfg_path)
            self._config_hash = file_sha256(cfg_path)
            if self.model_name != cfg_path.stem and self.model_name not in open_clip.list_models():
                raise _named_otherwise(cfg_path, self.model_name)
        _require_known_model(self.model_name, open_clip.list_models())
        try:
            with held_log_records() as held, torch.random.fork_rng(devices=[]):  # random weights are the same
                torch.manual_seed(0)                                               # every time; the caller's RNG
                model = open_clip.create_model(                                    # is untouched
                    self.model_name, pretrained=self.pretrained, precision=PURE.get(self.precision, self.precision),
                    device=self.device,
                    require_pretrained=self.pretrained is not None or self.model_name.startswith(("hf-hub:", "local-dir:")),
                    weights_only=True)
                self.tokenizer = open_clip.get_tokenizer(self.model_name)
            release(held)  # a model that loaded: its library's warnings are shown
        except Exception as exc:  # open_clip raises many types; the user needs one line (its own log lines dropped)
            first = weights_only_refusal(exc) or (re.sub(r"\x1b\[[0-9;]*m", "", str(exc).strip().splitlines()[0])
                                                  if str(exc).strip() else type(exc).__name__)
            hint = (_file_hint(exc, self.model_name) if self.pretrained and Path(self.pretrained).is_file()
                    else _load_hint(self.pretrained))
            raise TeacherLoadError(
                f"could not load open_clip model {self.model_name!r} with weights {self.pretrained!r} ({first}); "
                + hint) from exc
        if self.pretrained and Path(self.pretrained).is_file():
            resampled = resampled_positions(model.state_dict(), self.pretrained)
            if resampled:
                raise TeacherLoadError(f"teacher.pretrained={self.pretrained} was saved at another image size or context "
                                       f"length than teacher.model={self.model_name!r} runs ({resampled}; open_clip would "
                                       "resample it): set teacher.model to the architecture it was saved from (e.g. "
                                       "ViT-L-14-336 for a 336 px file)")
        self.model = model.eval()
        self._ieee = self.device.type == "cuda" and self.precision == "fp32"  # fp32 asked: no TF32 on a GPU
        if self.device.type == "cpu" and self.precision in PURE:
            warnings.warn(f"teacher.precision={self.precision} on a CPU: most CPUs have no fast {self.precision} "
                          f"kernels, so this is many times slower than fp32 (ViT-B/16: minutes for 64 images on "
                          f"2 cores); use --set teacher.precision=fp32 on a CPU", stacklevel=2)
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", 224)
        self.input_size = int(size if isinstance(size, int) else size[0])
        self.mean = tuple(float(v) for v in pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(float(v) for v in pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.interpolation = "bilinear" if pp.get("interpolation") == "bilinear" else "bicubic"
        self.context_length = int(getattr(self.tokenizer, "context_length", 77))
        with torch.no_grad():
            self.embed_dim = int(self.encode_text(["a"]).shape[-1])
        # open_clip's bf16/fp16 modes convert conv and linear weights but keep embeddings and norms
        # in fp32, so the input dtype is that of the first conv/linear layer, not of any parameter.
        self._dtype = next(m.weight.dtype for m in self.model.visual.modules()
                           if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))

    def _weights_identity(self) -> Any:
        if self.model_name.startswith("local-dir:"):
            folder = Path(self.model_name[len("local-dir:"):])
            files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "open_clip_config.json")
            return {p.name: file_sha256(p) for p in files}
        if self.pretrained and Path(self.pretrained).is_file():
            return {"file_sha256": file_sha256(Path(self.pretrained))}
        return self.pretrained  # a tag ('openai', 'laion2b_s34b_b79k'), an hf-hub name, or None (random)

    def identity(self) -> Dict[str, Any]:
        return {"name": self.registry_name, "model": self.model_name if not self.model_name.startswith("local-dir:") else "local-dir",
                "pretrained": self._weights_identity(), "model_config_sha256": self._config_hash,
                "precision": PURE.get(self.precision, self.precision)}

    def describe(self) -> Dict[str, Any]:
        # the path to reload from is recorded for humans and helpers, but kept out of the key
        return {**super().describe(), "source": {"model": self.model_name, "pretrained": self.pretrained,
                                                 "model_config": self._config_path}}

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        with ieee_fp32(self._ieee):
            feats = self.model.encode_image(x.to(self.device, self._dtype, non_blocking=True))
        return F.normalize(feats.float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_views(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 views -> (B, D) float32, L2-normalised, left on the teacher's device:
        extraction copies it to the host asynchronously, so a batch never waits for the last one."""
        x = normalize(x.to(self.device, non_blocking=True).float().div_(255.0), self.mean, self.std)
        with ieee_fp32(self._ieee):
            return F.normalize(self.model.encode_image(x.to(self._dtype)).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: List[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        with ieee_fp32(self._ieee):
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()

    # --- gradients (data-free synthesis) -------------------------------------------------------------
    def encode_image_grad(self, x: torch.Tensor) -> torch.Tensor:
        with ieee_fp32(self._ieee):  # the forward; a backward runs under the process's settings
            return F.normalize(self.model.encode_image(x.to(self.device, self._dtype)).float(), dim=-1)

    def _token_embedding(self) -> torch.nn.Module:
        for owner in (self.model, getattr(self.model, "text", None)):
            emb = getattr(owner, "token_embedding", None)
            if isinstance(emb, torch.nn.Embedding):
                return emb
        text = getattr(self.model, "text", None)
        if text is not None and hasattr(getattr(text, "transformer", None), "get_input_embeddings"):
            return text.transformer.get_input_embeddings()  # a Hugging Face text tower
        raise TeacherLoadError(f"open_clip model {self.model_name!r}: cannot find its text token embeddings, "
                               "so style pseudo-words cannot be injected; use a CLIP-style text tower")

    def _word_ids(self, word: str) -> List[int]:
        tok = self.tokenizer
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):
            return list(tok.encode(word))
        return list(tok.tokenizer(word, add_special_tokens=False)["input_ids"])

    def encode_text_styled(self, texts: List[str], styles: torch.Tensor, placeholder: str = "*") -> torch.Tensor:
        ids = self._word_ids(placeholder)
        if len(ids) != 1:
            raise ConfigError(f"style placeholder {placeholder!r} is {len(ids)} tokens for this tokenizer; pick one that is one")
        tokens = self.tokenizer(list(texts)).to(self.device)
        with replaced_tokens(self._token_embedding(), tokens, ids[0], styles), ieee_fp32(self._ieee):
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def count_tokens(self, texts: List[str]) -> List[int]:
        tok = self.tokenizer
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # open_clip's SimpleTokenizer
            return [len(tok.encode(t)) + 2 for t in texts]
        if hasattr(tok, "tokenizer"):  # HFTokenizer wraps a transformers tokenizer
            return [len(ids) for ids in tok.tokenizer(list(texts), verbose=False)["input_ids"]]  # ours warns
        raise TeacherLoadError(f"cannot count tokens for tokenizer {type(tok).__name__}")
