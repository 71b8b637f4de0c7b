"""Inputs that used to pass silently or end in a traceback (issue 32): each is one `error:` line, a warning line, or
the right result. The merge of a 4-bit-trained adapter, squeezes that would raise the rank, non-causal models,
corrupt weight files, tokenizers larger than the model, broken JSON lines, changed cache entries, and a tied
embedding stored under the head's name only under FSDP2."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BertConfig, GPTNeoXConfig, LlamaConfig, LlamaForCausalLM

from bilora_dist.cli import run_cli, train_main
from bilora_dist.export.cli import export_main
from bilora_dist.model.loading import LoadOptions, check_causal_lm, load_frozen_model, quantized_linears
from bilora_dist.squeeze.cli import squeeze_main
from bilora_dist.export.peft_io import read_peft_adapter
from tests_support import run_ok, tiny_llama_config, two_ranks


def _one_line(capsys, main, argv: list[str]) -> str:
    """The single `error:` line (exit status 2) that `main(argv)` ends in."""
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _train_args(model: Path, data: tuple[Path, Path], out: Path, *flags: str) -> list[str]:
    return ["--model", str(model), "--data", str(data[0]), "--eval-data", str(data[1]), "--max-steps", "1",
            "--micro-batch-size", "2", "--output-dir", str(out), "--data-cache", "none", *flags]


# --- 1, 2: a --quantize 4bit adapter: its provenance, its merge, and squeezes that would raise its rank ---

@pytest.fixture(scope="module")
def q4_run(tmp_path_factory, tokenizer, module_data) -> tuple[Path, Path]:
    """(base, output dir) of one --quantize 4bit LoRA step (rank 8) on a tiny Llama whose linear inputs are
    multiples of the 64-value NF4 block (what bitsandbytes' CPU kernel needs)."""
    root = tmp_path_factory.mktemp("q4_run")
    config = LlamaConfig(**{**tiny_llama_config(len(tokenizer)).to_dict(), "hidden_size": 64, "head_dim": 16,
                            "intermediate_size": 128})
    torch.manual_seed(1234)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    run_ok([sys.executable, "launch/train.py", *_train_args(root / "base", module_data, root / "run", "--quantize",
                                                             "4bit", "--method", "lora", "--lr", "1e-2",
                                                             "--warmup-ratio", "0")])
    return root / "base", root / "run"


def test_4bit_adapter_records_quantize_and_merges_into_the_dequantised_nf4_base(q4_run, tmp_path, capsys):
    import bitsandbytes as bnb

    base, run = q4_run
    provenance = json.loads((run / "adapter" / "bilora_dist.json").read_text())
    assert provenance["quantize"] == "4bit" and provenance["dtype"] == "float32"
    branch, _ = read_peft_adapter(run / "adapter")
    assert run_cli(export_main, ["--checkpoint", str(run), "--out", str(tmp_path / "nf4"), "--merged"]) == 0
    assert "linear weights quantised to NF4 (torch.float32) and dequantised" in capsys.readouterr().out
    assert run_cli(export_main, ["--checkpoint", str(run), "--out", str(tmp_path / "orig"), "--merged",
                                 "--merge-base", "original"]) == 0
    assert "original weights, not the NF4 weights the adapter was trained against" in capsys.readouterr().out
    nf4, orig = load_file(tmp_path / "nf4" / "model.safetensors"), load_file(tmp_path / "orig" / "model.safetensors")
    q4 = load_frozen_model(str(base), LoadOptions(torch.float32, "4bit"), torch.device("cpu"))  # as training loads it
    w0 = load_file(base / "model.safetensors")
    adapted = {s.name: i for i, s in enumerate(branch.shapes)}
    names = [name for name, _ in quantized_linears(q4)]
    assert len(names) == 14 and set(adapted) == set(names)
    for name in names:
        weight = q4.get_submodule(name).weight
        A, B = branch.factors(adapted[name])
        delta = branch.scales[adapted[name]] * B @ A
        assert delta.abs().max() > 0, name  # trained
        dequantised = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        torch.testing.assert_close(nf4[name + ".weight"], dequantised + delta, rtol=0, atol=1e-6)
        torch.testing.assert_close(orig[name + ".weight"], w0[name + ".weight"] + delta, rtol=0, atol=1e-6)
    for key in ("model.embed_tokens.weight", "model.norm.weight"):  # not quantised in training, not here
        assert torch.equal(nf4[key], w0[key])


def test_export_and_squeeze_cannot_raise_the_rank(q4_run, tmp_path, capsys):
    _, run = q4_run
    err = _one_line(capsys, export_main, ["--checkpoint", str(run), "--out", str(tmp_path / "e"), "--rank", "16"])
    assert err == ("error: --rank 16 exceeds the adapter's rank 8; a squeeze cannot raise the rank (choose --rank 8 "
                   "or less, or leave --rank out)")
    err = _one_line(capsys, squeeze_main, ["--adapter", str(run / "adapter"), "--out", str(tmp_path / "s"),
                                           "--rank", "16"])
    assert err == "error: --rank 16 exceeds the adapter's rank 8; a squeeze cannot raise the rank (choose --rank 8 or less)"
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


# --- 3, 4, 5: models that are not causal LMs, corrupt weight files, tokenizers larger than the model ---

def test_a_bidirectional_encoder_is_refused(tmp_path, tokenizer, small_data, capsys):
    model = tmp_path / "bert"
    BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, architectures=["BertLMHeadModel"]).save_pretrained(model)
    tokenizer.save_pretrained(model)
    err = _one_line(capsys, train_main, _train_args(model, small_data, tmp_path / "out"))
    assert err == (f"error: --model {model}: BertLMHeadModel (bert) is configured as a bidirectional encoder "
                   "(is_decoder false; bert.encoder.layer.0 attends both ways), not a causal language "
                   "model; set \"is_decoder\": true in its config.json or train a decoder-only model")
    assert not (tmp_path / "out").exists()
    check_causal_lm(BertConfig(is_decoder=True), "bert-decoder")  # a BERT decoder, and GPT-NeoX (is_decoder false,
    check_causal_lm(GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1), "neox")  # yet causal)


@pytest.mark.parametrize("damage, says", [("truncate", "incomplete metadata, file not fully covered"),
                                          ("junk", "header too large")])
def test_a_corrupt_weight_file_is_named(damage, says, tiny_model_dir, tmp_path, small_data, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncate" else b"\xff" * 100)
    err = _one_line(capsys, train_main, _train_args(model, small_data, tmp_path / "out"))
    assert err.startswith(f"error: --model {model}: weight file model.safetensors is corrupt or truncated") and says in err
    assert not (tmp_path / "out").exists()
    peft = tmp_path / "adapter"  # the merge names it too
    err = _one_line(capsys, export_main, ["--checkpoint", str(_small_adapter(tiny_model_dir, peft)), "--out",
                                          str(tmp_path / "merged"), "--merged", "--model", str(model)])
    assert "model.safetensors" in err and says in err and not (tmp_path / "merged").exists()


def _small_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(out)
    return out


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_the_output_dir(tmp_path, tokenizer, small_data,
                                                                                capsys):
    model = tmp_path / "small_vocab"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(1000)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    err = _one_line(capsys, train_main, _train_args(model, small_data, tmp_path / "out"))
    assert err.startswith("error: --data") and "token id" in err and "1000 rows" in err, err
    assert not (tmp_path / "out").exists()


# --- 6, 7: a broken JSON line in a mixed-type file; a cache entry changed on disk ---

def test_a_cut_record_among_mixed_type_records_names_its_line(tmp_path, tiny_model_dir, small_data, capsys):
    user, reply = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    plain = json.dumps({"messages": [user, reply]})
    parts = json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, reply]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{plain}\n{parts}\n{plain[:30]}\n{plain}\n")  # `datasets` fails on this in its own JSON pass
    err = _one_line(capsys, train_main, _train_args(tiny_model_dir, (bad, small_data[1]), tmp_path / "out"))
    assert err == f"error: --data {bad}: line 3: malformed JSON (Expecting property name enclosed in double quotes)"


def test_a_changed_cache_entry_is_rebuilt_with_one_warning(tmp_path, tokenizer, small_data):
    from bilora_dist.data import prepare_examples
    from bilora_dist.data.tokenize import TokenizeOptions

    options, cache, lines = TokenizeOptions(64), str(tmp_path / "cache"), []
    first = prepare_examples(str(small_data[0]), "--data", tokenizer, options, cache=cache, log=lines.append)
    want = [list(ids) for ids in first.examples["input_ids"]]  # a copy: the examples map the entry's file
    (arrow,) = (tmp_path / "cache").glob("*/dataset/*.arrow")
    pattern = torch.tensor(want[3][:4], dtype=torch.int32).numpy().tobytes()  # 4 ids of example 3, as stored
    data = arrow.read_bytes()
    assert data.count(pattern) == 1
    flipped = torch.tensor([want[3][0], want[3][1] ^ 1, *want[3][2:4]], dtype=torch.int32).numpy().tobytes()
    arrow.write_bytes(data.replace(pattern, flipped))
    del first
    lines.clear()
    again = prepare_examples(str(small_data[0]), "--data", tokenizer, options, cache=cache, log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "no longer match their checksum" in warnings[0], lines
    assert [list(ids) for ids in again.examples["input_ids"]] == want
    lines.clear()
    prepare_examples(str(small_data[0]), "--data", tokenizer, options, cache=cache, log=lines.append)
    assert len(lines) == 1 and "read from the cache" in lines[0]  # the rebuilt entry verifies


# --- 8: FSDP2 and a tied embedding stored under the head's name only ---

TIED_WORKER = """
import sys
import torch
from bilora_dist.engines.fsdp import FSDPEngine
from bilora_dist.model.loading import LoadOptions

engine = FSDPEngine(torch.float32)
model = engine.build(sys.argv[1], LoadOptions())
embed = model.get_input_embeddings().weight.full_tensor()
head = model.get_output_embeddings().weight.full_tensor()
if engine.rank == 0:
    torch.save({"embed": embed, "head": head}, sys.argv[2])
engine.close()
"""


@pytest.mark.parametrize("kept", ["lm_head.weight", "model.embed_tokens.weight"])
def test_fsdp2_ties_an_embedding_stored_under_one_name(kept, tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(256))
    model.config.save_pretrained(tmp_path / "tied")
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k not in ("lm_head.weight", "model.embed_tokens.weight") or k == kept}
    save_file(state, str(tmp_path / "tied" / "model.safetensors"), metadata={"format": "pt"})
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "tied").get_input_embeddings().weight
    torch.testing.assert_close(want, model.get_input_embeddings().weight, rtol=0, atol=0)  # from_pretrained ties it
    (tmp_path / "worker.py").write_text(TIED_WORKER)
    run_ok(two_ranks("torchrun") + [str(tmp_path / "worker.py"), str(tmp_path / "tied"), str(tmp_path / "got.pt")])
    got = torch.load(tmp_path / "got.pt")
    torch.testing.assert_close(got["embed"], want, rtol=0, atol=0)
    torch.testing.assert_close(got["head"], want, rtol=0, atol=0)
