"""Step time and peak memory on a mixture-of-experts model: our lora and bilora against PEFT's LoRA with the
experts in `target_parameters` (peft's ParamWrapper), side by side in one run.

    python benchmarks/moe_cost.py [--steps 6] [--rounds 3] [--micro-batch-size 4] [--seq-len 256]

The model is a random Qwen3-MoE of hidden size 256, 4 layers, 16 experts (expert width 256), top-2, vocabulary
8192, fp32 on the CPU; every method adapts q/k/v/o and every expert's gate_up_proj and down_proj at rank 8
(bilora: + rank 8 auxiliary), trains on the same random token batches with AdamW, and measures its step after a
warm-up. Each (round, method) is a fresh worker process (peak RSS per method); rounds interleave the methods.
Reports medians of wall and process-CPU time per step and ratios to PEFT's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("peft", "lora", "bilora")


def model_and_batches(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from bilora_dist.data import collate

    config = Qwen3MoeConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            num_experts=16, num_experts_per_tok=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps + 1):
        rows = [torch.randint(3, 8192, (args.seq_len,), generator=gen).tolist() for _ in range(args.micro_batch_size)]
        batches.append(collate([{"input_ids": r, "labels": r} for r in rows], 0))
    return model, batches


def peft_step(model, lr: float):
    """PEFT LoRA on the same layers (experts through target_parameters), our token loss, AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model

    from bilora_dist.loss import token_loss_sum

    experts = [f"model.layers.{i}.mlp.experts.{p}" for i in range(4) for p in ("gate_up_proj", "down_proj")]
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                 "o_proj"],
                                            target_parameters=experts))
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step(micro_batches):
        optimizer.zero_grad(set_to_none=False)
        for batch in micro_batches:
            loss, tokens = token_loss_sum(peft, batch)
            (loss / tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step


def worker(args: argparse.Namespace) -> None:
    import torch

    from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
    from bilora_dist.engines.base import Engine
    from bilora_dist.methods import METHOD_STEPS, build_optimizer

    model, batches = model_and_batches(args)
    if args.worker == "peft":
        step = peft_step(model, 1e-4)
    else:
        bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 8, 16.0,
                          8 if args.worker == "bilora" else None, 1.0, seed=0)
        inject(model, bank)
        step = METHOD_STEPS[args.worker](model, bank, build_optimizer(bank, 1e-4, 0.0), Engine(), 1.0,
                                         *([0.05] if args.worker == "bilora" else []))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step([batches[0]])  # warm-up
    times, cpu_times = [], []
    for b in batches[1:]:
        t0, c0 = time.perf_counter(), time.process_time()
        step([b])
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"times": times, "cpu_times": cpu_times, "peak_rss_mb": peak / 1024,
                      "train_extra_mb": (peak - baseline) / 1024, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_cost.json"))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for method in METHODS:
            cmd = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--micro-batch-size",
                   str(args.micro_batch_size), "--seq-len", str(args.seq_len)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[method].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {method}: median step "
                  f"{statistics.median(runs[method][-1]['times']):.3f} s", file=sys.stderr)
    summary = {}
    for method in METHODS:
        summary[method] = {"step_s": statistics.median(t for run in runs[method] for t in run["times"]),
                           "cpu_s": statistics.median(t for run in runs[method] for t in run["cpu_times"]),
                           "peak_rss_mb": max(run["peak_rss_mb"] for run in runs[method])}
    for method in METHODS:
        for key, name in (("step_s", "time_vs_peft"), ("cpu_s", "cpu_vs_peft"), ("peak_rss_mb", "peak_vs_peft")):
            summary[method][name] = summary[method][key] / summary["peft"][key]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "summary": summary, "runs": runs}, indent=2))
    print("| method | step wall (s) | wall / PEFT | step CPU (s) | CPU / PEFT | peak RSS (MB) | peak / PEFT |")
    print("|---|---|---|---|---|---|---|")
    for method, s in summary.items():
        print(f"| {method} | {s['step_s']:.3f} | {s['time_vs_peft']:.3f} | {s['cpu_s']:.3f} | {s['cpu_vs_peft']:.3f} "
              f"| {s['peak_rss_mb']:.0f} | {s['peak_vs_peft']:.3f} |")
    print(f"bilora / lora: wall {summary['bilora']['step_s'] / summary['lora']['step_s']:.3f}, "
          f"CPU {summary['bilora']['cpu_s'] / summary['lora']['cpu_s']:.3f}")


if __name__ == "__main__":
    main()
