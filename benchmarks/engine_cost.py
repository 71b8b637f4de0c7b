"""Per-rank peak memory and step time of single vs ZeRO-3 vs FSDP2 (2 ranks), side by side in one run.

    python benchmarks/engine_cost.py [--model DIR] [--steps 8] [--method bilora]

Each engine trains the default model through the real launcher (python / deepspeed / torchrun) on the
same global batch; the numbers come from each run's metrics.jsonl. Also reported: the bytes of the one
adapter-gradient all-reduce per step next to the adapter size, and the ring all-reduce traffic per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


LAUNCHERS = {
    "single": lambda: [sys.executable, "launch/train.py", "--grad-accum", "2"],
    "zero3": lambda: ["deepspeed", "--num_gpus", "2", "--master_port", _port(), "launch/train.py",
                      "--ds_config", "ds_configs/zero3.json"],
    "fsdp2": lambda: ["torchrun", "--nproc_per_node", "2", "--master_port", _port(), "launch/train.py",
                      "--engine", "fsdp"],
}


def run(engine: str, args: argparse.Namespace, workdir: Path, eval_file: Path) -> dict:
    out = workdir / engine
    cmd = LAUNCHERS[engine]() + ["--max-steps", str(args.steps), "--method", args.method, "--micro-batch-size",
                                 "4", "--eval-data", str(eval_file), "--output-dir", str(out)]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if engine != "single" else os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows if "loss" in r]
    summary = next(r for r in rows if "base_held_numel" in r)
    return {"step_s": statistics.median(b - a for a, b in zip(elapsed[1:], elapsed[2:])),
            "peak_mem_mb": summary["peak_mem_mb"], "base_held_numel": summary["base_held_numel"],
            "base_numel": summary["base_numel"], "adapter_numel": summary["adapter_numel"],
            "adapter_sync_bytes": summary["adapter_sync_bytes"], "world_size": summary["world_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--method", default="bilora")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_cost.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bilora_dist.model.embedded import DEFAULT_EVAL

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        eval_file = Path(tmp) / "eval.jsonl"
        eval_file.write_text("".join(DEFAULT_EVAL.read_text().splitlines(keepends=True)[:32]))
        for engine in LAUNCHERS:
            results[engine] = run(engine, args, Path(tmp), eval_file)
            print(f"{engine}: {results[engine]['step_s']:.2f} s/step", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "results": results}, indent=2))
    base = results["single"]
    print("| engine | ranks | step (s) | step / single | peak memory per rank (MB) | base held per rank |")
    print("|---|---|---|---|---|---|")
    for engine, r in results.items():
        held = ", ".join(f"{h / r['base_numel']:.1%}" for h in r["base_held_numel"])
        print(f"| {engine} | {r['world_size']} | {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f} | "
              f"{', '.join(f'{m:.0f}' for m in r['peak_mem_mb'])} | {held} |")
    sync = results["zero3"]["adapter_sync_bytes"]
    world = results["zero3"]["world_size"]
    print(f"\nadapter gradient sync: one all-reduce of {sync / 2**20:.2f} MiB per step "
          f"(adapters {results['zero3']['adapter_numel'] * 4 / 2**20:.2f} MiB fp32, plus 2 floats of loss/token "
          f"count); ring traffic per rank {2 * (world - 1) / world * sync / 2**20:.2f} MiB sent and received")


if __name__ == "__main__":
    main()
