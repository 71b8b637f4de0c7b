"""Peak memory and step time of the GPU-path features, each on and off, side by side in one run (CPU).

    python benchmarks/feature_cost.py [--model DIR] [--steps 2]

Every variant is one `launch/train.py` process on the default model (lora, micro-batch 8, all-linear rank 8),
on plain-text records built from the embedded task's glosses; its peak is the process's resident set size as
the run reports it (metrics.jsonl `peak_mem_mb`: model load, data, training and evaluation), its step time the
median of the steps after the first. Variants:
- the long-sequence memory target: `--seq-len 64` against `--seq-len 1024`, with --gradient-checkpointing
  (the chunked loss is the default; `--loss-chunk 0` shows the whole-batch logits it avoids);
- --gradient-checkpointing off at 1024; --bf16 true at 1024 (the CPU runs bf16 matmuls slowly: memory only);
- --packing on and off on records of mixed lengths (padding fraction and real tokens per second);
and, in this process, the bytes autograd saves in one bf16 forward with the adapters' product as shipped and
through an fp32 cast of each adapter's input.
Results: benchmarks/results/feature_cost.json and a table on stdout (copied into benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--method", "lora", "--micro-batch-size", "8", "--lr", "1e-4", "--warmup-ratio", "0", "--eval-batch-size", "8",
        "--replica-check-every", "0"]
VARIANTS = {  # name: (records, extra flags)
    "seq 64, checkpointing": ("long", ["--seq-len", "64", "--gradient-checkpointing"]),
    "seq 1024, checkpointing": ("long", ["--seq-len", "1024", "--gradient-checkpointing"]),
    "seq 1024, checkpointing, --loss-chunk 0": ("long", ["--seq-len", "1024", "--gradient-checkpointing",
                                                          "--loss-chunk", "0"]),
    "seq 1024, no checkpointing": ("long", ["--seq-len", "1024", "--gradient-checkpointing", "false"]),
    "seq 1024, checkpointing, --bf16 true": ("long", ["--seq-len", "1024", "--gradient-checkpointing", "--bf16"]),
    "mixed lengths, seq 1024, unpacked": ("mixed", ["--seq-len", "1024", "--gradient-checkpointing"]),
    "mixed lengths, seq 1024, --packing": ("mixed", ["--seq-len", "1024", "--gradient-checkpointing", "--packing"]),
}


def write_records(folder: Path) -> dict[str, Path]:
    """Plain-text records from the embedded glosses: 8 of ~1500 tokens ("long", every row truncated to --seq-len),
    and 64 of 40 to 1000 tokens ("mixed"), each as train and held-out files."""
    from bilora_dist.model.embedded import DEFAULT_TRAIN

    glosses = [json.loads(line)["prompt"] for line in DEFAULT_TRAIN.read_text().splitlines()]
    rng = random.Random(0)
    text = " ".join(glosses)
    words = text.split()
    long = [" ".join(words[i * 1200:(i + 1) * 1200]) for i in range(8)]
    mixed = []
    for _ in range(64):
        start, length = rng.randrange(len(words) - 900), rng.choice([30, 60, 120, 250, 500, 800])
        mixed.append(" ".join(words[start:start + length]))
    files = {}
    for name, records in (("long", long), ("mixed", mixed)):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    return files


def run_variant(files: dict[str, Path], records: str, flags: list[str], out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "launch/train.py", "--data", str(files[records]), "--eval-data", str(files["long"]),
           "--max-steps", str(args.steps), "--output-dir", str(out), *BASE, *flags] + (
        ["--model", args.model] if args.model else [])
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    elapsed = [r["elapsed_s"] for r in steps]
    times = [b - a for a, b in zip(elapsed, elapsed[1:])]
    final = next(r for r in rows if "peak_mem_mb" in r)
    return {"flags": flags, "records": records, "peak_mb": final["peak_mem_mb"][0],
            "step_s": statistics.median(times) if times else elapsed[0],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[1:] or steps),
            "padding_fraction": statistics.mean(r.get("padding_fraction", 0.0) for r in steps)}


def saved_activations(args: argparse.Namespace) -> dict[str, float]:
    """MB that autograd saves for backward in one bf16 forward of the default model (micro-batch 8, seq 256,
    bilora adapters on every linear layer): the adapters' product as shipped, and through x.to(fp32)."""
    import torch
    from torch.nn import functional as F

    from bilora_dist.adapters import layer as layer_module
    from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
    from bilora_dist.model.loading import LoadOptions, load_frozen_model, resolve_model

    model = load_frozen_model(resolve_model(args.model), LoadOptions(torch.bfloat16))
    inject(model, build_bank(layer_shapes(model, select_targets(model, "all-linear")), 8, 16.0, 8, 1.0, seed=0))
    ids = torch.randint(0, model.config.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))

    def saved_mb() -> float:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return sum(storages.values()) / 2**20

    ours = saved_mb()
    product = layer_module.low_rank_product
    layer_module.low_rank_product = lambda x, A, B: F.linear(F.linear(x.to(A.dtype), A), B)
    try:
        cast = saved_mb()
    finally:
        layer_module.low_rank_product = product
    return {"ours_mb": ours, "fp32_cast_mb": cast}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_records(Path(tmp))
        for i, (name, (records, flags)) in enumerate(VARIANTS.items()):
            results[name] = run_variant(files, records, flags, Path(tmp) / f"run{i}", args)
            r = results[name]
            print(f"{name}: peak {r['peak_mb'] / 1024:.2f} GB, step {r['step_s']:.1f} s, "
                  f"{r['tokens_per_s']:.0f} tokens/s, padding {r['padding_fraction']:.2f}", flush=True)
    short, long = results["seq 64, checkpointing"], results["seq 1024, checkpointing"]
    summary = {"seq1024_minus_seq64_gb": (long["peak_mb"] - short["peak_mb"]) / 1024, "target_gb": 1.5,
               "saved_activations_bf16": saved_activations(args)}
    out = ROOT / "benchmarks" / "results" / "feature_cost.json"
    out.write_text(json.dumps({"variants": results, "summary": summary}, indent=1))
    print("| variant | peak (GB) | step (s) | real tokens/s | padding |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['peak_mb'] / 1024:.2f} | {r['step_s']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['padding_fraction']:.2f} |")
    print(f"seq 1024 - seq 64 with checkpointing: {summary['seq1024_minus_seq64_gb']:.2f} GB (target <= 1.5 GB)")
    saved = summary["saved_activations_bf16"]
    print(f"saved for backward, one bf16 forward (8 x 256, bilora): {saved['ours_mb']:.0f} MB; adapters through an "
          f"fp32 cast of their inputs: {saved['fp32_cast_mb']:.0f} MB")


if __name__ == "__main__":
    main()
