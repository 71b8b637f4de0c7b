"""Step time of --compile (regional torch.compile of the decoder blocks) against eager, side by side in one run.

    python benchmarks/compile_cost.py [--model DIR] [--steps 8]

Both variants are `launch/train.py` processes on the default model (lora, micro-batch 8, every row truncated to
--seq-len 256 so the shapes stay fixed, no gradient checkpointing), on the plain-text records of
feature_cost.py; the step time is the median of the steps after the first two (the first includes the compile).
Results: benchmarks/results/compile_cost.json and one line per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from feature_cost import write_records  # noqa: E402

BASE = ["--method", "lora", "--micro-batch-size", "8", "--seq-len", "256", "--gradient-checkpointing", "false",
        "--eval-on-start", "false", "--eval-batch-size", "8", "--replica-check-every", "0", "--warmup-ratio", "0"]
VARIANTS = {"eager": [], "--compile": ["--compile"]}


def run_variant(data: Path, flags: list[str], out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "launch/train.py", "--data", str(data), "--eval-data", str(data), "--max-steps",
           str(args.steps), "--output-dir", str(out), *BASE, *flags] + (["--model", args.model] if args.model else [])
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows if "loss" in r]
    times = [b - a for a, b in zip(elapsed, elapsed[1:])][1:]
    return {"flags": flags, "first_step_s": elapsed[0], "step_s": statistics.median(times),
            "losses": [r["loss"] for r in rows if "loss" in r]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_records(Path(tmp))["long"]
        for i, (name, flags) in enumerate(VARIANTS.items()):
            results[name] = r = run_variant(data, flags, Path(tmp) / f"run{i}", args)
            print(f"{name}: first step {r['first_step_s']:.1f} s, then {r['step_s']:.2f} s/step", flush=True)
    ratio = results["--compile"]["step_s"] / results["eager"]["step_s"]
    print(f"--compile / eager step time: {ratio:.3f}")
    out = ROOT / "benchmarks" / "results" / "compile_cost.json"
    out.write_text(json.dumps({"variants": results, "compile_over_eager": ratio}, indent=1))


if __name__ == "__main__":
    main()
