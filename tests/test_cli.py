"""The `bilora-dist` command (bilora_dist/cli.py): subcommands, their --help, the module and launcher forms, and
docs/cli.md generated from the parsers and the configuration's metadata."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from bilora_dist import cli
from tests_support import ROOT, run_cmd, run_ok

CONSOLE_SCRIPT = Path(sys.executable).parent / "bilora-dist"


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text))


def _help_flags(text: str) -> set[str]:
    """The flags of argparse's option lines (`  --flag VALUE, --alias VALUE   help`), not those named in help."""
    return {flag for line in text.splitlines() if line.startswith("  -")
            for flag in _flags(re.split(r"\s{2,}", line.strip())[0])}


def test_the_console_script_and_the_module_print_the_same_commands():
    assert CONSOLE_SCRIPT.is_file(), "pip install . installs the bilora-dist console script"
    script = run_ok([str(CONSOLE_SCRIPT), "--help"]).stdout
    module = run_ok([sys.executable, "-m", "bilora_dist", "--help"]).stdout
    assert script == module == cli.usage() + "\n"
    assert [line.split()[0] for line in script.split("commands:\n")[1].split("\n\n")[0].splitlines()] == \
        ["train", "plan", "export", "squeeze", "probe"]


@pytest.mark.parametrize("argv, message", [
    ([], "no command given: one of train, plan, export, squeeze, probe"),
    (["trian"], "unknown command 'trian' (did you mean 'train'?): one of train, plan, export, squeeze, probe"),
    (["monkey"], "unknown command 'monkey': one of train, plan, export, squeeze, probe"),
])
def test_a_missing_or_unknown_command_is_one_line(argv, message):
    proc = run_cmd([sys.executable, "-m", "bilora_dist", *argv])
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}"


def test_docs_cli_md_is_generated_from_the_code():
    doc = (ROOT / "docs" / "cli.md").read_text()
    assert doc == cli.reference_markdown(), "regenerate docs/cli.md with python scripts/cli_docs.py"


@pytest.mark.parametrize("command", ["train", "export", "squeeze", "probe"])
def test_each_command_help_lists_exactly_the_flags_docs_cli_md_lists(command):
    proc = run_ok([sys.executable, "-m", "bilora_dist", command, "--help"])
    assert proc.stdout.startswith(f"usage: bilora-dist {command} ")
    section = (ROOT / "docs" / "cli.md").read_text().split(f"## bilora-dist {command}\n")[1].split("\n## ")[0]
    documented = {flag for row in section.splitlines() if row.startswith("| `--")
                  for flag in _flags(row.split("|")[1])}
    shown = _help_flags(proc.stdout) - {"--help"}
    if command == "train":  # every flag has a snake_case alias; the docs name the dashed form
        shown = {flag for flag in shown if "_" not in flag or flag.replace("_", "-") not in shown}
    assert documented == shown and len(documented) > 3


def test_plan_is_train_with_dry_run(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "train_main", calls.append)
    cli.main(["plan", "--model", "m"])
    assert calls == [["--model", "m", "--dry-run"]]


def test_a_launchers_local_rank_ahead_of_the_command_reaches_it(monkeypatch):
    """`deepspeed --module bilora_dist train ...` starts `python -m bilora_dist --local_rank=0 train ...`."""
    calls = []
    monkeypatch.setattr(cli.COMMANDS["export"], "main", lambda: calls.append)
    cli.main(["--local_rank=1", "export", "--out", "x"])
    assert calls == [["--out", "x", "--local_rank=1"]]


def test_launch_scripts_are_the_same_commands():
    for script, command in (("train", "train"), ("export", "export"), ("squeeze", "squeeze"),
                            ("sharpness", "probe")):
        text = (ROOT / "launch" / f"{script}.py").read_text()
        assert f"`bilora-dist {command}` as a script" in text
        assert len(text.splitlines()) <= 10  # thin: no logic of its own
    launched = run_ok([sys.executable, "launch/export.py", "--help"]).stdout
    assert launched == run_ok([sys.executable, "-m", "bilora_dist", "export", "--help"]).stdout
