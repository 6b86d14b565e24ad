"""optimizer_step: torch's fused Adam/AdamW kernel called directly must be exactly torch's own step()."""
import copy

import pytest
import torch

from embedcache.students.config import OptimConfig
from embedcache.students.optim import (_direct_fused_calls, build_optimizer, build_scheduler, load_optimizer_state,
                                       optimizer_step)


def _model_and_opt(name, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Linear(9, 4), torch.nn.Linear(4, 3))
    cfg = OptimConfig(name=name, lr=3e-2, weight_decay=0.05, warmup_steps=3, schedule="cosine")
    opt = build_optimizer(cfg, model.parameters())
    return model, opt, build_scheduler(cfg, opt, 20)


def _grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(model.parameters()):
        p.grad = None if (i == 5 and step % 3 == 0) else torch.randn(p.shape, generator=g)  # one layer skips steps


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_the_direct_kernel_call_is_torchs_step_bit_for_bit(name):
    (m1, o1, s1), (m2, o2, s2) = _model_and_opt(name), _model_and_opt(name)
    assert o1.param_groups[0]["fused"]
    direct = 0
    for step in range(20):
        _grads(m1, step), _grads(m2, step)
        o1.step()
        direct += _direct_fused_calls(o2) is not None
        optimizer_step(o2)
        s1.step(), s2.step()
    assert direct == 18  # all but steps 0 and 1: torch creates the state (layer 5 gets its first gradient at step 1)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    st1, st2 = o1.state_dict(), o2.state_dict()
    assert st1["param_groups"] == st2["param_groups"]
    for k in st1["state"]:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st1["state"][k][field], st2["state"][k][field]), (k, field)


def test_hooks_and_other_optimizers_go_through_step():
    model, opt, _ = _model_and_opt("adamw")
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append(1))
    for step in range(3):
        _grads(model, step)
        optimizer_step(opt)
    assert len(calls) == 3
    model, sgd, _ = _model_and_opt("sgd")
    _grads(model, 1)
    assert _direct_fused_calls(sgd) is None
    before = [p.detach().clone() for p in model.parameters()]
    optimizer_step(sgd)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_subclass_or_a_grad_scaler_goes_through_step():
    class Clipped(torch.optim.AdamW):  # a plugin that changes step(): the direct call must not bypass it
        def step(self, closure=None):
            for g in self.param_groups:
                torch.nn.utils.clip_grad_norm_(g["params"], 1e-3)
            return super().step(closure)

    model = torch.nn.Linear(6, 3)
    opt = Clipped(model.parameters(), lr=1e-2, fused=True)
    for step in range(3):
        _grads(model, step)
        optimizer_step(opt)
        assert _direct_fused_calls(opt) is None
    model, opt, _ = _model_and_opt("adamw")
    for step in range(2):
        _grads(model, step)
        optimizer_step(opt)
    assert _direct_fused_calls(opt) is not None
    opt.grad_scale = torch.ones(())
    assert _direct_fused_calls(opt) is None


def test_step_milestones_fall_on_the_nearest_step():
    """A milestone written as a rounded fraction (0.6666667 of 4,500 steps = 3000.00015) decays at
    step 3000, not one step late; the default thirds fall exactly on 1500 and 3000."""
    from embedcache.students.optim import SCHEDULES

    for milestones in ((0.3333333, 0.6666667), (1 / 3, 2 / 3)):
        f = SCHEDULES.get("step")(OptimConfig(schedule="step", milestones=milestones), 4500)
        assert [f(s) for s in (1499, 1500, 2999, 3000)] == [1.0, pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.01)]


def _conv_and_opt(name, channels_last):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, build_optimizer(OptimConfig(name=name, lr=3e-2, weight_decay=0.05), model.parameters())


def _conv_grads(model, step):
    g = torch.Generator().manual_seed(200 + step)
    for p in model.parameters():  # laid out as the weight, as autograd lays them out
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", ["adam", "adamw"])  # the fused kernels (SGD has none here: no case to fail)
def test_a_state_saved_channels_last_resumes_into_a_plain_model_as_the_same_numbers(name):
    """A run begun on a GPU (channels-last weights, so Adam's moments too) resumed on the CPU: the fused
    kernel paired the moments' memory with the weights' element by element, a silently other training."""
    ref, ref_opt = _conv_and_opt(name, channels_last=True)
    for step in range(3):
        _conv_grads(ref, step)
        optimizer_step(ref_opt)
    saved_model, saved_opt = copy.deepcopy(ref.state_dict()), copy.deepcopy(ref_opt.state_dict())  # as if read from disk
    resumed, opt = _conv_and_opt(name, channels_last=False)
    resumed.load_state_dict(saved_model)
    load_optimizer_state(opt, saved_opt)
    for step in range(3, 6):
        _conv_grads(ref, step), _conv_grads(resumed, step)
        optimizer_step(ref_opt), optimizer_step(opt)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
