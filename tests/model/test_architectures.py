"""Decoder architectures beyond Llama, loaded by hub id from a local Hugging Face cache.

Tiny random-weight models of seven architectures sit in a fake hub cache (HF_HUB_CACHE, offline). Each
engine -- one process, ZeRO-3 on 2 ranks (deepspeed launcher), FSDP2 on 2 ranks (torchrun) -- is launched
once over all of them (tests/arch_worker.py): its logits must equal a plain `from_pretrained` of the
snapshot directory, and two Bi-LoRA steps on 2 ranks must agree with the single process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, MistralConfig, Phi3Config, PretrainedConfig, Qwen2Config, Qwen3Config)

from bilora_dist.adapters.inject import select_targets
from bilora_dist.errors import UserError
from bilora_dist.model.loading import build_on_meta, resolve_model
from tests_support import ROOT, TRAINED_RTOL, relative_error, run_cmd, run_env, run_ok, two_ranks

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
RANKS = {"single": (0,), "deepspeed": (0, 1), "fsdp": (0, 1)}


def arch_config(arch: str, vocab: int) -> PretrainedConfig:
    """A 2-layer, 32-wide config of `arch`; tied and untied heads, sliding windows shorter than the probe."""
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    gemma = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
    return {"llama": lambda: LlamaConfig(**common, tie_word_embeddings=False),
            "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=True),
            "qwen3": lambda: Qwen3Config(**common, head_dim=8, tie_word_embeddings=True),
            "mistral": lambda: MistralConfig(**common, head_dim=8, sliding_window=16, tie_word_embeddings=False),
            "gemma2": lambda: Gemma2Config(**common, **gemma),
            "gemma3": lambda: Gemma3TextConfig(**common, **gemma),
            "phi3": lambda: Phi3Config(**common, pad_token_id=0, tie_word_embeddings=False)}[arch]()


def add_to_hub_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """Move the files of directory `files` into `cache` as the hub would have downloaded them (content-addressed
    blobs, a snapshot of symlinks, refs/main); returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in sorted(files.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        file.rename(blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tokenizer) -> Path:
    """A hub cache holding tiny/<arch> for every architecture, with the embedded tokenizer."""
    cache = tmp_path_factory.mktemp("hf_hub")
    for i, arch in enumerate(ARCHS):
        files = tmp_path_factory.mktemp(arch)
        torch.manual_seed(i)
        AutoModelForCausalLM.from_config(arch_config(arch, len(tokenizer))).save_pretrained(files)
        tokenizer.save_pretrained(files)
        add_to_hub_cache(cache, f"tiny/{arch}", files)
    return cache


def hub_env(cache: Path) -> dict[str, str]:
    return run_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")


def snapshot(cache: Path, arch: str) -> Path:
    return next((cache / f"models--tiny--{arch}" / "snapshots").iterdir())


@pytest.fixture(scope="module")
def probe(tokenizer) -> torch.Tensor:
    """Two sequences of 24 tokens, longer than the sliding windows."""
    return torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(hub, probe) -> dict[str, torch.Tensor]:
    """Logits of the probe from a plain `from_pretrained` of each snapshot directory."""
    logits = {}
    for arch in ARCHS:
        model = AutoModelForCausalLM.from_pretrained(snapshot(hub, arch)).eval()
        with torch.no_grad():
            logits[arch] = model(input_ids=probe).logits
    return logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hub, probe):
    """Launch the worker once per engine, over every architecture; returns its output directory. A failed
    launch fails every test of its engine without being launched again."""
    cache: dict[str, Path | Exception] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            out = tmp_path_factory.mktemp(kind)
            torch.save(probe, out / "probe.pt")
            start = [sys.executable] if kind == "single" else two_ranks(kind)
            try:
                run_ok(start + [str(ROOT / "tests" / "arch_worker.py"), kind, str(out),
                                *[f"tiny/{arch}" for arch in ARCHS]], env=hub_env(hub), timeout=900)
                cache[kind] = out
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                cache[kind] = exc
        if isinstance(cache[kind], Exception):
            pytest.fail(f"the {kind} launch failed: {cache[kind]}")
        return cache[kind]

    return get


def result(runs, kind: str, arch: str, rank: int = 0) -> dict:
    return torch.load(runs(kind) / f"{kind}-tiny--{arch}-rank{rank}.pt")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["single", "deepspeed", "fsdp"])
def test_engine_logits_match_from_pretrained(runs, reference, kind, arch):
    for rank in RANKS[kind]:
        torch.testing.assert_close(result(runs, kind, arch, rank)["logits"], reference[arch], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["deepspeed", "fsdp"])
def test_training_steps_match_one_process(runs, kind, arch):
    """Step 1 sees the base (B = 0): its loss is the same computation on any engine. Step 2 follows an AdamW
    update, which amplifies summation-order noise in near-zero gradients: relative error there. Both ranks
    end with bit-identical adapters."""
    ref, ranks = result(runs, "single", arch), [result(runs, kind, arch, rank) for rank in RANKS[kind]]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    got = ranks[0]
    torch.testing.assert_close(got["losses"][0], ref["losses"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["losses"][1], ref["losses"][1], rtol=1e-4, atol=0)
    assert relative_error(got["primary"], ref["primary"]) <= TRAINED_RTOL


def test_train_and_merged_export_resolve_a_cached_hub_id(hub, probe, reference, module_data, tmp_path):
    """launch/train.py and launch/export.py --merged take a hub id from the cache; the merged model equals
    PEFT's adapter over the base."""
    from peft import PeftModel

    run = tmp_path / "run"
    run_ok([sys.executable, "launch/train.py", "--model", "tiny/qwen2", "--data", str(module_data[0]),
            "--eval-data", str(module_data[1]), "--max-steps", "2", "--micro-batch-size", "4", "--lr", "1e-2",
            "--seq-len", "64", "--output-dir", str(run)], env=hub_env(hub))
    checkpoint = run / "checkpoints" / "step_2"  # names its base as trained: tiny/qwen2
    run_ok([sys.executable, "launch/export.py", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "merged"),
            "--merged"], env=hub_env(hub))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(snapshot(hub, "qwen2")),
                                     run / "adapter").eval()
    with torch.no_grad():
        want, got = peft(input_ids=probe).logits, merged(input_ids=probe).logits
    assert (want - reference["qwen2"]).abs().max() > 1e-4  # the adapter matters
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    empty = tmp_path / "empty_cache"
    empty.mkdir()
    proc = run_cmd([sys.executable, "launch/export.py", "--checkpoint", str(checkpoint), "--out",
                    str(tmp_path / "merged2"), "--merged"], env=hub_env(empty))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --merged: the adapter's base model tiny/qwen2: neither a local directory nor a model in the "
        f"local Hugging Face cache ({empty}); nothing is downloaded"]


def test_resolve_model_finds_cached_snapshots_only(hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert Path(resolve_model("tiny/gemma3")) == snapshot(hub, "gemma3")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    for spec in ("tiny/absent", str(tmp_path / "no_such_dir")):
        with pytest.raises(UserError, match=f"--model {spec}: neither a local directory nor a model in the local "
                                            f"Hugging Face cache \\({hub}\\); nothing is downloaded"):
            resolve_model(spec)


def test_fsdp_dry_run_plans_a_cached_hub_id(hub):
    proc = run_ok([sys.executable, "launch/train.py", "--dry-run", "--engine", "fsdp", "--plan-ranks", "2",
                   "--model", "tiny/gemma3"], env=hub_env(hub))
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["engine"] == "fsdp" and len(plan["ranks"]) == 2


def test_meta_build_keeps_computed_buffers(hub):
    """Parameters on meta, every buffer (Gemma-3's embed_scale, rotary frequencies) as from_pretrained has it."""
    path = snapshot(hub, "gemma3")
    meta = build_on_meta(str(path))
    assert all(p.is_meta for p in meta.parameters())
    assert meta.get_output_embeddings().weight is meta.get_input_embeddings().weight  # still tied
    want = dict(AutoModelForCausalLM.from_pretrained(path).named_buffers())
    got = dict(meta.named_buffers())
    assert got.keys() == want.keys() and "model.embed_tokens.embed_scale" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_gpt2_conv1d_layers_are_refused():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0,
                                       eos_token_id=0))
    for spec in ("all-linear", "c_attn", r".*\.mlp\.c_fc"):
        with pytest.raises(UserError, match=r"^--target-modules: transformer\.h\.0\.\S+ is a GPT-2-style "
                                            r"transformers Conv1D layer"):
            select_targets(model, spec)
