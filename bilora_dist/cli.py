"""The `bilora-dist` command (also `python -m bilora_dist`): one subcommand per job, each with its own --help.
User mistakes become one line on stderr and exit status 2, faults a run stops on (TrainingFault) one line and
exit status 1."""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import sys
import argparse
from collections.abc import Callable
from typing import NoReturn

from bilora_dist.errors import TrainingFault, UserError

# bitsandbytes (the quant extra) warns on import, on CPUs with AVX512-BF16, that an optional kernel
# package is missing; its CPU path works without it, and the line would sit in front of every message
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None = None) -> int:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingFault as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def exit_process(code: int) -> NoReturn:
    """Exit with `code`. A rank of a multi-process launch leaves at once, its streams flushed: by then its run
    has written and closed everything and destroyed its process group, and the interpreter's teardown of the
    distributed stack's native threads now and then aborts the process instead ("terminate called without an
    active exception", seen in 3 of several hundred 2-rank ZeRO-3 runs on gloo, always after the adapter was
    written), which the launcher then reports as a failed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD = -3, 1 << 20


def return_freed_cpu_memory() -> bool:
    """Make glibc serve every CPU allocation of 1 MB or more by mmap, so that freeing it returns it to the
    system; returns whether the setting took. glibc otherwise raises its mmap threshold (up to 32 MB) at the
    first large free, and the activation and logits buffers of later steps come from a heap that does not
    shrink: the default model at --seq-len 1024 (8 records, checkpointing) peaked at 10.9 GB instead of 1.8 GB,
    for about 25 % longer steps (benchmarks/feature_cost.py). GPU memory has its own allocator."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD))


def train_main(argv: list[str]) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    from bilora_dist.config.train import parse_config
    from bilora_dist.recipe.train import dry_run, train

    hf_logging.disable_progress_bar()  # the run shows its own progress
    cfg = parse_config(argv)
    if not torch.cuda.is_available():
        return_freed_cpu_memory()
    if cfg.dry_run:
        print(dry_run(cfg))
    else:
        train(cfg)


def plan_main(argv: list[str]) -> None:
    """`bilora-dist plan FLAGS`: `bilora-dist train FLAGS --dry-run`."""
    if {"-h", "--help"} & set(argv):
        print(f"usage: bilora-dist plan [flags of bilora-dist train]\n\n{COMMANDS['plan'].summary}. It takes every "
              "flag of `bilora-dist train` (see `bilora-dist train --help`) and is `bilora-dist train ... --dry-run`.")
        return
    train_main([*argv, "--dry-run"])


class Command:
    """A subcommand: its entry point and parser factory as `module:function` (imported only when used), and
    the one line `bilora-dist --help` shows for it."""

    def __init__(self, main: str, parser: str | None, summary: str):
        self.main_path, self.parser_path, self.summary = main, parser, summary

    @staticmethod
    def _load(path: str) -> Callable:
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)

    def main(self) -> Callable[[list[str]], object]:
        return self._load(self.main_path)

    def parser(self) -> argparse.ArgumentParser | None:
        return self._load(self.parser_path)() if self.parser_path else None


COMMANDS: dict[str, Command] = {
    "train": Command("bilora_dist.cli:train_main", "bilora_dist.config.train:build_parser",
                     "fine-tune with lora, bilora or lora-sam (flags, a YAML --config, a DeepSpeed --ds_config)"),
    "plan": Command("bilora_dist.cli:plan_main", None,
                    "print a run's per-rank memory plan from its model's config alone (no weights, no data)"),
    "export": Command("bilora_dist.export.cli:export_main", "bilora_dist.export.cli:build_parser",
                      "write a PEFT or vLLM adapter, a squeezed adapter or a merged model from a run"),
    "squeeze": Command("bilora_dist.squeeze.cli:squeeze_main", "bilora_dist.squeeze.cli:build_parser",
                       "compress a PEFT LoRA adapter to a lower rank, or extract one from a full fine-tune"),
    "probe": Command("bilora_dist.probe.cli:sharpness_main", "bilora_dist.probe.cli:build_parser",
                     "measure how far an adapted model's held-out loss rises under weight perturbations"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return ("usage: bilora-dist COMMAND [flags]   (python -m bilora_dist COMMAND is the same)\n\n"
            "Bi-LoRA and LoRA-Squeeze fine-tuning of causal language models, single process or sharded.\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n`bilora-dist COMMAND --help` lists a command's flags.")


def main(argv: list[str]) -> None:
    """Dispatch to a subcommand. A launcher's `--local_rank=N` (deepspeed puts it ahead of every argument of
    `deepspeed --module bilora_dist train ...`) is passed on to the subcommand."""
    launcher = [a for a in argv if a.startswith(("--local_rank", "--local-rank"))][:1]
    rest = [a for a in argv if a not in launcher]
    if not rest or rest[0] in ("-h", "--help"):
        print(usage())
        if not rest:
            raise UserError("no command given: one of " + ", ".join(COMMANDS))
        return
    if rest[0] == "--version":
        from bilora_dist import __version__
        print(f"bilora-dist {__version__}")
        return
    if rest[0] not in COMMANDS:
        from bilora_dist.errors import unknown_key_message
        raise UserError(f"{unknown_key_message(rest[0], list(COMMANDS), 'command')}: one of " + ", ".join(COMMANDS))
    COMMANDS[rest[0]].main()([*rest[1:], *launcher])


def console_main() -> NoReturn:
    """The `bilora-dist` console script."""
    exit_process(run_cli(main))


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _train_rows() -> list[str]:
    """One row per TrainConfig field, from the field's own metadata: flag, default, allowed values, help."""
    from dataclasses import MISSING, fields

    from bilora_dist.config.train import TrainConfig

    rows = []
    for f in fields(TrainConfig):
        default = "" if f.default is MISSING or f.default in ("", None, False) else f"`{f.default}`"
        allowed = ", ".join(f"`{c}`" for c in f.metadata["choices"]) if "choices" in f.metadata else (
            "flag" if f.type == "bool" else f.type.replace(" | None", ""))
        bounds = " ".join(f"{op} {f.metadata[key]}" for key, op in
                          (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")) if key in f.metadata)
        flag = f"--{f.name.replace('_', '-')}"
        rows.append(f"| `{flag}` | {default} | {allowed}{' ' + bounds if bounds else ''} | {_cell(f.metadata['help'])} |")
    return rows


def _parser_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or "--help" in action.option_strings:
            continue
        default = "" if action.default in (None, False, argparse.SUPPRESS) else f"`{action.default}`"
        allowed = ", ".join(f"`{c}`" for c in action.choices) if action.choices else (
            "flag" if action.nargs == 0 else (action.metavar and " ".join(action.metavar)) or
            getattr(action.type, "__name__", "str"))
        required = " (required)" if action.required else ""
        rows.append(f"| `{', '.join(action.option_strings)}` | {default} | {allowed} | "
                    f"{_cell(action.help)}{required} |")
    return rows


def reference_markdown() -> str:
    """docs/cli.md: every command and flag, from the parsers and TrainConfig's field metadata."""
    out = ["# Command reference", "",
           "Generated by `python scripts/cli_docs.py` from the parsers and the training configuration's own "
           "metadata; a test checks that it matches `--help`. Every `bilora-dist train` flag is also a YAML key "
           "(`--foo-bar` is `foo_bar`) of a `--config` file.", "", "```", usage(), "```"]
    for name, command in COMMANDS.items():
        out += ["", f"## bilora-dist {name}", "", command.summary + ".", ""]
        if name == "plan":
            out.append("Takes every flag of `bilora-dist train` and is `bilora-dist train ... --dry-run`.")
            continue
        rows = _train_rows() if name == "train" else _parser_rows(command.parser())
        out += ["| flag | default | values | meaning |", "|---|---|---|---|", *rows]
    return "\n".join(out) + "\n"
