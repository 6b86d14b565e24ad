"""The remote teacher over loopback against the same teacher locally, in one run, and the queries
the ledger saves when a second store reuses the first one's views.

    python bench/remote.py [--model ViT-B-32] [--images 56] [--views 2] [--batch 16] [--format png]

1. local: ``extract`` with the teacher in this process.
2. remote: the same extraction through ``embedcache serve`` (the same teacher, in a subprocess on
   127.0.0.1) and the ``remote`` teacher: render, PNG-encode, HTTP, decode, encode, ledger.
   Both on the same cores, so the figure is what the transport costs on this machine.
3. the transport's ceiling: 1 and 2 again with a near-free teacher (one 64-wide layer) that takes
   224 px views, so the views, PNGs and requests are full-sized but the teacher costs ~nothing.
4. reuse: a second store of the same images with one view more (views are seeded by (seed, image,
   view), so the first views are the same pixels): queries paid against queries without the ledger.
Random weights (speed does not depend on them). Prints a table and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedcache.config import DatasetConfig, ExtractConfig, TeacherConfig, TextConfig, ViewsConfig, to_dict  # noqa: E402
from embedcache.extract import extract  # noqa: E402
from embedcache.store import Store  # noqa: E402
from embedcache.teachers import build_teacher  # noqa: E402
from _common import write_json  # noqa: E402  (bench/ is on sys.path when a benchmark runs)

KEY = "sk-bench-remote-loopback"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(teacher_cfg: TeacherConfig, tmp: Path, max_batch: int, keys: int) -> tuple:
    port = free_port()
    conf = tmp / "serve.yaml"
    conf.write_text(json.dumps({"teacher": to_dict(teacher_cfg), "port": port, "keys_env": "BENCH_SERVE_KEYS",
                                "ledger": str(tmp / "server.sqlite"), "model_name": "bench", "log_level": "warning",
                                "max_batch": max_batch}))
    # one key per run: the server's idempotent replays are per key, so no run is answered from another's
    env = {**os.environ, "BENCH_SERVE_KEYS": ",".join(f"bench{i}:{KEY}-{i}" for i in range(keys)), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "embedcache.cli", "serve", "--config", str(conf)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit("embedcache serve exited; run it by hand to see why")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("embedcache serve did not start in 180 s")
        time.sleep(0.3)


def config(teacher: TeacherConfig, out: Path, images: int, views: int, batch: int) -> ExtractConfig:
    per_class = max(1, -(-images // (7 * 4)))
    return ExtractConfig(dataset=DatasetConfig(name="synthetic", num_classes=7, num_domains=4, per_class=per_class,
                                               image_size=227),
                         teacher=teacher, views=ViewsConfig(count=views), text=TextConfig(sources=("name",)),
                         out=str(out), batch_size=batch, num_workers=1, block_rows=batch * 4, progress=False)


TINY_224 = {"embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "patch_size": 32,
                                           "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def compare(local_cfg: TeacherConfig, tmp: Path, args, reuse: bool) -> dict:
    """Local and remote extraction of the same store with one teacher (and the ledger's savings)."""
    out: dict = {}
    proc, url = start_server(local_cfg, tmp, max_batch=max(256, args.batch * (args.views + 1)), keys=args.repeat)
    try:
        teacher = build_teacher(local_cfg)
        local_s, remote_s = [], []
        # interleaved, best of --repeat each: on a shared machine the load moves between runs
        for rep in range(args.repeat):
            res = extract(config(local_cfg, tmp / f"local{rep}.zarr", args.images, args.views, args.batch),
                          teacher=teacher, log=lambda _m: None)
            local_s.append(res.seconds)
            n_views = res.images * args.views
            # a fresh ledger and key each time: every view is paid, sent and encoded
            os.environ["BENCH_CLIENT_KEY"] = f"{KEY}-{rep}"
            remote_cfg = TeacherConfig(name="remote", url=url, api_key_env="BENCH_CLIENT_KEY",
                                       ledger=str(tmp / f"client{rep}.sqlite"), image_format=args.format, timeout=600)
            res = extract(config(remote_cfg, tmp / f"remote{rep}.zarr", args.images, args.views, args.batch),
                          teacher=build_teacher(remote_cfg), log=lambda _m: None)
            remote_s.append(res.seconds)
        # bare: encode_pixels on pre-made 224 px views (no decoding, rendering or store): the transport alone
        rteacher = build_teacher(TeacherConfig(name="remote", url=url, api_key_env="BENCH_CLIENT_KEY",
                                               ledger=str(tmp / "bare.sqlite"), image_format=args.format, timeout=600))
        g = torch.Generator().manual_seed(1)
        size, n = teacher.input_size, args.batch * args.views
        bare_l, bare_r = [], []
        for rep in range(3):
            smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bicubic")
            x = (smooth.clamp(0, 1) * 255).round().to(torch.uint8)  # new views each time: no ledger hits
            t0 = time.perf_counter()
            teacher.encode_pixels(x)
            bare_l.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rteacher.encode_pixels(x)
            bare_r.append(time.perf_counter() - t0)
        out["bare_local_views_per_s"], out["bare_remote_views_per_s"] = n / min(bare_l), n / min(bare_r)
        out["local_seconds"], out["remote_seconds"] = local_s, remote_s
        out["local_views_per_s"] = n_views / min(local_s)
        out["remote_views_per_s"] = n_views / min(remote_s)
        with Store(str(tmp / "local0.zarr")) as a, Store(str(tmp / "remote0.zarr")) as b:
            out["identical_embeddings"] = bool(np.array_equal(a.read("image/emb"), b.read("image/emb")))
            usage = b.manifest["teacher_usage"]
        out["remote_usage"] = {k: usage[k] for k in ("requests", "queries", "images", "bytes", "retries")}
        out["bytes_per_view"] = usage["bytes"] / max(1, usage["images"])
        if reuse:  # a second store: the same images with one view more, through the first run's ledger
            os.environ["BENCH_CLIENT_KEY"] = f"{KEY}-0"
            remote_cfg = TeacherConfig(name="remote", url=url, api_key_env="BENCH_CLIENT_KEY",
                                       ledger=str(tmp / "client0.sqlite"), image_format=args.format, timeout=600)
            res = extract(config(remote_cfg, tmp / "more.zarr", args.images, args.views + 1, args.batch),
                          teacher=build_teacher(remote_cfg), log=lambda _m: None)
            with Store(str(tmp / "more.zarr")) as c:
                u2 = c.manifest["teacher_usage"]
            needed = res.images * (args.views + 1)
            out["reuse"] = {"views_needed": needed, "image_queries_paid": u2["images"],
                            "ledger_hits": u2["image_cache_hits"], "saved_fraction": 1 - u2["images"] / needed}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model (random weights)")
    ap.add_argument("--images", type=int, default=56)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="images per extraction batch (x views per request)")
    ap.add_argument("--format", default="png", choices=("png", "jpeg"))
    ap.add_argument("--repeat", type=int, default=2, help="interleaved local/remote runs; the best of each counts")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON results")
    args = ap.parse_args()

    results = {"machine": f"{platform.node()} ({os.cpu_count()} cores), load average {os.getloadavg()[0]:.1f} at start",
               "args": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "tiny").mkdir()
        (tmp / "tiny224.json").write_text(json.dumps(TINY_224))
        tiny = TeacherConfig(name="open_clip", model="tiny224", model_config=str(tmp / "tiny224.json"), device="cpu")
        results["ceiling"] = compare(tiny, tmp / "tiny", args, reuse=False)
        results["teacher"] = compare(TeacherConfig(name="open_clip", model=args.model, device="cpu"), tmp, args, reuse=True)
    results["load_average_end"] = os.getloadavg()[0]
    print(f"\n{args.images} images x {args.views} views, batch {args.batch} images, {args.format}, random weights; "
          f"{results['machine']}")
    print(f"{'teacher, what':<40}{'local views/s':>15}{'remote views/s':>16}{'ratio':>8}{'transport ms/view':>19}")
    for label, r in ((args.model, results["teacher"]), ("near-free (224 px views)", results["ceiling"])):
        for what, a, b in (("extract", "local_views_per_s", "remote_views_per_s"),
                           ("bare encode_pixels", "bare_local_views_per_s", "bare_remote_views_per_s")):
            overhead = 1000 * (1 / r[b] - 1 / r[a])
            print(f"{label + ', ' + what:<40}{r[a]:>15.1f}{r[b]:>16.1f}{r[b] / r[a]:>8.2f}{overhead:>19.1f}")
    r = results["teacher"]
    print(f"identical embeddings: {r['identical_embeddings']} ({args.model}), {results['ceiling']['identical_embeddings']} "
          f"(near-free); {r['bytes_per_view']:.0f} PNG bytes a view; {r['remote_usage']['requests']} requests")
    ru = r["reuse"]
    print(f"second store, {args.views + 1} views: {ru['views_needed']} views needed, {ru['image_queries_paid']} paid, "
          f"{ru['ledger_hits']} from the ledger ({100 * ru['saved_fraction']:.0f}% saved)")
    write_json(Path(args.out) / "remote-cpu.json", results)


if __name__ == "__main__":
    main()
