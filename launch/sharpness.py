"""Sharpness of an adapted model: python launch/sharpness.py --adapter DIR --data FILE [--rho 0.01,0.05,0.1]."""

import sys

from bilora_dist.cli import run_cli
from bilora_dist.sharpness import sharpness_main

if __name__ == "__main__":
    sys.exit(run_cli(sharpness_main))
