"""The GPU data path on the CPU (issue 12): the device reader (decoder injected), its fallbacks, its
place in the cache key, resume with it, and the device-resident student inputs."""
import numpy as np
import pytest
import torch
from PIL import Image

import embedcache
from embedcache.extract import extract
from embedcache.extract.device import canvas_from_decoded
from embedcache.store import Store
from embedcache.views import make_canvas

from conftest import quiet


@pytest.fixture
def photo_folder(tmp_path):
    """JPEGs of several sizes, a PNG, a corrupt JPEG and a grayscale JPEG, in class folders."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k, (h, w) in enumerate([(60, 80), (90, 50), (64, 64)]):
            base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
            img = np.clip(base + rng.normal(0, 12, (h, w, 3)) + (40 if c == "b" else 0), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{k}.jpg", quality=95)
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(root / "a" / "p.png")
    Image.fromarray(rng.integers(0, 255, (44, 44), dtype=np.uint8)).save(root / "b" / "g.jpg", quality=95)
    (root / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_device_canvases_match_pils_within_a_level_or_two(photo_folder):
    from torchvision.io import ImageReadMode, decode_jpeg

    for path in sorted(photo_folder.rglob("*.jpg"))[:4]:
        data = torch.from_numpy(np.frombuffer(path.read_bytes(), np.uint8).copy())
        dev = canvas_from_decoded(decode_jpeg(data, mode=ImageReadMode.RGB), 48).numpy().astype(int)
        pil = make_canvas(Image.open(path), 48).astype(int)
        assert dev.shape == pil.shape == (48, 48, 3)
        assert np.abs(dev - pil).mean() < 2.0 and np.abs(dev - pil).max() <= 24  # another decoder, float resampling


def test_the_device_reader_falls_back_and_records_failures(photo_folder, make_cfg, tiny_teacher):
    cfg = make_cfg("dev.zarr", "dataset.name=folder", f"dataset.path={photo_folder}", "decoder=device", "block_rows=3")
    res = extract(cfg, teacher=tiny_teacher, log=quiet)
    assert res.complete and res.failed == 1
    with embedcache.open_store(res.path) as s:
        meta = s.meta.set_index("path")
        assert meta.loc["b/bad.jpg", "status"] == "failed" and meta.loc["b/g.jpg", "status"] == "ok"
        assert str(photo_folder) not in meta.loc["b/bad.jpg", "reason"]  # a store does not depend on where its dataset sat
        assert s.manifest["pipeline"]["decoder"].startswith("torchvision-decode_jpeg-cpu")
        px = s.pixels()[meta.index.get_loc("a/p.png")]
        assert np.array_equal(px, make_canvas(Image.open(photo_folder / "a" / "p.png"), cfg.canvas.size))  # PNG: PIL
        pil_key = extract(make_cfg("pil.zarr", "dataset.name=folder", f"dataset.path={photo_folder}", "decoder=pil",
                                   "block_rows=3"), teacher=tiny_teacher, log=quiet).key
        assert pil_key != s.key  # another decoder, other pixels: another store


def test_a_jpeg_the_device_decoder_rejects_goes_to_pil_and_one_both_reject_is_recorded(photo_folder, make_cfg,
                                                                                     tiny_teacher, monkeypatch):
    """The corrupt fixture never reaches the device decoder (its header sends it to PIL): here the
    decoder itself rejects two well-formed JPEGs inside batched calls. The batch is decoded file by
    file, the rejected one is read by PIL (its canvas exactly PIL's), its batch-mates keep the device's
    pixels, and one PIL cannot read either is recorded as failed while the store completes."""
    import torchvision.io as tvio
    from torchvision.io import ImageReadMode

    import embedcache.datasets as datasets

    real, read = tvio.decode_jpeg, datasets.read_rgb8
    refused = {(photo_folder / "a" / "1.jpg").read_bytes(), (photo_folder / "b" / "2.jpg").read_bytes()}
    calls = []

    def picky(data, *args, **kw):
        items = data if isinstance(data, list) else [data]
        calls.append(len(items))
        if any(x.numpy().tobytes() in refused for x in items):
            raise RuntimeError("unsupported JPEG")
        return real(data, *args, **kw)

    def pil_cannot(path):
        if path.parent.name == "b" and path.name == "2.jpg":
            raise OSError("broken data stream when reading image file")
        return read(path)

    monkeypatch.setattr(tvio, "decode_jpeg", picky)
    monkeypatch.setattr(datasets, "read_rgb8", pil_cannot)
    cfg = make_cfg("picky.zarr", "dataset.name=folder", f"dataset.path={photo_folder}", "decoder=device", "block_rows=3")
    said = []
    res = extract(cfg, teacher=tiny_teacher, log=said.append)
    assert res.complete and max(calls) > 1  # batched calls, retried file by file
    # which rows hold PIL's pixels under decoder=device is said and recorded (nothing said it: a trial)
    assert any(line.startswith("note: 1 JPEG the device decoder rejected was decoded by PIL") and "a/1.jpg" in line
               for line in said), said
    with embedcache.open_store(res.path) as s:
        assert [c.get("decoded_by_pil") for c in s.manifest["calls"]] == [["a/1.jpg"]]
        meta, px = s.meta.set_index("path"), s.pixels()
        assert meta.loc["a/1.jpg", "status"] == "ok" and meta.loc["b/2.jpg", "status"] == "failed"
        assert "broken data stream" in meta.loc["b/2.jpg", "reason"]
        size = cfg.canvas.size
        rescued = px[meta.index.get_loc("a/1.jpg")]
        assert np.array_equal(rescued, make_canvas(Image.open(photo_folder / "a" / "1.jpg"), size))
        mate = photo_folder / "a" / "0.jpg"
        dev = canvas_from_decoded(real(torch.from_numpy(np.frombuffer(mate.read_bytes(), np.uint8).copy()),
                                       mode=ImageReadMode.RGB), size)
        assert np.array_equal(px[meta.index.get_loc("a/0.jpg")], dev.numpy())
        row = meta.index.get_loc("a/1.jpg")
    # a repair where the device decoder takes that file gives other pixels: the refusal names it
    from embedcache.errors import DatasetError

    from conftest import alter_emb

    monkeypatch.setattr(tvio, "decode_jpeg", real)
    alter_emb(res.path, row=row, view=0, col=0)
    with pytest.raises(DatasetError, match=r"decodes it otherwise \(when it was made, the device decoder rejected "
                                           r"a/1.jpg, which PIL read"):
        extract(cfg, teacher=tiny_teacher, log=quiet)


@pytest.mark.parametrize("colour", [(), ("views.color_jitter=0.3", "views.grayscale=0.5")], ids=["crops", "colour"])
def test_a_device_store_resumes_byte_identically(photo_folder, make_cfg, tiny_teacher, colour):
    opts = ("dataset.name=folder", f"dataset.path={photo_folder}", "decoder=device", "block_rows=3", *colour)
    full = extract(make_cfg("full.zarr", *opts), teacher=tiny_teacher, log=quiet)
    with Store(full.path) as a:
        assert a.manifest["pipeline"]["views"].startswith("batched") and a.read("image/view_params").shape[-1] == 5 + 6 * bool(colour)
    cut = make_cfg("cut.zarr", *opts)

    def boom(block):
        if block == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cut, teacher=tiny_teacher, log=quiet, on_block_done=boom)
    extract(cut, teacher=tiny_teacher, log=quiet)
    with Store(full.path) as a, Store(cut.out) as b:
        for name in a.layout["block_arrays"]:
            assert np.array_equal(a.read(name), b.read(name)), name


def test_embeddings_copied_asynchronously_equal_the_direct_ones(make_cfg, tiny_teacher):
    """The embedder's pending copies (pinned + event on a GPU) give the same arrays as encoding directly."""
    from embedcache.extract.parts import Batch, Embedder

    canvas = torch.from_numpy(np.random.default_rng(2).integers(0, 255, (4, 48, 48, 3), dtype=np.uint8))
    from embedcache.views import view_params

    params = torch.from_numpy(np.stack([view_params(0, i, 3, 48) for i in range(4)]))
    batch = Batch(np.arange(4), canvas, params, ["", "bad", "", ""])
    for batched in (False, True):
        emb = Embedder(tiny_teacher, 3, batched=batched)(batch).numpy()
        assert emb.shape == (4, 3, tiny_teacher.embed_dim) and not emb[1].any()
        direct = tiny_teacher.encode_pixels(Embedder(tiny_teacher, 3, batched=batched).render(batch)).numpy()
        np.testing.assert_array_equal(emb[[0, 2, 3]].reshape(9, -1), direct.astype(np.float16))


def test_arrays_for_the_device_keep_their_contents():
    from embedcache.students.providers import to_device_array

    arr = np.random.default_rng(0).integers(0, 255, (2500, 4, 3), dtype=np.uint8)
    arr.flags.writeable = False  # as the store hands arrays out
    out = to_device_array(arr, torch.device("cpu"))
    assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), arr)


def test_a_store_without_canvases_is_read_with_the_decoder_students_rebuild_them_with(make_cfg, tmp_path):
    """Students rebuild a pixel-less store's canvases with PIL: the teacher must see PIL's canvases,
    so `auto` on a GPU keeps PIL there and `device` is refused in one line."""
    from types import SimpleNamespace

    from embedcache.config import ExtractConfig, build_config, to_dict
    from embedcache.datasets import build_dataset
    from embedcache.errors import ConfigError
    from embedcache.extract import make_reader
    from embedcache.extract.device import DeviceDecodeReader

    with pytest.raises(ConfigError, match="decoder=device with canvas.store=false: .*set canvas.store=true or decoder=pil"):
        build_config(ExtractConfig, {"decoder": "device", "canvas": {"store": False}})
    gpu = SimpleNamespace(device=torch.device("cuda"), input_size=32, interpolation="bicubic")
    from conftest import png_folder

    files = ("dataset.name=folder", f"dataset.path={png_folder(tmp_path / 'data')}")  # canvases to rebuild from files
    for store, device_reader in ((True, True), (False, False)):
        cfg = make_cfg("x.zarr", *files, f"canvas.store={str(store).lower()}")
        reader = make_reader(cfg, build_dataset(cfg.dataset), gpu)
        assert isinstance(reader, DeviceDecodeReader) == device_reader, to_dict(cfg.canvas)
    # images made in memory have no JPEG to decode: `auto` keeps PIL (the device reader probed nvJPEG, whose
    # failure would stop a store that decodes nothing, and named a decoder in its key that decoded nothing)
    cfg = make_cfg("x.zarr", "dataset.name=synthetic")
    assert not isinstance(make_reader(cfg, build_dataset(cfg.dataset), gpu), DeviceDecodeReader)


def _jpeg(path, img, **kw):
    Image.fromarray(img).save(path, "JPEG", quality=95, **kw)
    return path.read_bytes()


def test_files_the_device_decoder_would_read_unlike_pil_go_to_pil(tmp_path):
    """torchvision applies EXIF orientation on the CPU only, takes no CMYK, and nvJPEG may leave a
    cut-off file's rows unwritten: such files are decoded by PIL, decided from the header."""
    from embedcache.extract.device import device_decodes

    img = np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    plain = _jpeg(tmp_path / "a.jpg", img)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _jpeg(tmp_path / "r.jpg", img, exif=exif.tobytes())
    exif[0x0112] = 1
    upright = _jpeg(tmp_path / "u.jpg", img, exif=exif.tobytes())
    Image.fromarray(img).convert("CMYK").save(tmp_path / "c.jpg", "JPEG")
    Image.fromarray(img).save(tmp_path / "p.png")
    assert device_decodes(plain) and device_decodes(upright) and device_decodes(plain + b"\0\0\n")
    assert not device_decodes(rotated) and not device_decodes((tmp_path / "c.jpg").read_bytes())
    assert not device_decodes(plain[:-40]) and not device_decodes((tmp_path / "p.png").read_bytes())
    assert device_decodes(_jpeg(tmp_path / "g.jpg", img[..., 0]))  # grey
    # RGB samples marked by an Adobe segment (transform 0): whether nvJPEG honours the mark is not known
    assert not device_decodes(_jpeg(tmp_path / "k.jpg", img, keep_rgb=True))


def test_an_exif_rotated_photo_is_upright_with_the_cuda_decoders_semantics(tmp_path, make_cfg, tiny_teacher, monkeypatch):
    import torchvision.io

    real = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, **kw: real(data, **{**kw, "apply_exif_orientation": False}))
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    img = np.random.default_rng(2).integers(0, 255, (40, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    _jpeg(root / "a" / "r.jpg", img, exif=exif.tobytes())
    _jpeg(root / "b" / "s.jpg", img)
    res = extract(make_cfg("dev.zarr", "dataset.name=folder", f"dataset.path={root}", "decoder=device"),
                  teacher=tiny_teacher, log=quiet)
    with embedcache.open_store(res.path) as s:
        px = s.pixels()[s.meta.set_index("path").index.get_loc("a/r.jpg")]
    assert np.array_equal(px, make_canvas(Image.open(root / "a" / "r.jpg"), px.shape[0]))


def test_a_device_decoder_that_does_not_work_is_said_not_replaced_by_pil(photo_folder, make_cfg, tiny_teacher, monkeypatch):
    import torchvision.io

    from embedcache.errors import ConfigError

    real = torchvision.io.decode_jpeg

    def broken(data, **kw):
        raise RuntimeError("nvjpeg: not supported")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    opts = ("dataset.name=folder", f"dataset.path={photo_folder}", "decoder=device")
    with pytest.raises(ConfigError, match=r"does not decode JPEGs on cpu here; set decoder=pil \(it said: "
                                          r"RuntimeError: nvjpeg: not supported\)"):  # the cause was dropped
        extract(make_cfg("a.zarr", *opts), teacher=tiny_teacher, log=quiet)

    def fails_later(data, **kw):  # works for the first small image, then fails for every file (e.g. out of memory)
        blobs = data if isinstance(data, list) else [data]
        if any(len(b) > 1000 for b in blobs):
            raise RuntimeError("CUDA out of memory")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", fails_later)
    with pytest.raises(ConfigError, match=r"rejected all \d+ JPEGs of a batch that PIL reads .*RuntimeError: CUDA out of memory\)"):
        extract(make_cfg("b.zarr", *opts), teacher=tiny_teacher, log=quiet)


def test_auto_under_torchrun_is_the_processs_own_gpu(monkeypatch):
    """torchrun shards each took cuda:0 with device auto: every shard on one GPU."""
    from embedcache.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda:1") and resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("features", [False, True], ids=["images", "head-only"])
def test_no_step_reads_a_value_back_from_the_device(synthetic_store, tmp_path, features):
    """Running losses stay tensors between evaluation points: a step that reads a scalar back (an
    .item(), a float() of a loss, a bool() of a check) waits for the GPU on every step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from conftest import store_with_features
    from embedcache.students.config import StudentConfig, TrainConfig
    from embedcache.students.train import Trainer, train

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "_local_scalar_dense" in str(func) or "is_nonzero" in str(func):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    store, student = str(synthetic_store), StudentConfig(name="test_resnet", input_size=32)
    if features:
        store, student, _ = store_with_features(synthetic_store, tmp_path, seed=1)
    reads, steps, step = Reads(), [], Trainer.step

    def watched(self, *args, **kw):
        steps.append(1)
        with reads:
            return step(self, *args, **kw)

    cfg = TrainConfig(store=str(store), recipe="vl2v_adip_align" if features else "li_iccv23", student=student,
                      features=features, steps=12, batch_size=8, eval_every=6, ckpt_every=6, out=str(tmp_path / "run"),
                      progress=False, device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "step", watched)
        train(cfg, log=quiet)
    assert len(steps) == 12 and reads.ops == []


@pytest.mark.parametrize("mode", ["device", "host"])
def test_the_gpu_input_modes_give_the_view_whose_embedding_is_the_target(synthetic_store, mode):
    """Canvases held as a tensor (on the device, or in host memory gathered per batch) were used on a
    GPU only, so no test ran them: here on the CPU, against render_views of the same canvases."""
    from embedcache.students.data import SplitConfig, StoreData
    from embedcache.students.models import StudentConfig, build_student
    from embedcache.students.providers import CanvasInputs
    from embedcache.views import normalize, render_views

    data = StoreData(str(synthetic_store), "name", SplitConfig(val_fraction=0.25))
    model = build_student(StudentConfig(name="test_resnet", input_size=32), data.dim)
    inputs = CanvasInputs(data, model, torch.device("cpu"), mode=mode)
    assert inputs.mode == mode and isinstance(inputs.canvas, torch.Tensor)
    idx, views = data.sample(step=3, seed=1, batch_size=8)
    got = inputs(idx, views)
    canvas, params = torch.from_numpy(data.pixels[idx]), torch.from_numpy(data.params[idx, views][:, None])
    want = normalize(render_views(canvas, params, 32, data.interpolation)[:, 0], model.mean, model.std)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, CanvasInputs(data, model, torch.device("cpu"))(idx, views), atol=1e-5, rtol=0)


def test_a_store_of_another_decoder_names_the_decoder_that_resumes_it(photo_folder, make_cfg, tiny_teacher):
    """Resumed with the other decoder, a store was refused with "use another --out path, or delete that
    store", throwing its blocks away, and two keys whose owners were not said (a trial)."""
    from embedcache.errors import StoreMismatchError

    args = ("dataset.name=folder", f"dataset.path={photo_folder}", "block_rows=3")
    extract(make_cfg("dec.zarr", *args, "decoder=pil"), teacher=tiny_teacher, log=quiet)
    with pytest.raises(StoreMismatchError, match=r"its pipeline differs .*the store's key \w+, teacher .*; this call's "
                                                 r"key \w+: give --set decoder=pil to resume it with the decoder that "
                                                 r"made it, or use another --out path"):
        extract(make_cfg("dec.zarr", *args, "decoder=device"), teacher=tiny_teacher, log=quiet)


def test_a_store_a_gpu_decoded_names_the_device_that_resumes_it(photo_folder, make_cfg, tiny_teacher, monkeypatch):
    """A store decoded on a GPU, resumed on a CPU machine, was told "give --set decoder=device", which here
    decodes on the CPU, another decoder, refused again with no advice (a review)."""
    import embedcache.extract.device as dev
    from embedcache.errors import StoreMismatchError

    real = dev.device_pipeline
    monkeypatch.setattr(dev, "device_pipeline", lambda device: real(torch.device("cuda")))  # as a GPU made it
    args = ("dataset.name=folder", f"dataset.path={photo_folder}", "block_rows=3")
    extract(make_cfg("gpu.zarr", *args, "decoder=device"), teacher=tiny_teacher, log=quiet)
    monkeypatch.setattr(dev, "device_pipeline", real)
    for decoder in ("pil", "device"):
        with pytest.raises(StoreMismatchError, match=r"its pipeline differs .*: resume it where its decoder runs, with "
                                                     r"the teacher on a CUDA GPU \(--set teacher.device=cuda\) and --set "
                                                     r"decoder=device, or use another --out path"):
            extract(make_cfg("gpu.zarr", *args, f"decoder={decoder}"), teacher=tiny_teacher, log=quiet)


def test_small_host_data_reaches_a_device_by_the_non_waiting_paths():
    """`constant` makes a table once per device (a tensor made from a list on a GPU waited for the device
    once per batch); `upload` returns the same values (from pinned memory, asynchronously, on a GPU)."""
    from embedcache.device import constant, upload

    a = constant((0.5, 0.25, 0.125), torch.float32, torch.device("cpu"))
    assert a is constant((0.5, 0.25, 0.125), torch.float32, torch.device("cpu"))  # made once
    assert torch.equal(a, torch.tensor([0.5, 0.25, 0.125]))
    assert constant((1, 2), torch.int64, torch.device("cpu")).dtype == torch.int64
    t = torch.arange(6).view(2, 3)
    assert torch.equal(upload(t, torch.device("cpu")), t)


def test_a_block_waits_for_its_last_batch_only_once_the_next_is_queued():
    """The block's wait for its last batch's embeddings came before the next batch was queued, so the
    device idled while the host waited, read and queued: on a GPU with batch_size >= block_rows, at every
    batch. Now batch k is assembled after batch k+1 is queued, and every block is still written whole."""
    from embedcache.extract import run_blocks
    from embedcache.extract.parts import Batch

    events, written = [], []

    class Layout:
        path = "/nowhere/s.zarr"
        layout = {"block_rows": 4, "n": 10, "store_pixels": False, "block_arrays": []}

        def block_range(self, blk):
            return blk * 4, min(10, blk * 4 + 4)

        def write_block(self, blk, arrays, failures=None):
            written.append((blk, arrays["image/emb"][:, 0, 0].tolist()))

    class Reader:
        def batches(self, batches):
            for rows in batches:
                yield Batch(np.array(rows), torch.zeros(len(rows), 2, 2, 3, dtype=torch.uint8),
                            torch.zeros(len(rows), 1, 5, dtype=torch.int32), [""] * len(rows))

    class Waiting:  # a batch's embeddings: numpy() is where the host waits for the device
        def __init__(self, rows):
            self.rows = rows

        def numpy(self):
            events.append(("wait", self.rows[0]))
            return np.array(self.rows, np.float16)[:, None, None] * np.ones((1, 1, 3), np.float16)

        def canvas_numpy(self):
            return np.zeros((len(self.rows), 2, 2, 3), np.uint8)

    def embedder(batch):
        events.append(("queue", int(batch.rows[0])))
        return Waiting([int(r) for r in batch.rows])

    encoded, failed = run_blocks(Layout(), [0, 1, 2], Reader(), embedder, batch_size=4, progress=False, overlap=True)
    assert (encoded, failed) == (10, 0)
    assert events == [("queue", 0), ("queue", 4), ("wait", 0), ("queue", 8), ("wait", 4), ("wait", 8)]
    assert sorted(written) == [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7]), (2, [8, 9])]
    events.clear(), written.clear()  # without a GPU's work to overlap (a synthesis, a remote teacher): at once
    run_blocks(Layout(), [0, 1, 2], Reader(), embedder, batch_size=4, progress=False)
    assert events == [("queue", 0), ("wait", 0), ("queue", 4), ("wait", 4), ("queue", 8), ("wait", 8)]
    assert sorted(written) == [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7]), (2, [8, 9])]


def test_a_device_decoded_store_of_an_older_routing_names_the_version_not_the_device():
    """A store decoded on a GPU before JPEGs of Adobe-marked RGB went to PIL: it was told to resume on a
    GPU with decoder=device, which decodes under today's name and is refused again (a review)."""
    from embedcache.extract.resume import resumed_by

    old = "torchvision-decode_jpeg-cuda+pil-for-cmyk-exif-unended"
    for now in ("pil", "torchvision-decode_jpeg-cpu+pil-for-cmyk-adobe-rgb-exif-unended"):
        assert resumed_by(old, now).startswith(f"it was decoded by {old}, which this version does not run")
    today = "torchvision-decode_jpeg-cuda+pil-for-cmyk-adobe-rgb-exif-unended"
    assert resumed_by(today, "pil").startswith("resume it where its decoder runs, with the teacher on a CUDA GPU")


def test_blocks_no_history_lists_count_with_the_batch_size_that_made_the_store():
    """A store made before calls were recorded (or an entry lost), at batch 2, resumed at 4 for a block:
    a third call at 4 compared with the history alone and said nothing of the batch-2 blocks (a review)."""
    from embedcache.extract.resume import block_batch_sizes

    class Made:
        manifest = {"config": {"batch_size": 2}}

        def __init__(self, history, done):
            self.history, self.done = history, done

        def call_history(self):
            return self.history

        def blocks_done(self):
            return np.array(self.done)

    assert block_batch_sizes(Made([{"blocks": 1, "config": {"batch_size": 4}}], [True, True, False])) == [2, 4]
    assert block_batch_sizes(Made([{"blocks": 2, "config": {"batch_size": 4}}], [True, True, False])) == [4]
    assert block_batch_sizes(Made([], [True, False])) == [2]


def test_the_cuda_decoder_allocates_on_a_stream_of_its_own(monkeypatch):
    """torchvision's CUDA decode_jpeg allocates its outputs on the current stream and nvJPEG writes them
    without waiting for it: blocks the previous batch's queued resizes still read came back as outputs
    (pytorch/vision#9606, a review). The decode runs with a side stream current, the current stream
    waits for it, and each output is recorded as used on the current stream (the stream calls faked:
    no GPU here)."""
    from embedcache.extract.device import DeviceDecodeReader

    said, current = [], ["main"]

    class Img:
        def record_stream(self, stream):
            said.append(("record", stream))

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            said.append(("wait", self.name, other.name))

    class Ctx:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            current.append(self.stream.name)

        def __exit__(self, *exc):
            current.pop()

    main = Stream("main")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream("side"))
    monkeypatch.setattr(torch.cuda, "stream", Ctx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: main)
    reader = DeviceDecodeReader.__new__(DeviceDecodeReader)
    reader.device = torch.device("cuda", 0)
    monkeypatch.setattr(reader, "_decode_here", lambda blobs: said.append(("decode on", current[-1])) or [Img(), None])
    assert len(reader._decode([torch.zeros(3, dtype=torch.uint8)] * 2)) == 2
    assert said == [("decode on", "side"), ("wait", "main", "side"), ("record", main)]
    reader.device = torch.device("cpu")  # on the CPU: decoded where it is called, no streams
    said.clear()
    reader._decode([torch.zeros(3, dtype=torch.uint8)])
    assert said == [("decode on", "main")]


def test_a_store_decoded_on_one_gpu_is_refused_on_another_naming_both(photo_folder, make_cfg, tiny_teacher, monkeypatch):
    """nvJPEG decodes on a hardware engine on some GPUs and in CUDA code on others: the same files give
    other pixels on another GPU or torchvision, which the key did not hold (it named only "cuda"; a
    review). The GPU and version are in the pipeline, and a resume elsewhere names both (faked here)."""
    from embedcache.errors import StoreMismatchError
    from embedcache.extract import device as dev

    real = dev.device_pipeline
    gpu = ["NVIDIA H100, torchvision 0.26"]
    monkeypatch.setattr(dev, "device_pipeline", lambda d: {**real(d), "decoder_device": gpu[0]})

    def stop(block):
        raise KeyboardInterrupt

    cfg = make_cfg("dev.zarr", "dataset.name=folder", f"dataset.path={photo_folder}", "decoder=device", "block_rows=3")
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, teacher=tiny_teacher, on_block_done=stop, log=quiet)
    gpu[0] = "NVIDIA A10, torchvision 0.26"
    with pytest.raises(StoreMismatchError, match=r"store: pipeline.decoder_device='NVIDIA H100, torchvision 0.26'; "
                       r"this call: pipeline.decoder_device='NVIDIA A10, torchvision 0.26'.*resume it where it was decoded "
                       r"\(NVIDIA H100, torchvision 0.26: another GPU's"):
        extract(cfg, teacher=tiny_teacher, log=quiet)
    gpu[0] = "NVIDIA H100, torchvision 0.26"
    assert extract(cfg, teacher=tiny_teacher, log=quiet).complete  # where it was made: resumed


def test_a_gpu_pipeline_names_its_decoders_hardware_and_version(monkeypatch):
    import torchvision

    from embedcache.extract.device import device_pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    got = device_pipeline(torch.device("cuda"))
    assert got["decoder_device"] == f"NVIDIA H100 80GB HBM3, torchvision {torchvision.__version__}"
    assert "decoder_device" not in device_pipeline(torch.device("cpu"))  # CPU stores keep their keys


IEEE = {"float32_matmul_precision": "highest", "matmul_fp32_precision": "ieee", "conv_fp32_precision": "ieee"}


@pytest.mark.parametrize("caller", ["defaults", "high", "legacy flags", "new switch"])
def test_ieee_fp32_turns_tf32_off_inside_and_gives_the_settings_back(caller):
    """Inside, matmuls and convolutions are IEEE float32, by settings cuBLAS accepts: its check (the one
    reading allow_tf32 makes) refuses torch's two APIs disagreeing, which a caller's
    set_float32_matmul_precision('high') beside the newer switch set alone was (a review)."""
    from embedcache.device import ieee_fp32, tf32_settings

    saved = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision
    try:
        if caller == "high":
            torch.set_float32_matmul_precision("high")
        elif caller == "legacy flags":
            torch.backends.cuda.matmul.allow_tf32 = True
        elif caller == "new switch":
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        before = tf32_settings()
        assert before != IEEE  # cuDNN convolutions may use TF32 by default: there is something to turn off
        with ieee_fp32(False):
            assert tf32_settings() == before
        with pytest.raises(ZeroDivisionError):
            with ieee_fp32(True):
                assert tf32_settings() == IEEE
                assert torch.backends.cuda.matmul.allow_tf32 is False  # cuBLAS's own check: it raised on a mix
                1 / 0
        assert tf32_settings() == before
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.fp32_precision = saved[1]


def test_an_fp32_teacher_on_a_gpu_embeds_with_tf32_off(tiny_teacher, monkeypatch):
    """Stored numbers (images, views, label texts) and synthesis's forwards are IEEE float32 when fp32 is asked for."""
    import copy

    from embedcache.device import tf32_settings

    assert tiny_teacher._ieee is False  # a CPU teacher: nothing to switch
    teacher = copy.copy(tiny_teacher)
    teacher._ieee = True  # as on a GPU with precision fp32
    seen = []
    for name in ("encode_image", "encode_text"):
        real = getattr(teacher.model, name)
        monkeypatch.setattr(teacher.model, name, lambda *a, _real=real, **k: (seen.append(tf32_settings()), _real(*a, **k))[1])
    before = tf32_settings()
    teacher.encode_image(torch.rand(2, 3, teacher.input_size, teacher.input_size))
    teacher.embed_views(torch.randint(0, 255, (2, 3, teacher.input_size, teacher.input_size), dtype=torch.uint8))
    teacher.encode_text(["a photo of a dog"])
    teacher.encode_image_grad(torch.rand(1, 3, teacher.input_size, teacher.input_size))
    teacher.encode_text_styled(["a * style of a dog"], torch.zeros(1, teacher.model.token_embedding.weight.shape[1]))
    assert seen == [IEEE] * 5
    assert tf32_settings() == before


def test_the_device_reader_names_a_missing_file_by_its_dataset_path(photo_folder, make_cfg, tiny_teacher):
    """FileNotFoundError quotes the absolute path: the store records the dataset's own, so meta.parquet does
    not depend on where the dataset sat (an audit)."""
    listed = [f"{c}/{k}.jpg,{c},d,train" for c in "ab" for k in range(3)] + ["a/gone.jpg,a,d,train"]
    (photo_folder / "list.csv").write_text("\n".join(["path,label,domain,split", *listed]) + "\n")
    cfg = make_cfg("missing.zarr", "dataset.name=csv", f"dataset.path={photo_folder / 'list.csv'}", "decoder=device",
                   "block_rows=3")
    res = extract(cfg, teacher=tiny_teacher, log=quiet)
    assert res.complete and res.failed == 1
    with embedcache.open_store(res.path) as s:
        reason = s.meta.set_index("path").loc["a/gone.jpg", "reason"]
    assert reason.startswith("FileNotFoundError") and "'a/gone.jpg'" in reason and str(photo_folder) not in reason
