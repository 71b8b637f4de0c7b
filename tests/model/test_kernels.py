"""--kernels (which fused kernels a run takes, and refusals) and --compile (regional compilation equal to eager)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch._dynamo
from transformers import AutoModelForCausalLM
from torch._dynamo.utils import counters

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.adapters.bank import LayerShape
from bilora_dist.adapters.experts import is_experts_module
from bilora_dist.cli import run_cli, train_main
from bilora_dist.engines.base import Engine
from bilora_dist.errors import UserError
from bilora_dist.model.kernels import LIGER_PATCHES, KernelChoice, apply_kernels, choose_kernels, compile_blocks
from bilora_dist.training.methods import METHOD_STEPS, build_optimizer
from tests_support import random_adapted_model, step_rows, tiny_llama_config, tiny_moe_config

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_auto_takes_liger_only_on_cuda_where_it_is_installed_and_supported():
    assert choose_kernels("auto", CUDA, "llama", {"llama"}).name == "liger"
    assert choose_kernels("auto", CPU, "llama", {"llama"}).describe() == "kernels none: auto: Liger not used, it runs on CUDA only"
    assert "not installed" in choose_kernels("auto", CUDA, "llama", None).why
    assert "no kernels for model type 'gpt2'" in choose_kernels("auto", CUDA, "gpt2", {"llama"}).why
    assert choose_kernels("none", CUDA, "llama", {"llama"}).name == "none"
    with pytest.raises(UserError, match="--kernels liger: it runs on CUDA only"):
        choose_kernels("liger", CPU, "llama", {"llama"})


DENSE = [LayerShape("model.layers.0.self_attn.q_proj", 32, 32), LayerShape("model.layers.0.mlp.gate_proj", 32, 64)]
EXPERTS = [*DENSE, LayerShape("model.layers.0.mlp.experts.gate_up_proj", 32, 32, 4),
           LayerShape("model.layers.0.mlp.experts.down_proj", 16, 32, 4)]


def test_liger_takes_swiglu_only_where_no_expert_tensor_is_adapted():
    dense = choose_kernels("auto", CUDA, "llama", {"llama"}, DENSE)  # its SwiGLU MLPs call the projections
    assert dense.patches == ("rms_norm", "rope", "swiglu")
    assert dense.why == "Liger-Kernel's RMSNorm, RoPE and SwiGLU; the loss stays ours"
    for flag in ("auto", "liger"):
        moe = choose_kernels(flag, CUDA, "qwen3_moe", {"qwen3_moe"}, EXPERTS)
        assert moe.name == "liger" and moe.patches == ("rms_norm", "rope")
        assert moe.describe() == ("kernels liger: Liger-Kernel's RMSNorm and RoPE; SwiGLU left out (its fused MoE "
                                  "would replace the experts' forward, bypassing the adapters of 2 expert "
                                  "tensors); the loss stays ours")
    # an MoE model whose experts are not adapted keeps it: nothing of ours runs in the experts
    assert choose_kernels("auto", CUDA, "qwen3_moe", {"qwen3_moe"}, DENSE).patches == LIGER_PATCHES


def _fake_liger(monkeypatch) -> list[dict]:
    """liger_kernel.transformers with an instance patch that does to experts modules what Liger's `swiglu` does
    on transformers 5 (binds a fused MoE forward computing from the weights alone); returns its calls' flags."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    calls = []

    def _apply_liger_kernel_to_instance(model, **flags):
        calls.append(flags)
        if flags.get("swiglu", True):  # Liger's own default
            for module in model.modules():
                if is_experts_module(module):
                    module.forward = types.MethodType(grouped_mm_experts_forward, module)

    package, transformers_ = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    transformers_._apply_liger_kernel_to_instance = _apply_liger_kernel_to_instance
    package.transformers = transformers_
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_)
    return calls


def _first_step_on_patched_moe(choice: KernelChoice | None) -> None:
    """Build a tiny Qwen3-MoE, patch it as a run does (kernels, then adapters), take one LoRA step."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config("qwen3_moe", 96)).float().requires_grad_(False)
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 4, 8.0, None, 1.0, 0)
    apply_kernels(model, choice or choose_kernels("auto", CUDA, "qwen3_moe", {"qwen3_moe"}, bank.shapes))
    inject(model, bank)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "logits_to_keep": 12,
             "position_ids": torch.arange(12).expand(2, 12)}
    METHOD_STEPS["lora"](model, bank, build_optimizer(bank, 1e-2, 0.0), Engine(), 1.0)([batch])


def test_the_chosen_liger_patches_leave_adapted_experts_ours_and_a_full_patch_is_caught(monkeypatch):
    calls = _fake_liger(monkeypatch)
    _first_step_on_patched_moe(None)  # passes the first step's gradient check
    assert calls[-1] == {"rms_norm": True, "rope": True, "swiglu": False, "cross_entropy": False,
                         "fused_linear_cross_entropy": False}
    with pytest.raises(UserError, match=r"^the adapters of 4 of \d+ layers got no gradient in the first step "
                                        r"\(model\.layers\.0\.mlp\.experts\.gate_up_proj, .* and 1 more\): "
                                        r"something replaced their forward \(a kernel patch such as Liger's"):
        _first_step_on_patched_moe(KernelChoice("liger", "every patch", LIGER_PATCHES))


def _loss_and_grads(model, bank, ids) -> tuple[torch.Tensor, torch.Tensor]:
    for branch in bank.branches():
        branch.flat.grad = None
        branch.flat.requires_grad_(True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), torch.cat([b.flat.grad for b in bank.branches()])


def test_compiled_blocks_share_graphs_and_match_eager():
    config = tiny_llama_config(128)
    config.num_hidden_layers = 4
    model, bank = random_adapted_model(config)
    model.train()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    want_loss, want_grads = _loss_and_grads(model, bank, ids)
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(model) == 4
    loss, grads = _loss_and_grads(model, bank, ids)
    # block 0's input needs no gradient (frozen embeddings), blocks 1-3 share the other graph
    assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads, want_grads, rtol=1e-5, atol=1e-7)


def test_compile_refuses_fused_experts():
    model, _ = random_adapted_model(tiny_moe_config("qwen3_moe", 128))
    with pytest.raises(UserError, match="--compile: this model has fused expert weights"):
        compile_blocks(model)


@pytest.mark.parametrize("method", ["lora", "bilora"])
def test_a_compiled_run_equals_the_eager_run(method, tiny_model_dir, small_data, tmp_path, capsys):
    args = ["--model", str(tiny_model_dir), "--data", str(small_data[0]), "--eval-data", str(small_data[1]),
            "--method", method, "--max-steps", "3", "--micro-batch-size", "4", "--seq-len", "64",
            "--eval-on-start", "false", "--gradient-checkpointing", "true"]
    ref, out = tmp_path / "ref", tmp_path / "compiled"
    assert run_cli(train_main, args + ["--output-dir", str(ref)]) == 0
    torch._dynamo.reset()
    assert run_cli(train_main, args + ["--output-dir", str(out), "--compile"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "compiling 2 decoder blocks (the first step includes the compile time)" in lines
    assert "kernels none: auto: Liger not used, it runs on CUDA only" in lines
    for got, want in zip(step_rows(out), step_rows(ref), strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
