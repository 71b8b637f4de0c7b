"""`bilora-dist export` as a script: python launch/export.py --checkpoint DIR --out DIR [--rank K] [--merged]."""

import sys

from bilora_dist.cli import run_cli
from bilora_dist.export.cli import export_main

if __name__ == "__main__":
    sys.exit(run_cli(export_main))
