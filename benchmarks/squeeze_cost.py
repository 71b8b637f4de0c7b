"""Compressing a Llama-2-7B-shaped adapter (32 blocks x 7 linear layers, r 64 -> 16, random factors):
our factored path vs PEFT add_weighted_adapter(combination_type="svd") vs dense torch.linalg.svd.

    python benchmarks/squeeze_cost.py [--blocks-dense 1]

Each path runs in its own worker process (peak RSS is per path). The factored path compresses all 224
layers; the dense and PEFT paths, which take seconds per layer, run on --blocks-dense blocks and are
scaled to 32 blocks (every block has the same shapes). Error: ||s'B'A' - [ΔW]_16||_F / ||[ΔW]_16||_F
against the exact truncated SVD in float64, on the first block.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BLOCK = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
         ("gate_proj", 4096, 11008), ("up_proj", 4096, 11008), ("down_proj", 11008, 4096)]  # (name, n, m)
R, K, ALPHA = 64, 16, 128.0


def factors(blocks: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for b in range(blocks):
        for name, n, m in BLOCK:
            decay = torch.logspace(0, -2, R)
            out.append((f"layers.{b}.{name}", torch.randn(R, n, generator=gen) * decay[:, None] / n ** 0.5,
                        torch.randn(m, R, generator=gen) / R ** 0.5))
    return out


def exact_error(layers, results) -> float:
    """Worst relative error over the first block against the float64 truncated SVD."""
    import torch

    worst = 0.0
    for (name, A, B), (A2, B2, s2) in zip(layers[:len(BLOCK)], results[:len(BLOCK)]):
        M = (ALPHA / R) * B.double() @ A.double()
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        best = (U[:, :K] * S[:K]) @ Vh[:K]
        worst = max(worst, float((s2 * B2.double() @ A2.double() - best).norm() / best.norm()))
    return worst


def run_ours(blocks: int) -> dict:
    import torch

    from bilora_dist.adapters.bank import Branch, LayerShape
    from bilora_dist.squeeze import squeeze_branch

    layers = factors(blocks)
    branch = Branch.from_factors([LayerShape(name, A.shape[1], B.shape[0]) for name, A, B in layers],
                                 [(A, B) for _, A, B in layers], [ALPHA / R] * len(layers))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    new, _ = squeeze_branch(branch, K)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = [(*new.factors(i), new.scales[i]) for i in range(len(BLOCK))]
    return {"layers": len(layers), "seconds": seconds, "extra_peak_mb": (peak - base) / 1024,
            "rel_error": exact_error(layers, results), "threads": torch.get_num_threads()}


def run_dense(blocks: int) -> dict:
    import torch

    layers = factors(blocks)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    results = []
    for _, A, B in layers:
        U, S, Vh = torch.linalg.svd((ALPHA / R) * B @ A, full_matrices=False)
        d = (S[:K] / (ALPHA / R)).sqrt()
        results.append((d[:, None] * Vh[:K], U[:, :K] * d, ALPHA / R))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"layers": len(layers), "seconds": seconds, "extra_peak_mb": (peak - base) / 1024,
            "rel_error": exact_error(layers, results)}


def run_peft(blocks: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    layers = factors(blocks)

    class Stack(nn.Module):  # the linear layers under their 7B names; base weights are allocated, never touched
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Module() for _ in range(blocks))
            for b in range(blocks):
                for name, n, m in BLOCK:
                    setattr(self.layers[b], name, torch.nn.utils.skip_init(nn.Linear, n, m, bias=False))

    model = get_peft_model(Stack(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[n for n, _, _ in BLOCK]))
    with torch.no_grad():
        for name, A, B in layers:
            module = model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight = nn.Parameter(A)
            module.lora_B["default"].weight = nn.Parameter(B)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    # PEFT turns a one-adapter merge into "linear" (no SVD); listing the adapter twice at weight 1/2 keeps
    # ΔW unchanged and takes its SVD path.
    model.add_weighted_adapter(["default", "default"], [0.5, 0.5], "squeezed", combination_type="svd", svd_rank=K)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = []
    for name, _, _ in layers[:len(BLOCK)]:
        module = model.base_model.model.get_submodule(name)
        results.append((module.lora_A["squeezed"].weight.detach(), module.lora_B["squeezed"].weight.detach(),
                        module.scaling["squeezed"]))
    return {"layers": len(layers), "seconds": seconds, "extra_peak_mb": (peak - base) / 1024,
            "rel_error": exact_error(layers, results)}


WORKERS = {"ours (factored QR+SVD)": run_ours, "dense torch.linalg.svd": run_dense,
           "PEFT add_weighted_adapter svd": run_peft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks-dense", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "squeeze_cost.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        blocks = 32 if args.worker.startswith("ours") else args.blocks_dense
        print(json.dumps(WORKERS[args.worker](blocks)))
        return
    results = {}
    for name in WORKERS:
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--blocks-dense", str(args.blocks_dense)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        r["seconds_224_layers"] = r["seconds"] * 224 / r["layers"]
        results[name] = r
        print(f"{name}: {r['seconds']:.2f} s for {r['layers']} layers", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    ours = results["ours (factored QR+SVD)"]["seconds_224_layers"]
    print("| path | layers run | time for 224 layers (s) | vs ours | extra peak RSS (MB) | rel. error vs exact |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['layers']} | {r['seconds_224_layers']:.2f} | {r['seconds_224_layers'] / ours:.0f}x | "
              f"{r['extra_peak_mb']:.0f} | {r['rel_error']:.1e} |")


if __name__ == "__main__":
    main()
