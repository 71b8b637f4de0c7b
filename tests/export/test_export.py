"""launch/export.py: PEFT adapter, squeezed adapter and streamed merged model from a checkpoint, an output
directory or any PEFT adapter, against the trained model's own logits and a dense SVD."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.checkpoint.store import load_checkpoint, restore_bank
from bilora_dist.model.embedded import default_model_dir
from bilora_dist.adapters.bank import Branch
from bilora_dist.cli import run_cli
from bilora_dist.export.peft import save_peft_adapter
from bilora_dist.export.cli import export_main
from tests_support import launcher, run_ok


def export(*argv: str) -> subprocess.CompletedProcess:
    return run_ok([sys.executable, "launch/export.py", *argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, module_data) -> Path:
    """A 4-step 2-rank ZeRO-3 Bi-LoRA run with a checkpoint at its end."""
    out = tmp_path_factory.mktemp("export") / "run"
    cmd = launcher("zero3") + ["--model", str(tiny_model_dir), "--data", str(module_data[0]), "--eval-data",
                               str(module_data[1]), "--max-steps", "4", "--micro-batch-size", "4", "--lr", "1e-2",
                               "--output-dir", str(out)]
    run_ok(cmd)
    return out


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def trained_logits(model_dir: Path, checkpoint: Path) -> torch.Tensor:
    """Logits of the base with the checkpoint's bank injected, auxiliary off: what training evaluates."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 8, 16.0, 8, 1.0, 0)
    restore_bank(bank, load_checkpoint(checkpoint))
    inject(model, bank)
    with torch.no_grad(), bank.primary_only():
        return model(**inputs()).logits


def test_adapter_and_merged_model_reproduce_the_trained_model(trained, tiny_model_dir, tmp_path):
    checkpoint = trained / "checkpoints" / "step_4"
    want = trained_logits(tiny_model_dir, checkpoint)
    export("--checkpoint", str(checkpoint), "--out", str(tmp_path / "adapter"))
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
        torch.testing.assert_close(peft(**inputs()).logits, want, rtol=0, atol=1e-5)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tiny_model_dir)(**inputs()).logits, want,
                                  atol=1e-3)  # the adapter matters
    export("--checkpoint", str(checkpoint), "--out", str(tmp_path / "merged"), "--merged")
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "config.json").is_file()
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)
        torch.testing.assert_close(merged(**inputs()).logits, want, rtol=0, atol=1e-4)
    # from the output directory: its final adapter, the same primary factors as the last checkpoint
    export("--checkpoint", str(trained), "--out", str(tmp_path / "from_run"))
    a, b = load_file(tmp_path / "from_run" / "adapter_model.safetensors"), load_file(
        tmp_path / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rank_export_is_the_truncated_svd(trained, tiny_model_dir, tmp_path):
    checkpoint = trained / "checkpoints" / "step_4"
    export("--checkpoint", str(checkpoint), "--out", str(tmp_path / "r2"), "--rank", "2")
    config = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4.0  # the scale 16/8 is kept: alpha' = 2 * 2
    primary = load_checkpoint(checkpoint).branches["primary"].requires_grad_(False)
    got = load_file(tmp_path / "r2" / "adapter_model.safetensors")
    for i, shape in enumerate(primary.shapes):
        A, B = primary.factors(i)
        U, S, Vh = torch.linalg.svd(2.0 * B.double() @ A.double(), full_matrices=False)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        key = f"base_model.model.{shape.name}.lora_"
        delta = 2.0 * got[key + "B.weight"].double() @ got[key + "A.weight"].double()
        assert float((delta - best).norm() / best.norm()) < 1e-5
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "r2")


def test_merging_an_adapted_tied_head_unties_it(tiny_model_dir, tmp_path):
    """Any PEFT adapter, here one adapting the tied lm_head: merged in shards of 20 KB (many files + index)."""
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "peft" / "adapter_config.json").read_text()),
         "base_model_name_or_path": str(tiny_model_dir)}))
    export("--checkpoint", str(tmp_path / "peft"), "--out", str(tmp_path / "merged"), "--merged",
           "--shard-size", "20KB")
    merged_dir = tmp_path / "merged"
    assert json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"] is False
    assert len(json.loads((merged_dir / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    with torch.no_grad():
        want = peft(**inputs()).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)
        torch.testing.assert_close(merged(**inputs()).logits, want, rtol=0, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        torch.testing.assert_close(merged.model.embed_tokens.weight, base.model.embed_tokens.weight, rtol=0, atol=0)



@pytest.fixture(scope="module")
def q4_base(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A small Llama saved pre-quantised by bitsandbytes (NF4, double quantisation), and the loaded model."""
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("q4")
    torch.manual_seed(0)  # widths of 32+ for bitsandbytes' CPU 4-bit kernel
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path / "fp")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    q4 = AutoModelForCausalLM.from_pretrained(path / "fp", quantization_config=quant, device_map="cpu")
    q4.save_pretrained(path / "q4")
    return path / "q4", q4


def attention_adapter(q4: torch.nn.Module, base: Path, out: Path) -> tuple[list[str], list[str], Branch]:
    """A random adapter on the attention projections; the MLP stays 4-bit-only. Returns (4-bit layers,
    adapted layers, primary branch)."""
    names = select_targets(q4, "all-linear")
    adapted = [n for n in names if ".self_attn." in n]
    assert len(names) == 14 and len(adapted) == 8
    bank = build_bank(layer_shapes(q4, adapted), 4, 8.0, None, 1.0, 0)
    with torch.no_grad():
        bank.primary.flat.normal_(0, 0.05)
    save_peft_adapter(bank.primary, out, ["q_proj", "k_proj", "v_proj", "o_proj"], str(base), {})
    return names, adapted, bank.primary


def test_merge_into_a_4bit_base_dequantises_every_4bit_weight(q4_base, tmp_path):
    """Every 4-bit weight comes out as bitsandbytes' own dequantisation of the loaded layer, plus s·BA where
    adapted, and the merged model has no quantization_config."""
    from bitsandbytes.functional import dequantize_4bit

    base, q4 = q4_base
    names, adapted, primary = attention_adapter(q4, base, tmp_path / "adapter")
    export("--checkpoint", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--merged")

    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert not [k for k in merged if "absmax" in k or "quant" in k]
    modules = dict(q4.named_modules())
    for name in names:
        weight = modules[name].weight
        want = dequantize_4bit(weight.data, weight.quant_state)
        if name in adapted:
            A, B = primary.factors(adapted.index(name))
            want = want + 2.0 * B @ A
        torch.testing.assert_close(merged[name + ".weight"], want, rtol=0, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        fresh = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")  # PEFT wraps its base in place
        peft = PeftModel.from_pretrained(fresh, tmp_path / "adapter")(**inputs()).logits
        # bitsandbytes' CPU 4-bit matmul rounds differently from a dense matmul of its own dequantisation
        torch.testing.assert_close(model(**inputs()).logits, peft, rtol=0, atol=2e-2)


def test_merge_into_a_4bit_base_without_bitsandbytes_is_one_clear_error(q4_base, tmp_path, monkeypatch, capsys):
    base, q4 = q4_base
    attention_adapter(q4, base, tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if the quant extra were not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    code = run_cli(export_main, ["--checkpoint", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"),
                                 "--merged"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "4-bit weights" in err[-1] and "install bitsandbytes" in err[-1], err
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged-*"))


MEASURE = """
import sys
from bilora_dist.cli import run_cli
from bilora_dist.export.cli import export_main
import transformers, safetensors.torch
# VmHWM restarts at exec; ru_maxrss would carry the parent's peak over the fork
peak = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
before = peak()
code = run_cli(export_main, sys.argv[1:])
print("extra_kib", peak() - before)
sys.exit(code)
"""


def test_merge_of_the_default_model_streams(tmp_path):
    """Merging SmolLM2-135M (538 MB fp32) in 64 MB shards adds about one shard plus two copies of the largest
    tensor to peak RSS, far less than the model."""
    model_dir = default_model_dir()
    from bilora_dist.model.loading import build_on_meta

    meta = build_on_meta(str(model_dir))
    names = select_targets(meta, "all-linear")
    bank = build_bank(layer_shapes(meta, names), 8, 16.0, None, 1.0, 0)
    with torch.no_grad():
        bank.primary.flat.normal_(0, 0.01)
    save_peft_adapter(bank.primary, tmp_path / "adapter", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], str(model_dir), {})
    proc = run_ok([sys.executable, "-c", MEASURE, "--checkpoint", str(tmp_path / "adapter"), "--out",
                   str(tmp_path / "merged"), "--merged", "--shard-size", "64MB"])
    extra_mb = int(proc.stdout.split("extra_kib")[1]) / 1024
    model_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    merged_mb = sum(f.stat().st_size for f in (tmp_path / "merged").glob("*.safetensors")) / 2**20
    assert abs(merged_mb - model_mb) < 1 and len(list((tmp_path / "merged").glob("*.safetensors"))) > 4
    largest_mb = meta.get_input_embeddings().weight.numel() * 4 / 2**20  # 108 MiB, read and copied once
    assert largest_mb < extra_mb < 64 + 2 * largest_mb + 64, (extra_mb, largest_mb)  # shard + 2 tensors + slack
    assert extra_mb < 0.6 * model_mb, (extra_mb, model_mb)
    # one merged layer, checked against W0 + s·BA
    name = names[0]
    A, B = bank.primary.factors(0)
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())["weight_map"]
    merged_w = load_file(tmp_path / "merged" / index[name + ".weight"])[name + ".weight"]
    base_w = load_file(model_dir / "model.safetensors")[name + ".weight"]
    torch.testing.assert_close(merged_w, base_w + 2.0 * B @ A, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "gpt_oss"])
def test_moe_adapter_loads_in_peft_with_our_logits(family, tmp_path):
    """Fused expert projections go to PEFT's target_parameters layout: PeftModel.from_pretrained gives our logits.
    (Not DeepSeek-V3: on loading, peft 0.21 renames the target_modules `gate_proj`/`up_proj`/`down_proj` of its
    dense and shared-expert linear layers to the fused expert parameters, as if they were transformers-4 names.)"""
    from tests_support import tiny_moe_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_moe_config(family, 96)).float().requires_grad_(False)
    base.save_pretrained(tmp_path / "base")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    shapes = layer_shapes(ours, select_targets(ours, "all-linear"))
    bank = build_bank(shapes, 4, 8.0, None, 1.0, 0)
    with torch.no_grad():
        bank.primary.flat.normal_(0, 0.1)
    linear = [s.name for s in shapes if not s.experts]
    save_peft_adapter(bank.primary, tmp_path / "adapter", sorted({n.rsplit(".", 1)[-1] for n in linear}),
                      str(tmp_path / "base"), {})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(s.name for s in shapes if s.experts)
    inject(ours, bank)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        torch.testing.assert_close(peft(ids).logits, want, rtol=0, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(ids).logits
        assert (plain - want).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_merged_moe_model_reproduces_the_adapted_model(family, tmp_path):
    """--merged folds s·B_e A_e into each fused expert tensor (read from the per-expert checkpoint keys as
    transformers fuses them; gpt-oss's [E, in, out] transposed): from_pretrained of the result gives our logits."""
    from bilora_dist.export.merge import merge_into_base
    from tests_support import tiny_moe_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_moe_config(family, 96)).save_pretrained(tmp_path / "base")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    bank = build_bank(layer_shapes(ours, select_targets(ours, "all-linear")), 4, 8.0, None, 1.0, 0)
    with torch.no_grad():
        bank.primary.flat.normal_(0, 0.1)
    counts = merge_into_base(tmp_path / "base", bank.primary, tmp_path / "merged", shard_bytes=40_000)
    assert counts["merged_layers"] == len(bank.shapes) and counts["shards"] > 1
    inject(ours, bank)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(merged(ids).logits, ours(ids).logits, rtol=0, atol=1e-4)
