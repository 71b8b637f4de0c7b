"""The grouped expert projection (adapters/grouped.py) against a per-expert float64 reference, on torch's grouped
kernel and on the per-expert fallback; its autograd graph does not grow with the number of experts; it saves the
expert weight itself, never a view that would outlive a ZeRO-3 release."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from bilora_dist.adapters import build_bank, grouped, inject, layer_shapes, select_targets
from bilora_dist.adapters.grouped import expert_projection
from tests_support import tiny_moe_config

COUNTS = [5, 0, 12, 3, 0, 9]  # rows per expert; two experts get none


def _inputs(rank: int, transposed: bool, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    E, n, m, T = len(COUNTS), 16, 24, sum(COUNTS)
    x = torch.randn(T, n, generator=gen).to(dtype)
    W = torch.randn(E, n, m, generator=gen) if transposed else torch.randn(E, m, n, generator=gen)
    A = torch.randn(E, rank, n, generator=gen) * 0.3
    B = torch.randn(E, m, rank, generator=gen) * 0.3
    offsets = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    return x, W.to(dtype), A, B, offsets, [0] + offsets.tolist()


def _reference(x, W, A, B, bounds, transposed, grad):
    """Per expert in float64: y_e = x_e W_eᵀ + x_e A_eᵀ B_eᵀ; returns y and the gradients of <y, grad>."""
    x, A, B = (t.detach().double().requires_grad_() for t in (x, A, B))
    W = W.double()
    rows = []
    for e, (s, t) in enumerate(zip(bounds, bounds[1:])):
        w = W[e] if transposed else W[e].T
        rows.append(x[s:t] @ w + x[s:t] @ A[e].T @ B[e].T)
    y = torch.cat(rows)
    (y * grad.double()).sum().backward()
    return y, x.grad, A.grad, B.grad


@pytest.mark.parametrize("kernel", [True, False], ids=["grouped-kernel", "per-expert"])
@pytest.mark.parametrize("rank", [8, 6])
@pytest.mark.parametrize("transposed", [False, True])
def test_projection_and_gradients_equal_float64_reference(monkeypatch, kernel, rank, transposed):
    calls = []
    real = grouped._KERNEL
    monkeypatch.setattr(grouped, "_KERNEL", (lambda *a, **k: calls.append(1) or real(*a, **k)) if kernel else None)
    x, W, A, B, offsets, bounds = _inputs(rank, transposed, torch.float32)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    y = expert_projection(x, W, offsets, bounds, transposed, (A, B))
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(grad)
    want_y, want_x, want_A, want_B = _reference(x, W, A, B, bounds, transposed, grad)
    for got, want in ((y, want_y), (x.grad, want_x), (A.grad, want_A), (B.grad, want_B)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert A.grad[1].abs().sum() == 0 and B.grad[4].abs().sum() == 0  # experts without rows get none
    assert (len(calls) == 8) if kernel and rank == 8 else (len(calls) < 8)  # rank 6 rows are not 16-byte strided


def test_bf16_rows_keep_their_dtype_and_fp32_factor_gradients():
    x, W, A, B, offsets, bounds = _inputs(8, False, torch.bfloat16)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    y = expert_projection(x, W, offsets, bounds, False, (A, B))
    assert y.dtype == torch.bfloat16
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    y.backward(grad)
    assert x.grad.dtype == torch.bfloat16 and A.grad.dtype == B.grad.dtype == torch.float32
    _, _, want_A, want_B = _reference(x, W, A, B, bounds, False, grad)
    torch.testing.assert_close(A.grad.double(), want_A, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(B.grad.double(), want_B, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("transposed", [False, True])
def test_weight_gradient_when_the_base_is_not_frozen(transposed):
    x, W, A, B, offsets, bounds = _inputs(8, transposed, torch.float32)
    W.requires_grad_()
    y = expert_projection(x, W, offsets, bounds, transposed, (A, B))
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(grad)
    want = torch.stack([(x[s:t].T @ grad[s:t]) if transposed else (grad[s:t].T @ x[s:t])
                        for s, t in zip(bounds, bounds[1:])])
    torch.testing.assert_close(W.grad, want, rtol=1e-5, atol=1e-5)


def _adapted_moe(experts: int) -> tuple[torch.nn.Module, torch.Tensor]:
    config = tiny_moe_config("qwen3_moe", 96)
    config.num_experts = experts
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().requires_grad_(False)
    inject(model, build_bank(layer_shapes(model, select_targets(model, "all-linear")), 4, 8.0, 2, 1.0, 0))
    return model, torch.randint(5, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def _graph_nodes(root) -> int:
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def test_autograd_graph_does_not_grow_with_experts():
    """A per-expert loop under autograd adds slice/select/matmul nodes per expert; the grouped path adds none."""
    sizes = []
    for experts in (4, 64):
        model, ids = _adapted_moe(experts)
        sizes.append(_graph_nodes(model(ids).logits.sum().grad_fn))
    assert sizes[0] == sizes[1]


def test_expert_weight_is_saved_as_itself_not_a_view():
    """Under ZeRO-3 a saved view of an expert weight keeps the gathered tensor alive after DeepSpeed releases the
    parameter (it swaps the parameter's data, not a view's): every saved tensor on an expert weight's storage
    must be the parameter, with its shape and strides."""
    model, ids = _adapted_moe(8)
    weights = {p.data_ptr(): p for n, p in model.named_parameters() if p.dim() == 3}
    offenders = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        p = weights.get(t.untyped_storage().data_ptr())
        if p is not None and (t.shape != p.shape or t.stride() != p.stride()):
            offenders.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids).logits.sum().backward()
    assert len(weights) == 4 and offenders == []
