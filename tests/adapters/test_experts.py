"""LoRA and Bi-LoRA on fused expert projections (adapters/experts.py) against a dense float64 reference.

The reference is the same model in float64 running transformers' own eager experts loop, every adapted weight
replaced by W + s1·B1 A1 (+ s2·B2 A2) materialised per expert (transposed for gpt-oss's [E, in, out] layout):
its loss and its gradient with respect to every factor must equal ours within 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.adapters.bank import AdapterBank, Branch
from bilora_dist.errors import UserError
from tests_support import MOE_FAMILIES, tiny_moe_config

VOCAB = 96


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(family, VOCAB)).float().requires_grad_(False)
    with torch.no_grad():  # gpt-oss initialises its expert biases to zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("_bias") or p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


def _random_bank(model: torch.nn.Module, aux: bool) -> AdapterBank:
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 4, 8.0, 2 if aux else None, 1.0, 0)
    with torch.no_grad():
        for branch in bank.branches():
            branch.flat.normal_(0, 0.1)
    return bank


def _merged(model: torch.nn.Module, branches: list[Branch]) -> dict[str, torch.Tensor]:
    """Every adapted weight with its dense update added (differentiable in the branches' flat tensors)."""
    weights = {}
    for i, shape in enumerate(branches[0].shapes):
        key = shape.name if shape.experts else f"{shape.name}.weight"
        W = model.get_parameter(key)
        delta = sum(b.scales[i] * (b.factors(i)[1] @ b.factors(i)[0]) for b in branches)
        transposed = shape.experts and model.get_submodule(shape.name.rsplit(".", 1)[0]).is_transposed
        weights[key] = W + (delta.transpose(-2, -1) if transposed else delta)
    return weights


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten())


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("method", ["lora", "bilora"])
def test_loss_and_gradients_equal_dense_reference(family, method):
    model = _model(family)
    reference = copy.deepcopy(model).double()
    reference.set_experts_implementation("eager")
    bank = _random_bank(model, aux=method == "bilora")
    assert any(s.experts == 4 for s in bank.shapes) and any(not s.experts for s in bank.shapes)
    inject(model, bank)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    loss = _loss(model(ids).logits, ids)
    loss.backward()

    ref_branches = [Branch(b.shapes, b.ranks, b.scales, b.flat.detach().double().clone().requires_grad_())
                    for b in bank.branches()]
    ref_loss = _loss(functional_call(reference, _merged(reference, ref_branches), (ids,)).logits, ids)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    for ours, ref in zip(bank.branches(), ref_branches):
        assert ref.flat.grad.abs().max() > 1e-3  # every branch is reached
        torch.testing.assert_close(ours.flat.grad.double(), ref.flat.grad, rtol=0, atol=1e-5)


def test_unrouted_expert_gets_zero_gradient():
    """Tokens routed to experts 0-2 only: expert 3's factors get an exactly zero gradient, the others not."""
    model = _model("qwen3_moe")
    bank = _random_bank(model, aux=False)
    inject(model, bank)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 32, generator=gen)
    routes = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(9)])
    bank.begin_pass()
    model.model.layers[0].mlp.experts(hidden, routes, torch.rand(9, 2, generator=gen)).sum().backward()
    grad = Branch(bank.primary.shapes, bank.primary.ranks, bank.primary.scales, bank.primary.flat.grad)
    for name in ("gate_up_proj", "down_proj"):
        gA, gB = grad.factors(next(i for i, s in enumerate(bank.shapes) if s.name == f"model.layers.0.mlp.experts.{name}"))
        assert gA[3].abs().max() == 0 and gB[3].abs().max() == 0
        assert gA[:3].abs().amax(dim=(1, 2)).min() > 0 and gB[:3].abs().amax(dim=(1, 2)).min() > 0


def test_all_linear_covers_experts_but_not_gates():
    model = _model("qwen2_moe")
    names = select_targets(model, "all-linear")
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.experts.down_proj" in names
    assert "model.layers.0.mlp.shared_expert.gate_proj" in names
    assert not any(n.endswith(("shared_expert_gate", "mlp.gate")) for n in names)
    shapes = {s.name: s for s in layer_shapes(model, names)}
    assert (shapes["model.layers.0.mlp.experts.gate_up_proj"].in_features,
            shapes["model.layers.0.mlp.experts.gate_up_proj"].out_features,
            shapes["model.layers.0.mlp.experts.gate_up_proj"].experts) == (32, 32, 4)
    assert select_targets(model, "down_proj") == [n for n in names if n.endswith("down_proj")]
    assert select_targets(model, r".*experts\.gate_up_proj") == [n for n in names if n.endswith("experts.gate_up_proj")]


def test_gpt_oss_transposed_shapes():
    model = _model("gpt_oss")
    shape = {s.name: s for s in layer_shapes(model, select_targets(model, "all-linear"))}
    gate_up = shape["model.layers.0.mlp.experts.gate_up_proj"]
    down = shape["model.layers.0.mlp.experts.down_proj"]
    assert (gate_up.in_features, gate_up.out_features, down.in_features, down.out_features) == (32, 32, 16, 32)


def test_unknown_3d_weight_is_named():
    model = _model("qwen3_moe")
    model.model.layers[0].register_parameter("mystery", torch.nn.Parameter(torch.zeros(2, 3, 4)))
    with pytest.raises(UserError, match=r"model\.layers\.0\.mystery is a 3-D weight"):
        select_targets(model, "all-linear")
