"""Every `facegen` command in the README parses with the real CLI and is run by a test with the same
sub-command and flags; the README's shell commands are the ones `.ci/run` and the tests run."""

import ast
import functools
import re
import shlex
from pathlib import Path

import pytest

from facegen.jobs.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NESTED = {"index", "world", "models", "bench", "disentangle"}  # commands whose first argument is a sub-command


def readme_commands() -> list[str]:
    """`facegen ...` lines of the bash blocks (continuations joined) and every inline `facegen ...`."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            commands += [part.strip() for part in line.split("&&") if part.strip().startswith("facegen ")]
    for inline in re.findall(r"`(facegen [^`]+)`", README):
        inline = re.sub(r"\s*\[[^\]]*\]", "", inline)  # optional flags of a synopsis
        commands.append(re.sub(r"(\S+)\\\|\S+", r"\1", inline))  # `a\|b` alternatives: the first
    return sorted(set(commands))


def argv_of(command: str) -> list[str]:
    return shlex.split(command)[1:]


def flags_of(argv: list[str]) -> set[str]:
    return {arg.split("=")[0] for arg in argv if arg.startswith("--")}


def command_words(argv: list[str]) -> tuple[str, ...]:
    return tuple(argv[:2]) if argv[0] in NESTED and len(argv) > 1 else (argv[0],)


def test_readme_commands_were_found():
    commands = readme_commands()
    assert "facegen quickstart" in commands
    assert "facegen generate jobs/examples/tiny.yaml --out tiny-dataset" in commands
    assert len(commands) >= 25


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses_with_the_cli(command):
    args = build_parser().parse_args(argv_of(command))  # an unknown flag or choice exits here
    assert getattr(args, "func", None) is not None, command


@functools.cache
def cli_calls() -> list[tuple[tuple[str, ...], frozenset[str]]]:
    """(command words, flags) of every CLI invocation in the tests and .ci/run: a list literal or a call's
    arguments whose first string is a command name (after "facegen" or "-m facegen.jobs"); `*NAME` of a
    module-level list of strings is expanded, and a module-level helper returning such a list is followed."""
    names = set(build_parser()._subparsers._group_actions[0].choices)
    calls = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        constants = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                     for target in node.targets if isinstance(target, ast.Name) and isinstance(node.value, ast.List)}
        # Helpers `def _args(...): return ["command", ..., *extra]`: a call adds its strings to the list's.
        helpers = {node.name: node.body[-1].value.elts for node in tree.body if isinstance(node, ast.FunctionDef)
                   and isinstance(node.body[-1], ast.Return) and isinstance(node.body[-1].value, ast.List)}
        for node in ast.walk(tree):
            elements = node.elts if isinstance(node, ast.List) else node.args if isinstance(node, ast.Call) else None
            if elements is None:
                continue
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in helpers:
                elements = [*helpers[node.func.id], *elements]
            argv = [item for item in strings(elements, constants) if item is not None]
            while argv and argv[0] in ("facegen", "-m", "facegen.jobs"):
                argv = argv[1:]
            if argv and argv[0] in names:
                calls.append((command_words(argv), frozenset(flags_of(argv))))
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        if line.strip().startswith("facegen "):
            argv = argv_of(line.strip())
            calls.append((command_words(argv), frozenset(flags_of(argv))))
    return calls


def strings(elements: list[ast.expr], constants: dict[str, ast.List]) -> list[str | None]:
    items: list[str | None] = []
    for e in elements:
        if isinstance(e, ast.Starred) and isinstance(e.value, ast.Name) and e.value.id in constants:
            items += strings(constants[e.value.id].elts, {})
        else:
            items.append(e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else None)
    return items


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_is_run_by_a_test(command):
    argv = argv_of(command)
    words, flags = command_words(argv), flags_of(argv)
    runs = [found for called, found in cli_calls() if called == words]
    assert runs, f"no test runs `facegen {' '.join(words)}`"
    assert any(flags <= found for found in runs), (
        f"no test runs `facegen {' '.join(words)}` with {sorted(flags)}; closest: "
        f"{max(runs, key=lambda found: len(flags & found))}")


def test_the_invocation_finder_sees_the_tests_calls():
    calls = cli_calls()
    assert (("quickstart",), frozenset({"--out"})) in calls
    assert (("index", "build"), frozenset({"--images", "--embedder"})) in calls or any(
        words == ("index", "build") and "--images" in flags for words, flags in calls)


def test_shell_commands_are_the_ci_ones():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pip install -q torch==2.13.0" in ci and 'python3 -m pip install -q -e ".[dev]"' in ci
    assert "python3 -m pytest -q" in ci
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]" && facegen quickstart' in README
    assert "python3 -m pytest -q\n" in README
