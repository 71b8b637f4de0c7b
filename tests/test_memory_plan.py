"""The dry-run memory plan against what really exists: bitsandbytes' own 4-bit storage, and measured CPU training
steps (tests/memory_worker.py, torch.profiler's allocation events) with and without gradient checkpointing, fp32
and bf16, within 15 %."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig

from bilora_dist.config import parse_config
from bilora_dist.memory_plan import base_bytes_on_rank, nf4_bytes, quantized_weights
from bilora_dist.modeling import LoadOptions, build_on_meta
from bilora_dist.trainer import dry_run
from tests_support import run_ok

BATCH, SEQ, CHUNK = 4, 256, 256


def plan_of(*flags: str) -> dict:
    """Rank 0's plan as the --dry-run JSON line reports it."""
    return json.loads(dry_run(parse_config(["--dry-run", *flags])).splitlines()[-1])["ranks"][0]


def test_nf4_storage_equals_bitsandbytes(tmp_path):
    """Every byte a bitsandbytes NF4 (double quantisation) model stores, per quantised weight and in total."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    q4 = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    meta = build_on_meta(str(tmp_path))
    storages: dict[int, int] = {}
    for name, weight in dict(q4.named_parameters()).items():
        state = getattr(weight, "quant_state", None)
        tensors = [weight]
        if state is not None:
            tensors += [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
            numel = meta.get_parameter(name).numel()
            assert sum(t.untyped_storage().nbytes() for t in tensors) == sum(nf4_bytes(numel)), name
        storages.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors})
    assert len(quantized_weights(meta)) == 14  # 7 linear layers a block, not the head
    assert base_bytes_on_rank(meta, "single", 1, 0, quantized=quantized_weights(meta)) == sum(storages.values())


def test_4bit_plan_of_llama2_7b_by_hand():
    plan = plan_of("--model", "benchmarks/model_configs/llama-2-7b", "--bf16", "--quantize", "4bit")
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # NF4: half a byte, a byte per 64, 4 bytes per 64 x 256
    dense = (2 * 32000 * 4096 + 65 * 4096) * 2  # embeddings, head and RMSNorm weights stay bf16
    assert plan["base_bytes"] == pytest.approx(linear / 2 + linear / 64 + linear / 4096 + dense, rel=1e-3)
    assert plan["dequant_bytes"] == 4096 * 11008 * 2  # the MLP's weight, dequantised to bf16 for its matmul


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tokenizer) -> tuple[str, dict[tuple[str, bool], dict]]:
    """Real steps of a 4-layer Llama (hidden 256, the embedded tokenizer's vocabulary) on 4 x 256 tokens."""
    path = tmp_path_factory.mktemp("llama_256")
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=True).save_pretrained(path)
    cases = [{"dtype": dtype, "checkpointing": ckpt, "chunk": CHUNK, "batch": BATCH, "seq": SEQ, "rank": 8,
              "aux_rank": 8} for dtype, ckpt in (("float32", 0), ("float32", 1), ("float32", 2), ("bfloat16", 0))]
    proc = run_ok([sys.executable, "tests/memory_worker.py", str(path), json.dumps(cases)])
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return str(path), {(r["dtype"], r["checkpointing"]): r for r in rows}


@pytest.mark.parametrize("dtype,checkpointing", [("float32", 0), ("float32", 1), ("float32", 2), ("bfloat16", 0)])
def test_dry_run_is_within_15_percent_of_a_measured_cpu_step(measured, dtype, checkpointing):
    path, rows = measured
    real = rows[(dtype, checkpointing)]
    flags = ["--model", path, "--micro-batch-size", str(BATCH), "--seq-len", str(SEQ), "--loss-chunk", str(CHUNK),
             "--method", "bilora", "--rank", "8", "--aux-rank", "8", "--bf16", "true" if dtype == "bfloat16" else "false"]
    plan = plan_of(*flags, "--gradient-checkpointing", "true" if checkpointing else "false",
                   "--checkpoint-every", str(checkpointing))
    element = 2 if dtype == "bfloat16" else 4
    saved_by_loss = BATCH * SEQ * 256 * element  # the gradient of the head's input, kept for backward
    print(f"{dtype} checkpointing={checkpointing}: peak plan {plan['peak_bytes'] / 2**20:.1f} MiB, measured "
          f"{real['peak'] / 2**20:.1f}; activations plan {plan['activation_bytes'] / 2**20:.1f}, measured "
          f"{(real['after_loss_forward'] - saved_by_loss) / 2**20:.1f}")
    assert plan["total_bytes"] == pytest.approx(real["resident"], rel=1e-3)
    assert plan["activation_bytes"] == pytest.approx(real["after_loss_forward"] - saved_by_loss, rel=0.15)
    assert plan["peak_bytes"] == pytest.approx(real["peak"], rel=0.15)


def test_moe_plan_counts_every_expert_adapter():
    """Qwen3-30B-A3B's shape: Bi-LoRA (rank 8 + 8) on q/k/v/o and on every expert of gate_up_proj and down_proj,
    counted by hand; the frozen base (30.5B parameters, bf16) split over 8 FSDP2 ranks."""
    flags = ("--model", "benchmarks/model_configs/qwen3-30b-a3b", "--bf16", "--plan-ranks", "8", "--engine", "fsdp")
    plan = plan_of(*flags)
    attention = (2048 + 4096) + 2 * (2048 + 512) + (4096 + 2048)
    experts = 128 * (2048 + 2 * 768) + 128 * (768 + 2048)
    assert plan["adapter_bytes"] == 48 * 16 * (attention + experts) * 4
    assert plan["base_bytes"] == pytest.approx(30_532_122_624 * 2 / 8, rel=0.01)
    header = dry_run(parse_config(["--dry-run", *flags])).splitlines()[0]
    assert "192 adapted layers (192 attention, 0 dense), 96 expert tensors (x 128 experts)" in header


def test_4bit_moe_plan_keeps_experts_in_bf16_and_says_so():
    flags = ("--model", "benchmarks/model_configs/qwen3-30b-a3b", "--bf16", "--plan-ranks", "1", "--engine", "fsdp")
    meta = build_on_meta("benchmarks/model_configs/qwen3-30b-a3b", LoadOptions(torch.bfloat16))
    saved = sum(2 * w.numel() - sum(nf4_bytes(w.numel())) for w in quantized_weights(meta).values())
    assert all(w.dim() == 2 for w in quantized_weights(meta).values())  # linear layers only, no expert tensor
    assert plan_of(*flags)["base_bytes"] - plan_of(*flags, "--quantize", "4bit")["base_bytes"] == saved
    text = dry_run(parse_config(["--dry-run", *flags, "--quantize", "4bit"]))
    assert "--quantize 4bit: the 96 adapted expert tensors (28,991,029,248 params) stay in torch.bfloat16" in text
