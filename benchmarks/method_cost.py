"""Step time and peak memory of lora, bilora and lora-sam, side by side in one run.

    python benchmarks/method_cost.py [--model DIR] [--steps 6] [--rounds 3] [--micro-batch-size 8]

Each (round, method) runs in a fresh worker process (so peak RSS is per method); rounds interleave
the methods so machine drift hits all of them alike. Reports medians of wall and process-CPU time per
step (CPU time is immune to time the process waits for a shared core) and ratios to lora.
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

METHODS = ("lora", "bilora", "lora-sam")


def worker(args: argparse.Namespace) -> None:
    import torch

    from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
    from bilora_dist.data import collate, prepare_examples
    from bilora_dist.data.tokenize import TokenizeOptions
    from bilora_dist.model.embedded import DEFAULT_TRAIN
    from bilora_dist.engines.base import Engine
    from bilora_dist.training.methods import METHOD_STEPS, build_optimizer
    from bilora_dist.model.loading import load_frozen_model, load_tokenizer, resolve_model

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    examples = list(prepare_examples(str(DEFAULT_TRAIN), "--data", tokenizer, TokenizeOptions(256),
                                     log=lambda _: None).examples)
    model = load_frozen_model(path)
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 8, 16.0,
                      8 if args.worker == "bilora" else None, 1.0, seed=0)
    inject(model, bank)
    step = METHOD_STEPS[args.worker](model, bank, build_optimizer(bank, 1e-4, 0.0), Engine(), 1.0,
                                     *{"bilora": [0.05], "lora-sam": [0.01]}.get(args.worker, []))
    size = args.micro_batch_size
    batches = [collate(examples[i * size:(i + 1) * size], tokenizer.pad_token_id) for i in range(args.steps + 1)]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step([batches[0]])  # warm-up
    times, cpu_times = [], []
    for b in batches[1:]:
        t0, c0 = time.perf_counter(), time.process_time()
        step([b])
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"times": times, "cpu_times": cpu_times, "peak_rss_mb": peak / 1024, "train_extra_mb": (peak - baseline) / 1024,
                      "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "method_cost.json"))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for method in METHODS:
            cmd = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps),
                   "--micro-batch-size", str(args.micro_batch_size), "--model", args.model]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[method].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {method}: median step "
                  f"{statistics.median(runs[method][-1]['times']):.3f} s", file=sys.stderr)
    summary = {}
    for method in METHODS:
        times = [t for run in runs[method] for t in run["times"]]
        cpu = [t for run in runs[method] for t in run["cpu_times"]]
        summary[method] = {"step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
                           "peak_rss_mb": max(run["peak_rss_mb"] for run in runs[method]),
                           "train_extra_mb": max(run["train_extra_mb"] for run in runs[method])}
    for method in METHODS:
        summary[method]["time_vs_lora"] = summary[method]["step_s"] / summary["lora"]["step_s"]
        summary[method]["cpu_vs_lora"] = summary[method]["cpu_s"] / summary["lora"]["cpu_s"]
        summary[method]["peak_vs_lora"] = summary[method]["peak_rss_mb"] / summary["lora"]["peak_rss_mb"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "summary": summary, "runs": runs}, indent=2))
    print("| method | step wall (s) | wall / lora | step CPU (s) | CPU / lora | peak RSS (MB) | peak / lora "
          "| train-time extra (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for method, s in summary.items():
        print(f"| {method} | {s['step_s']:.3f} | {s['time_vs_lora']:.3f} | {s['cpu_s']:.3f} | {s['cpu_vs_lora']:.3f} "
              f"| {s['peak_rss_mb']:.0f} | "
              f"{s['peak_vs_lora']:.3f} | {s['train_extra_mb']:.0f} |")


if __name__ == "__main__":
    main()
