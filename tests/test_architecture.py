"""The walls of the house (DESIGN.md), checked on the source, and the installed namespace.

Layers, bottom to top, one folder each: embedcache/ (data, teachers, stores, extraction) ->
evaluate/ (embedcache.evaluate) -> students/ (embedcache.students) -> cli/ (embedcache.cli).
A layer imports only layers below it; students never import the teachers (a student run cannot
construct one); nothing imports the CLI. No exemption by file name: each folder is one layer.
"""
import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import source_tree

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"embedcache": "embedcache", "evaluate": "embedcache.evaluate", "students": "embedcache.students",
           "cli": "embedcache.cli", "configs": "embedcache.configs"}
ABOVE = {  # what each layer must not import
    "embedcache": ("embedcache.evaluate", "embedcache.students", "embedcache.cli"),
    "evaluate": ("embedcache.students", "embedcache.cli", "embedcache.teachers", "embedcache.extract"),
    "students": ("embedcache.cli", "embedcache.teachers", "embedcache.extract"),
}


def _imports(path: Path, folder: str):
    tree = ast.parse(path.read_text())
    rel = path.relative_to(ROOT / folder).with_suffix("").parts
    pkg = ".".join([FOLDERS[folder], *rel[:-1]]) if rel[-1] != "__init__" else ".".join([FOLDERS[folder], *rel[:-1]])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # resolve relative imports against the module's package
                parts = pkg.split(".")
                base = parts[: len(parts) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module or ""


def _cases():
    for folder in ABOVE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield pytest.param(folder, path, id=str(path.relative_to(ROOT)))


@pytest.mark.parametrize("folder,path", list(_cases()))
def test_each_layer_imports_only_layers_below(folder, path):
    bad = [m for m in _imports(path, folder) if m.startswith(ABOVE[folder])]
    # the core may use its own subpackages freely, except the layers above it
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_bare_top_level_students_or_evaluate_import():
    for folder in ("embedcache", "evaluate", "students", "cli", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                assert not [n for n in names if n.split(".")[0] in ("students", "evaluate", "cli")], path


def test_packages_listed_in_pyproject_match_the_folders():
    import tomllib

    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(py["packages"])
    mapping = py["package-dir"]
    on_disk = set()
    for folder, pkg in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join([pkg, *rel]))
    assert listed == on_disk
    assert {v: k for k, v in mapping.items()} == {f: p for f, p in FOLDERS.items() if f != "embedcache"}


@pytest.mark.slow
def test_wheel_installs_everything_under_one_namespace(tmp_path):
    src = source_tree(tmp_path / "src")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(tmp_path.glob("embedcache-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"embedcache", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for must in ("embedcache/students/train.py", "embedcache/evaluate/index.py", "embedcache/cli/__init__.py",
                 "embedcache/configs/extract/demo.yaml", "embedcache/configs/sweep/demo.yaml"):
        assert must in names


def test_a_student_run_s_store_comparison_loads_no_teacher(synthetic_store):
    """The walls hold at run time too: a run scored on another store compares the stores' manifests
    (``how_it_differs``), which imported the extraction package and with it every teacher (an audit)."""
    code = ("import sys; import embedcache.students.train, embedcache.students.sweep, embedcache.evaluate.store_eval; "
            "from embedcache.api import how_it_differs; "
            f"how_it_differs({str(synthetic_store)!r}, {str(synthetic_store)!r}); "
            "print(sorted(m for m in sys.modules if m.startswith(('embedcache.teachers', 'embedcache.extract', "
            "'open_clip'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr[-2000:]
