"""Compressing a Llama-2-7B-shaped adapter (32 blocks x 7 linear layers, r 64 -> 16, random factors):
our factored path vs PEFT add_weighted_adapter(combination_type="svd") vs dense torch.linalg.svd.

    python benchmarks/squeeze_cost.py [--blocks-dense 1]
    python benchmarks/squeeze_cost.py --baseline 320dca3,aeb454e [--rounds 3] [--threads 2,1] [--blocks 32]

Each path runs in its own worker process (peak RSS is per path). The factored path compresses all 224
layers; the dense and PEFT paths, which take seconds per layer, run on --blocks-dense blocks and are
scaled to 32 blocks (every block has the same shapes). Error: ||s'B'A' - [ΔW]_16||_F / ||[ΔW]_16||_F
against the exact truncated SVD in float64, on the first block.

--baseline REV[,REV] (git revisions, their bilora_dist/ extracted by `git archive` into a temporary directory) or
--baseline-src DIR (a source tree holding bilora_dist/) compares the factored path of that source with this
checkout's, side by side: --rounds rounds, each running one fresh worker per (source, thread count) in
turn, so both sources see the same machine load; reports the median and the fastest round of each, and
whether the sources give the same factors bit for bit (sha256 of the new flat tensor; --with-error adds the error
above, from the first round), written to results/squeeze_cost_compare.json unless --out. The dense and PEFT
paths are not run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

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


def run_ours(blocks: int, error: bool = True) -> dict:
    import torch

    import bilora_dist
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
            "rel_error": exact_error(layers, results) if error else None, "threads": torch.get_num_threads(),
            "factors_sha256": hashlib.sha256(new.flat.detach().numpy().tobytes()).hexdigest(),
            "source": str(Path(bilora_dist.__file__).parent.parent)}


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


OURS = "ours (factored QR+SVD)"
WORKERS = {OURS: run_ours, "dense torch.linalg.svd": run_dense,
           "PEFT add_weighted_adapter svd": run_peft}


def baseline_tree(revision: str, into: Path) -> Path:
    """bilora_dist/ as of `revision`, extracted into `into` (the checkout is not touched)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision, "bilora_dist"],
                             capture_output=True, check=True).stdout
    into.mkdir(parents=True)
    archive_path = into / "src.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(into / "src", filter="data")
    return into / "src"


def compare(args: argparse.Namespace) -> None:
    """The factored path of a baseline source against this checkout's, interleaved round by round."""
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline_src:
            sources = {f"baseline {args.baseline_src}": Path(args.baseline_src).resolve()}
        else:  # one or more revisions, comma-separated
            sources = {f"baseline {rev}": baseline_tree(rev, Path(tmp) / rev) for rev in args.baseline.split(",")}
        sources["current checkout"] = ROOT
        threads = [int(t) for t in args.threads.split(",")]
        runs: dict[str, list[dict]] = {f"{name}, {t} thread{'s' * (t > 1)}": [] for t in threads for name in sources}
        for round_ in range(args.rounds):
            for t in threads:
                for name, src in sources.items():
                    env = {**os.environ, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
                    first = not round_ and t == threads[0]
                    error = ["--error"] if args.with_error and first else []  # dense float64 SVDs: minutes
                    done = subprocess.run([sys.executable, __file__, "--worker", OURS, "--src", str(src),
                                           "--blocks", str(args.blocks)] + error, capture_output=True, text=True,
                                          env=env)
                    if done.returncode:
                        sys.exit(f"{name} worker failed:\n{done.stderr}")
                    r = json.loads(done.stdout.strip().splitlines()[-1]) | {"load_1min": os.getloadavg()[0]}
                    assert Path(r.pop("source")).resolve() == src.resolve(), f"worker imported the wrong source for {name}"
                    key = f"{name}, {t} thread{'s' * (t > 1)}"
                    runs[key].append(r)
                    print(f"round {round_ + 1} {key}: {r['seconds']:.2f} s (load {r['load_1min']:.1f})", file=sys.stderr)
    results = {"command": " ".join([Path(sys.executable).name, "benchmarks/squeeze_cost.py"] + sys.argv[1:]),
               "layers": runs[next(iter(runs))][0]["layers"], "cpu_cores": os.cpu_count(), "paths": {}}
    for key, rs in runs.items():
        seconds = [r["seconds"] for r in rs]
        results["paths"][key] = {"median_s": statistics.median(seconds), "min_s": min(seconds), "rounds_s": seconds,
                                 "load_1min": [r["load_1min"] for r in rs],
                                 "extra_peak_mb": max(r["extra_peak_mb"] for r in rs),
                                 "rel_error": next((r["rel_error"] for r in rs if r["rel_error"] is not None), None),
                                 "factors_sha256": rs[0]["factors_sha256"],
                                 "same_factors_every_round": len({r["factors_sha256"] for r in rs}) == 1}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"factored squeeze of {results['layers']} layers, r {R} -> {K}, {args.rounds} interleaved rounds")
    print("| source | threads | median (s) | fastest (s) | rel. error vs exact | factors (sha256) |")
    print("|---|---|---|---|---|---|")
    for key, r in results["paths"].items():
        name, t = key.rsplit(", ", 1)
        error = "—" if r["rel_error"] is None else f"{r['rel_error']:.1e}"
        print(f"| {name} | {t.split()[0]} | {r['median_s']:.2f} | {r['min_s']:.2f} | {error} | "
              f"{r['factors_sha256'][:12]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks-dense", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=32, help="blocks of the factored path (7 layers each)")
    parser.add_argument("--out", help="result JSON (default: results/squeeze_cost.json, or "
                                      "results/squeeze_cost_compare.json with a baseline)")
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", metavar="REV[,REV]", help="git revision(s) whose factored path to compare against")
    baseline.add_argument("--baseline-src", metavar="DIR", help="source tree (holding bilora_dist/) to compare against")
    parser.add_argument("--rounds", type=int, default=3, help="with a baseline: interleaved rounds")
    parser.add_argument("--threads", default="2", help="with a baseline: intra-op thread counts, e.g. 2,1")
    parser.add_argument("--with-error", action="store_true",
                        help="with a baseline: also the error against the exact SVD (first round; minutes)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--error", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.src:  # import bilora_dist from this tree, ahead of the installed package
            sys.path.insert(0, args.src)
        if args.worker == OURS:
            print(json.dumps(run_ours(args.blocks, error=args.error or not args.src)))
        else:
            print(json.dumps(WORKERS[args.worker](args.blocks_dense)))
        return
    results_dir = Path(__file__).parent / "results"
    if args.baseline or args.baseline_src:
        args.out = args.out or str(results_dir / "squeeze_cost_compare.json")
        compare(args)
        return
    args.out = args.out or str(results_dir / "squeeze_cost.json")
    results = {}
    for name in WORKERS:
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--blocks-dense", str(args.blocks_dense),
                              "--blocks", str(args.blocks)], capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        r["seconds_224_layers"] = r["seconds"] * 224 / r["layers"]
        results[name] = r
        print(f"{name}: {r['seconds']:.2f} s for {r['layers']} layers", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    ours = results[OURS]["seconds_224_layers"]
    print("| path | layers run | time for 224 layers (s) | vs ours | extra peak RSS (MB) | rel. error vs exact |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['layers']} | {r['seconds_224_layers']:.2f} | {r['seconds_224_layers'] / ours:.0f}x | "
              f"{r['extra_peak_mb']:.0f} | {r['rel_error']:.1e} |")


if __name__ == "__main__":
    main()
