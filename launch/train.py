"""Fine-tune with lora / bilora / lora-sam: `python launch/train.py --help` lists every flag."""

import sys

from bilora_dist.cli import run_cli, train_main

if __name__ == "__main__":
    sys.exit(run_cli(train_main))
