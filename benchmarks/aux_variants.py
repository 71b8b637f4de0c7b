"""Does the auxiliary follow the ascent? Bi-LoRA's auxiliary variants on one training run each, traced by
--aux-diagnostics-every, next to LoRA's step time, side by side in one run (CPU).

    python benchmarks/aux_variants.py [--size 8] [--seed 0] [--every 4] [--rho 0.05] [--out FILE.json]

Every variant trains the default model on the WordNet task of benchmarks/generalization.py (k per class, 3
epochs, micro-batch 8, its defaults otherwise), evaluated at the end on the first 96 held-out glosses only: this
measures the training-side diagnostic, not held-out accuracy. Reported per variant: aux_gain_ratio and
aux_alignment (mean over the diagnostics steps of the second half of training; README "Bi-LoRA's auxiliary"),
and the median step time of the steps that are not diagnostics steps, over LoRA's (a refresh step counts: its
cost is amortised in the median only when it is rare, so the mean is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from generalization import MICRO_BATCH, TASKS, subset  # noqa: E402

VARIANTS = {
    "lora": ["--method", "lora"],
    "bilora (paper)": [],
    "--aux-lr-scale 10 --aux-schedule constant": ["--aux-lr-scale", "10", "--aux-schedule", "constant"],
    "--aux-refresh 10": ["--aux-refresh", "10"],
    "--aux-optimizer sgd-normalized --aux-lr-scale 100": ["--aux-optimizer", "sgd-normalized", "--aux-lr-scale",
                                                          "100"],
}


def run_variant(flags: list[str], train: Path, held_out: Path, steps: int, out: Path, args: argparse.Namespace) -> dict:
    method = [] if flags[:1] == ["--method"] else ["--method", "bilora", "--rho", str(args.rho),
                                                    "--aux-diagnostics-every", str(args.every)]
    cmd = [sys.executable, "launch/train.py", *method, *flags, "--data", str(train), "--eval-data", str(held_out),
           "--max-steps", str(steps), "--micro-batch-size", str(MICRO_BATCH), "--seed", str(args.seed),
           "--eval-on-start", "false", "--output-dir", str(out), "--replica-check-every", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "loss" in r]
    times = [(b["step"], b["elapsed_s"] - a["elapsed_s"]) for a, b in zip(steps_rows, steps_rows[1:])]
    plain = [t for step, t in times if method == [] or (step - 1) % args.every]
    traced = [r for r in steps_rows if r.get("aux_alignment") is not None and r["step"] > steps / 2]
    mean = lambda key: statistics.mean(r[key] for r in traced) if traced else None  # noqa: E731
    return {"flags": flags, "step_s_median": statistics.median(plain), "step_s_mean": statistics.mean(plain),
            "aux_gain_ratio": mean("aux_gain_ratio"), "aux_alignment": mean("aux_alignment"),
            "trace": [{k: r.get(k) for k in ("step", "aux_alignment", "aux_gain_ratio", "aux_gain")}
                      for r in steps_rows if "aux_gain" in r],
            "final_loss": statistics.mean(r["loss"] for r in steps_rows[-max(1, steps // 10):])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "aux_variants.json"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = subset("wordnet", args.size, work)
        held_out = work / "held_out.jsonl"
        held_out.write_text("\n".join((TASKS["wordnet"][0] / "eval.jsonl").read_text().splitlines()[:96]) + "\n")
        steps = round(3 * sum(1 for _ in train.open()) / MICRO_BATCH)
        for i, (name, flags) in enumerate(VARIANTS.items()):
            results[name] = r = run_variant(flags, train, held_out, steps, work / f"run{i}", args)
            lora = results["lora"]["step_s_median"]
            print(f"{name}: aux_gain_ratio {r['aux_gain_ratio']}, aux_alignment {r['aux_alignment']}, step "
                  f"{r['step_s_median'] / lora:.3f}x lora (mean {r['step_s_mean'] / results['lora']['step_s_mean']:.3f}x)",
                  flush=True)
            Path(args.out).write_text(json.dumps({"settings": vars(args), "steps": steps, "variants": results}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
