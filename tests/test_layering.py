"""The import arrows point one way: jobs -> cluster -> engine -> models, all under `facegen`."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "engine", "cluster", "jobs")

# package -> names it must never import (facegen subpackages by their short name, or third-party tops)
FORBIDDEN = {
    "models": {"engine", "cluster", "jobs", "ray", "faiss", "webdataset", "pyarrow", "fsspec"},
    "engine": {"cluster", "jobs", "ray"},
    "cluster": {"jobs"},
}


def imported_names(path: Path) -> set[str]:
    """Top-level modules a file imports; `facegen.X...` counts as `X`, a bare `models` as `models`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
    names = set()
    for module in modules:
        parts = module.split(".")
        names.add(parts[1] if parts[0] == "facegen" and len(parts) > 1 else parts[0])
    return names


def package_files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    return files


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downward(package):
    offenders = {str(f.relative_to(ROOT)): sorted(imported_names(f) & FORBIDDEN[package])
                 for f in package_files(package)}
    assert {f: bad for f, bad in offenders.items() if bad} == {}


@pytest.mark.parametrize("package", PACKAGES)
def test_sources_import_facegen_by_its_installed_name(package):
    # A bare `import models` would pick up a user's own `models/` package instead of ours.
    offenders = {}
    for f in package_files(package):
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            bare = [n for n in names if n.split(".")[0] in PACKAGES]
            if bare:
                offenders.setdefault(str(f.relative_to(ROOT)), []).extend(bare)
    assert offenders == {}


# Sub-packages with a narrower contract: facegen modules they may import (prefixes), nothing else.
# The on-disk dataset knows storage, not how samples are generated (no bundle, phases, spec, models).
ALLOWED_INSIDE = {
    "engine/dataset": ("facegen.engine.dataset", "facegen.engine.storage", "facegen.models.errors"),
}


def facegen_modules(path: Path) -> set[str]:
    """Full facegen module names a file imports (anywhere in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("facegen"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("facegen"))
    return names


@pytest.mark.parametrize("folder", sorted(ALLOWED_INSIDE))
def test_subpackage_imports_only_what_its_contract_allows(folder):
    allowed = ALLOWED_INSIDE[folder]
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"{folder}/ has no Python files"
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in facegen_modules(f) if not m.startswith(allowed))
                 for f in files}
    assert {f: bad for f, bad in offenders.items() if bad} == {}


def test_commands_do_not_import_each_other():
    # Shared CLI helpers live in facegen.jobs.common; a command module is only ever loaded by the CLI.
    commands = "facegen.jobs.commands"
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in facegen_modules(f) if m.startswith(commands))
                 for f in sorted((ROOT / "jobs" / "commands").rglob("*.py"))}
    assert {f: bad for f, bad in offenders.items() if bad} == {}


def test_no_import_cycle_between_modules():
    """Module-level imports inside facegen form a DAG (imports inside functions are lazy and exempt)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for f in package_files(package):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = "facegen." + ".".join(parts)
            deps = set()
            for node in ast.parse(f.read_text()).body:
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("facegen."):
                    deps.add(node.module)
                    deps.update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.startswith("facegen."))
            graph[name] = deps
    graph = {n: {d for d in deps if d in graph and d != n} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_checker_sees_an_upward_import(tmp_path):
    # The checker itself must be able to fail.
    bad = tmp_path / "bad.py"
    bad.write_text("import ray\nfrom facegen.engine.x import y\nfrom models import z\nfrom . import sibling\n")
    assert imported_names(bad) == {"ray", "engine", "models"}
    assert facegen_modules(bad) == {"facegen.engine.x"}
