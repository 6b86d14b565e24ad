"""Closed-form head steps (issue 12): every closed-form loss and gradient against autograd of the loss
in losses.py, in float64; stacked (pack) inputs against one head at a time; a head-only run trained in
closed form against the same run through autograd."""
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from embedcache.students.headstep import GRADS, HeadStep, has_closed_form, linear, linear_grads, stage_terms
from embedcache.students.losses import LOSSES, BatchContext
from embedcache.students.recipes import RECIPES, Recipe, Stage
from embedcache.students.train import Trainer, set_trainable, stage_loss, train

from conftest import quiet
from test_heads import _cfg, feature_store  # noqa: F401  (the module fixture)


def _batch(seed=0, lead=(), b=6, c=5, d=8, tiny_row=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, b, d, generator=g, dtype=torch.float64)
    if tiny_row:  # a norm under F.normalize's eps: the clamp, not the norm, divides
        s[..., 0, :] *= 1e-13 / s[..., 0, :].norm()
    t = F.normalize(torch.randn(*lead, b, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=-1)
    y = torch.randint(0, c, (*lead, b), generator=g)
    logits = torch.randn(*lead, b, c, generator=g, dtype=torch.float64)
    return s, t, text, y, logits


def _autograd(stage, s, t, text, y, logits):
    s, logits = s.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss, parts = stage_loss(stage, BatchContext(s, t, text, y, logits))
    ds, dl = torch.autograd.grad(loss, (s, logits), allow_unused=True)
    return loss.detach(), {k: v.detach() for k, v in parts.items()}, ds, dl


STAGES = [Stage({name: 1.0}, train="head") for name in GRADS.names()] + [
    Stage({"vl2v_adip": 1.0}, train="head", loss_args={"vl2v_adip": {"lam": 0.3}}),
    Stage({"ce": 1.0}, train="head", loss_args={"ce": {"temperature": 0.1}}),
    Stage({"cls": 0.7, "mse": 1.0, "ce": 0.5, "cos": 2.0}, train="head", loss_args={"cls": {"tau": 0.2}}),
]


@pytest.mark.parametrize("stage", STAGES, ids=lambda st: "+".join(f"{k}*{w}" for k, w in st.losses.items()))
@pytest.mark.parametrize("tiny_row", [False, True])
def test_closed_form_matches_autograd(stage, tiny_row):
    s, t, text, y, logits = _batch(tiny_row=tiny_row)
    assert has_closed_form(stage)
    total, parts, ds, dl = stage_terms(stage, s, t, text, y, logits)
    ref_total, ref_parts, ref_ds, ref_dl = _autograd(stage, s, t, text, y, logits)
    torch.testing.assert_close(total, ref_total)
    assert set(parts) == set(ref_parts)
    for k in parts:
        torch.testing.assert_close(parts[k], ref_parts[k])
    for got, ref in ((ds, ref_ds), (dl, ref_dl)):
        if ref is None:
            assert got is None
        else:
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_stacked_heads_equal_one_head_at_a_time():
    stage = STAGES[-1]
    s, t, text, y, logits = _batch(seed=3, lead=(3,))
    total, parts, ds, dl = stage_terms(stage, s, t, text, y, logits)
    assert total.shape == (3,)
    for h in range(3):
        one = stage_terms(stage, s[h], t[h], text, y[h], logits[h])
        torch.testing.assert_close(total[h], one[0])
        torch.testing.assert_close(ds[h], one[2])
        torch.testing.assert_close(dl[h], one[3])


def test_closed_forms_take_the_losses_own_arguments_and_defaults():
    for name in GRADS.names():
        mine = list(inspect.signature(GRADS.get(name)).parameters.values())[1:]
        theirs = list(inspect.signature(LOSSES.get(name)).parameters.values())[1:]
        assert [(p.name, p.default) for p in mine] == [(p.name, p.default) for p in theirs], name


def test_stages_without_a_closed_form_are_left_to_autograd():
    assert not has_closed_form(Stage({}, train="head"))
    assert not has_closed_form(Stage({"vlalign": 1.0}, train="head"))
    assert not has_closed_form(Stage({"vl2v_adip": 1.0, "kd": 1.0}, train="head"))
    assert not has_closed_form(Stage({"vl2v_adip": 1.0}, train="head", loss_args={"vl2v_adip": {"gamma": 2}}))


@pytest.mark.parametrize("lead", [(), (4,)])
def test_linear_and_its_gradients_match_autograd(lead):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, 32, 48, generator=g)
    w = torch.randn(*lead, 16, 48, generator=g, requires_grad=True)
    b = torch.randn(*lead, 16, generator=g, requires_grad=True)
    ref = torch.matmul(x, w.transpose(-1, -2)) + b[..., None, :]
    torch.testing.assert_close(linear(x, w, b), ref)
    d = torch.randn(ref.shape, generator=g)
    gw, gb = torch.autograd.grad(ref, (w, b), d)
    mine = linear_grads(d, x)
    torch.testing.assert_close(mine[0], gw)
    torch.testing.assert_close(mine[1], gb)


@pytest.fixture
def plugin_recipe(monkeypatch):
    """A head-only recipe with no closed form, as a plugin would register it (for this test only)."""
    monkeypatch.setitem(RECIPES._items, "test_head_imcst",
                        Recipe("test_head_imcst", (Stage({"imcst": 1.0, "cls": 0.5}, train="head"),)))
    return "test_head_imcst"


@pytest.mark.parametrize("recipe", ["vl2v_adip_align", "linear_probe"])
def test_a_closed_form_run_ends_where_autograd_ends(feature_store, tmp_path, monkeypatch, recipe):  # noqa: F811
    store, student = feature_store
    cfg = _cfg(store, student, tmp_path / "closed", recipe, seed=1, lr=1e-2)
    trainer = Trainer(cfg, log=quiet)
    stage = trainer.recipe.stages[0]
    set_trainable(trainer.model, stage)
    assert trainer.closed_form(stage) is not None
    train(cfg, log=quiet)
    monkeypatch.setattr(HeadStep, "applies", staticmethod(lambda *a: False))
    ref = _cfg(store, student, tmp_path / "autograd", recipe, seed=1, lr=1e-2)
    train(ref, log=quiet)
    got, want = load_file(f"{cfg.out}/model.safetensors"), load_file(f"{ref.out}/model.safetensors")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)
    assert json.load(open(f"{cfg.out}/summary.json"))["gradients"] == ["closed form, float32"]
    assert json.load(open(f"{ref.out}/summary.json"))["gradients"] == ["autograd"]
    mg = [json.loads(ln) for ln in open(f"{cfg.out}/metrics.jsonl")]
    mw = [json.loads(ln) for ln in open(f"{ref.out}/metrics.jsonl")]
    assert [m["loss"] for m in mg] == pytest.approx([m["loss"] for m in mw], rel=1e-4, abs=1e-6)
    assert [m["val_top1"] for m in mg] == pytest.approx([m["val_top1"] for m in mw], abs=0.02)  # a rounding flip at most


def test_a_head_only_recipe_without_closed_form_still_trains_and_packs(feature_store, tmp_path, plugin_recipe):  # noqa: F811
    from embedcache.students.heads import train_heads

    store, student = feature_store
    cfgs = [_cfg(store, student, tmp_path / f"p{k}", "test_head_imcst", seed=k, lr=1e-2) for k in range(2)]
    trainer = Trainer(cfgs[0], log=quiet)
    set_trainable(trainer.model, trainer.recipe.stages[0])
    assert trainer.closed_form(trainer.recipe.stages[0]) is None
    packed = train_heads(cfgs, log=quiet)
    alone = train(_cfg(store, student, tmp_path / "alone", "test_head_imcst", seed=1, lr=1e-2), log=quiet)
    w_pack, w_alone = load_file(f"{cfgs[1].out}/model.safetensors"), load_file(f"{tmp_path}/alone/model.safetensors")
    for k in w_alone:
        torch.testing.assert_close(w_pack[k], w_alone[k], atol=2e-5, rtol=1e-4)
    assert packed[1].val_top1 == pytest.approx(alone.val_top1)
    assert json.load(open(f"{tmp_path}/alone/summary.json"))["gradients"] == ["autograd"]
