"""`bilora-dist squeeze` as a script: python launch/squeeze.py --adapter DIR --rank K --out DIR."""

import sys

from bilora_dist.cli import run_cli
from bilora_dist.squeeze.cli import squeeze_main

if __name__ == "__main__":
    sys.exit(run_cli(squeeze_main))
