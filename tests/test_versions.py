"""The versions pyproject.toml declares are true: each minimum is installed here (CI installs the minimums or
newer) and is at least what the code needs, and the README's table states the same minimums."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.version import Version

from tests_support import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# what the code cannot do without, and why
CODE_NEEDS = {
    "transformers": ("5.0", "the experts interface, the checkpoint conversion mapping and the loading API"),
    "torch": ("2.6", "public FSDP2 (fully_shard) and distribute_tensor(src_data_rank=)"),
    "peft": ("0.21", "target_parameters for fused experts, and the expert layout the export writes"),
}


def _requirements() -> list[Requirement]:
    extras = PYPROJECT["optional-dependencies"]
    return [Requirement(r) for r in PYPROJECT["dependencies"] + extras["test"] + extras["quant"]]


def _minimum(req: Requirement) -> Version:
    (spec,) = [s for s in req.specifier if s.operator == ">="]
    return Version(spec.version)


def test_every_declared_minimum_is_installed_and_every_installed_version_is_allowed():
    reqs = _requirements()
    assert len(reqs) >= 15
    for req in reqs:
        installed = Version(version(req.name))
        assert installed.release >= _minimum(req).release, f"{req.name} {installed} is below {req}"
        assert req.specifier.contains(installed.base_version), f"{req.name} {installed} is outside {req}"
    assert sys.version_info[:2] >= tuple(int(p) for p in PYPROJECT["requires-python"][2:].split("."))


def test_minimums_cover_what_the_code_needs():
    declared = {r.name: _minimum(r) for r in _requirements()}
    for name, (needed, why) in CODE_NEEDS.items():
        assert declared[name] >= Version(needed), f"{name} >= {needed} is needed for {why}"


def test_the_readme_table_states_the_declared_minimums():
    table = (ROOT / "README.md").read_text().split("## Tested with")[1].split("\n## ")[0]
    rows = {m[0].split(" (")[0].split()[0]: m[1] for m in re.findall(r"^\| ([^|]+?) \| ([\d.]+)", table, re.M)}
    declared = {r.name: str(_minimum(r)) for r in _requirements()}
    assert rows.pop("Python") == PYPROJECT["requires-python"][2:]
    assert rows and all(declared[name] == minimum for name, minimum in rows.items()), (rows, declared)
