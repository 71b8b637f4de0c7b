"""--quantize 4bit (bitsandbytes NF4 with double quantisation under the adapters) and --attn-implementation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.config.train import parse_config
from bilora_dist.errors import UserError
from bilora_dist.engines.nf4 import PackedLinear4bit
from bilora_dist.model.loading import LoadOptions, load_frozen_model
from tests_support import (assert_same_run, launcher, read_metrics, relative_error, run_cmd, run_env, run_ok,
                           tiny_llama_config)

CPU = torch.device("cpu")
Q4 = LoadOptions(torch.float32, "4bit")


@pytest.fixture(scope="module")
def q4_model_dir(tmp_path_factory, tokenizer) -> Path:
    """The conftest tiny Llama widened so that every linear layer's input is a multiple of the 64-value NF4 block
    (what bitsandbytes' CPU kernel needs)."""
    path = tmp_path_factory.mktemp("tiny_llama_64")
    config = LlamaConfig(**{**tiny_llama_config(len(tokenizer)).to_dict(), "hidden_size": 64, "head_dim": 16,
                            "intermediate_size": 128})
    torch.manual_seed(1234)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _ids() -> torch.Tensor:
    return torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def _random_bank(model: torch.nn.Module):
    """A Bi-LoRA bank over every linear layer but the head, with non-zero B (so the update is visible)."""
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 4, 8.0, 4, 1.0, 0)
    with torch.no_grad():
        for branch in bank.branches():
            branch.flat.copy_(torch.randn(branch.flat.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    return bank


def test_4bit_base_is_nf4_double_quantised_and_the_adapters_hook_it(q4_model_dir):
    q4 = load_frozen_model(str(q4_model_dir), Q4, CPU)
    reference = load_frozen_model(str(q4_model_dir), LoadOptions(torch.float32))
    names = select_targets(q4, "all-linear")
    assert names == select_targets(reference, "all-linear") and len(names) == 14
    assert layer_shapes(q4, names) == layer_shapes(reference, names)  # in/out features, not the packed shape
    for name in names:
        layer = q4.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit), name
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested and layer.weight.dtype == torch.float32
    assert type(q4.get_output_embeddings()) is torch.nn.Linear
    assert type(q4.get_input_embeddings()) is torch.nn.Embedding
    original = load_frozen_model(str(q4_model_dir), LoadOptions(torch.float32))
    with torch.no_grad():  # the reference holds the dequantised NF4 weights in plain nn.Linear layers
        for name in names:
            weight = q4.get_submodule(name).weight
            dequantised = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
            # NF4 with 64-value blocks: about 9% relative error on Gaussian weights
            assert relative_error(dequantised, original.get_submodule(name).weight) < 0.11, name
            reference.get_submodule(name).weight.copy_(dequantised)
        want, got, exact = (m(input_ids=_ids()).logits for m in (reference, q4, original))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert 1e-3 < relative_error(got, exact) < 0.25  # the NF4 error: visible, and bounded
        inject(q4, _random_bank(q4))
        inject(reference, _random_bank(reference))
        adapted, adapted_ref = q4(input_ids=_ids()).logits, reference(input_ids=_ids()).logits
    torch.testing.assert_close(adapted, adapted_ref, rtol=0, atol=1e-5)
    assert (adapted - got).abs().max() > 1e-2  # the hooks on the Linear4bit layers act


def test_bilora_on_a_4bit_base_trains_and_exports_over_the_original_base(q4_model_dir, small_data, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    run_ok([sys.executable, "launch/train.py", "--quantize", "4bit", "--method", "bilora", "--model",
            str(q4_model_dir), "--data", str(small_data[0]), "--eval-data", str(small_data[1]), "--max-steps", "8",
            "--micro-batch-size", "4", "--lr", "1e-2", "--output-dir", str(out), "--data-cache", "none"])
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.1, evals
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(q4_model_dir), out / "adapter")
        lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
        assert len(lora_b) == 14 and all(b.abs().max() > 0 for b in lora_b)  # the trained factors, loaded
        want = peft.merge_and_unload().state_dict()
    run_ok([sys.executable, "launch/export.py", "--checkpoint", str(out), "--out", str(tmp_path / "merged"),
            "--merged", "--merge-base", "original"])  # the default folds into NF4(W0) (tests/recipe/test_input_checks.py)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert not [k for k in merged if "absmax" in k or "quant" in k]  # unquantised weights, as the base holds them
    assert merged.keys() <= want.keys() and len(merged) == len(want) - 1  # the tied head is not written
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, want[key], rtol=0, atol=1e-5)


def _refusal(q4_model_dir: Path, small_data, tmp_path: Path, *flags: str) -> str:
    proc = run_cmd([sys.executable, "launch/train.py", "--model", str(q4_model_dir), "--data", str(small_data[0]),
                    "--eval-data", str(small_data[1]), "--max-steps", "1", "--output-dir", str(tmp_path / "out"),
                    "--data-cache", "none", *flags])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    return proc.stderr.strip()


def test_4bit_layers_bitsandbytes_mis_dequantises_on_the_cpu_are_refused(tiny_model_dir):
    with pytest.raises(UserError) as err:
        load_frozen_model(str(tiny_model_dir), Q4, CPU)
    assert str(err.value) == ("--quantize 4bit on the CPU: layer model.layers.0.self_attn.q_proj has 32 input "
                              "features, not a multiple of 64, which bitsandbytes' CPU kernel dequantises wrongly")


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_4bit_with_zero3_is_refused_before_the_data(q4_model_dir, small_data, tmp_path, dry_run):
    """Refused in one line, by the run's first stage (the data file here cannot be read: never reached) and by
    the dry-run plan."""
    small_data[0].write_text("not json\n")
    want = ("error: --quantize 4bit with ZeRO-3: DeepSpeed cannot partition bitsandbytes 4-bit weights; use "
            "--engine fsdp, a ZeRO-1/2 --ds_config (replicated base) or --engine single")
    assert _refusal(q4_model_dir, small_data, tmp_path, "--quantize", "4bit", "--ds_config",
                    "ds_configs/zero3.json", *dry_run) == want


def test_packed_4bit_layer_computes_what_bitsandbytes_linear4bit_does(q4_model_dir):
    """The FSDP2 engine's PackedLinear4bit against transformers' own 4-bit layer on the same weight: the same
    bytes, quantisation state, output and input gradient, bit for bit."""
    q4 = load_frozen_model(str(q4_model_dir), Q4, CPU)
    original = load_frozen_model(str(q4_model_dir), LoadOptions(torch.float32))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        reference, linear = q4.get_submodule(name), original.get_submodule(name)
        packed = PackedLinear4bit(linear, torch.float32)
        with torch.no_grad():
            packed.weight.copy_(packed.quantize_(linear.weight))
        assert packed.weight.shape == reference.weight.shape  # bytes compared as bytes (some are NaN as floats)
        assert torch.equal(packed.weight.view(torch.uint8), reference.weight.data.view(torch.uint8))
        for key, value in packed.quant_state.as_dict(packed=True).items():
            want = reference.weight.quant_state.as_dict(packed=True)[key]
            assert torch.equal(value, want) if isinstance(value, torch.Tensor) else value == want, key
        x = torch.randn(3, 5, linear.in_features, generator=torch.Generator().manual_seed(2), requires_grad=True)
        got = packed(x)
        (grad,) = torch.autograd.grad(got.square().sum(), x)
        want = reference(x)
        (want_grad,) = torch.autograd.grad(want.square().sum(), x)
        assert torch.equal(got, want) and torch.equal(grad, want_grad)
        assert relative_error(got, linear(x)) > 1e-3  # it is the 4-bit weight that computes


def test_bilora_on_a_4bit_base_trains_the_same_on_fsdp2_as_on_one_process(q4_model_dir, small_data, tmp_path):
    """2-rank FSDP2 sharding the NF4 bytes (with gradient checkpointing, which recomputes each 4-bit matmul
    from re-gathered bytes) against the single process's transformers 4-bit base: the same losses, norms and
    trained adapter; each rank holds half of the packed bytes."""
    runs = {}
    for kind in ("single", "fsdp"):
        out = tmp_path / kind
        run_ok(launcher(kind) + ["--quantize", "4bit", "--method", "bilora", "--model", str(q4_model_dir),
                                 "--data", str(small_data[0]), "--eval-data", str(small_data[1]), "--max-steps", "4",
                                 "--micro-batch-size", "2", "--grad-accum", "2" if kind == "single" else "1",
                                 "--lr", "1e-2", "--output-dir", str(out), "--data-cache", "none"]
               + (["--gradient-checkpointing"] if kind == "fsdp" else []), env=run_env(), timeout=900)
        runs[kind] = out
    assert_same_run(runs["fsdp"], runs["single"], 4)
    single, fsdp = (next(r for r in read_metrics(runs[k]) if "base_held_numel" in r) for k in ("single", "fsdp"))
    assert fsdp["base_numel"] == single["base_numel"] == 2 * fsdp["base_held_numel"][0]


def test_unavailable_attention_implementation_is_refused(q4_model_dir, small_data, tmp_path):
    """flash_attention_2 on an fp32 base: refused for the first thing this machine lacks (the package, CUDA,
    else the bf16 base it needs)."""
    flag = "error: --attn-implementation flash_attention_2:"
    if importlib.util.find_spec("flash_attn") is None:
        want = f"{flag} the flash_attn package is not installed (pip install 'bilora_dist[gpu]')"
    elif not torch.cuda.is_available():
        want = f"{flag} flash_attn runs on CUDA devices only, and none is available"
    else:
        want = f"{flag} flash_attn needs a bfloat16 base; add --bf16"
    assert _refusal(q4_model_dir, small_data, tmp_path, "--attn-implementation", "flash_attention_2",
                    "--bf16", "false") == want


def test_missing_bitsandbytes_and_flex_attention_are_one_line_each(monkeypatch, tiny_model_dir):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    with pytest.raises(UserError, match=r"^--quantize 4bit needs bitsandbytes, which is not installed "
                                        r"\(pip install 'bilora_dist\[quant\]'\)$"):
        LoadOptions.of(parse_config(["--quantize", "4bit"]), str(tiny_model_dir))
    monkeypatch.setattr("transformers.utils.is_torch_flex_attn_available", lambda: False)
    with pytest.raises(UserError, match=r"^--attn-implementation flex_attention: torch .* has no flex attention "):
        LoadOptions.of(parse_config(["--attn-implementation", "flex_attention"]), str(tiny_model_dir))


def test_eager_and_sdpa_attention_give_the_same_logits(tiny_model_dir):
    logits = {}
    for name in ("eager", "sdpa"):
        model = load_frozen_model(str(tiny_model_dir), LoadOptions(attn_implementation=name), CPU)
        assert model.config._attn_implementation == name
        with torch.no_grad():
            logits[name] = model(input_ids=_ids(), attention_mask=torch.ones_like(_ids())).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=0, atol=1e-5)
