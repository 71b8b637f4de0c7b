"""Step time and peak memory of expert LoRA at the expert counts people train: our lora and bilora against PEFT's
LoRA with the experts in `target_parameters` (peft's ParamWrapper) and against the attention-only floor, side by
side in one run.

    python benchmarks/moe_cost.py [--shapes sweep layer] [--rounds 2] [--steps 3]
    python benchmarks/moe_cost.py --shapes gpu --device cuda --dtype bf16 --micro-batch-size 8 --seq-len 1024

Shapes (random Qwen3-MoE, top-8, fp32 on the CPU, vocabulary 8192, micro-batch 4 x 256 = 1024 tokens):
- `sweep`: hidden 512, expert width 256, 2 layers, 16 / 64 / 128 / 256 experts (same routed tokens each);
- `layer`: one Qwen3-30B-A3B decoder layer (hidden 2048, expert width 768, 128 experts, 32 / 4 heads of 128);
- `gpu`: Qwen3-30B-A3B's layer shape at 4 layers, for one GPU in bf16 (`--device cuda --dtype bf16`);
- `smoke`: hidden 64, 8 experts, 2 layers: seconds, to try the script.

Methods, all rank 8 with AdamW on the same random token batches:
- `floor`: our LoRA on q/k/v/o only; the frozen experts still run forward and backward (transformers' grouped mm);
- `peft`: PEFT on q/k/v/o and every expert gate_up_proj / down_proj (target_parameters);
- `lora` / `bilora`: ours on the same layers as PEFT (bilora: + a rank-8 auxiliary).

Each (round, shape, method) is a fresh worker process (one thread on the CPU; peak RSS per worker, and on CUDA the
peak allocated memory); rounds interleave the methods. Reports the median wall and process-CPU time per step after a
warm-up, tokens per second and the ratios the targets are stated in (CPU-time ratios are the steadier where other
work shares the cores).
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

METHODS = ("floor", "peft", "lora", "bilora")
SHAPES = {  # name: (hidden, expert width, experts, layers, heads, kv heads, head dim)
    **{f"sweep-{e}": (512, 256, e, 2, 8, 4, 64) for e in (16, 64, 128, 256)},
    "qwen3-30b-a3b-layer": (2048, 768, 128, 1, 32, 4, 128),
    "qwen3-30b-a3b-4-layers": (2048, 768, 128, 4, 32, 4, 128),
    "tiny": (64, 32, 8, 2, 4, 2, 16),
}
GROUPS = {"sweep": [f"sweep-{e}" for e in (16, 64, 128, 256)], "layer": ["qwen3-30b-a3b-layer"],
          "gpu": ["qwen3-30b-a3b-4-layers"], "smoke": ["tiny"]}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def model_and_batches(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from bilora_dist.data import collate

    hidden, width, experts, layers, heads, kv_heads, head_dim = SHAPES[args.shape]
    config = Qwen3MoeConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=4 * hidden,
                            moe_intermediate_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, head_dim=head_dim, num_experts=experts,
                            num_experts_per_tok=8, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(args.device):  # random init where the model runs (billions of parameters on a GPU)
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, DTYPES[args.dtype]))
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps + 1):
        rows = [torch.randint(3, 8192, (args.seq_len,), generator=gen).tolist() for _ in range(args.micro_batch_size)]
        batch = collate([{"input_ids": r, "labels": r} for r in rows], 0)
        batches.append({k: v.to(args.device) if hasattr(v, "to") else v for k, v in batch.items()})
    return model, batches


def peft_step(model, layers: int, lr: float):
    """PEFT LoRA on the same layers (experts through target_parameters), our token loss, AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model

    from bilora_dist.training.loss import token_loss_sum

    experts = [f"model.layers.{i}.mlp.experts.{p}" for i in range(layers) for p in ("gate_up_proj", "down_proj")]
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION, target_parameters=experts))
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


def our_step(model, method: str, device: str):
    from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
    from bilora_dist.engines.base import Engine
    from bilora_dist.training.methods import METHOD_STEPS, build_optimizer

    targets = select_targets(model, ",".join(ATTENTION) if method == "floor" else "all-linear")
    bank = build_bank(layer_shapes(model, targets), 8, 16.0, 8 if method == "bilora" else None, 1.0, seed=0).to(device)
    inject(model, bank)
    name = "lora" if method == "floor" else method
    return METHOD_STEPS[name](model, bank, build_optimizer(bank, 1e-4, 0.0), Engine(), 1.0,
                              *([0.05] if method == "bilora" else []))


def worker(args: argparse.Namespace) -> None:
    import torch

    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    model, batches = model_and_batches(args)
    layers = SHAPES[args.shape][3]
    step = peft_step(model, layers, 1e-4) if args.worker == "peft" else our_step(model, args.worker, args.device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step([batches[0]])  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for b in batches[1:]:
        t0, c0 = time.perf_counter(), time.process_time()
        step([b])
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    base = 0 if cuda else baseline * 1024
    print(json.dumps({"times": times, "cpu_times": cpu_times, "peak_mb": peak / 2**20, "train_extra_mb": (peak - base) / 2**20,
                      "tokens_per_s": args.micro_batch_size * args.seq_len / statistics.median(times)}))


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    for shape, by_method in runs.items():
        s = {m: {"step_s": statistics.median(t for run in rs for t in run["times"]),
                 "cpu_s": statistics.median(t for run in rs for t in run["cpu_times"]),
                 "peak_mb": max(run["peak_mb"] for run in rs),
                 "tokens_per_s": statistics.median(run["tokens_per_s"] for run in rs),
                 "train_extra_mb": max(run["train_extra_mb"] for run in rs)} for m, rs in by_method.items()}
        for m in s:
            s[m]["vs_floor"] = s[m]["step_s"] / s["floor"]["step_s"]
            s[m]["vs_peft"] = s[m]["step_s"] / s["peft"]["step_s"]
            s[m]["cpu_vs_floor"] = s[m]["cpu_s"] / s["floor"]["cpu_s"]
            s[m]["cpu_vs_peft"] = s[m]["cpu_s"] / s["peft"]["cpu_s"]
            s[m]["peak_vs_peft"] = s[m]["peak_mb"] / s["peft"]["peak_mb"]
        s["bilora"]["vs_lora"] = s["bilora"]["step_s"] / s["lora"]["step_s"]
        s["bilora"]["cpu_vs_lora"] = s["bilora"]["cpu_s"] / s["lora"]["cpu_s"]
        out[shape] = s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(GROUPS), default=["sweep", "layer"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_cost.json"))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    shapes = [s for group in args.shapes for s in GROUPS[group]]
    runs: dict[str, dict[str, list[dict]]] = {s: {m: [] for m in METHODS} for s in shapes}
    for r in range(args.rounds):
        for shape in shapes:
            for method in METHODS:
                cmd = [sys.executable, __file__, "--worker", method, "--shape", shape, "--steps", str(args.steps),
                       "--micro-batch-size", str(args.micro_batch_size), "--seq-len", str(args.seq_len),
                       "--device", args.device, "--dtype", args.dtype]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs[shape][method].append(json.loads(out.strip().splitlines()[-1]))
                print(f"round {r + 1}/{args.rounds} {shape} {method}: median step "
                      f"{statistics.median(runs[shape][method][-1]['times']):.3f} s", file=sys.stderr, flush=True)
    summary = summarize(runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "summary": summary, "runs": runs}, indent=2))
    memory = "peak allocated (MB)" if args.device == "cuda" else "peak RSS (MB)"
    print(f"| shape | method | step (s) | tokens/s | / floor | / PEFT | CPU (s) | CPU / floor | CPU / PEFT | {memory} "
          "| peak / PEFT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, s in summary.items():
        for method, row in s.items():
            print(f"| {shape} | {method} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['vs_floor']:.2f} "
                  f"| {row['vs_peft']:.2f} | {row['cpu_s']:.3f} | {row['cpu_vs_floor']:.2f} | {row['cpu_vs_peft']:.2f} "
                  f"| {row['peak_mb']:.0f} | {row['peak_vs_peft']:.2f} |")
    for shape, s in summary.items():
        print(f"{shape}: bilora / lora {s['bilora']['vs_lora']:.3f} (CPU {s['bilora']['cpu_vs_lora']:.3f})")


if __name__ == "__main__":
    main()
