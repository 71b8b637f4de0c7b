"""Command-line entry points: user mistakes become one line on stderr and exit status 2, faults a run stops on
(TrainingFault) one line and exit status 1."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
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
    from bilora_dist.trainer import dry_run, train

    hf_logging.disable_progress_bar()  # the run shows its own progress
    cfg = parse_config(argv)
    if not torch.cuda.is_available():
        return_freed_cpu_memory()
    if cfg.dry_run:
        print(dry_run(cfg))
    else:
        train(cfg)
