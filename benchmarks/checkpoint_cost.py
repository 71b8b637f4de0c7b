"""Checkpoint save/load time and size against the adapter size, and streamed merge time and peak RSS.

    python benchmarks/checkpoint_cost.py [--skip-1b]

Checkpoints: Bi-LoRA banks (primary + auxiliary at the same rank, AdamW state after one step) for the
embedded SmolLM2-135M at ranks 8 and 64 and for Llama-2-7B's shapes at rank 16, saved and loaded by
the trainer's own functions. Merge: `launch/export.py --merged` of a random rank-16 adapter into the
embedded model (fp32, 538 MB) and into a 1.1B Llama-shaped model with random bf16 weights written for
the purpose (TinyLlama's shapes), each in a worker process that reports the peak RSS it added.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

from bilora_dist.adapters import build_bank, layer_shapes, select_targets
from bilora_dist.checkpoint.store import load_checkpoint, save_checkpoint
from bilora_dist.model.embedded import default_model_dir
from bilora_dist.engines.base import Engine
from bilora_dist.export.peft import save_peft_adapter
from bilora_dist.export.merge import DTYPE_BYTES
from bilora_dist.model.loading import LoadOptions, build_on_meta

HERE = Path(__file__).resolve().parent
LLAMA_1B = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                       torch_dtype="bfloat16")
MEASURE = """
import sys, time
from bilora_dist.cli import run_cli
from bilora_dist.export.cli import export_main
import transformers, safetensors.torch
# VmHWM restarts at exec; ru_maxrss would carry the parent's peak over the fork
peak = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
before = peak()
t0 = time.perf_counter()
code = run_cli(export_main, sys.argv[1:])
print("RESULT", time.perf_counter() - t0, peak() - before)
sys.exit(code)
"""


def checkpoint_row(label: str, model_dir: Path, rank: int, work: Path) -> dict:
    meta = build_on_meta(str(model_dir), LoadOptions(torch.float32))
    bank = build_bank(layer_shapes(meta, select_targets(meta, "all-linear")), rank, 2.0 * rank, rank, 1.0, 0)
    optimizer = torch.optim.AdamW([bank.primary.flat, bank.aux.flat])
    for p in (bank.primary.flat, bank.aux.flat):
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = {"step": 1, "consumed": 8, "total_steps": 2, "global_batch": 8, "world_size": 1,
             "squeeze_history": [], "identity": {}}
    out = work / f"{label}_r{rank}"
    t0 = time.perf_counter()
    path = save_checkpoint(out, state, bank, optimizer, scheduler, "", Engine(), 0)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_checkpoint(path)
    load_s = time.perf_counter() - t0
    adapter = sum(b.flat.numel() * 4 for b in (bank.primary, bank.aux))
    size = sum(f.stat().st_size for f in path.iterdir())
    return {"model": label, "rank": rank, "adapter_mb": adapter / 2**20, "checkpoint_mb": size / 2**20,
            "size_vs_adapter": size / adapter, "save_s": save_s, "load_s": load_s}


def random_llama(path: Path, config: LlamaConfig, shard_bytes: int = 2 << 30) -> None:
    """A Llama-shaped model directory with random bf16 weights, written shard by shard."""
    path.mkdir(parents=True)
    config.save_pretrained(path)
    meta = build_on_meta(str(path), LoadOptions(torch.bfloat16))
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    count = 0
    for name, p in meta.state_dict().items():
        shard[name] = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        if sum(t.numel() * 2 for t in shard.values()) >= shard_bytes:
            save_file(shard, str(path / f"model-{count}.safetensors"), metadata={"format": "pt"})
            shard, count = {}, count + 1
    if shard:
        save_file(shard, str(path / f"model-{count}.safetensors"), metadata={"format": "pt"})
    for f in default_model_dir().glob("tokenizer*"):
        (path / f.name).write_bytes(f.read_bytes())


def merge_row(label: str, model_dir: Path, work: Path, shard: str) -> dict:
    meta = build_on_meta(str(model_dir), LoadOptions(torch.float32))
    bank = build_bank(layer_shapes(meta, select_targets(meta, "all-linear")), 16, 32.0, None, 1.0, 0)
    with torch.no_grad():
        bank.primary.flat.normal_(0, 0.01)
    adapter = work / f"{label}_{shard}_adapter"
    save_peft_adapter(bank.primary, adapter, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], str(model_dir), {})
    out = subprocess.run([sys.executable, "-c", MEASURE, "--checkpoint", str(adapter), "--out",
                          str(work / f"{label}_{shard}_merged"), "--merged", "--shard-size", shard],
                         capture_output=True, text=True, check=True).stdout
    seconds, extra_kib = out.split("RESULT")[1].split()
    model_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    return {"model": label, "model_mb": model_mb, "shard": shard, "largest_tensor_mb": largest_tensor_mb(model_dir),
            "merge_s": float(seconds), "extra_peak_rss_mb": int(extra_kib) / 1024,
            "extra_rss_vs_model": int(extra_kib) / 1024 / model_mb}


def largest_tensor_mb(model_dir: Path) -> float:
    sizes = []
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            headers = [f.get_slice(k) for k in f.keys()]
            sizes += [math.prod(h.get_shape()) * DTYPE_BYTES[h.get_dtype()] for h in headers]
    return max(sizes) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-1b", action="store_true", help="leave out the 1.1B merge (writes 2.2 GB)")
    parser.add_argument("--out", default=str(HERE / "results" / "checkpoint_cost.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoints = [checkpoint_row("SmolLM2-135M", default_model_dir(), 8, work),
                       checkpoint_row("SmolLM2-135M", default_model_dir(), 64, work),
                       checkpoint_row("Llama-2-7B", HERE / "model_configs" / "llama-2-7b", 16, work)]
        merges = [merge_row("SmolLM2-135M", default_model_dir(), work, shard) for shard in ("64MB", "256MB")]
        if not args.skip_1b:
            random_llama(work / "llama-1.1b", LLAMA_1B)
            merges += [merge_row("Llama-1.1B-random", work / "llama-1.1b", work, shard) for shard in ("64MB", "512MB")]
    Path(args.out).write_text(json.dumps({"checkpoints": checkpoints, "merges": merges}, indent=2))
    print("| model | rank | adapter (MiB, primary+aux fp32) | checkpoint (MiB) | size / adapter | save (s) | load (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in checkpoints:
        print(f"| {r['model']} | {r['rank']} | {r['adapter_mb']:.1f} | {r['checkpoint_mb']:.1f} | "
              f"{r['size_vs_adapter']:.2f} | {r['save_s']:.2f} | {r['load_s']:.2f} |")
    print("\n| merged model | weights (MiB) | largest tensor (MiB) | shard size | merge (s) | extra peak RSS (MiB) "
          "| extra RSS / model |")
    print("|---|---|---|---|---|---|---|")
    for r in merges:
        print(f"| {r['model']} | {r['model_mb']:.0f} | {r['largest_tensor_mb']:.0f} | {r['shard']} | {r['merge_s']:.1f} | "
              f"{r['extra_peak_rss_mb']:.0f} | {r['extra_rss_vs_model']:.2f} |")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
          file=sys.stderr)


if __name__ == "__main__":
    main()
