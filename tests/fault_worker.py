"""launch/train.py with one fault injected, for runs under torchrun. Usage: fault_worker.py [train flags]

FAULT in the environment says which:
- `nan:RANK:CALL,CALL...`: rank RANK's loss is NaN on those calls of token_loss_sum (0-based, every pass counted);
- `kill:RANK:STEP:MARKER`: rank RANK kills itself (SIGKILL) as step STEP (1-based) begins, once: MARKER records it.
"""

import math
import os
import signal
import sys
from pathlib import Path

from bilora_dist.training import loop, methods
from bilora_dist.cli import exit_process, run_cli, train_main


def poison_losses(calls: set[int]) -> None:
    original, count = methods.token_loss_sum, iter(range(10**9))

    def poisoned(model, batch):
        loss, tokens = original(model, batch)
        return (loss * math.nan if next(count) in calls else loss), tokens
    methods.token_loss_sum = poisoned


def kill_at(step: int, marker: Path) -> None:
    original = loop.TrainingLoop.step

    def step_or_die(self, index: int):
        if index + 1 == step and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, index)
    loop.TrainingLoop.step = step_or_die


if __name__ == "__main__":
    kind, rank, *rest = os.environ["FAULT"].split(":")
    if int(rank) == int(os.environ.get("RANK", "0")):
        if kind == "nan":
            poison_losses({int(c) for c in rest[0].split(",")})
        else:
            kill_at(int(rest[0]), Path(rest[1]))
    exit_process(run_cli(train_main, sys.argv[1:]))
