"""The adapters' matmul pair as one autograd function that keeps no fp32 copy of a bf16 input."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class LowRankProduct(torch.autograd.Function):
    """y = B (A x) in the factors' dtype (fp32), saving x as it came (e.g. bf16) and the r-wide A x.

    Autograd through `x.to(fp32)` would keep a private fp32 copy of every adapted layer's input (q, k and v
    each their own, twice the size of the bf16 hidden states they share); here backward re-casts x for the
    one product that needs it (grad A = (B^T g)^T x) and frees it at once.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        h = x.to(A.dtype) @ A.T
        ctx.save_for_backward(x, A, B, h)
        return h @ B.T

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, A, B, h = ctx.saved_tensors
        grad = grad.to(B.dtype)
        grad_h = grad @ B
        grad_x = (grad_h @ A).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_A = grad_h.flatten(0, -2).T @ x.flatten(0, -2).to(A.dtype) if ctx.needs_input_grad[1] else None
        grad_B = grad.flatten(0, -2).T @ h.flatten(0, -2) if ctx.needs_input_grad[2] else None
        return grad_x, grad_A, grad_B


def low_rank_product(x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """B (A x) over the last dimension of x, in A's dtype (see LowRankProduct)."""
    return LowRankProduct.apply(x, A, B)
