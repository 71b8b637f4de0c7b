"""bf16 done right: the adapters' product keeps no fp32 copy of a bf16 input, every adapter tensor stays fp32,
`--bf16 auto` follows the device, and TF32 is left alone off CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.adapters import layer as layer_module
from bilora_dist.adapters.product import LowRankProduct, low_rank_product
from bilora_dist.config.train import parse_config
from bilora_dist.data import collate, tokenize
from bilora_dist.engines.base import Engine
from bilora_dist.training.methods import METHOD_STEPS, build_optimizer
from bilora_dist.model.loading import LoadOptions, load_frozen_model


def test_low_rank_product_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    x, A, B = (torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in ((2, 3, 5), (4, 5), (6, 4)))
    assert torch.autograd.gradcheck(LowRankProduct.apply, (x, A, B))


def test_low_rank_product_on_bf16_input_equals_the_fp32_cast_path():
    """Same forward bits and the same gradients as autograd through x.to(fp32), with x's gradient in bf16."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 32, generator=g).to(torch.bfloat16)
    A, B = torch.randn(4, 32, generator=g), torch.randn(16, 4, generator=g)
    out_grad = torch.randn(3, 7, 16, generator=g)
    grads = []
    for fn in (low_rank_product, lambda x, A, B: F.linear(F.linear(x.to(A.dtype), A), B)):
        xi, Ai, Bi = (t.clone().requires_grad_() for t in (x, A, B))
        y = fn(xi, Ai, Bi)
        y.backward(out_grad)
        grads.append((y.detach(), xi.grad, Ai.grad, Bi.grad))
    (y, gx, gA, gB), (y_ref, gx_ref, gA_ref, gB_ref) = grads
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert gx.dtype == torch.bfloat16 and gA.dtype == gB.dtype == torch.float32
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)  # bf16-rounded from fp32 values equal to 1e-6
    torch.testing.assert_close(gA, gA_ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gB, gB_ref, rtol=1e-6, atol=1e-5)


def _saved(model, batch) -> dict[int, tuple[torch.dtype, tuple[int, ...], int]]:
    """The distinct storages autograd saves for backward during one forward: data pointer -> (dtype, shape, bytes)."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = (t.dtype, tuple(t.shape), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return storages


def test_bf16_adapters_save_no_fp32_copy_of_their_inputs(tiny_model_dir, tokenizer, train_records, monkeypatch):
    """In a bf16 model the adapters save no fp32 tensor of their input's shape (autograd through an fp32 cast of
    each input saves one per adapted layer: q, k and v each their own copy of the same hidden states)."""
    batch = collate([tokenize(r, tokenizer, 64) for r in train_records[:4]], tokenizer.pad_token_id)
    model = load_frozen_model(str(tiny_model_dir), LoadOptions(torch.bfloat16))
    shapes = layer_shapes(model, select_targets(model, "all-linear"))
    bank = build_bank(shapes, 8, 16.0, 8, 1.0, seed=0)
    inject(model, bank)
    inputs = {batch["input_ids"].numel() * s.in_features for s in shapes}  # (batch, seq, n), also seen as 2-D

    def fp32_inputs(saved) -> list[int]:
        return [nbytes for dtype, shape, nbytes in saved.values() if dtype == torch.float32 and math.prod(shape) in inputs]

    ours = _saved(model, batch)
    monkeypatch.setattr(layer_module, "low_rank_product", lambda x, A, B: F.linear(F.linear(x.to(A.dtype), A), B))
    cast = _saved(model, batch)
    # the base's own fp32 saves (RMSNorm upcasts) are in both; the cast path adds one per adapted layer
    assert len(fp32_inputs(cast)) - len(fp32_inputs(ours)) == len(shapes)
    assert sum(b for *_, b in ours.values()) < sum(b for *_, b in cast.values()) - sum(fp32_inputs(cast)) / 2


def test_bf16_keeps_every_adapter_tensor_fp32(tiny_model_dir, tokenizer, train_records):
    model = load_frozen_model(str(tiny_model_dir), LoadOptions(torch.bfloat16))
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 4, 8.0, 4, 1.0, seed=0)
    inject(model, bank)
    optimizer = build_optimizer(bank, 1e-2, 0.0)
    step = METHOD_STEPS["bilora"](model, bank, optimizer, Engine(), 1.0, 0.05)
    batch = collate([tokenize(r, tokenizer, 64) for r in train_records[:4]], tokenizer.pad_token_id)
    stats = step([batch])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tensors = [b.flat for b in bank.branches()] + [b.flat.grad for b in bank.branches()]
    tensors += [t for state in optimizer.state.values() for k, t in state.items() if k != "step"]
    assert len(tensors) == 8 and all(t.dtype == torch.float32 for t in tensors)
    assert stats.aux_norm is not None and torch.isfinite(torch.tensor(stats.loss))


@pytest.mark.parametrize(("flag", "want"), [([], "false"), (["--bf16"], "true"), (["--bf16", "false"], "false"),
                                            (["--bf16", "auto"], "false")])
def test_bf16_auto_follows_the_device(flag, want):
    """This machine has no CUDA: auto resolves to false; a bare --bf16 means true."""
    assert not torch.cuda.is_available()
    cfg = parse_config(flag)
    assert cfg.bf16 == want and cfg.dtype == (torch.bfloat16 if want == "true" else torch.float32)
