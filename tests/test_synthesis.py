"""Data-free synthesis (embedcache.synthesis): prompt diversification, the image optimiser, and
stores of synthesised images, on the tiny random open_clip teacher."""
import copy
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import embedcache
from embedcache.config import apply_overrides, build_config, to_dict
from embedcache.errors import ConfigError, StoreDamagedError, StoreError
from embedcache.store import Store
from embedcache.synthesis import (GENERATORS, PROMPTS, STYLE_WORDS, ImageConfig, PromptsConfig, SynthesizeConfig,
                                  build_generator, build_plan, leaked_words, optimise, prepare, spherical_distance,
                                  synthesize)
from embedcache.synthesis.config import DEFAULT_TEST_DOMAINS, prompts_without_unread
from embedcache.synthesis.image import affine_thetas, augment
from embedcache.synthesis.prompts import style_spread
from embedcache.teachers import TEACHERS, Teacher
from embedcache.views import normalize, render_views

from conftest import quiet

CLASSES = ["circle", "square", "triangle"]  # the synthetic dataset's first three classes
ARRAYS = ["image/emb", "image/view_params", "image/pixels", "image/status"]


@pytest.fixture
def synth_cfg(tmp_path, tiny_teacher_cfg):
    """synth_cfg(out, *overrides) -> SynthesizeConfig: 3 classes x 2 images, tiny sizes."""
    def make(out: str = "syn.zarr", *overrides: str) -> SynthesizeConfig:
        base = {"classes": CLASSES, "per_class": 2, "teacher": to_dict(tiny_teacher_cfg),
                "prompts": {"method": "random", "k": 2, "steps": 3},
                "image": {"iterations": 4, "cutouts": 2, "lr": 0.1},
                "views": {"count": 2}, "canvas": {"size": 32}, "text": {"sources": ["name"]},
                "out": str(tmp_path / out), "batch_size": 2, "block_rows": 2, "progress": False}
        data = apply_overrides(base, overrides)
        given = {o.split("=", 1)[0] for o in overrides}  # the base's k and steps leave when a method reads neither
        data["prompts"] = {k: v for k, v in data["prompts"].items()
                           if k in prompts_without_unread(data["prompts"]) or f"prompts.{k}" in given}
        return build_config(SynthesizeConfig, data)
    return make


@pytest.fixture(scope="module")
def pooled_teacher(tmp_path_factory):
    """The tiny random CLIP with average-pooled patch tokens. The conftest one reads its class token,
    which in a random one-layer ViT barely depends on the pixels, so no image can move its embedding
    far; pooling the patch tokens lets synthesis steer it, as a trained encoder's can be steered."""
    import json

    import open_clip
    from safetensors.torch import save_file

    from conftest import TINY_CLIP
    from embedcache.config import TeacherConfig
    from embedcache.teachers import build_teacher

    cfg = json.loads(json.dumps(TINY_CLIP))
    cfg["vision_cfg"]["pool_type"] = "avg"
    folder = tmp_path_factory.mktemp("pooled_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}}))
    return build_teacher(TeacherConfig(name="open_clip", model=f"local-dir:{folder}", device="cpu"))


def _plan(teacher, method, **kw):
    settings = prompts_without_unread({"method": method, "k": 4, **kw})  # plain reads no k, only contrastive steps
    return build_plan(teacher, CLASSES, build_config(PromptsConfig, settings), quiet)


# --- prompt diversification ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", PROMPTS.names())
def test_each_method_gives_one_target_per_style_and_class(tiny_teacher, method):
    plan = _plan(tiny_teacher, method, steps=3)
    k = 1 if method == "plain" else 4
    d, w = tiny_teacher.embed_dim, tiny_teacher.token_table().shape[1]
    assert plan.targets.shape == (k, len(CLASSES), d) and plan.k == k
    np.testing.assert_allclose(plan.targets.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    if method == "plain":
        assert plan.styles is None
    else:
        assert plan.styles.shape == (k, w) and plan.styles.dtype == torch.float32
    assert len(plan.describe) == k and len(plan.digest()) == 16
    assert 0.0 <= plan.info["class_fidelity"] <= 1.0 and "leaks_test_domains" in plan.info


def test_mix_weights_are_convex_and_sentence_level_has_no_pseudo_word(tiny_teacher):
    plan = _plan(tiny_teacher, "mix", mix_words=3)
    for line in plan.describe:
        weights = [float(part.split()[0]) for part in line.split(" + ")]
        assert len(weights) == 3 and all(w >= 0 for w in weights) and abs(sum(weights) - 1) < 2e-3
    sent = _plan(tiny_teacher, "mix", mix_words=3, mix_level="sentence")
    assert sent.styles is None and sent.targets.shape == plan.targets.shape
    assert sent.describe == plan.describe  # same mixtures, mixed at another level
    assert not torch.allclose(sent.targets, plan.targets)


def test_contrastive_lowers_its_loss_and_spreads_the_styles(tiny_teacher):
    from embedcache.synthesis.prompts import CONTRASTIVE_LOSS, STYLE_TOKEN

    plan = _plan(tiny_teacher, "contrastive", steps=25, lr=0.02)
    info = plan.info
    assert info["loss"] == CONTRASTIVE_LOSS and info["style_token"] == STYLE_TOKEN  # the design, recorded (an audit)
    assert info["loss_end"] < info["loss_start"]
    assert info["spread_end"] > info["spread_start"] + 0.05
    assert info["spread"] == pytest.approx(info["spread_end"])


def test_the_contrastive_loss_is_the_form_its_record_describes():
    """A numpy reference of the recorded form: InfoNCE both ways between the K styles' prompts of classes m
    and m', plus content_weight x the cross-entropy of both classes' styled prompts over the content prompts."""
    from embedcache.synthesis.prompts import CONTRASTIVE_LOSS, contrastive_loss

    rng = np.random.default_rng(0)
    k, c, d, tau, w, m, m2 = 5, 6, 16, 0.07, 0.5, 2, 5
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    a, p, content = unit(rng.normal(size=(k, d))), unit(rng.normal(size=(k, d))), unit(rng.normal(size=(c, d)))

    def ce(z, y):
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))

    style = 0.5 * (ce(a @ p.T / tau, np.arange(k)) + ce(p @ a.T / tau, np.arange(k)))
    both = ce(np.concatenate([a, p]) @ content.T / tau, np.array([m] * k + [m2] * k))
    total, s, cterm = contrastive_loss(*(torch.from_numpy(x) for x in (a, p, content)), m, m2, tau, w)
    assert (float(total), float(s), float(cterm)) == pytest.approx((style + w * both, style, both), rel=1e-9)
    assert "both ways" in CONTRASTIVE_LOSS and "both classes' styled prompts" in CONTRASTIVE_LOSS


def test_style_spread_is_zero_for_identical_styles_and_positive_otherwise():
    same = F.normalize(torch.randn(1, 3, 8), dim=-1).expand(4, 3, 8)
    assert style_spread(same) == pytest.approx(0.0, abs=1e-6)
    assert style_spread(F.normalize(torch.randn(4, 3, 8), dim=-1)) > 0.5


def test_injected_word_equals_the_word_and_gradients_reach_the_style(tiny_teacher):
    word = tiny_teacher.word_embeddings(["circle"])  # one BPE token
    styled = tiny_teacher.encode_text_styled(["a * style of a dog"], word)
    plain = tiny_teacher.encode_text(["a circle style of a dog"]).to(styled.device)
    torch.testing.assert_close(styled, plain, atol=1e-5, rtol=1e-5)
    s = torch.zeros(1, word.shape[1], requires_grad=True)
    (g,) = torch.autograd.grad(tiny_teacher.encode_text_styled(["a * style of a dog"], s).sum(), [s])
    assert g.abs().sum() > 0
    assert all(p.grad is None for p in tiny_teacher.model.parameters())


def test_default_style_words_name_no_evaluation_domain_and_leaks_are_found():
    assert leaked_words(STYLE_WORDS, DEFAULT_TEST_DOMAINS) == []
    assert leaked_words(["neon", "sketchy", "oil painting", "Cartoon", "photograph", "art deco", "clay"],
                        ["art_painting", "cartoon", "photo", "sketch"]) == \
        ["Cartoon", "art deco", "oil painting", "photograph", "sketchy"]


def test_a_store_made_with_leaking_words_says_so(tiny_teacher, synth_cfg):
    p = prepare(synth_cfg("leak.zarr", "prompts.method=mix", "prompts.words=[neon,sketch,cartoon]"), tiny_teacher, quiet)
    assert p.section["leaks_test_domains"] == ["cartoon", "sketch"]
    clean = prepare(synth_cfg("clean.zarr", "prompts.method=mix"), tiny_teacher, quiet)
    assert clean.section["leaks_test_domains"] == []
    assert prepare(synth_cfg("plain.zarr", "prompts.method=plain"), tiny_teacher, quiet).section[
        "leaks_test_domains"] == ["photo"]  # 'a photo of a {c}' names the photo domain


# --- the image side ----------------------------------------------------------------------------------
def test_spherical_distance_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    an = a.numpy() / np.linalg.norm(a.numpy(), axis=1, keepdims=True)
    bn = b.numpy() / np.linalg.norm(b.numpy(), axis=1, keepdims=True)
    want = 2 * np.arcsin(np.linalg.norm(an - bn, axis=1) / 2) ** 2
    np.testing.assert_allclose(spherical_distance(a, b).numpy(), want, rtol=1e-5, atol=1e-6)
    assert float(spherical_distance(a[:1], a[:1])) == pytest.approx(0.0, abs=1e-6)
    # antipodes: arcsin is ill-conditioned at 1 (float32 rounding of |a - b| / 2 moves it by ~4e-4),
    # so the formula's maximum is checked in float64
    a64 = a[:1].double()
    assert float(spherical_distance(a64, -a64)) == pytest.approx(math.pi ** 2 / 2, rel=1e-6)


def test_identity_and_flip_cutouts_resample_exactly():
    img = torch.rand(1, 3, 16, 16)
    grid = lambda p: F.grid_sample(img, F.affine_grid(affine_thetas(np.array([p])), [1, 3, 16, 16], align_corners=False),
                                   align_corners=False, padding_mode="reflection")
    torch.testing.assert_close(grid([1, 1, 0, 0, 1, 0, 0]), img, atol=1e-5, rtol=0)
    torch.testing.assert_close(grid([1, 1, 0, 0, -1, 0, 0]), img.flip(-1), atol=1e-5, rtol=0)


def test_augmentations_depend_on_seed_row_and_iteration_only():
    cfg = build_config(ImageConfig, {"cutouts": 3})
    img = torch.rand(2, 3, 24, 24)
    both = augment(img, [5, 9], 2, cfg, 0, 20)
    assert both.shape == (6, 3, 20, 20)
    torch.testing.assert_close(augment(img[1:], [9], 2, cfg, 0, 20), both[3:])  # batch-mates change nothing
    assert not torch.equal(augment(img[1:], [9], 3, cfg, 0, 20), both[3:])


@pytest.mark.parametrize("name", GENERATORS.names())
def test_generators_render_images_from_per_image_seeds(name, tiny_teacher, tmp_path):
    cfg = build_config(ImageConfig, {"generator": name})
    if name == "diffusers_vae":
        pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
        from diffusers import AutoencoderKL

        AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=2, norm_num_groups=4,
                      layers_per_block=1).save_pretrained(tmp_path / "vae")
        cfg = build_config(ImageConfig, {"generator": name, "model": str(tmp_path / "vae")})
    gen = build_generator(cfg, 16, torch.device("cpu"))
    img = gen.render(gen.init([3, 4]))
    assert img.shape == (2, 3, 16, 16) and float(img.detach().min()) >= 0 and float(img.detach().max()) <= 1
    torch.testing.assert_close(gen.render(gen.init([4])), img[1:])
    assert gen.identity()["name"] == name


def test_each_image_ignores_its_batch_mates(pooled_teacher):
    cfg = build_config(ImageConfig, {"iterations": 6, "cutouts": 2, "lr": 0.1})
    gen = build_generator(cfg, 32, pooled_teacher.device)
    targets = _plan(pooled_teacher, "plain").targets[0, :2]
    two = optimise(pooled_teacher, gen, targets, [0, 1], cfg, 32)
    assert two.images.shape == (2, 3, 32, 32) and (two.loss_end < two.loss_start).all()
    one = optimise(pooled_teacher, gen, targets[1:], [1], cfg, 32)
    torch.testing.assert_close(one.images, two.images[1:], atol=1e-4, rtol=0)


# --- stores of synthesised images ---------------------------------------------------------------------
def _arrays(path):
    with embedcache.open_store(path) as s:
        return {a: s.store.b.read(a) for a in ARRAYS}


def test_synthesis_lowers_the_loss_and_the_teacher_recognises_its_images(pooled_teacher, synth_cfg):
    """Above chance on a few classes: the teacher's zero-shot top-1 on the stored images, over the
    class prompts they were made for (class names alone: 'a photo of a {c}.' embeddings of this
    random text tower are 0.98 alike, too close for any image to tell apart)."""
    cfg = synth_cfg("acc.zarr", "prompts.method=plain", "prompts.plain_template='{}'", "image.iterations=20",
                    "batch_size=6", "block_rows=6")
    losses = []
    synthesize(cfg, teacher=pooled_teacher, log=quiet, on_batch=lambda rows, out: losses.append(out))
    assert all((o.loss_end < o.loss_start - 0.2).all() for o in losses)
    with embedcache.open_store(cfg.out) as s:
        targets = s.store.read_derived("synthesis_targets")[0]  # (C, D): T('{c}')
        emb = s.image_emb().astype(np.float32)
        top1 = ((emb[:, 0] @ targets.T).argmax(1) == s.meta.label.to_numpy()).mean()
    assert top1 >= 2 / 3  # chance: 1/3


def test_synthesised_store_passes_the_store_checks_of_an_extracted_one(tiny_teacher, synth_cfg):
    cfg = synth_cfg("full.zarr", "prompts.method=mix", "image.iterations=2")
    res = synthesize(cfg, teacher=tiny_teacher, log=quiet)
    assert res.complete and res.images == 6 and res.failed == 0
    with embedcache.open_store(cfg.out) as s:
        assert s.store.verify().ok
        n, d = 6, tiny_teacher.embed_dim
        emb = s.image_emb()
        assert emb.shape == (n, 2, d) and emb.dtype == np.float16 and s.pixels().shape == (n, 32, 32, 3)
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=-1), 1.0, atol=2e-3)
        assert list(s.meta.columns) == ["index", "path", "class_name", "label", "domain", "split", "status", "reason"]
        assert s.classes == CLASSES and (s.meta.groupby("class_name").size() == 2).all()
        assert s.domains == ["mix-00", "mix-01"] and s.meta.path[1] == "mix/circle/00001.png"
        assert s.meta.domain.tolist()[:2] == ["mix-00", "mix-01"]  # styles round-robin within a class
        m = s.manifest
        assert m["dataset"]["name"] == "synthesis" and m["synthesis"]["per_class"] == 2
        # the resolved config recorded no dataset of the shapes' defaults (4 classes, 8 per class: a trial)
        assert m["config"]["dataset"] == {"name": "synthesis", "rows": "class names: the manifest's synthesis section"}
        assert m["synthesis"]["image"]["augment"]["cut_size"] == tiny_teacher.input_size
        assert m["synthesis"]["prompts"]["k"] == 2 and len(m["synthesis"]["styles"]) == 2
        assert {"spread", "class_fidelity", "styles_digest"} <= set(m["synthesis_plan"])  # recorded, not keyed
        from embedcache.synthesis.image import DETAILS
        from embedcache.synthesis.prompts import STYLE_TOKEN

        assert m["synthesis_plan"]["image_details"] == DETAILS and m["synthesis_plan"]["style_token"] == STYLE_TOKEN
        adam = torch.optim.Adam([torch.zeros(1, requires_grad=True)]).defaults  # what DETAILS says of it holds
        assert (adam["betas"], adam["eps"], adam["weight_decay"]) == ((0.9, 0.999), 1e-8, 0)
        assert "betas (0.9, 0.999), eps 1e-8, no weight decay" in DETAILS["optimizer"]
        assert "sub-word" in m["synthesis_plan"]["word_vector"]  # mix at token level: its words' vectors
        assert set(s.store.derived()) == {"synthesis_targets", "synthesis_styles"}
        assert s.store.read_derived("synthesis_styles").shape == (2, tiny_teacher.token_table().shape[1])
        # views were drawn and embedded as for real images: the teacher re-encoding them agrees
        x = render_views(torch.from_numpy(s.pixels().copy()), torch.from_numpy(s.view_params().copy()),
                         tiny_teacher.input_size, tiny_teacher.interpolation)
        again = tiny_teacher.encode_image(normalize(x, tiny_teacher.mean, tiny_teacher.std).flatten(0, 1)).view(n, 2, d)
        np.testing.assert_allclose(again.numpy(), emb.astype(np.float32), atol=3e-3)
    assert synthesize(cfg, teacher=tiny_teacher, log=quiet).skipped  # a complete store is a no-op
    # damage: `verify --repair` cannot rebuild a synthesiser; it says to rerun synthesize, which re-does the block
    from click.testing import CliRunner

    from embedcache.cli import main

    next(p for p in (Path(cfg.out) / "image" / "pixels" / "c").rglob("*") if p.is_file()).unlink()
    # verify and the readers name the fix that works (they named `verify --repair`, which then refused: a trial)
    listed = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress"])
    assert listed.exit_code == 2 and "verify --repair" not in listed.output, listed.output
    assert "rerunning the store's `embedcache synthesize` command with the same config re-does" in listed.output
    with pytest.raises(StoreDamagedError, match=r"then rerunning the store's `embedcache synthesize` command") as err:
        embedcache.open_store(cfg.out).pixels()
    assert "--repair" not in str(err.value)
    seen = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress", "--repair"])
    assert seen.exit_code == 2 and "was made by `embedcache synthesize`: rerun that command" in seen.output, seen.output
    assert synthesize(cfg, teacher=tiny_teacher, log=quiet).repaired == 1
    with Store(cfg.out, "a") as st:
        assert st.verify().ok
        st.b.write("derived/synthesis_styles", 0, np.zeros((1,) + st.b.shape("derived/synthesis_styles")[1:], np.float32))
    marked = CliRunner().invoke(main, ["verify", cfg.out, "--no-progress", "--repair"])  # a record made with the store
    assert marked.exit_code == 0 and "synthesis_styles marked to be recomputed" in marked.output, marked.output
    said = []  # the store is intact; its record is made again, and that is said (not "nothing to do" alone: a trial)
    assert synthesize(cfg, teacher=tiny_teacher, log=said.append).skipped
    assert any(line.endswith("synthesis_styles made again (the styles planned again; a store's images keep theirs)")
               for line in said), said
    with Store(cfg.out) as st:
        assert st.verify().derived == {} and st.read_derived("synthesis_styles").shape[0] == 2


def test_the_image_loop_runs_adam_as_its_record_says(tiny_teacher, monkeypatch):
    """DETAILS says torch's Adam defaults: the loop passes nothing but the learning rate."""
    from embedcache.synthesis import image as image_mod

    made = []
    real = torch.optim.Adam
    monkeypatch.setattr(image_mod.torch.optim, "Adam", lambda params, **kw: made.append(kw) or real(params, **kw))
    cfg = build_config(ImageConfig, {"iterations": 1, "cutouts": 1, "lr": 0.07})
    gen = build_generator(cfg, 32, tiny_teacher.device)
    image_mod.optimise(tiny_teacher, gen, _plan(tiny_teacher, "plain").targets[0, :1], [0], cfg, 32)
    assert made == [{"lr": 0.07}]



def test_a_recipe_trains_on_a_synthesised_store_and_is_scored_on_real_images(tiny_teacher, synth_cfg, synthetic_store,
                                                                            tmp_path):
    from embedcache.students.scoring import score_run
    from embedcache.students.train import StudentConfig, TrainConfig, train

    cfg = synth_cfg("train.zarr", "text.sources=[name,templates,attributes]", "text.attributes=synthetic")
    synthesize(cfg, teacher=tiny_teacher, log=quiet)
    run = tmp_path / "run"
    train(TrainConfig(store=cfg.out, recipe="li_iccv23", student=StudentConfig(name="test_resnet", input_size=32),
                      steps=3, batch_size=4, eval_every=3, ckpt_every=3, out=str(run), progress=False), log=quiet)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        rows = score_run(str(run), ["lodo"], str(synthetic_store), transfer=True)
    # synthesised images are never real ones: no check of shared images to make, nor a warning that it could not be
    assert not [w for w in said if "cannot be checked" in str(w.message)], [str(w.message) for w in said]
    top1 = rows[rows.metric == "top1"]
    assert set(top1.split) == {"zero_shot"} and set(top1.domain) == {"solid", "outline", "avg"}
    from embedcache.errors import StoreError
    from embedcache.students.data import StoreData

    with pytest.raises(StoreError, match=r"no text source 'descriptions' .*; synthesise it again with --set "
                                         r"text.sources=\[...,descriptions\]"):  # it said re-extract
        StoreData(cfg.out, "descriptions")


def test_a_killed_or_stopped_synthesis_resumes_to_the_same_arrays(tiny_teacher, synth_cfg):
    from embedcache import interrupt
    from embedcache.synthesis import SynthesisInterrupted

    full = synth_cfg("full.zarr")
    synthesize(full, teacher=tiny_teacher, log=quiet)
    cut = synth_cfg("cut.zarr")

    def kill(block):
        raise KeyboardInterrupt  # after the first block is written, as a crash would

    with pytest.raises(KeyboardInterrupt):
        synthesize(cut, teacher=tiny_teacher, on_block_done=kill, log=quiet)
    with Store(cut.out) as st:
        assert not st.complete and st.blocks_done().tolist() == [True, False, False]
    with pytest.raises(embedcache.EmbedcacheError, match="rerun the same `embedcache synthesize` command"):
        embedcache.open_store(cut.out)  # a reader names the command that finishes it
    try:  # Ctrl-C: a stop request, seen at the next optimisation step
        with pytest.raises(SynthesisInterrupted, match="rerun the same command to resume"):
            synthesize(cut, teacher=tiny_teacher, on_batch=lambda rows, out: interrupt.request(), log=quiet)
    finally:
        interrupt.reset()
    with Store(cut.out) as st:
        assert st.blocks_done().tolist() == [True, True, False]
    res = synthesize(cut, teacher=tiny_teacher, log=quiet)
    assert res.complete and res.images == 2  # only the unfinished block was synthesised
    a, b = _arrays(full.out), _arrays(cut.out)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # a damaged store (a lost pixel chunk) is repaired by the same command: that block alone, same bytes
    pixels = Path(cut.out) / "image" / "pixels"
    chunk = next(p for p in sorted(pixels.rglob("*")) if p.is_file() and p.relative_to(pixels).parts[:2] == ("c", "1"))
    chunk.unlink()
    res = synthesize(cut, teacher=tiny_teacher, log=quiet)
    assert res.repaired == 1 and res.images == 2
    assert np.array_equal(_arrays(cut.out)["image/pixels"], a["image/pixels"])


def test_fewer_images_per_class_than_styles_is_said(tiny_teacher, synth_cfg):
    """per_class below prompts.k left most styles without an image, with no word (a trial)."""
    from embedcache.synthesis.run import prepare

    said = []
    prepare(synth_cfg("few.zarr", "prompts.k=4"), teacher=tiny_teacher, log=said.append)
    assert any(line.startswith("note: per_class=2 uses 2 of the 4 styles") for line in said), said
    said.clear()
    prepare(synth_cfg("enough.zarr"), teacher=tiny_teacher, log=said.append)
    assert not any("of the 2 styles" in line for line in said), said


def test_a_synthesis_resumed_under_another_thread_count_says_its_images_will_differ(tiny_teacher, synth_cfg):
    """Images optimised under another CPU thread count drift far apart (up to 59/255 in a helper's
    trial), and the resume mixed the two syntheses with exit 0 and no word."""
    cut = synth_cfg("threads.zarr")

    def kill(block):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize(cut, teacher=tiny_teacher, on_block_done=kill, log=quiet)
    began, said = torch.get_num_threads(), []

    def stop_when_said(line):
        said.append(line)
        if "the store began" in line:
            raise KeyboardInterrupt

    torch.set_num_threads(began + 1)
    try:
        with pytest.raises(KeyboardInterrupt):
            synthesize(cut, teacher=tiny_teacher, log=stop_when_said)
    finally:
        torch.set_num_threads(began)
    assert said[-1] == (f"resuming with {began + 1} CPU threads; the store began with {began}: images synthesised now "
                        f"will differ from theirs (the rounding grows over the iterations); OMP_NUM_THREADS={began} "
                        "keeps the store byte-identical"), said


def test_a_resume_names_every_batch_size_the_stores_blocks_were_made_with(tiny_teacher, synth_cfg):
    """Begun at batch 2, resumed at 1 for a block, then at 2 again: the third call compared itself with the
    first only and said nothing, leaving images of two batch sizes (45 to 169/255 apart in a trial: the
    rounding grows over the iterations) in one store."""
    def one_block(block):
        raise KeyboardInterrupt

    cut = synth_cfg("mixed.zarr", "block_rows=2", "batch_size=2")
    for size in (2, 1):
        with pytest.raises(KeyboardInterrupt):
            synthesize(build_config(SynthesizeConfig, {**to_dict(cut), "batch_size": size}), teacher=tiny_teacher,
                       on_block_done=one_block, log=quiet)
    said = []

    def stop_when_said(line):
        said.append(line)
        if line.startswith("resuming with batch_size"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize(cut, teacher=tiny_teacher, log=stop_when_said)
    assert said[-1] == ("resuming with batch_size=2; blocks of the store were encoded with batch_size=1: images "
                        "synthesised now will differ from theirs (the rounding grows over the iterations); the store "
                        "already holds blocks of batch_size=2 too"), said


@pytest.mark.parametrize("method", ["contrastive", "mix", "plain"])
def test_a_complete_synthesis_is_found_without_learning_its_styles_again(tiny_teacher, synth_cfg, monkeypatch, method):
    """A rerun of a complete synthesis learned every style again (minutes with a real teacher) before
    saying "nothing to do"; the key's style lines now come from the settings, and the plan is asked
    for only when something has to be made: an unfinished block or a lost record of the styles."""
    import embedcache.synthesis.run as run

    cfg = synth_cfg(f"{method}.zarr", f"prompts.method={method}")
    made = synthesize(cfg, teacher=tiny_teacher, log=quiet)
    real, calls = run.build_plan, []

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(run, "build_plan", counted)
    again = synthesize(cfg, teacher=tiny_teacher, log=quiet)
    assert again.skipped and again.key == made.key and calls == []
    with Store(cfg.out, "a") as st:  # its record of the styles lost: remade from the plan kept in the store
        targets, record = st.read_derived("synthesis_targets"), st.manifest["synthesis_plan"]
        st.write_manifest({k: v for k, v in st.manifest.items() if k != "synthesis_plan"})
    assert synthesize(cfg, teacher=tiny_teacher, log=quiet).skipped and calls == []
    with Store(cfg.out) as st:
        assert st.manifest["synthesis_plan"] == record
    with Store(cfg.out, "a") as st:  # a store whose targets were kept without the plan's lines (before): learned
        info = st.derived()
        info["synthesis_targets"] = {k: v for k, v in info["synthesis_targets"].items() if k != "describe"}
        st.b.set_attr("derived", info)
        st.write_manifest({k: v for k, v in st.manifest.items() if k != "synthesis_plan"})
    assert synthesize(cfg, teacher=tiny_teacher, log=quiet).skipped and calls == [1]
    with Store(cfg.out) as st:
        assert "synthesis_plan" in st.manifest and np.array_equal(st.read_derived("synthesis_targets"), targets)
    if method != "plain":  # a store killed between the record and the styles (the order before): styles remade
        with Store(cfg.out, "a") as st:
            kept = st.derived()
            assert kept.pop("synthesis_styles", {}).get("complete") == (method == "contrastive" or method == "mix")
            st.b.set_attr("derived", kept)
        synthesize(cfg, teacher=tiny_teacher, log=quiet)
        with Store(cfg.out) as st:
            assert st.derived()["synthesis_styles"]["complete"] and calls == [1, 1]
    # a store left unfinished learns them before it is opened, as before
    cut = synth_cfg(f"{method}-cut.zarr", f"prompts.method={method}")

    def kill(block):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize(cut, teacher=tiny_teacher, on_block_done=kill, log=quiet)
    calls.clear()  # resumed: with the styles it began with, kept in the store (test below)
    assert synthesize(cut, teacher=tiny_teacher, log=quiet).complete and calls == []


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_a_resumed_synthesis_pulls_its_images_towards_the_styles_it_began_with(tiny_teacher, synth_cfg, monkeypatch,
                                                                                backend):
    """A resume learned the styles again, and their last bits vary with the thread count: its images
    were pulled towards other targets than the first call's, and the store recorded the second plan
    only. The plan is kept in the store as it is opened, and a resume takes it from there."""
    import embedcache.synthesis.run as run

    cut = synth_cfg(f"began.{'zarr' if backend == 'zarr' else 'h5'}", "prompts.method=contrastive")

    def kill(block):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize(cut, teacher=tiny_teacher, on_block_done=kill, log=quiet)
    with Store(cut.out) as st:
        began = st.read_derived("synthesis_targets"), st.read_derived("synthesis_styles")
    real = run.build_plan

    def drifted(*args, **kw):  # learned again under another thread count
        plan = real(*args, **kw)
        plan.styles = plan.styles + 1e-3
        plan.targets = torch.nn.functional.normalize(plan.targets + 1e-3, dim=-1)
        return plan

    monkeypatch.setattr(run, "build_plan", drifted)
    assert synthesize(cut, teacher=tiny_teacher, log=quiet).complete
    with Store(cut.out) as st:
        assert np.array_equal(st.read_derived("synthesis_targets"), began[0])
        assert np.array_equal(st.read_derived("synthesis_styles"), began[1])
        digest = st.manifest["synthesis_plan"]["styles_digest"]
    monkeypatch.setattr(run, "build_plan", real)
    full = synth_cfg(f"whole.{'zarr' if backend == 'zarr' else 'h5'}", "prompts.method=contrastive")
    synthesize(full, teacher=tiny_teacher, log=quiet)  # one call on this machine: the same plan, the same images
    with Store(full.out) as st:
        assert st.manifest["synthesis_plan"]["styles_digest"] == digest
    a, b = _arrays(full.out), _arrays(cut.out)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_a_store_made_before_its_plan_was_kept_is_repaired_with_its_own_styles(tiny_teacher, synth_cfg, monkeypatch):
    """A store of the version before keeps its targets without the plan's lines: a repair learned the
    styles again and overwrote its arrays, while its manifest named the old plan (a review). Its plan is
    rebuilt from its arrays and its manifest's record, checked against the record's digest."""
    import embedcache.synthesis.run as run

    cfg = synth_cfg("before.zarr", "prompts.method=contrastive")
    synthesize(cfg, teacher=tiny_teacher, log=quiet)
    with Store(cfg.out, "a") as st:  # as the version before left it
        info = st.derived()
        info["synthesis_targets"] = {k: v for k, v in info["synthesis_targets"].items()
                                     if k not in ("describe", "method", "info", "styles")}
        st.b.set_attr("derived", info)
        kept = st.read_derived("synthesis_targets"), st.read_derived("synthesis_styles")
        digest = st.manifest["synthesis_plan"]["styles_digest"]
    before = _arrays(cfg.out)
    pixels = Path(cfg.out) / "image" / "pixels"
    next(p for p in sorted(pixels.rglob("*")) if p.is_file() and p.relative_to(pixels).parts[:2] == ("c", "1")).unlink()
    calls = []

    def drifted(*args, **kw):
        calls.append(1)
        plan = real(*args, **kw)
        plan.targets = torch.nn.functional.normalize(plan.targets + 1e-3, dim=-1)
        return plan

    real = run.build_plan
    monkeypatch.setattr(run, "build_plan", drifted)
    assert synthesize(cfg, teacher=tiny_teacher, log=quiet).repaired == 1 and calls == []
    with Store(cfg.out) as st:
        assert np.array_equal(st.read_derived("synthesis_targets"), kept[0])
        assert np.array_equal(st.read_derived("synthesis_styles"), kept[1])
        assert st.manifest["synthesis_plan"]["styles_digest"] == digest
    after = _arrays(cfg.out)
    for k in before:
        assert np.array_equal(before[k], after[k]), k


def test_the_open_hook_sees_what_another_shard_kept_before_it(tiny_teacher, synth_cfg):
    """A Zarr handle caches its attributes: a shard that opened the store before another kept its plan
    there would not see it behind the writers' gate, and keep its own over it (a review)."""
    from embedcache.extract import _on_open

    cfg = synth_cfg("shards.zarr")
    synthesize(cfg, teacher=tiny_teacher, log=quiet)
    seen = []
    with Store(cfg.out, "a") as late, Store(cfg.out, "a") as first:
        late.derived()  # read (and cached) before the other shard writes
        first.put_derived("kept_by_the_other", np.zeros(3, np.float32), {"what": "x"})
        _on_open(late, lambda st: seen.append(st.derived().get("kept_by_the_other", {}).get("complete")), cfg.out)
    assert seen == [True]


def test_ctrl_c_stops_the_learning_of_contrastive_styles(tiny_teacher, synth_cfg):
    """A stop request while Contrastive-Prompt learned its styles was seen only once they were learned
    (10 minutes later with prompts.steps=20000)."""
    from embedcache import interrupt
    from embedcache.synthesis import SynthesisInterrupted

    cfg = synth_cfg("stop.zarr", "prompts.method=contrastive", "prompts.steps=100000")
    interrupt.request()
    try:
        with pytest.raises(SynthesisInterrupted, match=r"interrupted while learning the styles \(step 0 of 100000"):
            synthesize(cfg, teacher=tiny_teacher, log=quiet)
    finally:
        interrupt.reset()
    assert not Path(cfg.out).exists()


KEY_CHANGES = ["per_class=3", "classes=[circle,square,star]", "prompts.method=mix", "prompts.k=3", "prompts.seed=1",
               "prompts.template='a * kind of a {}'", "prompts.random_sigma=0.5", "image.iterations=5",
               "image.lr=0.2", "image.cutouts=3", "image.cut_size=24", "image.cut_scale=[0.6,1.0]", "image.flip=false",
               "image.rotate=5", "image.translate=0.1", "image.noise=0.0", "image.decay=0.5",
               "image.decorrelate=false", "image.init_std=0.02", "image.seed=1", "canvas.size=24", "views.count=3",
               "prompts.test_domains=[sketch]"]


def test_cache_key_changes_with_every_synthesis_setting_and_not_with_batch_size(tiny_teacher, synth_cfg):
    base = prepare(synth_cfg(), tiny_teacher, quiet).key()
    same = prepare(synth_cfg("other.zarr", "batch_size=5", "block_rows=3", "progress=true"), tiny_teacher, quiet).key()
    assert same == base
    keys = {c: prepare(synth_cfg("s.zarr", c), tiny_teacher, quiet).key() for c in KEY_CHANGES}
    assert base not in keys.values()
    assert len(set(keys.values())) == len(keys), [c for c in keys if list(keys.values()).count(keys[c]) > 1]
    mix = {lvl: prepare(synth_cfg("m.zarr", "prompts.method=mix", f"prompts.mix_level={lvl}"), tiny_teacher,
                        quiet).key() for lvl in ("token", "sentence")}
    words = prepare(synth_cfg("m.zarr", "prompts.method=mix", "prompts.words=[neon,clay]"), tiny_teacher, quiet).key()
    con = [prepare(synth_cfg("c.zarr", "prompts.method=contrastive", f"prompts.steps={s}"), tiny_teacher, quiet).key()
           for s in (1, 2)]
    assert len({*mix.values(), words, *con}) == 5


def test_cache_key_holds_settings_not_the_numbers_style_learning_computes(tiny_teacher, synth_cfg, monkeypatch):
    """Learned styles differ in their last bits with the thread count; a resumed synthesis on another
    machine must still find its store (the key names settings, as an extraction's names the teacher)."""
    import embedcache.synthesis.run as run

    cfg = synth_cfg("c.zarr", "prompts.method=contrastive")
    base = prepare(cfg, tiny_teacher, quiet).key()
    real = run.build_plan

    def nudged(*args, **kw):
        plan = real(*args, **kw)
        plan.styles = plan.styles * (1 + 1e-6)
        plan.targets = plan.targets * (1 + 1e-6)
        plan.info = {k: v + 1e-9 if isinstance(v, float) else v for k, v in plan.info.items()}
        return plan

    monkeypatch.setattr(run, "build_plan", nudged)
    assert prepare(cfg, tiny_teacher, quiet).key() == base


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("prompts.method=fancy", "prompts.method='fancy' is not valid: choose one of contrastive, mix, plain, random"),
    ("classes=[]", "classes is empty"),
    ("classes=[dog,cat,dog]", "classes lists 'dog' twice"),
    ("classes=[dog,cat,true]", r"classes\[2\]=True is not valid: expected a string; quote it \('true'\)"),
    ("classes=[hot_dog,cat,'Hot dog']", "classes 'hot_dog' and 'Hot dog' give the same prompt text"),
    ("classes=['0','1','2']", r"class '0' is an id, not a name.*--set classes=\[dog,horse"),
    ("classes=[dog,'3']", r"class '3' is an id, not a name"),
    ("classes=[dog,n02084071]", r"class 'n02084071' is an id, not a name"),
    ("classes=['dog*2',cat]", "class 'dog\\*2' holds the style placeholder '\\*' of the prompts"),
    ('classes=[cat,"dog\\tx"]', r"class 'dog\\tx' holds the control character '\\t' \(a tab or a line break\)"),
    ("image.generator=gan", "image.generator='gan' is not valid: choose one of diffusers_vae, fourier"),
    ("prompts.template='a style of a {}'", "needs the placeholder '\\*' once"),
    # braces a template or word cannot be filled with: a KeyError/IndexError traceback after the teacher loaded
    (("prompts.method=plain", "prompts.plain_template='a {} in {style}'"), r"prompts.plain_template='a \{\} in \{style\}' cannot be filled "
                                                 r"with a class name \(KeyError: 'style'\)"),
    ("prompts.template='a * {0} of a {}'", r"prompts.template=.* cannot be filled with a class name"),
    (("prompts.method=mix", "prompts.words=['{} art',ink]"), r"prompts.words\[0\]='\{\} art' holds a brace"),
    (("prompts.placeholder='{s}'", "prompts.template='a {s} style of a {}'"), r"prompts.placeholder='\{s\}' holds a brace"),
    # mix settings that were quietly capped, or gave every style the same words
    (("prompts.method=mix", "prompts.words=[watercolor,ink]", "prompts.mix_words=5"),
     r"prompts.mix_words=5 is more than the 2 prompts.words"),
    (("prompts.method=mix", "prompts.words=[watercolor]"), r"prompts.words holds one word: every mix style"),
    (("prompts.method=mix", "prompts.mix_words=100"), r"prompts.mix_words=100 is more than the 48 default style words"),
    (("prompts.method=mix", "prompts.words=[watercolor,ink,watercolor]"), r"prompts.words lists 'watercolor' twice"),
    # settings the method does not read (the shipped pacs-plain set k: 8 and made one style)
    (("prompts.method=plain", "prompts.k=8"), r"prompts.k=8 is not read by prompts.method=plain; remove it \(that "
                                              r"method reads plain_template\)"),
    (("prompts.method=mix", "prompts.steps=50"), r"prompts.steps=50 is not read by prompts.method=mix"),
    (("prompts.method=contrastive", "prompts.random_sigma=0.5"), r"prompts.random_sigma=0.5 is not read by "
                                                                 r"prompts.method=contrastive"),
    ("image.model=/nowhere", r"image.model is read by image.generator=diffusers_vae only; the fourier generator"),
    # the Fourier generator's own settings beside another generator were ignored; 0 iterations stored the starting
    # grey as a complete store (a fuzz)
    (("image.generator=diffusers_vae", "image.model=/nowhere", "image.decay=3"),
     r"^image.decay=3.0 is read by image.generator=fourier only; the diffusers_vae generator has no use for it: leave "
     r"it out"),
    (("image.generator=diffusers_vae", "image.model=/nowhere", "image.decorrelate=false", "image.init_std=0.1"),
     r"^image.decorrelate=false is read by image.generator=fourier only"),
    ("image.iterations=0", r"image.iterations=0 is not valid: must be at least 1"),
])
def test_bad_settings_are_one_line_errors(synth_cfg, override, match):
    with pytest.raises(ConfigError, match=match) as err:
        synth_cfg("x.zarr", *(override if isinstance(override, tuple) else (override,)))
    assert "\n" not in str(err.value)


def test_a_store_path_against_its_backend_is_refused_before_styles_are_learned(synth_cfg, tiny_teacher, monkeypatch):
    import embedcache.synthesis.run as run

    monkeypatch.setattr(run, "build_plan", lambda *a, **k: pytest.fail("styles learned for a store refused"))
    with pytest.raises(ConfigError, match=r"--out .*x.zarr names a Zarr store, but backend=hdf5"):
        synthesize(synth_cfg("x.zarr", "backend=hdf5", "prompts.method=contrastive"), teacher=tiny_teacher, log=quiet)


def test_a_store_of_other_settings_is_refused_before_styles_are_learned(synth_cfg, tiny_teacher, monkeypatch):
    """Pointed at a store made with other settings, synthesize learned its styles (minutes with a real
    teacher), then was refused (a trial); refused first now, naming what differs as extraction does."""
    import embedcache.synthesis.run as run
    from embedcache.errors import StoreMismatchError

    synthesize(synth_cfg("x.zarr", "prompts.method=contrastive"), teacher=tiny_teacher, log=quiet)
    monkeypatch.setattr(run, "build_plan", lambda *a, **k: pytest.fail("styles learned for a store refused"))
    with pytest.raises(StoreMismatchError, match=r"x.zarr was made from other inputs \(its .*synthesis differ") as err:
        synthesize(synth_cfg("x.zarr", "prompts.method=contrastive", "image.iterations=5"), teacher=tiny_teacher,
                   log=quiet)
    # the setting to restore is named, as extraction's refusals name theirs (it named none: a trial)
    assert "(store: synthesis.image.iterations=" in str(err.value) and "this call: synthesis.image.iterations=5)" in str(
        err.value), str(err.value)

@pytest.mark.parametrize("method", ["plain", "contrastive"])
def test_one_class_is_refused(synth_cfg, method):
    """A one-class store scored 100% on every nearest-label protocol, by construction, with exit 0."""
    with pytest.raises(ConfigError, match=r"classes=\['dog'\] is one class: .*100% by construction; give at least "
                                          "two classes"):
        synth_cfg("x.zarr", "classes=[dog]", f"prompts.method={method}")


def test_one_class_stays_refused_for_the_api_and_a_store_made_before_still_resumes(synth_cfg, tiny_teacher, tmp_path):
    """build_plan is public: one class for contrastive styles is a ConfigError there, not numpy's
    ValueError; a store synthesised with one class before the check still resumes (a review)."""
    from conftest import block_store
    from embedcache.synthesis.config import PromptsConfig
    from embedcache.synthesis.prompts import build_plan

    with pytest.raises(ConfigError, match="at least two classes"):
        build_plan(tiny_teacher, ["dog"], PromptsConfig(method="contrastive"), log=quiet)
    path, _ = block_store(tmp_path, "zarr")  # a store already at --out
    assert synth_cfg(path, "classes=[dog]").classes == ("dog",)


def test_a_teacher_without_gradients_is_refused_in_one_line(synth_cfg, tiny_teacher):
    class BlackBox(Teacher):
        registry_name = "black_box"
        no_gradients_reason = "it is a black box behind an HTTP API that answers embeddings only"

        def __init__(self):
            self.embed_dim, self.input_size, self.device = 32, 32, torch.device("cpu")

    with pytest.raises(ConfigError, match="teacher 'black_box' cannot synthesise images: it is a black box .* use a "
                                          "local teacher") as err:
        synthesize(synth_cfg(), teacher=BlackBox(), log=quiet)
    assert "\n" not in str(err.value)
    if "remote" in TEACHERS:  # refused by name, before it is built (no server is contacted)
        with pytest.raises(ConfigError, match="teacher 'remote' cannot synthesise images"):
            synthesize(synth_cfg("r.zarr", "teacher.name=remote", "teacher.device=auto"), log=quiet)
    assert tiny_teacher.differentiable and TEACHERS.get("conse").differentiable


def test_class_names_with_joiners_and_no_break_spaces_are_names(synth_cfg):
    """The control-character check refused a non-breaking space and the zero-width non-joiner that Persian and
    Hindi spelling needs, as "a control character" (a review)."""
    names = ("horse\u00a0shoe", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "soft\u00adhyphen")
    assert synth_cfg("u.zarr", f"classes={json.dumps(list(names))}").classes == names


def test_a_teacher_with_image_gradients_but_no_token_embeddings_is_refused_for_style_vectors(synth_cfg, tiny_teacher):
    """A teacher giving image gradients but not its text encoder's token embeddings was said to "give no gradients
    through its encoders", a NotImplementedError traceback once the styles began (a trial). Refused in one line
    before anything is learned, for the methods whose style vectors replace a token; plain needs none."""
    class ImagesOnly(type(tiny_teacher)):
        registry_name = "images_only"
        _token_embedding = Teacher._token_embedding
        _word_ids = Teacher._word_ids
        encode_text_styled = Teacher.encode_text_styled

    teacher = copy.copy(tiny_teacher)
    teacher.__class__ = ImagesOnly
    for method in ("random", "contrastive"):
        with pytest.raises(ConfigError, match=r"^teacher 'images_only' gives image gradients but not its text "
                                              r"encoder's token embeddings, .*use prompts.method=plain") as err:
            synthesize(synth_cfg(f"{method}.zarr", f"prompts.method={method}"), teacher=teacher, log=quiet)
        assert "\n" not in str(err.value)
    assert synthesize(synth_cfg("plain.zarr", "prompts.method=plain"), teacher=teacher, log=quiet).complete


def test_cli_synthesize_writes_a_store_and_reports_errors_in_one_line(tmp_path, tiny_clip_dir):
    from click.testing import CliRunner

    from embedcache.cli import main

    cfg = tmp_path / "syn.yaml"
    cfg.write_text(f"""# tiny
classes: [circle, square]
per_class: 2
prompts: {{method: mix, k: 2}}
image: {{iterations: 2, cutouts: 2}}
teacher: {{name: open_clip, model: 'local-dir:{tiny_clip_dir}', device: cpu}}
views: {{count: 2}}
canvas: {{size: 32}}
text: {{sources: [name]}}
""")
    out = tmp_path / "cli.zarr"
    res = CliRunner().invoke(main, ["synthesize", "--config", str(cfg), "--out", str(out), "--no-progress",
                                    "--set", "batch_size=4"])
    assert res.exit_code == 0, res.output
    assert "4 images synthesised" in res.output and "store complete" in res.output
    assert "unreadable" not in res.output  # made images: never unreadable (it said "0 unreadable image(s) skipped")
    with embedcache.open_store(str(out)) as s:
        assert s.manifest["synthesis"]["prompts"]["method"] == "mix" and len(s.meta) == 4
    bad = CliRunner().invoke(main, ["synthesize", "--config", str(cfg), "--out", str(tmp_path / "b.zarr"),
                                    "--set", "classes=[circle,circle]"])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0 and "twice" in bad.output


def test_ctrl_c_while_styles_are_learned_says_no_image_is_made(tmp_path, tiny_clip_dir, monkeypatch):
    """Ctrl-C while the styles were learned said "stopping after this batch's iteration; finished blocks are
    kept", then "no image was made yet" (a trial): the notice now says what stops at that stage."""
    import os
    import signal

    from click.testing import CliRunner

    import embedcache.synthesis.prompts as prompts
    from embedcache.cli import main

    cfg = tmp_path / "syn.yaml"
    cfg.write_text(f"""classes: [circle, square]
per_class: 2
prompts: {{method: contrastive, k: 2, steps: 50}}
image: {{iterations: 2, cutouts: 2}}
teacher: {{name: open_clip, model: 'local-dir:{tiny_clip_dir}', device: cpu}}
canvas: {{size: 32}}
text: {{sources: [name]}}
""")
    real = prompts.contrastive_loss

    def stop_at_first_step(*args, **kw):
        if not stop_at_first_step.sent:
            stop_at_first_step.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)

    stop_at_first_step.sent = False
    monkeypatch.setattr(prompts, "contrastive_loss", stop_at_first_step)
    res = CliRunner().invoke(main, ["synthesize", "--config", str(cfg), "--out", str(tmp_path / "s.zarr"), "--no-progress"])
    lines = [ln for ln in res.output.splitlines() if ln.startswith(("stopping", "interrupted"))]
    assert res.exit_code == 130 and len(lines) == 2, res.output
    assert lines[0] == ("stopping before any image is made (styles are learned again on the rerun) (Ctrl-C again to "
                        "stop at once)")
    assert lines[1].startswith("interrupted while learning the styles (step ") and "no image was made yet" in lines[1]


def test_a_synthesised_store_says_what_made_it_and_styles_that_drown_their_class(synth_cfg, tiny_teacher, monkeypatch):
    """inspect showed nothing of a synthesis (method, styles, leaks), and styles whose targets sit nearer
    another class's prompt (class fidelity 0.14 in a trial: images pulled towards the wrong class under
    their own label) were recorded in the manifest without a word."""
    import embedcache.synthesis.prompts as prompts
    from embedcache.api import StoreReader

    monkeypatch.setattr(prompts, "drowned", lambda targets, class_emb: torch.tensor([[True, False, True], [False, True, False]]))
    cfg = synth_cfg("f.zarr", "prompts.method=contrastive", "prompts.test_domains=[sketch]",
                    "prompts.template='a sketch style * of a {}'")
    with pytest.warns(UserWarning, match=r"3 of 6 \(style, class\) targets of the 'contrastive' styles are nearer "
                                         r"another class's plain prompt than their own \(class fidelity 0.50\)"):
        synthesize(cfg, teacher=tiny_teacher, log=quiet)
    with StoreReader(cfg.out) as r:
        facts, said = r.facts(), r.summary()
    assert facts["synthesis"] == {"method": "contrastive", "styles": 2, "per_class": 2, "leaks_test_domains": ["sketch"],
                                  "spread": facts["synthesis"]["spread"], "class_fidelity": 0.5}
    assert said["synthesis"] == (f"synthesised from class names: contrastive prompts, 2 style(s), 2 images per class; "
                                 f"style spread {facts['synthesis']['spread']:.2f}, class fidelity 0.50 (some styles "
                                 "pull their images towards another class); its prompts name evaluation domains: sketch")


def test_a_synthesis_resumed_or_written_twice_speaks_of_synthesis(synth_cfg, tiny_teacher):
    """A second synthesis of a store being written was refused as "another extraction", and a resume with
    another batch size spoke of a paid teacher's cut-off requests, which synthesis never sends (a trial)."""
    from embedcache.errors import StoreError

    cfg = synth_cfg("twice.zarr")

    def second_while_first_runs(block):
        with pytest.raises(StoreError, match=r"another synthesis is writing .*twice.zarr now"):
            synthesize(cfg, teacher=tiny_teacher, log=quiet)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize(cfg, teacher=tiny_teacher, on_block_done=second_while_first_runs, log=quiet)
    said = []
    synthesize(synth_cfg("twice.zarr", "batch_size=1"), teacher=tiny_teacher, log=said.append)
    note = [s for s in said if s.startswith("resuming with batch_size=1")]
    assert note and "paid teacher" not in note[0], said


def test_an_out_that_cannot_be_a_synthesis_is_refused_before_the_teacher_loads(synth_cfg, tmp_path, monkeypatch,
                                                                               make_cfg, tiny_teacher):
    """--out at a file, a folder of other files, or an extracted store of real images was refused only after
    the teacher loaded (16 to 36 s with a real one), the last as "its canvas, dataset, synthesis and views
    differ" (a trial)."""
    import embedcache.synthesis.run as run
    from embedcache.extract import extract

    extract(make_cfg("real.zarr"), teacher=tiny_teacher, log=quiet)  # a store of real images there
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    (tmp_path / "file.zarr").write_text("x")
    monkeypatch.setattr(run, "build_teacher", lambda *a, **k: pytest.fail("the teacher loaded for a refused --out"))
    with pytest.raises(ConfigError, match=r"--out .*real.zarr is a store of real images made by `embedcache extract`, "
                                          r"not a synthesised one; give another --out"):
        synthesize(synth_cfg("real.zarr"), log=quiet)
    for name in ("notes", "file.zarr"):
        with pytest.raises(ConfigError, match=rf"--out .*{name} exists and is not a Zarr store; choose another path"):
            synthesize(synth_cfg(name), log=quiet)
    (tmp_path / "text.h5").write_text("not hdf5")  # (a review: stores that are not stores passed to the teacher)
    (tmp_path / "bare.zarr").mkdir()
    (tmp_path / "bare.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    for name in ("text.h5", "bare.zarr"):
        with pytest.raises(StoreError, match=rf"{name}"):
            synthesize(synth_cfg(name), log=quiet)


@pytest.mark.parametrize("change,said", [(("text.sources=[name, attributes]",), "needs text.attributes"),
                                         (("text.sources=[name, attributes]", "text.attributes=pacs"),
                                          "have no descriptions for class 'circle'")])
def test_text_settings_that_cannot_make_the_prompts_are_refused_before_the_teacher_loads(synth_cfg, monkeypatch,
                                                                                         change, said):
    """Extraction refuses them in a second; synthesis loaded the teacher and learned the styles first (a trial)."""
    import embedcache.synthesis.run as run

    monkeypatch.setattr(run, "build_teacher", lambda *a, **k: pytest.fail("the teacher loaded for refused text settings"))
    with pytest.raises(ConfigError, match=said):
        synthesize(synth_cfg("syn.zarr", *change), log=quiet)


def test_drowned_targets_are_counted_among_the_styles_that_make_images(synth_cfg, tiny_teacher, monkeypatch):
    """With per_class below k the later styles make no image, yet their drowned targets were counted:
    "8 of 12 (style, class) targets" with one style of four in use (a trial)."""
    import warnings

    import embedcache.synthesis.prompts as prompts

    masks = {"clean first": [[False] * 3, [True] * 3], "drowned first": [[True, False, False], [True] * 3]}
    for name, mask in masks.items():
        monkeypatch.setattr(prompts, "drowned", lambda targets, class_emb, m=mask: torch.tensor(m))
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            synthesize(synth_cfg(f"{name}.zarr", "per_class=1"), teacher=tiny_teacher, log=quiet)
        lines = [str(w.message) for w in said if "targets of the" in str(w.message)]
        if name == "clean first":
            assert lines == [], lines
        else:
            assert len(lines) == 1 and lines[0].startswith(
                "1 of 3 (style, class) targets of the 'random' styles (the 1 of its 2 styles that make images at "
                "per_class=1) are nearer another class's plain prompt than their own (class fidelity 0.67)"), lines


def test_an_out_path_that_cannot_be_written_is_refused_before_the_teacher(synth_cfg, monkeypatch):
    """synthesize --out /proc/x.zarr failed once the teacher had loaded (and contrastive styles would have been
    learned); and a config built in code skipped the prompts' own rules (a review)."""
    import dataclasses

    import embedcache.synthesis.run as run

    monkeypatch.setattr(run, "build_teacher", lambda cfg: pytest.fail("the teacher was built"))
    with pytest.raises(ConfigError, match=r"--out /proc/embedcache-test/x.zarr: /proc is not writable"):
        prepare(dataclasses.replace(synth_cfg(), out="/proc/embedcache-test/x.zarr"), log=quiet)
    cfg = synth_cfg("p.zarr", "prompts.method=plain")
    with pytest.raises(ConfigError, match=r"prompts.k=8 is not read by prompts.method=plain"):
        prepare(dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, k=8)), log=quiet)


def test_a_stop_that_came_as_the_store_was_finished_is_said(tmp_path, monkeypatch):
    """SIGTERM during the last blocks' finishing said "stopping after this batch's iteration", then the
    store completed and the command exited 0 without a word (a trial)."""
    import os
    import signal
    from types import SimpleNamespace

    from click.testing import CliRunner

    import embedcache.synthesis as synthesis
    from embedcache.cli import main

    def finishes_after_a_stop(cfg, log, on_stage):
        on_stage("images")
        os.kill(os.getpid(), signal.SIGTERM)  # the graceful handler sets the stop flag
        return SimpleNamespace(complete=True, skipped=False, images=2, seconds=1.0, path=cfg.out)

    monkeypatch.setattr(synthesis, "synthesize", finishes_after_a_stop)
    res = CliRunner().invoke(main, ["synthesize", "--config", "pacs-contrastive", "--out", str(tmp_path / "s.zarr")])
    assert res.exit_code == 0, res.output
    assert "note: the stop came as the store was being finished: it is complete" in res.output, res.output


def test_settings_that_make_no_picture_are_refused_not_stored(synth_cfg, tiny_teacher):
    """image.decay=1e12 wrote a complete store of all-black images, image.lr=1e12 one of black-and-white
    noise, each with exit 0 (a trial): a student distilled from it learns from nothing like a picture."""
    cfg = synth_cfg("black.zarr", "image.decay=1e12")
    with pytest.raises(ConfigError, match=r"synthesised image\(s\) of one value everywhere \(row 0 and 1 more of this "
                                          r"batch\): the image settings \(image.lr=0.1, image.decay=1000000000000.0, image.iterations=4\) make no picture"):
        synthesize(cfg, teacher=tiny_teacher, log=quiet)
    with Store(cfg.out) as st:
        assert st.blocks_done().sum() == 0  # nothing written
    noise = synth_cfg("noise.zarr", "image.lr=1e12")  # saturated noise: refused too (image.lr=1e30, a fuzz)
    with pytest.raises(ConfigError, match=r"synthesised images of rows 0-1 are 100.0% pure black or white pixels: the "
                                          r"image settings \(image.lr=1000000000000.0, image.iterations=4\) make no"):
        synthesize(noise, teacher=tiny_teacher, log=quiet)
    with Store(noise.out) as st:
        assert st.blocks_done().sum() == 0
    from embedcache.synthesis.run import require_pictures

    rng = np.random.default_rng(0)
    mostly = torch.from_numpy(rng.choice(np.array([0, 255, 90], np.uint8), size=(2, 20, 20, 3), p=[0.48, 0.49, 0.03]))
    with pytest.warns(UserWarning, match=r"are 9\d% pure black or white pixels"):  # little else: said
        require_pictures(mostly, np.arange(2), ImageConfig())
    # images left near the generator's starting grey (pixels 125-130) were stored without a word (a trial)
    with pytest.warns(UserWarning, match=r"^6 of the synthesised images of rows 0-5 are nearly flat grey \(pixel "
                                         r"standard deviation under 2 of 255\): the image settings \(image.lr=1e-07, "
                                         r"image.iterations=4\) make no picture"):
        synthesize(synth_cfg("grey.zarr", "image.lr=1e-7", "batch_size=6", "block_rows=6"), teacher=tiny_teacher,
                   log=quiet)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pure black or white|.*nearly flat grey")  # the defaults' pictures
        synthesize(synth_cfg("fine.zarr"), teacher=tiny_teacher, log=quiet)                   # pass without a word


def test_the_stage_is_teacher_while_the_teacher_loads_then_styles(synth_cfg, tiny_teacher, monkeypatch):
    """``synthesize`` tells the CLI when the teacher is loading (a stop then ends it at once: nothing is held)."""
    import embedcache.synthesis.run as run

    stages, at_build = [], []
    monkeypatch.setattr(run, "build_teacher", lambda cfg: at_build.append(stages[-1]) or tiny_teacher)
    synthesize(synth_cfg(), log=quiet, on_stage=stages.append)
    assert at_build == ["teacher"]
    assert stages == ["teacher", "styles", "images"]


def test_a_stop_while_the_teacher_loads_ends_synthesize_at_once(tmp_path, monkeypatch):
    """The conse teacher encodes 1,000 ImageNet prompts in one call as it loads (2 s idle, 10 s under load); a
    Ctrl-C then said "stopping before any image is made" and waited for the load (a trial): nothing is held yet."""
    import os
    import signal

    from click.testing import CliRunner

    import embedcache.synthesis as synthesis
    from embedcache.cli import main

    went_on = []

    def loads_a_teacher(cfg, log, on_stage):
        on_stage("teacher")
        os.kill(os.getpid(), signal.SIGINT)
        went_on.append(True)  # the load went on after the stop
        on_stage("styles")

    monkeypatch.setattr(synthesis, "synthesize", loads_a_teacher)
    res = CliRunner().invoke(main, ["synthesize", "--config", "pacs-contrastive", "--out", str(tmp_path / "s.zarr")])
    assert res.exit_code == 130, res.output
    assert res.output.strip().splitlines()[-1] == "stopped while the teacher loaded; nothing was made", res.output
    assert not went_on and not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("content, said", [
    (b"", r"its config.json is not JSON \(JSONDecodeError\); give a diffusers autoencoder folder"),
    (b"\xff\xfe\x00", r"its config.json is not JSON \(UnicodeDecodeError\)"),
    (b'{"_class_name": "UNet2DModel"}', r"holds a UNet2DModel; diffusers_vae takes AutoencoderKL or VQModel"),
    (b'["AutoencoderKL"]', r"holds a JSON list; diffusers_vae takes AutoencoderKL or VQModel"),
])
def test_an_autoencoder_folder_whose_config_is_not_one_is_one_line_before_diffusers_loads(tmp_path, content, said):
    """An empty or binary config.json in image.model would have died in json.loads with a traceback (a fuzz, read
    from the code): it is read, and refused, before diffusers is imported, so it is said with or without it."""
    from embedcache.synthesis.config import ImageConfig
    from embedcache.synthesis.generators import build_generator

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_bytes(content)
    cfg = build_config(ImageConfig, {"generator": "diffusers_vae", "model": str(tmp_path)})
    with pytest.raises(ConfigError, match=rf"^image.model={re.escape(str(tmp_path))}:? {said}") as err:
        build_generator(cfg, 64, torch.device("cpu"))
    assert "\n" not in str(err.value)
