"""The test suite's own layout: shared helpers live in tests_support.py, never in another test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module `path` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def called(path: Path, owner: str, attr: str) -> list[int]:
    """The lines of `path` that call `owner.attr(...)`."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
            and isinstance(node.func.value, ast.Name) and node.func.value.id == owner]


def test_no_test_module_imports_another_test_module_or_conftest():
    test_modules = {p.stem for p in TESTS.rglob("*.py") if p.stem.startswith("test_")} | {"conftest"}
    offenders = {p.name: sorted(imported_modules(p) & test_modules) for p in TESTS.rglob("*.py")}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_runs_are_launched_through_tests_support():
    """subprocess.run and socket.socket (free ports) appear in tests_support.py only."""
    offenders = {f"{p.name}:{line}" for p in TESTS.rglob("*.py") if p.name != "tests_support.py"
                 for owner, attr in (("subprocess", "run"), ("socket", "socket")) for line in called(p, owner, attr)}
    assert offenders == set()


def test_the_test_folders_mirror_the_package():
    """tests/<stage>/ for each bilora_dist/<stage>/; tests/benchmarks/ for the benchmark scripts; fixtures apart."""
    package = {p.name for p in (TESTS.parent / "bilora_dist").iterdir() if (p / "__init__.py").is_file()}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name not in ("fixtures", "__pycache__")}
    assert folders - {"benchmarks"} == package
    assert all(list((TESTS / folder).glob("test_*.py")) for folder in folders)
