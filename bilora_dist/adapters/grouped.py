"""One fused expert projection, base and low-rank update, as grouped matrix products over expert-sorted rows.

Rows of `x` are sorted by expert; `offsets[e]` ends expert e's rows (cumulative counts, int32, as torch's grouped
mm takes them) and `bounds` is the same as a Python list starting at 0. Every product is one grouped mm for all
experts: torch's kernel where it runs the dtype on that device (CPU; bf16 on CUDA), otherwise one `mm` per expert
written into a preallocated output. Either way autograd sees a single node per projection, whose backward
allocates each gradient once, never a zero tensor per expert.

The weight is saved as the parameter itself, not a transposed view of it: under ZeRO-3 a view would keep the
gathered [E, out, in] tensor alive from forward to backward after DeepSpeed has released the parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

_KERNEL = getattr(F, "grouped_mm", None)


def _strides_fit(*tensors: Tensor) -> bool:
    """torch's grouped mm on CPU needs every non-unit stride to be a multiple of 16 bytes."""
    return all(s == 1 or (s * t.element_size()) % 16 == 0 for t in tensors for s in t.stride())


def _use_kernel(a: Tensor, b: Tensor, out: tuple[int, ...]) -> bool:
    if _KERNEL is None or a.dtype != b.dtype:
        return False
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (8, 0)
    if a.device.type != "cpu":  # meta (the memory plan's trace) among others
        return False
    return _strides_fit(a, b) and _strides_fit(torch.empty(out, device="meta"))


def rows_times_experts(a: Tensor, b: Tensor, offsets: Tensor, bounds: list[int]) -> Tensor:
    """Rows of expert e in `a` (T x k) times b[e] (k x n): the T x n result."""
    shape = (a.shape[0], b.shape[-1])
    if _use_kernel(a, b, shape):
        return _KERNEL(a, b, offs=offsets)
    out = a.new_empty(shape)
    if a.is_meta:  # the memory plan's trace: shapes only
        return out
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            torch.mm(a[start:end], b[e], out=out[start:end])
    return out


def experts_outer(a: Tensor, b: Tensor, offsets: Tensor, bounds: list[int]) -> Tensor:
    """a[:, rows of e] (m x T) times b[rows of e] (T x n) for every expert e: E x m x n, zero where e has no rows."""
    experts = len(bounds) - 1
    shape = (experts, a.shape[0], b.shape[1])
    if _use_kernel(a, b, shape):
        return _KERNEL(a, b, offs=offsets)
    out = a.new_zeros(shape)
    if a.is_meta:
        return out
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            torch.mm(a[:, start:end], b[start:end], out=out[e])
    return out


class ExpertProjection(torch.autograd.Function):
    """y = x W_eᵀ (+ B_e A_e x) for the rows of each expert e; W is [E, out, in], or [E, in, out] when
    `transposed`; the factors A (E x r x n) and B (E x m x r, scale included) are optional.

    The base product runs in W's dtype; the low-rank one in the factors' dtype (fp32), from x as it came: x is
    saved once in its own dtype and re-cast in backward, with the r-wide x Aᵀ, so no fp32 copy of the routed
    activations is kept.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, A: Tensor | None, B: Tensor | None, offsets: Tensor,
                bounds: list[int], transposed: bool) -> Tensor:
        out = rows_times_experts(x.to(weight.dtype), weight if transposed else weight.mT, offsets, bounds)
        h = None
        if A is not None and B is not None:
            h = rows_times_experts(x.to(A.dtype), A.mT, offsets, bounds)
            out.add_(rows_times_experts(h, B.mT, offsets, bounds).to(out.dtype))  # out is ours and not saved
        ctx.save_for_backward(x, weight, A, B, h, offsets)
        ctx.bounds, ctx.transposed = bounds, transposed
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, A, B, h, offsets = ctx.saved_tensors
        bounds = ctx.bounds
        grad_x = grad_W = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = rows_times_experts(grad.to(weight.dtype), weight.mT if ctx.transposed else weight, offsets,
                                        bounds).to(x.dtype)
        if ctx.needs_input_grad[1]:  # a trained base (not ours: the adapters' base is frozen), for completeness
            rows, cols = (x, grad) if ctx.transposed else (grad, x)
            grad_W = experts_outer(rows.to(weight.dtype).T, cols.to(weight.dtype), offsets, bounds)
        if A is not None and B is not None:
            grad32 = grad.to(B.dtype)
            grad_h = rows_times_experts(grad32, B, offsets, bounds)
            if grad_x is not None:
                grad_x.add_(rows_times_experts(grad_h, A, offsets, bounds).to(x.dtype))
            if ctx.needs_input_grad[2]:
                grad_A = experts_outer(grad_h.T, x.to(A.dtype), offsets, bounds)
            if ctx.needs_input_grad[3]:
                grad_B = experts_outer(grad32.T, h, offsets, bounds)
        return grad_x, grad_W, grad_A, grad_B, None, None, None


def expert_projection(x: Tensor, weight: Tensor, offsets: Tensor, bounds: list[int], transposed: bool,
                      factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One fused expert projection of expert-sorted rows `x`, with the update of `factors` (A, B) if given."""
    A, B = factors if factors is not None else (None, None)
    return ExpertProjection.apply(x, weight, A, B, offsets, bounds, transposed)
