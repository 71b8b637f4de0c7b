"""--kernels (which fused kernels a run takes, and refusals) and --compile (regional compilation equal to eager)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from bilora_dist.cli import run_cli, train_main
from bilora_dist.errors import UserError
from bilora_dist.kernels import choose_kernels, compile_blocks
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
