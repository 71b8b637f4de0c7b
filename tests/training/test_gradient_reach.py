"""The first step's check that every adapted layer got a gradient (methods.LoRAStep.check_reached): a forward
rebound after injection so that it skips the adapters (as Liger's fused MoE does to experts modules) stops the
run at its first step with one line naming those layers, before anything is updated; an untouched model passes."""

from __future__ import annotations

import types

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.cli import run_cli, train_main
from bilora_dist.data import collate
from bilora_dist.engines.base import Engine
from bilora_dist.errors import UserError
from bilora_dist.training.methods import METHOD_STEPS, build_optimizer
from tests_support import tiny_llama_config, tiny_moe_config

VOCAB = 96
METHODS = {"lora": (), "bilora": (0.05,), "lora-sam": (0.05,)}


def _adapted(config, method: str) -> tuple[torch.nn.Module, object]:
    """A random frozen model with a freshly initialised bank (B = 0, as a run starts) on all-linear."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().requires_grad_(False)
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 4, 8.0,
                      2 if method == "bilora" else None, 1.0, 0)
    inject(model, bank)
    return model, bank


def _step(model, bank, method: str):
    return METHOD_STEPS[method](model, bank, build_optimizer(bank, 1e-2, 0.0), Engine(), 1.0, *METHODS[method])


def _batches(labelled: bool = True) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(4):
        ids = torch.randint(3, VOCAB, (12,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": ids if labelled else [-100] * len(ids)})
    return [collate(rows[:2], 0), collate(rows[2:], 0)]


def bypass_mlp(mlp: torch.nn.Module) -> None:
    """Rebind a dense gated MLP's forward to one that reads its projections' weights directly (a fused kernel
    that never calls the projections as modules, so their adapter hooks never run)."""
    def forward(self, x):
        gate, up = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)
        return F.linear(F.silu(gate) * up, self.down_proj.weight)
    mlp.forward = types.MethodType(forward, mlp)


def bypass_experts(experts: torch.nn.Module) -> None:
    """Rebind an experts module's forward to transformers' grouped experts forward, as Liger's swiglu patch binds
    its fused MoE: the experts compute from their weights alone, our ExpertsInterface implementation never runs."""
    from transformers.integrations.moe import grouped_mm_experts_forward
    experts.forward = types.MethodType(grouped_mm_experts_forward, experts)


@pytest.mark.parametrize("method", list(METHODS))
def test_an_untouched_model_passes_the_first_step_check(method):
    model, bank = _adapted(tiny_moe_config("qwen3_moe", VOCAB), method)
    step = _step(model, bank, method)
    stats = step(_batches())
    assert stats.skipped is None and not step.reach_pending
    assert (bank.primary.grad_peaks() > 0).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_bypassed_experts_stop_the_first_step_naming_them(method):
    model, bank = _adapted(tiny_moe_config("qwen3_moe", VOCAB), method)
    bypass_experts(model.model.layers[1].mlp.experts)
    before = [b.flat.detach().clone() for b in bank.branches()]
    step = _step(model, bank, method)
    with pytest.raises(UserError) as caught:
        step(_batches())
    message = str(caught.value)
    assert "\n" not in message
    n = len(bank.shapes)
    assert message.startswith(f"the adapters of 2 of {n} layers got no gradient in the first step "
                              "(model.layers.1.mlp.experts.gate_up_proj, model.layers.1.mlp.experts.down_proj): ")
    assert "Liger's fused MoE" in message
    for branch, was in zip(bank.branches(), before):  # stopped before any update
        assert torch.equal(branch.flat.detach(), was)


def test_a_bypassed_dense_mlp_is_named_and_long_lists_are_cut():
    model, bank = _adapted(tiny_llama_config(VOCAB), "lora")
    bypass_mlp(model.model.layers[0].mlp)
    bypass_mlp(model.model.layers[1].mlp)
    with pytest.raises(UserError, match=r"^the adapters of 6 of 14 layers got no gradient in the first step "
                                        r"\(model\.layers\.0\.mlp\.gate_proj, model\.layers\.0\.mlp\.up_proj, "
                                        r"model\.layers\.0\.mlp\.down_proj and 3 more\): "):
        _step(model, bank, "lora")(_batches())


def test_a_step_without_tokens_defers_the_check_and_only_the_first_checks():
    model, bank = _adapted(tiny_llama_config(VOCAB), "lora")
    step = _step(model, bank, "lora")
    step(_batches(labelled=False))  # every gradient is zero: nothing to judge by yet
    assert step.reach_pending
    step(_batches())
    assert not step.reach_pending
    bypass_mlp(model.model.layers[0].mlp)  # later steps are not checked (one pass over the gradient per run)
    step(_batches())


def test_grad_peaks_is_each_layers_largest_gradient():
    model, bank = _adapted(tiny_moe_config("qwen3_moe", VOCAB), "bilora")
    for branch in bank.branches():
        branch.flat.grad = torch.randn(branch.flat.shape)
        want = torch.stack([torch.cat([A.flatten(), B.flatten()]).abs().max()
                            for A, B in _grad_factors(branch)])
        torch.testing.assert_close(branch.grad_peaks(), want, rtol=0, atol=0)


def _grad_factors(branch):
    """Every layer's (A, B) gradient, by the branch's own layout."""
    grad_branch = type(branch)(branch.shapes, branch.ranks, branch.scales, branch.flat.grad.clone())
    return [grad_branch.factors(i) for i in range(len(branch.shapes))]


def test_a_run_whose_forward_is_bypassed_stops_in_one_line_and_saves_nothing(
        tiny_model_dir, small_data, tmp_path, capsys, monkeypatch):
    from bilora_dist.recipe import stages

    apply = stages.apply_kernels

    def apply_and_bypass(model, choice):  # a kernel patch that replaces layer 0's MLP forward
        apply(model, choice)
        bypass_mlp(model.model.layers[0].mlp)

    monkeypatch.setattr(stages, "apply_kernels", apply_and_bypass)
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--data", str(small_data[0]), "--eval-data", str(small_data[1]),
            "--max-steps", "2", "--micro-batch-size", "2", "--seq-len", "64", "--eval-on-start", "false",
            "--save-every", "1", "--output-dir", str(out)]
    assert run_cli(train_main, args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors  # beside the progress bar, as test_faults reads it
    err = errors[0]
    assert err.startswith("error: the adapters of 3 of ") and "(model.layers.0.mlp.gate_proj, " in err, err
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()
