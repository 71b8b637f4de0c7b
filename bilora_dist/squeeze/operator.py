"""The LoRA-Squeeze compression operator (specs/squeeze.md): truncated SVD of ΔW = s·B A.

Everything works on batches of equal-shape layers: A is (L, r, n), B is (L, m, r), s is (L,).
The factored path never forms an m x n matrix: QR of B and of Aᵀ, then the SVD of an r x r core.

On CPU the batch is split across the intra-op threads, each running its share single-threaded: MKL's
threaded Householder QR of one tall, thin factor (4096 x 64) is slower on two threads than on one (0.38 s
against 0.26 s for 128 such factors, 2 cores), and its threads meet at a barrier per panel, so it took up to
14 s when other processes held the cores; whole matrices per thread need no barrier (0.13 s). The result is
the one-thread result bit for bit, whatever the thread count.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Spectrum:
    """A batch of truncated SVDs: ΔW_l ≈ U_l diag(S_l) V_lᵀ. U (L, m, k), S (L, k), V (L, n, k)."""

    U: Tensor
    S: Tensor
    V: Tensor


def factored_svd(A: Tensor, B: Tensor, scales: Tensor, k: int | None = None) -> Spectrum:
    """Exact SVD of s·B A for each layer, computed in fp32 (or the inputs' float64) from the factors.

    Q_B R_B = B, Q_A R_A = Aᵀ, C = s R_B R_Aᵀ = U_c Σ V_cᵀ, so s B A = (Q_B U_c) Σ (Q_A V_c)ᵀ.
    Q_B and Q_A stay in Householder form (geqrf) and are applied only to the first `k` singular
    vectors (ormqr), so the cost is O((m + n) r² + (m + n) r k + r³) per layer.
    All singular values are returned; U and V hold the first k (default: all) vectors.
    Rank-deficient factors give zero singular values.
    """
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    A, B, scales = A.to(dtype), B.to(dtype), scales.to(dtype)
    workers = min(torch.get_num_threads(), A.shape[0]) if A.device.type == "cpu" else 1
    if workers <= 1:
        return _factored_svd(A, B, scales, k)
    chunks = zip(A.tensor_split(workers), B.tensor_split(workers), scales.tensor_split(workers))
    with _single_threaded(), ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(lambda chunk: _factored_svd(*chunk, k), chunks))
    return Spectrum(*(torch.cat(tensors) for tensors in zip(*((p.U, p.S, p.V) for p in parts))))


@contextmanager
def _single_threaded() -> Iterator[None]:
    """One intra-op thread (torch's, OpenMP's and MKL's) for the block; the previous count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _factored_svd(A: Tensor, B: Tensor, scales: Tensor, k: int | None) -> Spectrum:
    B_householder, B_tau = torch.geqrf(B)
    A_householder, A_tau = torch.geqrf(A.transpose(1, 2))
    R_B = B_householder[:, :B_tau.shape[1]].triu()
    R_A = A_householder[:, :A_tau.shape[1]].triu()
    U_c, S, V_cT = torch.linalg.svd(scales[:, None, None] * (R_B @ R_A.transpose(1, 2)))
    k = S.shape[1] if k is None else min(k, S.shape[1])
    return Spectrum(_apply_q(B_householder, B_tau, U_c[..., :k]), S,
                    _apply_q(A_householder, A_tau, V_cT.transpose(1, 2)[..., :k]))


def _apply_q(householder: Tensor, tau: Tensor, X: Tensor) -> Tensor:
    """Q X for the orthonormal Q (L, m, p) stored by geqrf and X (L, p, k): zero-pad X to m rows, apply."""
    padded = X.new_zeros(X.shape[0], householder.shape[1], X.shape[2])
    padded[:, :X.shape[1]] = X
    return torch.ormqr(householder, tau, padded)


def randomized_svd(M: Tensor, k: int, oversample: int = 10, power_iters: int = 2,
                   generator: torch.Generator | None = None) -> Spectrum:
    """Halko-Martinsson-Tropp randomized SVD of dense matrices M (L, m, n), rank k, in fp32 (or float64).

    Range finder with k + oversample Gaussian probes and `power_iters` QR-stabilised power iterations.
    """
    dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    M = M.to(dtype)
    L, m, n = M.shape
    width = min(k + oversample, m, n)
    omega = torch.randn(L, n, width, generator=generator, dtype=dtype)
    Q, _ = torch.linalg.qr(M @ omega)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(M.transpose(1, 2) @ Q)
        Q, _ = torch.linalg.qr(M @ Z)
    U_small, S, VT = torch.linalg.svd(Q.transpose(1, 2) @ M, full_matrices=False)
    return Spectrum((Q @ U_small)[..., :k], S[..., :k], VT.transpose(1, 2)[..., :k])


def energy_rank(S: Tensor, tau: float, max_rank: int) -> list[int]:
    """Per layer, the smallest k (1 <= k <= max_rank) with Σ_{i<k} σ_i² / Σ σ_i² >= tau."""
    energy = S.square()
    cumulative = energy.cumsum(-1) / energy.sum(-1, keepdim=True).clamp_min(torch.finfo(S.dtype).tiny)
    reached = (cumulative >= tau - 1e-12).to(torch.int64)
    first = torch.where(reached.any(-1), reached.argmax(-1) + 1, torch.full_like(reached[:, 0], S.shape[-1]))
    return [int(min(max(k, 1), max_rank)) for k in first]


def balanced_factors(U: Tensor, S: Tensor, V: Tensor, new_scale: float | Tensor) -> tuple[Tensor, Tensor]:
    """New (A', B') with s'·B'A' = U diag(S) Vᵀ, the singular values split evenly: d = sqrt(S / s'),
    B' = U diag(d), A' = diag(d) Vᵀ. One layer (U (m, k), S (k,), V (n, k), s' a number) or a batch
    (U (L, m, k), S (L, k), V (L, n, k), s' a number or (L,))."""
    if isinstance(new_scale, Tensor) and S.dim() == 2:
        new_scale = new_scale[:, None]
    d = (S / new_scale).sqrt()
    return d[..., :, None] * V.mT, U * d[..., None, :]
