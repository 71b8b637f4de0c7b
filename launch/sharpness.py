"""`bilora-dist probe` as a script: python launch/sharpness.py --adapter DIR --data FILE [--rho 0.01,0.05,0.1]."""

from bilora_dist.cli import exit_process, run_cli
from bilora_dist.probe.cli import sharpness_main

if __name__ == "__main__":
    exit_process(run_cli(sharpness_main))
