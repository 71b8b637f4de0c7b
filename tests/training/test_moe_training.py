"""Training a mixture-of-experts model end to end: a tiny random Qwen3-MoE (4 experts, top-2), saved as
transformers 5 saves it (per-expert tensors, fused at load time), trained by launch/train.py on one process,
2 ZeRO-3 ranks (ds_configs/zero3.json, and tests/fixtures/zero3_partitioned.json, which partitions every tensor,
resumed) and 2 FSDP2 ranks (which must agree up to summation order, as in test_distributed.py), resumed
on another engine, and its PEFT adapter loaded by peft with the experts in target_parameters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.checkpoint.store import load_checkpoint, restore_bank
from tests_support import (assert_same_run, assert_trained_close, launcher, read_metrics, run_ok, step_rows,
                           tiny_moe_config)

STEPS = 4


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    torch.manual_seed(1234)
    AutoModelForCausalLM.from_config(tiny_moe_config("qwen3_moe", len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in f.keys()  # the hub's per-expert layout
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, moe_model_dir, module_data):
    cache: dict[tuple[str, ...], tuple[Path, str]] = {}

    def get(kind: str, method: str, *extra: str) -> tuple[Path, str]:
        key = (kind, method, *extra)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"moe_{kind}_{method}") / "run"
            cmd = launcher(kind) + [
                "--model", str(moe_model_dir), "--data", str(module_data[0]), "--eval-data", str(module_data[1]),
                "--method", method, "--max-steps", str(STEPS), "--micro-batch-size", "4", "--grad-accum",
                "2" if kind == "single" else "1", "--lr", "2e-3", "--warmup-ratio", "0", "--rho", "0.02",
                "--save-every", "2", "--output-dir", str(out), *extra]
            proc = run_ok(cmd)
            cache[key] = out, proc.stdout + proc.stderr
        return cache[key]

    return get


def test_new_user_run_adapts_every_expert(runs, moe_model_dir):
    out, log = runs("single", "lora")
    assert "8 adapted layers (8 attention, 0 dense), 4 expert tensors (x 4 experts)" in log
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                           for p in ("down_proj", "gate_up_proj")]
    # peft loads the trained adapter and computes what the trained model computes
    model = AutoModelForCausalLM.from_pretrained(moe_model_dir)
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 8, 16.0, None, 1.0, 0)
    restore_bank(bank, load_checkpoint(out / "checkpoints" / f"step_{STEPS}"))
    inject(model, bank)
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_model_dir), out / "adapter")
        torch.testing.assert_close(peft(ids).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "bilora"])
@pytest.mark.parametrize("kind", ["zero3", "zero3_partitioned", "fsdp"])
def test_two_ranks_match_one_process(runs, kind, method):
    out, _ = runs(kind, method)
    assert_same_run(out, runs("single", method)[0], STEPS)


def test_zero3_partitioned_holds_half_of_every_tensor(runs, moe_model_dir):
    """tests/fixtures/zero3_partitioned.json (persistence threshold 0): no tensor stays whole on a rank, the experts'
    included (ds_configs/zero3.json keeps every tensor of this model under 100,000 elements whole); each rank
    holds its half of each, padded to even (gathering and release: test_zero3_partitioned.py)."""
    out, _ = runs("zero3_partitioned", "bilora")
    held = [r for r in read_metrics(out) if "base_held_numel" in r][-1]["base_held_numel"]
    model = AutoModelForCausalLM.from_pretrained(moe_model_dir)
    assert held == [sum(-(-p.numel() // 2) for p in model.parameters())] * 2


def test_zero3_partitioned_resumes_where_it_stopped(runs, moe_model_dir, module_data, tmp_path):
    """A run stopped after its step-2 checkpoint (its output directory as it was then) and continued with --resume
    auto ends as the uninterrupted run: the same losses and adapters, bit for bit."""
    full, _ = runs("zero3_partitioned", "lora")
    stopped = tmp_path / "run"
    shutil.copytree(full, stopped)
    shutil.rmtree(stopped / "adapter")
    shutil.rmtree(stopped / "checkpoints" / f"step_{STEPS}")
    proc = run_ok(launcher("zero3_partitioned") + [
        "--model", str(moe_model_dir), "--data", str(module_data[0]), "--eval-data", str(module_data[1]),
        "--method", "lora", "--max-steps", str(STEPS), "--micro-batch-size", "4", "--grad-accum", "1", "--lr", "2e-3",
        "--warmup-ratio", "0", "--rho", "0.02", "--save-every", "2", "--output-dir", str(stopped), "--resume", "auto"])
    assert f"resuming from {stopped / 'checkpoints' / 'step_2'}" in proc.stdout + proc.stderr
    assert [(r["step"], r["loss"]) for r in step_rows(stopped)] == [(r["step"], r["loss"]) for r in step_rows(full)]
    got, want = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (stopped, full))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_on_fsdp_from_a_one_process_checkpoint(runs, moe_model_dir, module_data, tmp_path):
    full, _ = runs("single", "bilora")
    resumed = tmp_path / "resumed"
    run_ok(launcher("fsdp") + [
        "--model", str(moe_model_dir), "--data", str(module_data[0]), "--eval-data", str(module_data[1]),
        "--method", "bilora", "--max-steps", str(STEPS), "--micro-batch-size", "4", "--lr", "2e-3",
        "--warmup-ratio", "0", "--rho", "0.02", "--output-dir", str(resumed),
        "--resume", str(full / "checkpoints" / "step_2")])

    def factors(run: Path) -> dict[str, torch.Tensor]:
        branches = load_checkpoint(run / "checkpoints" / f"step_{STEPS}").branches
        return {f"{name}.{s.name}.{part}": t for name, b in branches.items() for i, s in enumerate(b.shapes)
                for part, t in zip("AB", b.factors(i))}

    want = factors(full)
    assert sum(".experts." in k for k in want) == 2 * 2 * 4  # A and B of 4 expert tensors, both branches
    assert_trained_close(factors(resumed), want)


def test_in_training_squeeze_on_two_fsdp_ranks_matches_one_process(runs):
    out, _ = runs("fsdp", "bilora", "--squeeze", "in:8->4/1", "--squeeze-min-stage", "1")
    want, _ = runs("single", "bilora", "--squeeze", "in:8->4/1", "--squeeze-min-stage", "1")
    assert_same_run(out, want, STEPS, products=True)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        shape = f.get_slice("base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight").get_shape()
    assert config["r"] == 4 and shape == [4 * 4, 32]  # rank 4 for each of the 4 experts, in = hidden 32
