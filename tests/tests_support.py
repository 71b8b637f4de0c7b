"""Helpers shared by tests and the worker scripts they launch."""

import torch

from bilora_dist.adapters.bank import Branch, LayerShape


def random_branch(seed: int = 7) -> Branch:
    """Twelve layers of four shapes with decaying spectra, scale 2."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [LayerShape(f"l{i}", (24, 40, 16)[i % 3], (32, 16)[i % 2]) for i in range(12)]
    pairs = [(torch.randn(8, s.in_features, generator=gen) * torch.logspace(0, -2, 8)[:, None],
              torch.randn(s.out_features, 8, generator=gen)) for s in shapes]
    return Branch.from_factors(shapes, pairs, [2.0] * len(shapes))
