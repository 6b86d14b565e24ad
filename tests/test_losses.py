"""Every registered loss against a direct numpy computation of its formula (PAPERS.md)."""
import numpy as np
import pytest
import torch

from embedcache.students.losses import LOSSES, BatchContext


def _norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _ce(z, y):
    return float(-_log_softmax(z)[np.arange(len(y)), y].mean())


def _batch(seed=0, b=6, c=5, d=8):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(b, d))
    t = _norm(rng.normal(size=(b, d)))
    text = _norm(rng.normal(size=(c, d)))
    y = rng.integers(0, c, b)
    y[0] = int(np.argmax(t[0] @ text.T))  # at least one correct teacher prediction
    logits = rng.normal(size=(b, c))
    return s, t, text, y, logits


def _ref_vlalign(s, t, text, y, tau=0.07, k=256, correct_only=False):
    zt, zs = _norm(t) @ text.T / tau, _norm(s) @ text.T / tau
    out, keep = [], []
    for i in range(len(y)):
        top = np.argsort(-zt[i])[:min(k, text.shape[0])]
        pt = np.exp(zt[i, top] - zt[i, top].max()); pt /= pt.sum()
        ps = np.exp(zs[i, top] - zs[i, top].max()); ps /= ps.sum()
        out.append(float((pt * (np.log(pt) - np.log(ps))).sum()))
        keep.append(np.argmax(zt[i]) == y[i])
    out, keep = np.array(out), np.array(keep, dtype=float)
    return float((out * keep).sum() / max(keep.sum(), 1)) if correct_only else float(out.mean())


def _ref_kd(s, t, text, y, logits, T=4.0, scale=100.0, student="text", t_squared=True):
    zt = scale * t @ text.T
    zs = logits if student == "linear" else scale * _norm(s) @ text.T
    lpt, lps = _log_softmax(zt / T), _log_softmax(zs / T)
    return float((np.exp(lpt) * (lpt - lps)).sum(1).mean() * (T * T if t_squared else 1.0))


REFERENCES = {
    "ce": lambda s, t, text, y, lg: _ce(lg, y),
    "cls": lambda s, t, text, y, lg: _ce(_norm(s) @ text.T / 0.07, y),
    "vlalign": lambda s, t, text, y, lg: _ref_vlalign(s, t, text, y),
    "mse": lambda s, t, text, y, lg: float(((_norm(s) - t) ** 2).sum(1).mean()),
    "cos": lambda s, t, text, y, lg: float((1 - (_norm(s) * t).sum(1)).mean()),
    "imcst": lambda s, t, text, y, lg: 0.5 * (_ce(_norm(s) @ t.T / 0.07, np.arange(len(y)))
                                              + _ce(t @ _norm(s).T / 0.07, np.arange(len(y)))),
    "kd": lambda s, t, text, y, lg: _ref_kd(s, t, text, y, lg),
    "vl2v_adip": lambda s, t, text, y, lg: float((0.5 * -(_norm(s) * t).sum(1) + 0.5 * -(_norm(s) * text[y]).sum(1)).mean()),
    "vl2v_sd": lambda s, t, text, y, lg: float((-0.5 * ((_norm(s) * text[y]).sum(1) + (_norm(s) * t).sum(1))).mean()),
}


def _ctx(s, t, text, y, logits):
    f = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return BatchContext(f(s), f(t), f(text), torch.tensor(y), f(logits))


def test_every_registered_loss_has_a_reference():
    assert set(LOSSES.names()) == set(REFERENCES)


@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_numpy(name, seed):
    s, t, text, y, logits = _batch(seed)
    got = LOSSES.get(name)(_ctx(s, t, text, y, logits))
    assert got.dim() == 0
    np.testing.assert_allclose(float(got), REFERENCES[name](s, t, text, y, logits), rtol=1e-5, atol=1e-6)


def test_loss_options_against_numpy():
    s, t, text, y, logits = _batch(3, b=8, c=7)
    ctx = _ctx(s, t, text, y, logits)
    np.testing.assert_allclose(float(LOSSES.get("vlalign")(ctx, k=3)), _ref_vlalign(s, t, text, y, k=3), rtol=1e-5)
    np.testing.assert_allclose(float(LOSSES.get("vlalign")(ctx, correct_only=True)),
                               _ref_vlalign(s, t, text, y, correct_only=True), rtol=1e-5)
    np.testing.assert_allclose(float(LOSSES.get("kd")(ctx, student="linear", temperature=2.0)),
                               _ref_kd(s, t, text, y, logits, T=2.0, student="linear"), rtol=1e-5)
    np.testing.assert_allclose(float(LOSSES.get("kd")(ctx, student="linear", temperature=0.1, t_squared=False)),
                               _ref_kd(s, t, text, y, logits, T=0.1, student="linear", t_squared=False), rtol=1e-5)
    np.testing.assert_allclose(float(LOSSES.get("ce")(ctx, temperature=0.1)), _ce(logits / 0.1, y), rtol=1e-6)
    lam = 0.3
    ref = float((lam * -(_norm(s) * t).sum(1) + (1 - lam) * -(_norm(s) * text[y]).sum(1)).mean())
    np.testing.assert_allclose(float(LOSSES.get("vl2v_adip")(ctx, lam=lam)), ref, rtol=1e-6)


def test_naive_kd_weighs_its_losses_as_vl2v_adips_baseline():
    """PAPERS.md: CE on logits / 0.1 plus 0.5 x KL (here the corrected KL: log-probabilities, batch
    mean); VL2V-ADiP's code divides both the student's and the teacher's logits by the same 0.1 before
    both terms, a scale of the logits, not a distillation temperature, and rescales neither by T^2.
    With T^2 the KD term's gradient was 0.5% of the CE term's: the recipe trained as CE alone."""
    from embedcache.students.recipes import RECIPES
    from embedcache.students.train import stage_loss

    s, t, text, y, logits = _batch(5, b=8, c=7)
    (stage,) = RECIPES.get("naive_kd").stages
    total, _ = stage_loss(stage, _ctx(s, t, text, y, logits))
    ref = _ce(logits / 0.1, y) + 0.5 * _ref_kd(s, t, text, y, logits, T=0.1, student="linear", t_squared=False)
    np.testing.assert_allclose(float(total), ref, rtol=1e-6)

    def grad_norm(name):  # the gradient one weighted term sends into the student's logits
        lg = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
        ctx = _ctx(s, t, text, y, logits)
        ctx.logits = lg
        (stage.losses[name] * LOSSES.get(name)(ctx, **stage.loss_args.get(name, {}))).backward()
        return float(lg.grad.norm())

    assert grad_norm("kd") > 0.2 * grad_norm("ce")


def test_losses_vanish_or_bottom_out_when_student_equals_teacher():
    s, t, text, y, logits = _batch(4)
    ctx = _ctx(t * 3.0, t, text, y, logits)  # same direction, different norm
    assert float(LOSSES.get("mse")(ctx)) < 1e-12 and float(LOSSES.get("cos")(ctx)) < 1e-12
    assert abs(float(LOSSES.get("vlalign")(ctx))) < 1e-9 and abs(float(LOSSES.get("kd")(ctx))) < 1e-9


def test_ce_without_classifier_is_a_clear_error():
    s, t, text, y, _ = _batch()
    ctx = BatchContext(torch.tensor(s), torch.tensor(t), torch.tensor(text), torch.tensor(y), logits=None)
    with pytest.raises(ValueError, match="needs a student with a linear classifier"):
        LOSSES.get("ce")(ctx)


def test_losses_are_float32_under_bf16_autocast():
    """A GPU step runs under bf16 autocast; the losses' own matmuls (class logits at tau 0.07, the
    correct-teacher filter's argmax, KD at temperature 0.1) stay float32: equal to the loss without."""
    from embedcache.students.recipes import RECIPES
    from embedcache.students.train import stage_loss

    s, t, text, y, logits = _batch(6, b=16, c=9, d=32)
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    ctx = BatchContext(f32(s), f32(t), f32(text), torch.tensor(y), f32(logits))
    for recipe in ("li_iccv23", "naive_kd", "vl2v_sd"):
        stage = RECIPES.get(recipe).stages[0]
        want, _ = stage_loss(stage, ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, parts = stage_loss(stage, ctx)
        assert got.dtype == torch.float32 and float(got) == float(want), recipe


def test_imcst_does_not_push_an_image_away_from_its_own_copy():
    """A pool smaller than the batch is drawn with replacement: a row drawn twice (same image, same view)
    was a negative of its own copy, a contradictory target (loss 0.17 instead of 0.0003 with s = t).
    Copies are left out of each other's softmax; the rest of the batch is as before."""
    s, t, text, y, logits = _batch(6, b=8)
    s[5], t[5], y[5] = s[2], t[2], y[2]  # row 5 is row 2 drawn again

    def ref(s, t, tau=0.07, mask=True):
        m = _norm(s) @ t.T / tau
        copy = (t @ t.T > 1 - 1e-6) & ~np.eye(len(t), dtype=bool)
        m = np.where(copy & mask, -np.inf, m)
        return 0.5 * (_ce(m, np.arange(len(t))) + _ce(m.T, np.arange(len(t))))

    np.testing.assert_allclose(float(LOSSES.get("imcst")(_ctx(s, t, text, y, logits))), ref(s, t), rtol=1e-6)
    same = float(LOSSES.get("imcst")(_ctx(t * 2.0, t, text, y, logits)))  # a student equal to its teacher
    assert same == pytest.approx(ref(t, t)) and ref(t, t, mask=False) > 50 * same
