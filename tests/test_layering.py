"""The import arrows point one way: jobs -> cluster -> engine -> models (DESIGN.md)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "models": {"engine", "cluster", "jobs", "ray", "faiss", "webdataset", "pyarrow", "fsspec"},
    "engine": {"cluster", "jobs", "ray"},
    "cluster": {"jobs"},
}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downward(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    offenders = {
        str(f.relative_to(ROOT)): sorted(imported_top_levels(f) & FORBIDDEN[package]) for f in files
    }
    offenders = {f: bad for f, bad in offenders.items() if bad}
    assert offenders == {}


def test_checker_sees_an_upward_import(tmp_path):
    # The checker itself must be able to fail.
    bad = tmp_path / "bad.py"
    bad.write_text("import ray\nfrom engine.x import y\nfrom . import sibling\n")
    assert imported_top_levels(bad) == {"ray", "engine"}
