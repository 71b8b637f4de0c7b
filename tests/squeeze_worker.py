"""Run under torchrun: squeeze a seeded random branch with the layers split across ranks; save the result."""

import sys

import torch

from bilora_dist.engines.distributed import DataParallelEngine
from bilora_dist.squeeze import squeeze_branch
from tests_support import random_branch

if __name__ == "__main__":
    engine = DataParallelEngine()
    new, reports = squeeze_branch(random_branch(), 3, energy=0.95, engine=engine)
    torch.save({"flat": new.flat.detach(), "ranks": new.ranks, "kept": [r.kept_energy for r in reports]},
               f"{sys.argv[1]}/rank{engine.rank}.pt")
    engine.close()
