"""The walls of the house (DESIGN.md): checked on the source, so a stray import fails CI."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # resolve relative imports against the module's package
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module or ""


def _modules(package: str):
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("students") + _modules("evaluate"), ids=lambda p: str(p.relative_to(ROOT)))
def test_students_and_evaluate_never_import_teachers_or_cli(path):
    bad = [m for m in _imports(path) if m.startswith(("embedcache.teachers", "embedcache.cli", "embedcache.extract"))]
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", _modules("evaluate"), ids=lambda p: str(p.relative_to(ROOT)))
def test_evaluate_never_imports_students(path):
    assert not [m for m in _imports(path) if m.startswith("students")]


@pytest.mark.parametrize("path", [p for p in _modules("embedcache") if p.name != "cli.py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_embedcache_library_imports_neither_students_nor_evaluate(path):
    assert not [m for m in _imports(path) if m.startswith(("students", "evaluate", "embedcache.cli"))]
