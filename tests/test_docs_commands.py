"""Every command in README.md and docs/*.md (```bash blocks) is checked here or run by .ci/run: the CLI's are
parsed by the command's own parser (behind the real deepspeed and torchrun argument parsers where launched),
the short ones are run (help, the memory plans, with the README's printed numbers), benchmark and example flags
exist in their parsers (tests/integrations/test_examples.py runs the examples), named tests exist, and the two
set-up commands are what .ci/run runs."""

from __future__ import annotations

import ast
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

from bilora_dist import cli
from tests_support import ROOT, run_ok

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCH_SCRIPTS = {"launch/train.py": "train", "launch/export.py": "export", "launch/squeeze.py": "squeeze",
                  "launch/sharpness.py": "probe"}
# shell plumbing of the GPU session (docs/GPU_CHECK.md): wheels carried to a machine without network access
GPU_SESSION = ("echo /.whl/", "python3 -m pip download", "python3 -m pip install", "export PYTHONPATH=", "R=")
SETUP = ["bash scripts/setup.sh && bilora-dist train", "bash scripts/setup.sh test && python -m pytest -q"]


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every line of every ```bash block, continuation lines joined."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            found += [(page.name, " ".join(line.split())) for line in block.replace("\\\n", " ").splitlines()
                      if line.strip()]
    return found


def cli_argv(command: str) -> tuple[str, list[str]] | None:
    """(subcommand, its arguments) of a bilora-dist command in any of its forms, else None."""
    words = shlex.split(command.replace("$NODE", "0").replace("$HOST", "127.0.0.1"))
    if words[0] == "deepspeed":
        from deepspeed.launcher.runner import parse_args
        args = parse_args(words[1:])
        script, rest = args.user_script, args.user_args
    elif words[0] == "torchrun":
        from torch.distributed.run import parse_args
        args = parse_args(words[1:])
        script, rest = args.training_script, args.training_script_args
    elif words[0] == "bilora-dist":
        script, rest = "bilora_dist", words[1:]
    elif words[:3] == ["python", "-m", "bilora_dist"]:
        script, rest = "bilora_dist", words[3:]
    elif words[0] == "python" and words[1] in LAUNCH_SCRIPTS:
        script, rest = words[1], words[2:]
    else:
        return None
    if script in LAUNCH_SCRIPTS:
        return LAUNCH_SCRIPTS[script], rest
    assert script == "bilora_dist", command
    return rest[0], rest[1:]


@cache
def benchmark_flags(script: str) -> set[str]:
    """The option strings a benchmark's or example's parser declares (read from its source, nothing run)."""
    tree = ast.parse((ROOT / script).read_text())
    return {arg.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")}


COMMANDS = documented_commands()


def test_the_pages_have_commands():
    assert len(COMMANDS) > 50 and any(page == "README.md" for page, _ in COMMANDS)


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_documented_command_is_valid(page, command):
    if command in SETUP or command == "bash .ci/run":
        ci = (ROOT / ".ci" / "run").read_text()
        assert "bash scripts/setup.sh ||" in ci and "bash scripts/setup.sh test ||" in ci
        assert "bilora-dist train --max-steps 3" in ci and "python -m pytest -q" in ci
        return
    if command.startswith(GPU_SESSION):
        assert page == "GPU_CHECK.md" or command.startswith("R=")
        return
    if (parsed := cli_argv(command)) is not None:
        name, argv = parsed
        parser = COMMANDS_PARSERS[name if name != "plan" else "train"]
        if argv != ["--help"]:
            parser.parse_args(argv)  # a UserError (one line) names a flag or value the command does not take
        return
    words = shlex.split(command.split("PYTHONPATH=")[-1].split(" ", 1)[-1] if "PYTHONPATH=" in command
                        else command)
    if words[:3] == ["python", "-m", "pytest"]:
        for target in (w for w in words[3:] if w.startswith("tests/")):
            path, _, name = target.partition("::")
            assert (ROOT / path).is_file() and (not name or f"def {name}(" in (ROOT / path).read_text()), target
        return
    assert words[0] in ("python", "python3") and words[1].startswith(("benchmarks/", "examples/")), \
        f"{page}: unchecked: {command}"
    assert (ROOT / words[1]).is_file(), words[1]
    flags = {w.split("=")[0] for w in words[2:] if re.fullmatch(r"--[a-z][\w-]*(=\S*)?", w)}
    assert flags <= benchmark_flags(words[1]), f"{words[1]} takes no {flags - benchmark_flags(words[1])}"


COMMANDS_PARSERS = {name: command.parser() for name, command in cli.COMMANDS.items() if name != "plan"}


def test_the_readme_set_up_commands_are_the_two_ci_runs():
    readme = [c for p, c in COMMANDS if p == "README.md" and c.startswith("bash scripts/setup.sh")]
    assert readme == SETUP


def test_the_checked_commands_catch_a_wrong_flag():
    with pytest.raises(Exception, match="--rnak"):
        COMMANDS_PARSERS["train"].parse_args(["--rnak", "8"])
    assert cli_argv("torchrun --nproc_per_node 8 -m bilora_dist probe --engine fsdp") == ("probe", ["--engine", "fsdp"])
    assert "--rounds" in benchmark_flags("benchmarks/moe_cost.py")


def _plan_commands() -> list[tuple[str, str]]:
    return [(p, c) for p, c in COMMANDS if c.startswith("bilora-dist plan")]


@pytest.mark.parametrize("page, command", sorted(set(_plan_commands())), ids=lambda x: x[:50])
def test_the_documented_memory_plans_run(page, command):
    proc = run_ok([sys.executable, "-m", "bilora_dist", *shlex.split(command)[1:]], timeout=300)
    assert "GiB" in proc.stdout


def test_the_readme_plan_prints_the_readmes_numbers():
    readme = (ROOT / "README.md").read_text()
    (command,) = {c for p, c in _plan_commands() if p == "README.md"}
    said = re.search(r"prints ([\d.]+) GiB of\s+Llama-2-7B base shard, ([\d.]+) GiB of adapters.*?and ([\d.]+) GiB",
                     readme, re.S)
    assert said, "the README's plan sentence changed: update this test"
    out = run_ok([sys.executable, "-m", "bilora_dist", *shlex.split(command)[1:]], timeout=300).stdout
    for number in said.groups():
        assert f"{number} GiB" in out, (number, out)


@pytest.mark.parametrize("command", ["train", "export", "squeeze", "probe", "plan"])
def test_short_help_commands_run(command):
    run_ok([sys.executable, "-m", "bilora_dist", command, "--help"])


def test_every_page_link_resolves():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
