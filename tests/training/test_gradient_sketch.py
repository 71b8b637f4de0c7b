"""The single-pass sketch of a layer's weight gradient: exact top triplets for a low-rank gradient, linear in its
parts (micro-batches and ranks sum)."""

from __future__ import annotations

import torch

from bilora_dist.training.gradient_sketch import GradientSketch

CPU = torch.device("cpu")


def _parts(tokens: int, m: int = 24, n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, n, generator=generator), torch.randn(tokens, m, generator=generator)


def test_top_triplets_of_a_gradient_within_the_sketch_rank_are_exact():
    x, dy = _parts(6)  # G = dyᵀ x has rank 6 <= k = 3 + OVERSAMPLE
    sketch = GradientSketch({0: (24, 16)}, 3, seed=1, device=CPU)
    sketch.add(0, x, dy)
    U, S, V = sketch.top(0, 3)
    Uw, Sw, Vhw = torch.linalg.svd(dy.T @ x)
    torch.testing.assert_close(S, Sw[:3], rtol=1e-4, atol=0)
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, Uw[:, :3] @ torch.diag(Sw[:3]) @ Vhw[:3], rtol=0, atol=1e-3)


def test_the_sketch_of_the_parts_is_the_sketch_of_the_sum():
    (x1, dy1), (x2, dy2) = _parts(5, seed=1), _parts(4, seed=2)
    split, whole = (GradientSketch({3: (24, 16)}, 2, seed=5, device=CPU) for _ in range(2))
    split.add(3, x1, dy1)
    split.add(3, x2.view(2, 2, 16), dy2.view(2, 2, 24))  # batched (..., n) inputs
    whole.add(3, torch.cat([x1, x2]), torch.cat([dy1, dy2]))
    torch.testing.assert_close(split.flat, whole.flat, rtol=1e-5, atol=1e-5)
    split.add(7, x1, dy1)  # a layer it does not sketch is ignored
    assert split.layers() == [3]


def test_a_decaying_spectrum_is_recovered_beyond_the_sketch_rank():
    """A full-rank gradient whose singular values halve: the top 4 within 0.1 % though G has rank 16."""
    generator = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(24, 16, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    S = 100 * 0.5 ** torch.arange(16.0)
    sketch = GradientSketch({0: (24, 16)}, 4, seed=2, device=CPU)
    sketch.add(0, torch.eye(16), (U * S @ V.T).T)  # dy rows are Gᵀ's: dyᵀ I = G
    torch.testing.assert_close(sketch.top(0, 4)[1], S[:4], rtol=1e-3, atol=0)
