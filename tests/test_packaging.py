"""A pip-installed embedcache has its configs (issue 17): the wheel, installed into a fresh virtual
environment outside the repository, runs `configs`, the demo extraction and a tiny sweep by name
from an empty folder. The fresh environment borrows the dependencies of this one through a plain
path entry (so no editable-install mapping reaches it): embedcache itself comes from the wheel only."""
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import source_tree

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    src = source_tree(tmp / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp / "dist").glob("embedcache-*.whl"))
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies of this environment, as a plain path: its .pth files (the editable mapping) stay out
    Path(purelib, "deps.pth").write_text("\n".join(p for p in site.getsitepackages() if "site-packages" in p) + "\n")
    inst = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]
    work = tmp / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_HUB_OFFLINE"] = "1"

    def run(*args, timeout=600):
        return subprocess.run([str(env_dir / "bin" / "embedcache"), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout)
    where = subprocess.run([str(py), "-c", "import embedcache, embedcache.students; print(embedcache.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True)
    assert purelib in where.stdout, (where.stdout, where.stderr)  # the wheel's copy, not the repository's
    return run, work


@pytest.mark.slow
def test_the_installed_package_lists_and_runs_its_configs(fresh_env, tiny_clip_dir):
    run, work = fresh_env
    listed = run("configs")
    assert listed.returncode == 0, listed.stderr
    for name in ("demo", "pacs-conse", "pacs-losses"):
        assert name in listed.stdout
    shown = run("configs", "show", "pacs-conse")
    assert shown.returncode == 0 and "dataset:" in shown.stdout and "domainbed" in shown.stdout
    missing = run("extract", "--config", "pacs-conse", "--out", "p.zarr")
    assert missing.returncode == 2 and "--set dataset.path=" in missing.stderr
    assert missing.stderr.strip().count("\n") == 0
    tiny = ["--set", "dataset.per_class=2", "--set", "dataset.num_classes=2", "--no-progress",
            "--set", "teacher.name=open_clip", "--set", f"teacher.model=local-dir:{tiny_clip_dir}"]  # loads at once
    made = run("extract", "--config", "demo", "--out", "stores/demo.zarr", *tiny)
    assert made.returncode == 0, made.stderr
    assert (work / "stores" / "demo.zarr" / "zarr.json").exists()
    swept = run("sweep", "--launcher", "serial", "--no-progress", "--device", "cpu",
                "--set", "grid.recipe=[feat_kd]", "--set", "grid.seed=[0]", "--set", "holdout_domains=[solid]",
                "--set", "base.student.name=test_resnet", "--set", "base.student.input_size=32",
                "--set", "base.steps=2", "--set", "base.eval_every=1", "--set", "base.batch_size=4")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert "running the demo sweep" in swept.stdout and "1 runs: 1 done now" in swept.stdout
    assert (work / "sweeps" / "demo" / "results.parquet").exists()


def test_the_declared_setuptools_can_read_this_pyproject():
    """`license = "Apache-2.0"` (an SPDX expression, PEP 639) needs setuptools 77: an older one that
    the build requirement allowed refused the whole pyproject ("project.license must be valid")."""
    import re
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needs = 77 if isinstance(meta["project"].get("license"), str) else 64
    declared = meta["build-system"]["requires"] + meta["project"]["optional-dependencies"]["test"]
    floors = [int(m.group(1)) for r in declared if (m := re.fullmatch(r"setuptools>=(\d+).*", r))]
    assert floors and min(floors) >= needs, declared
