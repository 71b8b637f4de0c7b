"""Command-line entry points: user mistakes become one line on stderr and exit status 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from bilora_dist.errors import UserError

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
    return 0


def train_main(argv: list[str]) -> None:
    from transformers.utils import logging as hf_logging

    from bilora_dist.config import parse_config
    from bilora_dist.trainer import dry_run, train

    hf_logging.disable_progress_bar()  # the run shows its own progress
    cfg = parse_config(argv)
    if cfg.dry_run:
        print(dry_run(cfg))
    else:
        train(cfg)
