import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from embedcache.config import TextConfig
from embedcache.errors import ConfigError
from embedcache.text import TEXT_SOURCES, aggregate, build_prompts, encode_sources, id_names, load_templates
from embedcache.views import make_canvas, render_views, view_params


def test_canvas_resizes_shorter_side_and_centre_crops():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # the centre 40 columns are white
    c = make_canvas(Image.fromarray(img), 20)
    assert c.shape == (20, 20, 3) and c.dtype == np.uint8
    assert c[:, 2:18].min() > 200  # the white centre fills the canvas, the black sides are cropped


def test_view_params_are_seeded_bounded_and_view0_is_whole():
    p = view_params(seed=3, index=7, count=6, canvas=64)
    assert p.shape == (6, 5) and p.dtype == np.int32
    assert tuple(p[0]) == (0, 0, 64, 64, 0)
    top, left, h, w, flip = p[1:].T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    assert set(flip) <= {0, 1}
    assert np.array_equal(p, view_params(3, 7, 6, 64))
    assert not np.array_equal(p, view_params(3, 8, 6, 64))
    # adding views never changes the earlier ones (each view has its own generator)
    assert np.array_equal(p, view_params(3, 7, 9, 64)[:6])


@pytest.mark.parametrize("ratio", [(5.0, 10.0), (0.1, 0.2), (0.75, 1.333)])
def test_a_view_no_crop_fits_is_torchvisions_fallback_crop(ratio):
    """Where none of its 10 tries fits, torchvision's RandomResizedCrop takes the centred crop at the allowed
    ratio nearest the image's; a ratio range without 1 took the whole canvas here (a fuzz: views.ratio=[5,10]
    made every augmented view the plain image)."""
    from torchvision.transforms import RandomResizedCrop

    from embedcache.views import drawn_share, fallback_box

    tiny = (1e-9, 1e-9)  # no crop of this area fits: every try misses
    torch.manual_seed(0)
    assert fallback_box(96, ratio) == RandomResizedCrop.get_params(torch.zeros(3, 96, 96), list(tiny), list(ratio))
    p = view_params(seed=0, index=1, count=5, canvas=96, scale=(0.35, 1.0) if ratio[0] > 1 or ratio[1] < 1 else tiny,
                    ratio=ratio)
    assert all(tuple(row[:4]) == fallback_box(96, ratio) for row in p[1:])
    assert drawn_share(96, tiny, ratio) == 0 and drawn_share(96, (0.35, 1.0), (0.75, 1.333)) > 0.99


def test_render_matches_direct_crop_resize_flip():
    rng = np.random.default_rng(0)
    canvas = torch.from_numpy(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    params = torch.tensor([[[0, 0, 32, 32, 0], [4, 6, 16, 20, 1]], [[2, 3, 28, 12, 0], [0, 0, 32, 32, 1]]])
    out = render_views(canvas, params, 16)
    assert out.shape == (2, 2, 3, 16, 16) and out.dtype == torch.float32
    t, l, h, w, _ = params[0, 1].tolist()
    ref = canvas[0, t:t + h, l:l + w].permute(2, 0, 1)[None].float() / 255
    ref = F.interpolate(ref, size=(16, 16), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    assert torch.allclose(out[0, 1], ref[0].flip(-1), atol=1e-6)
    # a whole-canvas view at the canvas size is the canvas itself
    same = render_views(canvas, torch.tensor([[[0, 0, 32, 32, 0]]] * 2), 32)
    assert torch.allclose(same[:, 0], canvas.permute(0, 3, 1, 2).float() / 255, atol=1e-5)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_views_are_the_same_pixels_as_stores_were_rendered_with_before(interpolation):
    """On the CPU the canvases are laid out plane by plane before resizing (1.7x faster than resizing
    the channels-last image they arrive as); every view must stay the pixels earlier stores hold,
    bit for bit, or a resumed store would mix two renderings."""
    rng = np.random.default_rng(5)
    canvas = torch.from_numpy(rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    params = torch.from_numpy(np.stack([view_params(9, i, 5, 64, flip=True) for i in range(6)]))
    got = render_views(canvas, params, 40, interpolation)
    before = canvas.permute(0, 3, 1, 2).float().div_(255.0)  # the layout it had: channels last
    assert not before.is_contiguous() and before.is_contiguous(memory_format=torch.channels_last)
    for i in range(6):
        for j in range(5):
            t, l, h, w, flip = params[i, j].tolist()
            ref = F.interpolate(before[i:i + 1, :, t:t + h, l:l + w], size=(40, 40), mode=interpolation,
                                antialias=True, align_corners=False)[0].clamp(0, 1)
            assert torch.equal(got[i, j], ref.flip(-1) if flip else ref), (i, j)
    # and the teacher's 8-bit input (scaled in place there) is these pixels rounded, as before
    from embedcache.extract.parts import render_teacher_views
    rounded = before.new_empty(got.shape).copy_(got).mul(255.0).round_().to(torch.uint8)
    assert torch.equal(render_teacher_views(canvas, params, 40, interpolation), rounded)

def test_aggregate_matches_numpy_reference():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(7, 5)).astype(np.float32) * rng.uniform(0.5, 3, (7, 1))
    cls = np.array([0, 0, 1, 2, 2, 2, 1])
    got = aggregate(emb, cls, 3)
    for c in range(3):
        rows = emb[cls == c]
        ref = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(0)
        np.testing.assert_allclose(got[c], ref / np.linalg.norm(ref), rtol=1e-5)


def test_bundled_templates_and_sources():
    assert len(load_templates("openai80")) == 80 and len(set(load_templates("openai80"))) == 80
    assert len(load_templates("short7")) == 7
    prompts = build_prompts(["dog", "house_cat"], TextConfig(sources=("name", "templates"), templates="short7"))
    assert prompts["name"] == [["a photo of a dog."], ["a photo of a house cat."]]
    assert len(prompts["templates"][1]) == 7 and "house cat" in prompts["templates"][1][0]
    pacs = TEXT_SOURCES.get("attributes")(["dog", "person"], TextConfig(attributes="pacs"))
    assert len(pacs[0]) >= 3 and all(p.startswith("a photo of a dog, ") for p in pacs[0])


def test_attributes_missing_class_and_unknown_set():
    with pytest.raises(ConfigError, match="no descriptions for class 'zebra'"):
        TEXT_SOURCES.get("attributes")(["dog", "zebra"], TextConfig(attributes="pacs"))
    with pytest.raises(ConfigError, match="bundled: pacs, synthetic"):
        TEXT_SOURCES.get("attributes")(["dog"], TextConfig(attributes="nope"))


def test_truncation_is_recorded(tiny_teacher):
    prompts = {"name": [["a photo of a dog."], ["a photo of a " + "very " * 40 + "long cat."]]}
    with pytest.warns(UserWarning, match="1 of 2 prompts exceed"):
        tabs = encode_sources(lambda t: tiny_teacher.encode_text(t).numpy(), tiny_teacher.count_tokens,
                              tiny_teacher.context_length, ["dog", "cat"], prompts)
    assert tabs["name"].frame["truncated"].tolist() == [False, True]
    assert tabs["name"].emb.shape == (2, tiny_teacher.embed_dim)


@pytest.mark.parametrize("size,out,interpolation", [(48, 32, "bicubic"), (64, 64, "bilinear"), (40, 72, "bicubic"),
                                                    (96, 24, "bilinear")])
def test_batched_views_equal_render_views(size, out, interpolation):
    """The batched renderer (GPU extraction, every student crop) against the per-crop reference:
    max |diff| < 1e-4 on [0, 1], and as 8-bit pixels equal but for rare rounding ties (<= 1 level)."""
    from embedcache.views import render_views_batched, to_uint8, view_params

    rng = np.random.default_rng(size + out)
    canvas = torch.from_numpy(rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8))
    params = torch.from_numpy(np.stack([view_params(3, i, 6, size, (0.05, 1.0), flip=True) for i in range(5)]))
    assert params[..., 4].any()  # flips are exercised
    ref = render_views(canvas, params, out, interpolation)
    got = render_views_batched(canvas, params, out, interpolation)
    assert got.shape == ref.shape == (5, 6, 3, out, out)
    assert float((got - ref).abs().max()) < 1e-4
    diff = (to_uint8(got).int() - to_uint8(ref).int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


def _torchvision_color(img: torch.Tensor, fields) -> torch.Tensor:
    """The reference: torchvision's own ColorJitter adjustments in the drawn order, then grayscale."""
    import torchvision.transforms.functional as TF

    from embedcache.views import COLOR_SCALE, ORDERS

    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k in ORDERS[int(fields[4])]:
        img = ops[k](img, float(fields[k]) / COLOR_SCALE)
    return TF.rgb_to_grayscale(img, 3) if int(fields[5]) else img


def test_color_views_are_torchvisions_colorjitter_and_grayscale():
    """Colour draws as ColorJitter(0.3, 0.3, 0.3, 0.3) + RandomGrayscale(0.1) draw them, applied as
    torchvision applies them (checked image by image against torchvision.transforms.functional), by
    both renderers; the crops stay those of a store without colour, and view 0 stays the plain view."""
    from embedcache.views import COLOR_FIELDS, ORDERS, render_views_batched

    p = np.stack([view_params(3, i, 6, 48, color_jitter=0.3, grayscale=0.1) for i in range(60)])
    assert p.shape == (60, 6, 5 + len(COLOR_FIELDS))
    assert np.array_equal(p[..., :5], np.stack([view_params(3, i, 6, 48) for i in range(60)]))
    assert (p[:, 0, 5:] == (10_000, 10_000, 10_000, 0, 0, 0)).all()
    f = p[:, 1:, 5:9] / 10_000
    assert (f[..., :3] >= 0.7).all() and (f[..., :3] <= 1.3).all() and (np.abs(f[..., 3]) <= 0.3).all()
    assert 0.03 < p[:, 1:, 10].mean() < 0.2 and len(set(p[:, 1:, 9].ravel())) > 12 and p[:, 1:, 9].max() < len(ORDERS)
    rng = np.random.default_rng(2)
    canvas = torch.from_numpy(rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8))
    params = torch.from_numpy(p[:4])
    ref = render_views(canvas, params, 24)
    plain = render_views(canvas, params[..., :5], 24)
    for i in range(4):
        for v in range(6):
            expect = _torchvision_color(plain[i, v], params[i, v, 5:])
            assert float((ref[i, v] - expect).abs().max()) < 1e-5, (i, v)
    assert float((ref[:, 1:] - plain[:, 1:]).abs().max()) > 0.05  # the colour did change the views
    assert torch.equal(ref[:, 0], plain[:, 0])  # identity colours leave view 0 exactly as rendered
    # grayscale alone (ColorJitter(0) is no transform at all): the other views stay exactly plain
    only = torch.from_numpy(np.stack([view_params(3, i, 6, 48, grayscale=0.5) for i in range(4)]))
    gray_only, flag = render_views(canvas, only, 24), only[..., 10].bool()
    assert flag.any() and torch.equal(gray_only[~flag], plain[~flag])
    got = render_views_batched(canvas, params, 24)
    assert float((got - ref).abs().max()) < 1e-4
    # a student's step runs under bf16 autocast on a GPU (here its CPU twin): its views stay float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = render_views_batched(canvas, params, 24)
    assert under.dtype == torch.float32 and torch.equal(under, got)
    with pytest.raises(ConfigError, match="views.color_jitter"):
        from embedcache.config import ExtractConfig, build_config
        build_config(ExtractConfig, {"views": {"color_jitter": 0.8}})


@pytest.mark.parametrize("classes", [["0", "1", "10"], ["n01443537", "n01629819"], [" 3 ", "4"]])
def test_class_names_that_are_ids_are_found(classes):
    """A dataset labelled by numbers or WordNet ids gave prompts like "a photo of a 417." and text
    embeddings that mean nothing (extraction refuses them: tests/test_extract_store.py)."""
    assert id_names(classes).startswith("the class names are ids (")
    assert id_names(["n01443537", "goldfish"]) is None and id_names(["7up", "3"]) is None


def test_numbered_class_names_are_kept_with_a_warning():
    """CUB's folders (001.Black_footed_Albatross) put their number into every prompt: said once, kept."""
    with pytest.warns(UserWarning, match=r"every class name starts with a number \('001.Black footed Albatross'\).*"
                                         "dataset.class_names=FILE"):
        prompts = build_prompts(["001.Black_footed_Albatross", "002.Laysan_Albatross"], TextConfig(sources=("name",)))
    assert prompts["name"][0] == ["a photo of a 001.Black footed Albatross."]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_prompts(["001.Black_footed_Albatross", "dog", "7up"], TextConfig(sources=("name",)))


def test_a_template_file_that_repeats_a_template_says_so(tmp_path):
    """A template listed twice counted twice in every class's mean embedding without a word (a trial)."""
    from embedcache.text import load_templates

    f = tmp_path / "tpl.txt"
    f.write_text("a photo of a {}.\na sketch of a {}.\na photo of a {}.\n")
    with pytest.warns(UserWarning, match=r"repeats 1 template\(s\) \(e.g. 'a photo of a \{\}.'\): each counts"):
        assert load_templates(str(f)) == ["a photo of a {}.", "a sketch of a {}.", "a photo of a {}."]  # kept as given


def test_a_stop_requested_while_prompts_are_encoded_stops_before_the_next_call(monkeypatch):
    """`synthesize` asks its loops to stop at Ctrl-C, but the label prompts were encoded to the last call
    first (80 templates x 1,000 classes is minutes on a CPU): a stop now ends an encoding that has run
    FINISH_WITHIN_S at its next call. A shorter one finishes (two sources of a few prompts, the default's
    two calls at least, were left unfinished by a first version: a review)."""
    import embedcache.text as text
    from embedcache import interrupt

    clock, calls = [0.0], []

    def encode(texts):  # each call of 256 prompts takes a second
        calls.append(len(texts))
        clock[0] += 1.0
        return np.zeros((len(texts), 4), dtype=np.float32)

    monkeypatch.setattr(text, "_clock", lambda: clock[0])
    many = {"name": [[f"a photo of a thing {i}."] for i in range(1000)]}  # four calls
    few = {"name": [["a dog."], ["a cat."]], "templates": [["a photo of a dog."], ["a photo of a cat."]]}  # two calls
    interrupt.request()  # asked before the encoding (the last image batch done): the short one finishes
    try:
        assert encode_sources(encode, lambda t: [5] * len(t), 77, ["dog", "cat"], few)["templates"].emb.shape == (2, 4)
        calls.clear()
        with pytest.raises(KeyboardInterrupt, match="stopped while encoding the label prompts"):
            encode_sources(encode, lambda t: [5] * len(t), 77, [f"c{i}" for i in range(1000)], many)
    finally:
        interrupt.reset()
    assert calls == [256, 256, 256]  # past FINISH_WITHIN_S (2 s) after the third call: no fourth


@pytest.mark.parametrize("content, said", [
    (b"hello", r"is not JSON \(Expecting value: line 1 column 1"),
    (b'["a striped coat"]', r"is a JSON list, not an object of class -> \[descriptions\]"),
    (b'{"dog": "a long snout"}', r"class 'dog' has a string, not a list of descriptions"),
    (b'{"dog": ["a long snout", 3]}', r"class 'dog' has a description that is not a string \(3\)"),
    (b'{"dog": ["a long snout", " "]}', r"class 'dog' has an empty description"),
    (b"\xff\xfe\x00bin", r"is not a text file \(UTF-8\)"),
])
def test_an_attributes_file_that_is_not_a_table_of_descriptions_is_one_line(tmp_path, content, said):
    """text.attributes naming a file that is not JSON died with a 60-line JSONDecodeError (a fuzz); a class given
    one string became one prompt per character of it ("a photo of a dog, a", "a photo of a dog, ", ...)."""
    path = tmp_path / "attrs.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^text.attributes={re.escape(str(path))}:? {said}.*; give a JSON object "
                                          r"of class name -> list of descriptions") as err:
        TEXT_SOURCES.get("attributes")(["dog"], TextConfig(attributes=str(path)))
    assert "\n" not in str(err.value)


def test_an_attributes_files_entries_for_other_classes_are_not_read(tmp_path):
    """The check covered every entry of the file, and refused one that worked: a note beside the classes (a review)."""
    path = tmp_path / "attrs.json"
    path.write_text('{"_source": "written by hand", "cat": [" "], "dog": ["a long snout"]}')
    assert TEXT_SOURCES.get("attributes")(["dog"], TextConfig(attributes=str(path))) == [["a photo of a dog, a long snout"]]


def test_a_templates_file_that_is_not_text_is_one_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xff\xfe\x00a {}")
    with pytest.raises(ConfigError, match=rf"^text.templates={re.escape(str(path))} is not a text file \(UTF-8\)"):
        load_templates(str(path))


def test_an_empty_templates_file_is_said_to_hold_none(tmp_path):
    """It said "bad line: []" (a fuzz)."""
    path = tmp_path / "t.txt"
    path.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match=rf"^template file {re.escape(repr(str(path)))} holds no template; give a text "
                                          r"file of one template per line"):
        load_templates(str(path))
