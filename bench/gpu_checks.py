"""Checks only a GPU can make, printed as a table and written as JSON (bench/gpu_run.sh's ``checks`` part).

    python bench/gpu_checks.py [--model ViT-B-32] [--pacs .gpu/pacs] [--out bench/results]

1. Decoders: JPEGs of every kind a dataset holds (baseline 4:2:0, 4:4:4, progressive, grey, restart
   markers, odd sizes, RGB samples an Adobe segment marks, CMYK, EXIF-rotated) extracted with
   ``decoder=device`` and with ``decoder=pil``: per kind, who decoded it (the device, or PIL for the files
   routed to it) and the largest and mean difference between the two canvases. The device decoder's
   pixels may differ from PIL's a little (another IDCT and float resampling); a kind far off means a
   file the device reads otherwise, to be routed to PIL (``extract/device.py:device_decodes``).
2. Waits for the device: with ``torch.cuda.set_sync_debug_mode("warn")``, the synchronising CUDA calls
   of two extractions (N and 2N images, batch 8, one block each) and of two cached training runs (20
   and 40 steps, no evaluation or checkpoint between): the difference, per extra batch and per extra
   step, is what the loop itself waits for (0 is the design; each wait leaves the device idle).
3. Decoder streams (first: the one most likely to find wrong numbers): the same JPEGs extracted three
   times with ``decoder=device``: as the reader does it (the decoder's outputs on a side stream),
   unguarded (decoded on the current stream, as before pytorch/vision#9606 was known) and serialised
   (the device synchronised before each decode): the rows whose canvases differ from the serialised
   ones. 0 is the design; rows off when unguarded show the race is real on this GPU.
4. Renderers: ``render_views_batched`` on the GPU against ``render_views`` on the CPU, the reference
   (max |diff| on [0, 1]; the stated tolerance is 1e-4), and the TF32 settings in force.
5. An fp32 teacher: the same views embedded in IEEE float32 (what ``precision: fp32`` does) and with the
   process's TF32 settings, cuDNN's TF32 convolutions on by default: the largest embedding difference
   is what turning TF32 off changes in a store (0 would mean the switch does nothing on this GPU).
On a machine without a GPU, part 1 runs with torchvision's CPU decoder and parts 2 to 4 are skipped.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import embedcache  # noqa: E402
from embedcache.config import DatasetConfig, ExtractConfig, TeacherConfig, TextConfig, ViewsConfig  # noqa: E402
from embedcache.extract import extract  # noqa: E402
from embedcache.extract.device import device_decodes  # noqa: E402
from embedcache.teachers import build_teacher  # noqa: E402
from embedcache.students.models import StudentConfig  # noqa: E402
from embedcache.students.train import TrainConfig, train  # noqa: E402
from _common import write_json  # noqa: E402  (bench/ is on sys.path when a benchmark runs)

KINDS = {  # name -> (PIL mode, save keywords)
    "baseline 4:2:0": ("RGB", {"quality": 90}),
    "4:4:4": ("RGB", {"quality": 95, "subsampling": 0}),
    "progressive": ("RGB", {"quality": 90, "progressive": True}),
    "grey": ("L", {"quality": 90}),
    "restart markers": ("RGB", {"quality": 90, "restart_marker_blocks": 4}),
    "Adobe RGB samples": ("RGB", {"quality": 90, "keep_rgb": True}),
    "CMYK": ("CMYK", {"quality": 90}),
}


def _photo(pacs: Path, k: int):
    from PIL import Image

    photos = sorted(pacs.glob("photo/*/*.jpg"))
    if photos:
        return Image.open(photos[k % len(photos)]).convert("RGB")
    rng = np.random.default_rng(k)  # no photos: smooth random images
    small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((227, 170), Image.BICUBIC)


def make_kinds(pacs: Path, root: Path) -> dict:
    """A folder dataset, one class per kind, 4 files each (two odd sizes among them); returns class -> kind."""
    from PIL import Image

    classes = {}
    for c, (kind, (mode, kw)) in enumerate(KINDS.items()):
        folder = root / f"k{c}"
        folder.mkdir(parents=True)
        classes[folder.name] = kind
        for j, size in enumerate([(500, 375), (333, 257), (64, 49), (375, 500)]):
            img = _photo(pacs, 4 * c + j).resize(size, Image.BICUBIC).convert(mode)
            img.save(folder / f"{j}.jpg", "JPEG", **kw)
    exif = Image.Exif()
    exif[0x0112] = 6
    folder = root / f"k{len(KINDS)}"
    folder.mkdir()
    classes[folder.name] = "EXIF-rotated"
    for j in range(4):
        _photo(pacs, 100 + j).resize((320, 240)).save(folder / f"{j}.jpg", "JPEG", quality=90, exif=exif.tobytes())
    return classes


def decoders(tcfg: TeacherConfig, teacher, pacs: Path, tmp: Path) -> list:
    root = tmp / "kinds"
    classes = make_kinds(pacs, root)
    pixels = {}
    for dec in ("device", "pil"):
        cfg = ExtractConfig(dataset=DatasetConfig(name="folder", path=str(root)), teacher=tcfg,
                            views=ViewsConfig(count=1), text=TextConfig(sources=("name",)), out=str(tmp / f"k-{dec}.zarr"),
                            batch_size=8, progress=False, decoder=dec, num_workers=2)
        extract(cfg, teacher=teacher, log=lambda _m: None)
        with embedcache.open_store(cfg.out) as s:
            pixels[dec], meta = s.pixels().astype(np.int16), s.meta
    rows = []
    for cls, kind in classes.items():
        at = np.flatnonzero(meta["class_name"].to_numpy() == cls)
        diff = np.abs(pixels["device"][at] - pixels["pil"][at])
        routed = [device_decodes((root / p).read_bytes()) for p in meta["path"].to_numpy()[at]]
        by = "device" if all(routed) else ("PIL" if not any(routed) else "both")
        rows.append({"kind": kind, "decoded_by": by, "max_diff": int(diff.max()), "mean_diff": float(diff.mean())})
        print(f"  {kind:<20} decoded by {by:<6} max |device - PIL| {int(diff.max()):>3}, mean {diff.mean():.3f}", flush=True)
    return rows


def _syncs(fn) -> int:
    """The synchronising CUDA calls ``fn`` makes (torch's sync debug mode, as warnings)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def jpeg_folder(pacs: Path, root: Path, per_class: int, classes: int = 4) -> Path:
    """A folder dataset of ``classes`` x ``per_class`` 500x375 JPEGs made from PACS photos."""
    from PIL import Image

    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for j in range(per_class):
            img = _photo(pacs, per_class * c + j).resize((500, 375), Image.BICUBIC)
            img.save(root / f"c{c}" / f"{j}.jpg", quality=90)
    return root


def waits(tcfg: TeacherConfig, teacher, pacs: Path, tmp: Path) -> dict:
    root = jpeg_folder(pacs, tmp / "waits", 32)

    def ex(n: int, name: str):
        cfg = ExtractConfig(dataset=DatasetConfig(name="folder", path=str(root), max_per_class=n), teacher=tcfg,
                            views=ViewsConfig(count=2), text=TextConfig(sources=("name",)), out=str(tmp / name),
                            batch_size=8, progress=False, decoder="device", num_workers=2)
        return lambda: extract(cfg, teacher=teacher, log=lambda _m: None)

    small, large = _syncs(ex(8, "w8.zarr")), _syncs(ex(16, "w16.zarr"))  # 4 and 8 batches of 8
    out = {"extract_syncs": [small, large], "extract_syncs_per_batch": (large - small) / 4}
    print(f"  extraction: {small} and {large} synchronising calls for 4 and 8 batches: "
          f"{out['extract_syncs_per_batch']:.2f} per batch", flush=True)
    store = str(tmp / "w16.zarr")

    def tr(steps: int, name: str):
        cfg = TrainConfig(store=store, recipe="li_iccv23", student=StudentConfig(name="resnet18", input_size=112),
                          steps=steps, batch_size=16, eval_every=10**9, ckpt_every=10**9, out=str(tmp / name),
                          progress=False, device="cuda")
        return lambda: train(cfg, log=lambda _m: None)

    tr(5, "warm")()  # kernels chosen and memory pools grown before counting
    short, long = _syncs(tr(20, "t20")), _syncs(tr(40, "t40"))
    out.update(train_syncs=[short, long], train_syncs_per_step=(long - short) / 20)
    print(f"  training: {short} and {long} synchronising calls for 20 and 40 steps: "
          f"{out['train_syncs_per_step']:.2f} per step", flush=True)
    return out


def streams(tcfg: TeacherConfig, teacher, pacs: Path, tmp: Path) -> dict:
    from embedcache.extract.device import DeviceDecodeReader

    root = jpeg_folder(pacs, tmp / "streams", 64)
    guarded = DeviceDecodeReader._decode

    def serialised(self, blobs):
        torch.cuda.synchronize()
        return guarded(self, blobs)

    pixels = {}
    for arm, decode in (("serialised", serialised), ("side stream", guarded),
                        ("unguarded", lambda self, blobs: self._decode_here(blobs))):
        DeviceDecodeReader._decode = decode
        try:
            cfg = ExtractConfig(dataset=DatasetConfig(name="folder", path=str(root)), teacher=tcfg,
                                views=ViewsConfig(count=4), text=TextConfig(sources=("name",)),
                                out=str(tmp / f"s-{arm.replace(' ', '_')}.zarr"), batch_size=64, progress=False,
                                decoder="device", num_workers=4)
            extract(cfg, teacher=teacher, log=lambda _m: None)
        finally:
            DeviceDecodeReader._decode = guarded
        with embedcache.open_store(cfg.out) as s:
            pixels[arm] = s.pixels().copy()
    out = {}
    for arm in ("side stream", "unguarded"):
        off = int((pixels[arm] != pixels["serialised"]).any(axis=(1, 2, 3)).sum())
        out[arm] = off
        print(f"  decoder streams: {arm:<12} {off} of {len(pixels[arm])} canvases differ from the serialised decode",
              flush=True)
    return out


def renderers() -> dict:
    from embedcache.views import render_views, render_views_batched, view_params

    g = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, 256, (32, 256, 256, 3), dtype=torch.uint8, generator=g)
    params = torch.from_numpy(np.stack([view_params(0, i, 4, 256, color_jitter=0.4, grayscale=0.2) for i in range(32)]))
    want = render_views(canvas, params, 224)
    got = render_views_batched(canvas.cuda(), params.cuda(), 224).cpu()
    out = {"max_diff": float((got - want).abs().max()), **_tf32_flags()}
    print(f"  renderers: batched on the GPU vs render_views on the CPU: max |diff| {out['max_diff']:.2e} "
          f"(tolerance 1e-4); {', '.join(f'{k} {v}' for k, v in _tf32_flags().items())}", flush=True)
    return out


def _tf32_flags() -> dict:
    from embedcache.device import tf32_settings

    return tf32_settings()


def fp32_teacher(model: str) -> dict:
    teacher = build_teacher(TeacherConfig(name="open_clip", model=model, pretrained=None, device="auto", precision="fp32"))
    g = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (64, 3, teacher.input_size, teacher.input_size), dtype=torch.uint8, generator=g)
    ieee = teacher.embed_views(views).cpu()
    teacher._ieee = False  # the process's own settings
    tf32 = teacher.embed_views(views).cpu()
    out = {"max_diff": float((ieee - tf32).abs().max()), "min_cosine": float((ieee * tf32).sum(-1).min()),
           **_tf32_flags()}
    print(f"  fp32 teacher ({model}): IEEE fp32 vs the process's TF32 settings: max |diff| {out['max_diff']:.2e}, "
          f"min cosine {out['min_cosine']:.6f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pacs", default=str(ROOT / ".gpu" / "pacs"), help="DomainBed-layout photos (else random images)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    import timm
    import torchvision

    on_gpu = torch.cuda.is_available()
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    tcfg = TeacherConfig(name="open_clip", model=args.model, pretrained=None, device="auto",
                         precision="bf16" if on_gpu else "fp32")
    teacher = build_teacher(tcfg)
    result = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", **versions}
    with tempfile.TemporaryDirectory() as d:
        if on_gpu:
            result["streams"] = streams(tcfg, teacher, Path(args.pacs), Path(d))
            result["renderers"] = renderers()
            result["fp32_teacher"] = fp32_teacher(args.model)
        result["decoders"] = decoders(tcfg, teacher, Path(args.pacs), Path(d))
        if on_gpu:
            result["waits"] = waits(tcfg, teacher, Path(args.pacs), Path(d))
        else:
            print("  no GPU: the waits for the device are not counted", flush=True)
    write_json(Path(args.out) / f"gpu_checks-{'gpu' if on_gpu else 'cpu'}.json", result)


if __name__ == "__main__":
    main()
