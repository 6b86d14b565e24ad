"""Student models (a registry): a backbone plus a projection head to the teacher's dimension.

The head's output dimension always comes from the store's manifest, never from a constant. Any
timm backbone works (``timm:<name>``); the common ones and timm's CPU-sized test models are
registered by name, and ``openclip_visual`` is the image tower of a smaller CLIP (VL2V-SD).
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from embedcache.errors import ConfigError
from embedcache.registry import Registry

from .config import StudentConfig

STUDENTS = Registry("student", hint="or timm:<any name in timm.list_models()>", prefixes=("timm:",))


class Student(nn.Module):
    """backbone -> (B, F) features -> head -> (B, D) embedding; optional linear classifier on features."""

    def __init__(self, name: str, backbone: nn.Module, feat_dim: int, embed_dim: int, num_classes: int,
                 input_size: int, mean: Tuple[float, ...], std: Tuple[float, ...], head: str = "random"):
        super().__init__()
        self.name, self.feat_dim, self.embed_dim = name, feat_dim, embed_dim
        self.input_size, self.mean, self.std = input_size, tuple(mean), tuple(std)
        self.backbone = backbone
        self.head_kind = head  # identity: the embedding is the backbone's own output (what its training moves)
        self.head = _head(head, feat_dim, embed_dim)
        self.classifier = nn.Linear(feat_dim, num_classes) if num_classes else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalised -> (B, F)."""
        return self.backbone(x)

    def from_features(self, feat: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        """Head and classifier in float32 even inside a step's bf16 autocast: the losses divide their
        outputs by temperatures of 0.07 to 0.1, which would multiply bf16's rounding (cheap: two small
        Linear layers against the backbone)."""
        with torch.autocast(feat.device.type, enabled=False):
            feat = feat.float() if feat.dtype in (torch.float16, torch.bfloat16) else feat
            return {"emb": self.head(feat), "logits": self.classifier(feat) if self.classifier is not None else None}

    def forward(self, x: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        return self.from_features(self.features(x))


def is_backbone(key) -> bool:
    """A state-dict key of a student's backbone (``module.`` prefixed: inside SWA's averaged copy)."""
    return isinstance(key, str) and (key.startswith("backbone.") or key.startswith("module.backbone."))


def without_backbone(obj):
    """A state dict, or a checkpoint of nested dicts and lists, without the backbone's entries wherever
    they sit (the model, SWA's and SWAD's averages, the selected weights)."""
    if isinstance(obj, dict):
        return {k: without_backbone(v) for k, v in obj.items() if not is_backbone(k)}
    if isinstance(obj, list):
        return [without_backbone(v) for v in obj]
    return obj


class Heads(nn.Module):
    """A student's head and classifier without its backbone: the part of a run on cached features
    that trains and all that it saves (state-dict keys as in the whole student)."""

    def __init__(self, head: nn.Module, classifier: Optional[nn.Module]):
        super().__init__()
        self.head, self.classifier = head, classifier

    @classmethod
    def of(cls, model: Student) -> "Heads":
        """The student's own head and classifier modules (shared, not copied)."""
        return cls(model.head, model.classifier)

    @classmethod
    def from_weights(cls, weights: Dict[str, torch.Tensor]) -> "Heads":
        """Linear layers shaped and filled from a run's saved weights (no head weights: the identity)."""
        def layer(name: str) -> Optional[nn.Module]:
            if f"{name}.weight" not in weights:
                return None
            out_dim, in_dim = weights[f"{name}.weight"].shape
            return nn.Linear(in_dim, out_dim, bias=f"{name}.bias" in weights)

        heads = cls(layer("head") or nn.Identity(), layer("classifier"))
        heads.load_state_dict(without_backbone(weights))
        return heads

    from_features = Student.from_features


def load_weights(model: Student, state: Dict[str, torch.Tensor], backbone_saved: bool = True) -> None:
    """Load saved weights into ``model``; with ``backbone_saved=False`` exactly the backbone's keys are
    absent (a run on cached features saves its heads only) and the model's own backbone stays."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = sorted(unexpected) + [k for k in missing if backbone_saved or not is_backbone(k)]
    if wrong:
        raise RuntimeError(f"saved weights do not fit the {model.name} student: {', '.join(wrong[:3])}")


def _head(kind: str, feat_dim: int, embed_dim: int) -> nn.Module:
    """random: a fresh linear projection. identity: the backbone's output is the embedding (a CLIP
    image tower whose width matches the teacher's, as VL2V-SD trains it); when the widths differ,
    a linear projection initialised to the (rectangular) identity, so training starts from the tower's
    own output rather than a random map of it."""
    if kind == "random":
        return nn.Linear(feat_dim, embed_dim)
    if feat_dim == embed_dim:
        return nn.Identity()
    head = nn.Linear(feat_dim, embed_dim)
    with torch.no_grad():
        nn.init.eye_(head.weight)
        head.bias.zero_()
    return head


def weights_file_sha(pretrained: Optional[str]) -> Optional[str]:
    """The content hash of ``student.pretrained`` where it names a file (None: from scratch, a hub tag, or a
    file no longer there): a run's settings hold the path, and weights saved over the same file are others."""
    if not pretrained or not Path(pretrained).is_file():
        return None
    st = Path(pretrained).stat()
    return _file_sha(str(Path(pretrained).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha(path: str, _size: int, _mtime_ns: int) -> str:
    """A file's content hash, once per path, size and modification time: every old run of a sweep's table, of an
    evaluate and of its settings legend hashed the same file again (hundreds of megabytes each)."""
    from embedcache.fileio import file_sha256

    return file_sha256(Path(path))


# where training checkpoints keep the weights (timm's and most scripts': state_dict; others': model), and the
# prefixes their names may carry (DataParallel's module., a Lightning module's model., torch.compile's _orig_mod.)
WRAPPING_KEYS = ("state_dict", "model")
NAME_PREFIXES = ("module.", "model.", "_orig_mod.")


def _load_local(backbone: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        found = "is a folder" if p.is_dir() else "not found"
        raise ConfigError(f"student weights {path} {found}; give a .safetensors/.pth file or leave student.pretrained empty")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
            wrapped = [k for k in WRAPPING_KEYS if isinstance(state, dict) and isinstance(state.get(k), dict)]
            state = state[wrapped[0]] if wrapped else state  # a training checkpoint's weights
    except Exception as exc:  # not a checkpoint, damaged, or one that needs pickled code (refused: weights only)
        from embedcache.pretrained import weights_only_refusal

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        said = weights_only_refusal(exc) or f"{type(exc).__name__}: {first[:120]}"
        raise ConfigError(f"student weights {path} cannot be read as a state dict ({said}); "
                          "give a .safetensors file or a torch.save'd state dict") from None
    if not isinstance(state, dict):
        raise ConfigError(f"student weights {path} hold a {type(state).__name__}, not a state dict; give a .safetensors "
                          "file or a torch.save'd state dict")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    own = backbone.state_dict()
    state = _aligned(state, own)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"no tensor in {path} matches the student backbone; is it the same architecture?")
    misfit = _misfit(backbone, own, state)
    if misfit:  # a part of the backbone left random, or another architecture's tensors dropped
        raise ConfigError(f"student.pretrained {path} does not fit the student backbone: {misfit}; give weights "
                          "saved from this architecture")
    backbone.load_state_dict(usable, strict=False)


def _aligned(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with its names as the backbone names them: as saved, without a prefix of ``NAME_PREFIXES``
    (DataParallel's, Lightning's, torch.compile's), a run's own model file's ``backbone.`` tensors alone (its head
    and classifier left out), or
    with the backbone's own wrapper prefix (weights saved from the wrapped model itself, as an
    efficientnet_lite_pytorch net is): whichever names most of the backbone's tensors."""
    wrapper = {k.split(".", 1)[0] for k in own}
    ways = [state, *({k.removeprefix(p): v for k, v in state.items()} for p in NAME_PREFIXES),
            {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}]  # a run's model file
    if len(wrapper) == 1:
        ways += [{f"{next(iter(wrapper))}.{k}": v for k, v in way.items()} for way in list(ways)]
    return max(ways, key=lambda named: sum(k in own for k in named))


def _misfit(backbone: nn.Module, own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> str:
    """What of a weights file does not fit the backbone, in words ('' when it fits): its tensors the
    file lacks (BatchNorm's step counters aside), those of another shape, and the file's tensors with
    no place in it (a checkpoint's classifier aside: the backbone has none)."""
    named = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = [named] if isinstance(named, str) else list(named)  # distilled DeiT, LeViT: ("head", "head_dist")
    spare = lambda k: any(k == h or k.startswith(h + ".") for h in heads if h)  # noqa: E731
    # a backbone that keeps a classifier it never runs (efficientnet_lite's _fc) need not find it in the file
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked") and not spare(k)]
    shaped = [k for k in own if k in state and state[k].shape != own[k].shape and not spare(k)]  # another class count
    extra = [k for k in state if k not in own and not spare(k)]
    parts = [f"{len(missing)} of its {len(own)} tensors are not in the file ({missing[0]}, ...)" if missing else "",
             f"{len(shaped)} have another shape ({shaped[0]}, ...)" if shaped else "",
             f"{len(extra)} tensors of the file have no place in it ({extra[0]}, ...)" if extra else ""]
    return "; ".join(p for p in parts if p)


@torch.no_grad()
def _feature_width(backbone: nn.Module, size: int) -> int:
    """Width of the pooled output, measured: timm's num_features is the width *before* a conv head
    (MobileNetV3: 576, while its pooled output is 1024)."""
    was = backbone.training
    backbone.eval()
    width = int(backbone(torch.zeros(1, 3, size, size)).shape[-1])
    backbone.train(was)
    return width


def _hub_weights(timm_name: str, pretrained: Optional[str]) -> Optional[str]:
    """The timm name whose weights come from the hub ('timm': the model's default weights; a tag
    'a1_in1k', or the full 'resnet18.a1_in1k': those), or None for random weights (unset, 'scratch') or a
    file. A path, even one without a suffix, is a file: a missing /path/weights spent 50 s on hub retries
    before its error (a trial); a file `weights` here is a file, a folder `timm/` is not one. A tag was
    dropped, every tag giving the default weights under its own run name (a review)."""
    if pretrained in (None, "scratch") or "/" in pretrained or Path(pretrained).is_file():
        return None
    if pretrained == "timm" or pretrained.startswith(f"{timm_name}."):
        return timm_name if pretrained == "timm" else pretrained
    return None if Path(pretrained).suffix else f"{timm_name}.{pretrained}"


def _timm_student(timm_name: str, cfg: StudentConfig, embed_dim: int, num_classes: int) -> Student:
    import timm

    kwargs = {}
    if cfg.input_size and ("vit" in timm_name or "deit" in timm_name):
        kwargs["img_size"] = cfg.input_size  # ViTs fix their input size at creation; CNNs take any size
    hub = _hub_weights(timm_name, cfg.pretrained)
    try:
        backbone = timm.create_model(hub or timm_name, pretrained=hub is not None, num_classes=0, **kwargs)
    except Exception as exc:
        if hub:
            raise ConfigError(f"could not download timm weights {hub} ({str(exc).splitlines()[0]}); "
                              "pass a local file with student.pretrained=/path/weights.safetensors") from exc
        raise ConfigError(f"timm cannot build {timm_name!r} ({str(exc).splitlines()[0]}); check student.name") from exc
    if cfg.pretrained not in (None, "scratch") and hub is None:
        _load_local(backbone, cfg.pretrained)
    pc = backbone.pretrained_cfg
    size = cfg.input_size or int(pc.get("input_size", (3, 224, 224))[-1])
    try:
        width = _feature_width(backbone, size)
    except (AssertionError, RuntimeError, ValueError) as exc:  # e.g. a ViT's size not a multiple of its patch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"student {timm_name} cannot take {size} px inputs ({first}); choose another "
                          "student.input_size") from exc
    return Student(timm_name, backbone, width, embed_dim, num_classes, size,
                   pc.get("mean", (0.485, 0.456, 0.406)), pc.get("std", (0.229, 0.224, 0.225)))


def _register_timm(name: str) -> None:
    STUDENTS.register(name)(lambda cfg, embed_dim, num_classes: _timm_student(name, cfg, embed_dim, num_classes))


for _name in ("resnet18", "resnet50", "mobilenetv3_small_100", "efficientnet_b0", "vit_tiny_patch16_224",
              "vit_small_patch16_224", "deit_small_patch16_224", "test_resnet", "test_vit"):
    _register_timm(_name)


@STUDENTS.register("openclip_visual")
def openclip_visual(cfg: StudentConfig, embed_dim: int, num_classes: int) -> Student:
    """The image tower of a (smaller) open_clip model, initialised from its weights (VL2V-SD)."""
    import open_clip

    if not cfg.model:
        raise ConfigError("student openclip_visual needs student.model (an open_clip name or local-dir:/path)")
    try:
        model = open_clip.create_model(cfg.model, pretrained=cfg.pretrained, weights_only=True)
    except Exception as exc:
        raise ConfigError(f"could not build open_clip model {cfg.model!r} for the student "
                          f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                          "give student.model=local-dir:/folder or a name with local weights") from exc
    if cfg.pretrained and Path(cfg.pretrained).is_file():
        from embedcache.openclip_weights import resampled_positions

        resampled = resampled_positions(model.state_dict(), cfg.pretrained)
        if resampled:  # said, not refused: a finished run's student is built so again to be scored
            warnings.warn(f"student.pretrained={cfg.pretrained} was saved at another image size or context length than "
                          f"student.model={cfg.model} runs ({resampled}): open_clip resampled its position embeddings; "
                          "set student.model to the architecture it was saved from", stacklevel=2)
    visual = model.visual
    pp = open_clip.get_model_preprocess_cfg(model)
    native = pp.get("size", 224)
    native = int(native if isinstance(native, int) else native[0])
    size = cfg.input_size or native
    if size != native:
        _refuse_a_size_it_cannot_take(visual, cfg.model, size, native)
    return Student("openclip_visual", visual, int(visual.output_dim), embed_dim, num_classes, size,
                   pp.get("mean", (0.481, 0.458, 0.408)), pp.get("std", (0.269, 0.261, 0.276)), head="identity")


def _refuse_a_size_it_cannot_take(visual: nn.Module, model: str, size: int, native: int) -> None:
    """A CLIP tower's position embeddings (a ViT's grid, a ResNet's attention pool) fix its input size:
    one image of ``size`` tried now, refused in one line, not a traceback from inside the first step."""
    was = visual.training
    try:
        with torch.no_grad():
            visual.eval()(torch.zeros(1, 3, size, size))
    except RuntimeError:
        raise ConfigError(f"student.input_size={size}: the openclip_visual tower {model} takes {native} px images "
                          "only (its position embeddings); leave student.input_size out") from None
    finally:
        visual.train(was)


def build_student(cfg: StudentConfig, embed_dim: int, num_classes: int = 0) -> Student:
    """``embed_dim`` comes from the store (manifest ``teacher.embed_dim``); ``num_classes`` > 0 adds
    a linear classifier over the training classes."""
    if cfg.model and cfg.name != "openclip_visual":  # a setting no other student reads: never passed over
        raise ConfigError(f"student.model={cfg.model!r} is read by the openclip_visual student only; student "
                          f"{cfg.name} has no use for it: leave it out (student.pretrained gives its weights)")
    if cfg.name.startswith("timm:"):
        return _timm_student(cfg.name[len("timm:"):], cfg, embed_dim, num_classes)
    return STUDENTS.get(cfg.name)(cfg, embed_dim, num_classes)


# --- students with packaged ImageNet weights (no hub needed) ---------------------------------------
class _PooledLite(nn.Module):
    """An EfficientNet-Lite classifier up to its pooled features (B, 1280): no dropout, no fc. The fc
    stays in the module (its weights in run files since the first runs), named as the classifier that a
    weights file may leave out."""
    pretrained_cfg = {"classifier": "net._fc"}

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean((2, 3))



def batchnorms(module: nn.Module) -> List[nn.Module]:
    """The BatchNorm layers of ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer of ``module`` in eval mode (its running statistics fixed; its scale and shift
    still train where they require gradients), the rest as it was: DomainBed's ``freeze_bn``."""
    for m in batchnorms(module):
        m.eval()
    return module


def starts_random(cfg: StudentConfig) -> bool:
    """Whether the student's backbone starts from random weights: no ``pretrained`` (or "scratch"), but
    for the students whose packaged ImageNet weights are their default and an open_clip tower read from a
    local folder or the hub (its weights are there)."""
    if cfg.pretrained is not None:
        return cfg.pretrained == "scratch"
    return not (cfg.name.startswith("efficientnet_lite") or str(cfg.model or "").startswith(("local-dir:", "hf-hub:")))


def build_seeded(cfg: StudentConfig, dim: int, n_classes: int, seed: int) -> "Student":
    """The student a run of ``seed`` starts from, built under torch's generator seeded with ``seed``
    (the caller's generator untouched): one place, so a run, its cached features and its saved heads
    always agree on the backbone a seed gives (the features key hashes its weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_student(cfg, dim, n_classes)
    model.made_from = (cfg, seed)  # what builds it again (the features command a refusal names)
    return model

def _lite_student(variant: str, cfg: StudentConfig, embed_dim: int, num_classes: int) -> Student:
    from embedcache.pretrained import LITE_MEAN, LITE_STD, load_efficientnet_lite

    net, _, native = load_efficientnet_lite(variant)
    if cfg.pretrained == "scratch":
        with torch.no_grad():
            for m in net.modules():
                if hasattr(m, "reset_parameters") and m is not net:
                    m.reset_parameters()
    backbone = _PooledLite(net)
    if cfg.pretrained not in (None, "imagenet", "scratch"):
        _load_local(backbone, cfg.pretrained)
    size = cfg.input_size or native
    return Student(f"efficientnet_{variant}", backbone, _feature_width(backbone, size), embed_dim, num_classes, size,
                   LITE_MEAN, LITE_STD)


def _register_lite(variant: str) -> None:
    STUDENTS.register(f"efficientnet_{variant}")(
        lambda cfg, embed_dim, num_classes: _lite_student(variant, cfg, embed_dim, num_classes))


for _variant in ("lite0", "lite1", "lite2"):
    # student.pretrained: None / "imagenet" (the packaged ImageNet weights, the default), "scratch",
    # or a local weights file for the backbone
    _register_lite(_variant)
