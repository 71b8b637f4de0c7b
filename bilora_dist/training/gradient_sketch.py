"""A single-pass sketch of every adapted linear layer's weight gradient G_j = dL/dW_j (m x n), never formed.

The adapter hooks feed it each layer's input x and output gradient dy during one backward: G = dyᵀ x over the
tokens, so the two sketches Y = G Ω (m x k) and Z = Ψ G (l x n) are dyᵀ (x Ω) and (dy Ψᵀ)ᵀ x, a few small
products per layer (Tropp, Yurtsever, Udell & Cevher 2017, "Practical sketching algorithms for low-rank matrix
approximation", single-pass reconstruction: G ≈ Q (ΨQ)⁺ Z with Q an orthonormal basis of Y). The sketches are
linear in G, so summing them over micro-batches and ranks (one all-reduce of one flat buffer) sketches the
global gradient exactly as one process would with the same Ω and Ψ. When G's rank is at most k the top
singular triplets are exact; otherwise they are the randomized estimate, with OVERSAMPLE extra columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

OVERSAMPLE = 10


class GradientSketch:
    """Sketches of the gradients of the linear layers `dims` (layer index: (out m, in n)) for their top `rank`
    singular triplets; Ω and Ψ are drawn from `seed`, the same on every rank."""

    def __init__(self, dims: dict[int, tuple[int, int]], rank: int, seed: int, device: torch.device):
        self.rank, self.k = rank, rank + OVERSAMPLE
        self.l = 2 * self.k + 1
        generator = torch.Generator().manual_seed(seed)
        sizes = [(m * self.k, self.l * n) for m, n in dims.values()]
        self.flat = torch.zeros(sum(a + b for a, b in sizes), device=device)
        self.omega, self.psi, self.y, self.z = {}, {}, {}, {}
        offset = 0
        for (j, (m, n)), (size_y, size_z) in zip(dims.items(), sizes):
            self.omega[j] = torch.randn(n, self.k, generator=generator).to(device)
            self.psi[j] = torch.randn(self.l, m, generator=generator).to(device)
            self.y[j] = self.flat[offset:offset + size_y].view(m, self.k)
            self.z[j] = self.flat[offset + size_y:offset + size_y + size_z].view(self.l, n)
            offset += size_y + size_z

    def add(self, j: int, x: Tensor, dy: Tensor) -> None:
        """Accumulate layer j's gradient contribution dyᵀ x of one micro-batch (x: (..., n), dy: (..., m))."""
        if j not in self.y:
            return
        x = x.reshape(-1, x.shape[-1]).to(self.flat.dtype)
        dy = dy.reshape(-1, dy.shape[-1]).to(self.flat.dtype)
        self.y[j].add_(dy.T @ (x @ self.omega[j]))
        self.z[j].add_((dy @ self.psi[j].T).T @ x)

    def top(self, j: int, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """Layer j's top r (<= rank) singular triplets (U (m x r), S (r,), V (n x r)) of the sketched gradient."""
        Q, _ = torch.linalg.qr(self.y[j].double())
        core = torch.linalg.lstsq(self.psi[j].double() @ Q, self.z[j].double()).solution  # ≈ Qᵀ G, k x n
        U, S, Vh = torch.linalg.svd(core, full_matrices=False)
        dtype = self.flat.dtype
        return (Q @ U[:, :r]).to(dtype), S[:r].to(dtype), Vh[:r].T.to(dtype)

    def layers(self) -> list[int]:
        return list(self.y)
