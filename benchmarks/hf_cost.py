"""Cost of Bi-LoRA inside TRL's SFTTrainer: SFTTrainer + PEFT LoRA against SFTTrainer + PEFT LoRA +
BiLoRACallback on the same job (the embedded model and task), side by side in one run.

    python benchmarks/hf_cost.py [--steps 12] [--rounds 3] [--batch 8] [--model DIR]

Each (round, config) runs in a fresh worker process, so peak RSS is that config's; rounds interleave the two
configs so machine drift hits both alike. Step time: the median wall and process-CPU time of the steps after
the first two (warm-up), taken between the trainer's on_step_begin and on_step_end. Targets (issue 34): step
time ratio <= 1.10, peak memory <= +5 %. Results: benchmarks/results/hf_cost.json and a table on stdout.

Peak RSS counts what glibc's heap kept, not only live tensors: without `--mmap-threshold`, freed blocks of a
step's transient tensors stay in a heap that does not shrink, so extra transient allocations show as peak even
when live memory is not higher. `--mmap-threshold 1048576` (glibc's MALLOC_MMAP_THRESHOLD_, for both configs
alike; `bilora-dist train` sets the same) makes RSS follow live memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("lora", "bilora")


def worker(args: argparse.Namespace) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bilora_dist.integrations import BiLoRACallback
    from bilora_dist.model.embedded import DEFAULT_TRAIN
    from bilora_dist.model.loading import resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    times: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            times.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))

    callbacks = [StepTimer()] + ([BiLoRACallback(rho=0.05, aux_rank=8)] if args.worker == "bilora" else [])
    data = load_dataset("json", data_files=str(DEFAULT_TRAIN), split="train")
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=AutoTokenizer.from_pretrained(model_dir),
        args=SFTConfig(output_dir=args.tmp, max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=2e-4, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                       logging_steps=args.steps, max_length=128, disable_tqdm=True, optim="adamw_torch"),
        train_dataset=data, callbacks=callbacks,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    trainer.train()
    steady = times[2:]
    print(json.dumps({"wall_s": statistics.median(t for t, _ in steady), "cpu_s": statistics.median(c for _, c in steady),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="")
    p.add_argument("--mmap-threshold", type=int, default=0, help="glibc MALLOC_MMAP_THRESHOLD_ for both configs "
                   "(bytes; 0: the allocator's default)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/hf_cost.json"))
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp/hf_cost", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for round_ in range(args.rounds):
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--worker", config, "--steps", str(args.steps), "--batch",
                   str(args.batch), "--threads", str(args.threads), "--model", args.model]
            env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {})}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            runs[config].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {round_ + 1}/{args.rounds} {config}: {runs[config][-1]}", flush=True)
    summary = {c: {k: statistics.median(r[k] for r in runs[c]) for k in ("wall_s", "cpu_s", "peak_rss_mib")}
               for c in CONFIGS}
    ratios = {k: summary["bilora"][k] / summary["lora"][k] for k in ("wall_s", "cpu_s", "peak_rss_mib")}
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "tmp", "out")},
              "runs": runs, "median": summary, "bilora_over_lora": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| config | step wall (s) | step CPU (s) | peak RSS (MiB) |\n|---|---|---|---|")
    for c in CONFIGS:
        print(f"| SFTTrainer + {c} | {summary[c]['wall_s']:.3f} | {summary[c]['cpu_s']:.3f} | "
              f"{summary[c]['peak_rss_mib']:.0f} |")
    print(f"| bilora / lora | {ratios['wall_s']:.3f} | {ratios['cpu_s']:.3f} | {ratios['peak_rss_mib']:.3f} |")


if __name__ == "__main__":
    main()
