"""Extraction throughput against the teacher's bare forward pass, and store read speed against .npy.

    python bench/extract.py [--images 256] [--model ViT-B-32] [--precision fp32|bf16] [--device auto]
                            [--workers N] [--views 1 4] [--decoders pil device] [--jpegs 0] [--baseline]
                            [--rounds 3]

In one run, with one teacher and batch size, in ``--rounds`` rounds (each measures bare before and after
its pipelines, and takes their mean; medians of the rates and of the ratios within a round are reported):
1. bare: the teacher's own call on pre-made uint8 views on its device (``embed_views``, as extraction
   calls it; no decoding, rendering, copying back or writing): the hardware's own limit.
2. extract: the full pipeline (read -> decode -> canvas -> views -> teacher -> checksummed store) on
   real PACS images when ../shared/datasets/pacs exists, else synthetic ones, for each decoder
   (``pil``: PIL in DataLoader workers; ``device``: JPEGs decoded on the teacher's device) and view
   count. The figure is teacher forwards/s (images x views) and its ratio to bare: over the whole
   call, and over its image pass alone (``ExtractResult.image_seconds``: without the work a call does
   once per store, the dataset scanned, the prompts encoded, the tables written, which a short
   benchmark weighs far more than a dataset's extraction does).
   ``--jpegs N`` first writes N 500x375 JPEGs made from PACS photos (ImageNet-sized files) and
   extracts those instead.
3. ``--baseline``: a PIL DataLoader pipeline the way clip-retrieval and the papers' code read
   images (open, resize, centre crop, to tensor, normalise in workers; the teacher on the batch),
   one view per image, no store: the reference a user would otherwise run.
4. read: loading a whole (N, 1, 512) float16 embedding array from Zarr and HDF5 stores (the store's
   own checksum-verified read) against np.load of the same array, for stores of 256-row blocks
   (extraction's default) and of 4096-row blocks (``--read-block-rows``); with the seconds it took
   to write the blocks and to finish the store (Zarr packs the embeddings into ~8 MB chunks then).
Random weights are fine for speed. Prints a table and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedcache.config import DatasetConfig, ExtractConfig, TeacherConfig, TextConfig, ViewsConfig  # noqa: E402
from embedcache.extract import extract, reader_workers  # noqa: E402
from embedcache.store import SCHEMA_VERSION, Store, plan_layout  # noqa: E402
from embedcache.teachers import build_teacher  # noqa: E402
from _common import measured, write_json  # noqa: E402  (bench/ is on sys.path when a benchmark runs)

PACS = ROOT.parent / "shared" / "datasets" / "pacs"


def _sync(teacher) -> None:
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(teacher, n: int, batch: int) -> float:
    """The teacher's own call on pre-made uint8 views already on its device, as extraction makes it
    (``embed_views``: normalisation and forward, the result left on the device; no sync per batch)."""
    s = teacher.input_size
    x = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=teacher.device)
    encode = getattr(teacher, "embed_views", teacher.encode_pixels)
    encode(x)  # warm-up
    _sync(teacher)
    t0, done = time.perf_counter(), 0
    while done < n:
        encode(x)
        done += batch
    _sync(teacher)
    return done / (time.perf_counter() - t0)


def _make_jpeg(job) -> None:
    from PIL import Image

    src, dst = job
    Image.open(src).convert("RGB").resize((500, 375), Image.BICUBIC).save(dst, quality=90)


def make_jpegs(pacs: Path, n: int, out: Path) -> Path:
    """N 500x375 JPEGs (quality 90) upscaled from PACS photos, in a DomainBed layout under ``out``
    (made by every core: a GPU host's device time is short)."""
    from multiprocessing import get_context

    by_class = [sorted(c.glob("*.jpg")) for c in sorted((pacs / "photo").iterdir()) if c.is_dir()]
    photos = [p for turn in zip(*by_class) for p in turn]  # class by class in turn: a few files span every class
    if not photos:
        sys.exit(f"--jpegs: no photo/*/*.jpg under {pacs} (bench/prepare_gpu.sh copies some into .gpu/pacs)")
    jobs = [(photos[k % len(photos)], out / "photo" / photos[k % len(photos)].parent.name / f"{k:06d}.jpg")
            for k in range(n)]
    for folder in {dst.parent for _, dst in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    with get_context("spawn").Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_make_jpeg, jobs, chunksize=32)
    return out


def dataset_for(pacs: Path, n: int) -> DatasetConfig:
    if not pacs.is_dir():
        return DatasetConfig(name="synthetic", num_classes=7, num_domains=4, per_class=max(1, -(-n // 28)), image_size=227)
    domains = len([d for d in pacs.iterdir() if d.is_dir()])
    classes = len({c.name for d in pacs.iterdir() if d.is_dir() for c in d.iterdir() if c.is_dir()})
    return DatasetConfig(name="domainbed", path=str(pacs), max_per_class=max(1, -(-n // (classes * domains))))


def pipeline(teacher, teacher_cfg, ds: DatasetConfig, batch: int, workers: int, views: int, decoder: str,
             tmp: Path) -> float:
    cfg = ExtractConfig(dataset=ds, teacher=teacher_cfg, views=ViewsConfig(count=views), text=TextConfig(sources=("name",)),
                        out=str(tmp / f"bench-{decoder}-{views}.zarr"), batch_size=batch, num_workers=workers,
                        block_rows=batch * 4, progress=False, decoder=decoder)
    res = extract(cfg, teacher=teacher, log=lambda _m: None)
    return res.images * views / res.seconds, res.images * views / res.image_seconds


def pil_baseline(teacher, ds: DatasetConfig, batch: int, workers: int) -> float:
    """What a user's script does without the cache: PIL decode + resize + crop in workers, teacher on GPU."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from embedcache.datasets import build_dataset

    data = build_dataset(ds)
    size, mean, std = teacher.input_size, torch.tensor(teacher.mean).view(3, 1, 1), torch.tensor(teacher.std).view(3, 1, 1)

    class Files(Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            im = data.load(i)
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            x = torch.from_numpy(np.array(im.crop((left, top, left + size, top + size)))).permute(2, 0, 1).float() / 255
            return (x - mean) / std

    loader = DataLoader(Files(), batch_size=batch, num_workers=workers, pin_memory=teacher.device.type == "cuda")
    t0, n = time.perf_counter(), 0
    for x in loader:
        teacher.encode_image(x.to(teacher.device, non_blocking=True))
        n += len(x)
    _sync(teacher)
    return n / (time.perf_counter() - t0)


def read_speed(tmp: Path, rows: int, block_rows: int, dim: int = 512, rounds: int = 11) -> dict:
    """Seconds to load a whole (rows, 1, dim) float16 array: np.load against each backend's own
    checksum-verified read of a finished store of ``block_rows``-row blocks (Zarr packs its embeddings
    into chunks of whole blocks of ~8 MB as it finishes), each the median of ``rounds`` interleaved
    reads (files in the page cache)."""
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((rows, 1, dim)).astype(np.float16)
    np.save(tmp / "emb.npy", arr)
    layout = plan_layout(rows, 1, dim, 8, False, block_rows)
    manifest = {"schema": SCHEMA_VERSION, "key": "bench", "complete": False}
    paths = {"zarr": tmp / f"r{block_rows}.zarr", "hdf5": tmp / f"r{block_rows}.h5"}
    spent = {}
    for name, path in paths.items():
        with Store.create(str(path), manifest, layout, name) as st:
            t0 = time.perf_counter()
            for b in range(st.num_blocks):
                start, stop = st.block_range(b)
                st.write_block(b, {"image/emb": arr[start:stop], "image/status": np.ones(stop - start, np.uint8),
                                   "image/view_params": np.zeros((stop - start, 1, 5), np.int32),
                                   "image/canvas_crc32c": np.zeros(stop - start, np.uint32)})  # a store without pixels
            t1 = time.perf_counter()
            st.finish()  # complete, as training reads it (Zarr: the embeddings packed into ~8 MB chunks)
            spent.update({f"{name}_write_s": t1 - t0, f"{name}_finish_s": time.perf_counter() - t1})
        with Store(str(path)) as st:
            assert np.array_equal(st.read("image/emb"), arr)
    times = {k: [] for k in ("npy", *paths)}
    for _ in range(rounds):
        t0 = time.perf_counter()
        np.load(tmp / "emb.npy")
        times["npy"].append(time.perf_counter() - t0)
        for name, path in paths.items():
            with Store(str(path)) as st:  # the store's own whole-array read, checksums verified
                t0 = time.perf_counter()
                st.read("image/emb")
                times[name].append(time.perf_counter() - t0)
    for path in paths.values():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return {**{f"{k}_s": float(np.median(v)) for k, v in times.items()}, **spent, "mb": arr.nbytes / 2**20,
            "block_rows": block_rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None,
                    help="image-reading worker processes (default: extraction's own choice, reader_workers)")
    ap.add_argument("--views", type=int, nargs="+", default=[1])
    ap.add_argument("--decoders", nargs="+", default=["pil"], choices=["pil", "device"])
    ap.add_argument("--jpegs", type=int, default=0, help="extract N 500x375 JPEGs made from PACS photos")
    ap.add_argument("--rounds", type=int, default=0,
                    help="rounds of bare + pipelines, medians reported (default 3 on a CPU, 1 on a GPU)")
    ap.add_argument("--baseline", action="store_true", help="also time a plain PIL DataLoader + teacher pipeline")
    ap.add_argument("--read-rows", type=int, default=200_000)
    ap.add_argument("--read-block-rows", type=int, nargs="+", default=[256, 4096],
                    help="store block sizes to read (256: extraction's default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON results")
    ap.add_argument("--pacs", default=str(PACS), help="DomainBed-layout image folder (default ../shared/datasets/pacs)")
    args = ap.parse_args()
    if min(args.read_block_rows) < 1 or args.read_rows < 1:
        ap.error("--read-rows and --read-block-rows must be at least 1")

    tcfg = TeacherConfig(name="open_clip", model=args.model, pretrained=None, device=args.device, precision=args.precision)
    teacher = build_teacher(tcfg)
    workers = reader_workers(args.workers, teacher)  # as extraction resolves it
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pacs = Path(args.pacs)
        if args.jpegs:
            pacs = make_jpegs(pacs, args.jpegs, tmp / "jpegs")
        ds = dataset_for(pacs, args.jpegs or args.images)
        n = args.jpegs or args.images
        rounds = args.rounds or (1 if teacher.device.type == "cuda" else 3)
        arms = {}  # what -> [(rate, bare of its round)]
        for r in range(rounds):  # each round measures bare before and after its pipelines: a shared CPU's speed drifts
            before = bare_forward(teacher, n * max(args.views), args.batch)
            got = {}
            if args.baseline:
                got[f"PIL DataLoader + teacher, 1 view, {workers} worker(s)"] = pil_baseline(teacher, ds, args.batch, workers)
            for dec in args.decoders:
                for v in args.views:
                    try:  # one arm that fails (a decoder the device will not run) costs only its own figures
                        call, images = pipeline(teacher, tcfg, ds, args.batch, args.workers, v, dec, tmp / f"round{r}")
                    except Exception as exc:
                        print(f"  extract ({dec}), {v} view(s)/image failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}", flush=True)
                        continue
                    got[f"extract ({dec}), {v} view(s)/image, {workers} worker(s)"] = call
                    got[f"  of it the image pass ({dec}, {v} view(s)/image)"] = images
            bare = (before + bare_forward(teacher, n * max(args.views), args.batch)) / 2
            for what, rate in {"bare forward (pre-made tensors)": bare, **got}.items():
                arms.setdefault(what, []).append((rate, bare))
            print(f"  round {r + 1} of {rounds}: " + ", ".join(f"{q[-1][0] / q[-1][1]:.2f}" for q in arms.values()), flush=True)
        for what, runs in arms.items():  # medians over rounds: of the rate, and of its ratio within its round
            measured(rows, what, float(np.median([a for a, _ in runs])), float(np.median([a / b for a, b in runs])))
        reads = [read_speed(tmp, args.read_rows, br) for br in args.read_block_rows]
    device = torch.cuda.get_device_name() if teacher.device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    source = f"{args.jpegs} 500x375 JPEGs from PACS photos" if args.jpegs else (pacs if pacs.is_dir() else "synthetic")
    print(f"\nteacher {args.model} (random weights, {args.precision}), batch {args.batch}, device {device}, images: {source}")
    print(f"{'what':<52} {'teacher images/s':>16} {'vs bare':>8}")
    for name, rate, ratio in rows:
        print(f"{name:<52} {rate:>16.1f} {ratio:>8.2f}")
    print(f"\nload-all read of a {reads[0]['mb']:.0f} MB (N, 1, 512) float16 array, checksums verified")
    print(f"{'format':<10} {'block rows':>10} {'seconds':>8} {'MB/s':>8} {'vs npy':>8} {'write s':>8} {'finish s':>8}")
    for rd in reads:
        for k in ("npy", "zarr", "hdf5"):
            s, made = rd[f"{k}_s"], (f"{rd[f'{k}_write_s']:>8.2f} {rd[f'{k}_finish_s']:>8.2f}" if k != "npy" else "")
            print(f"{k:<10} {rd['block_rows']:>10} {s:>8.3f} {rd['mb'] / s:>8.0f} {rd['npy_s'] / s:>8.2f} {made}")
    result = {"device": device, "model": args.model, "precision": args.precision, "batch": args.batch,
              "workers": workers, "rounds": rounds, "images": n, "jpegs": args.jpegs, "host": platform.node(), "cpus": os.cpu_count(),
              "throughput": [{"what": a, "images_per_s": r, "ratio_vs_bare": q} for a, r, q in rows], "read": reads}
    tag = ("gpu" if teacher.device.type == "cuda" else "cpu") + f"-{args.model}-{args.precision}"
    write_json(Path(args.out) / f"extract-{tag}.json", result)


if __name__ == "__main__":
    main()
