"""Does the auxiliary follow the ascent? Bi-LoRA's auxiliary variants on one training run each, traced by
--aux-diagnostics-every, next to LoRA's step time, side by side in one run (CPU).

    python benchmarks/aux_variants.py [--size 8] [--seed 0] [--every 4] [--rho 0.05] [--variants A,B] [--out FILE.json]
    python benchmarks/aux_variants.py --plot docs/results/aux_trace.png FILE.json [FILE.json ...]

Every variant trains the default model on the WordNet task of benchmarks/generalization.py (k per class, 3
epochs, micro-batch 8, its defaults otherwise), evaluated at the end on a validation split carved from the
training file: the last VALIDATION_PER_CLASS glosses of each class, which no size up to 32 - 4 trains on. The
held-out set is never read, so this is what variants and radii are chosen by. Reported per variant: aux_gain_ratio and
aux_alignment (mean over the diagnostics steps of the second half of training; docs/bilora.md),
and the median step time of the steps that are not diagnostics steps, over LoRA's, with the mean next to it.
A refresh step that is also a diagnostics step (every one, when K is a multiple of --every) is left out of
both, so a refresh's cost is read from --aux-refresh 1, whose every step refreshes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from generalization import MICRO_BATCH, TASKS, subset  # noqa: E402

VARIANTS = {
    "lora": ["--method", "lora"],
    "bilora (paper)": [],
    "--aux-lr-scale 10 --aux-schedule constant": ["--aux-lr-scale", "10", "--aux-schedule", "constant"],
    "--aux-refresh 10": ["--aux-refresh", "10"],
    "--aux-refresh 10 --rho 0.01": ["--aux-refresh", "10", "--rho", "0.01"],
    "--aux-refresh 4": ["--aux-refresh", "4"],
    "--aux-refresh 1": ["--aux-refresh", "1"],
    "--aux-optimizer sgd-normalized --aux-lr-scale 100": ["--aux-optimizer", "sgd-normalized", "--aux-lr-scale",
                                                          "100"],
}
VALIDATION_PER_CLASS = 4


def validation_split(folder: Path) -> Path:
    """The last VALIDATION_PER_CLASS training glosses of each class, as a .jsonl file."""
    lines = (TASKS["wordnet"][0] / "train.jsonl").read_text().splitlines()
    labels = [json.loads(line)["completion"] for line in lines]
    total = Counter(labels)
    seen: dict[str, int] = {}
    rows = []
    for line, label in zip(lines, labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > total[label] - VALIDATION_PER_CLASS:
            rows.append(line)
    path = folder / "validation.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def run_variant(flags: list[str], train: Path, validation: Path, steps: int, out: Path, args: argparse.Namespace) -> dict:
    method = [] if flags[:1] == ["--method"] else ["--method", "bilora", "--rho", str(args.rho),
                                                    "--aux-diagnostics-every", str(args.every)]
    cmd = [sys.executable, "launch/train.py", *method, *flags, "--data", str(train), "--eval-data", str(validation),
           "--max-steps", str(steps), "--micro-batch-size", str(MICRO_BATCH), "--seed", str(args.seed),
           "--eval-on-start", "false", "--output-dir", str(out), "--replica-check-every", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval_loss" in r][-1]
    steps_rows = [r for r in rows if "loss" in r]
    times = [(b["step"], b["elapsed_s"] - a["elapsed_s"]) for a, b in zip(steps_rows, steps_rows[1:])]
    plain = [t for step, t in times if method == [] or (step - 1) % args.every]
    traced = [r for r in steps_rows if r.get("aux_alignment") is not None and r["step"] > steps / 2]
    mean = lambda key: statistics.mean(r[key] for r in traced) if traced else None  # noqa: E731
    return {"flags": flags, "step_s_median": statistics.median(plain), "step_s_mean": statistics.mean(plain),
            "aux_gain_ratio": mean("aux_gain_ratio"), "aux_alignment": mean("aux_alignment"),
            "trace": [{k: r.get(k) for k in ("step", "aux_alignment", "aux_gain_ratio", "aux_gain")}
                      for r in steps_rows if "aux_gain" in r],
            "final_loss": statistics.mean(r["loss"] for r in steps_rows[-max(1, steps // 10):]),
            "val_accuracy": final.get("accuracy"), "val_loss": final["eval_loss"]}


def plot(files: list[Path], path: Path) -> None:
    """aux_gain_ratio against the step, one line per variant of the results `files`, with the 30 % target."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    traces = {}  # a variant in several files: the last file's run (reruns agree to 5 significant digits)
    for file in files:
        for name, r in json.loads(file.read_text())["variants"].items():
            if points := [(t["step"], t["aux_gain_ratio"]) for t in r["trace"] if t["aux_gain_ratio"] is not None]:
                traces[name] = points
    fig, axis = plt.subplots(figsize=(9, 4.2))
    for name, points in traces.items():
        axis.plot(*zip(*points), marker=".", label=name if name != "bilora (paper)" else "the paper's update")
    axis.axhline(0.3, color="grey", linestyle="--", linewidth=1, label="target 0.3")
    axis.axhline(0, color="black", linewidth=0.5)
    axis.set_xlabel("step")
    axis.set_ylabel("aux_gain_ratio (of the best first-order gain)")
    axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS; lora "
                        "always runs first, as the step-time reference")
    parser.add_argument("--plot", type=Path, default=None, help="draw the traces of the results files given")
    parser.add_argument("files", nargs="*", type=Path, help="results files, with --plot")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "aux_variants.json"))
    args = parser.parse_args()
    if args.plot:
        return plot(args.files, args.plot)
    names = ["lora"] + [v.strip() for v in args.variants.split(",") if v.strip() != "lora"]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; one of: {', '.join(VARIANTS)}")
    if args.size > 32 - VALIDATION_PER_CLASS:
        parser.error(f"--size at most {32 - VALIDATION_PER_CLASS}: the last {VALIDATION_PER_CLASS} of each class "
                     "are the validation split")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = subset("wordnet", args.size, work)
        validation = validation_split(work)
        steps = round(3 * sum(1 for _ in train.open()) / MICRO_BATCH)
        for i, name in enumerate(names):
            results[name] = r = run_variant(VARIANTS[name], train, validation, steps, work / f"run{i}", args)
            lora = results["lora"]["step_s_median"]
            print(f"{name}: aux_gain_ratio {r['aux_gain_ratio']}, aux_alignment {r['aux_alignment']}, step "
                  f"{r['step_s_median'] / lora:.3f}x lora (mean {r['step_s_mean'] / results['lora']['step_s_mean']:.3f}x), "
                  f"validation accuracy {r['val_accuracy']:.3f}", flush=True)
            Path(args.out).write_text(json.dumps({"settings": vars(args), "steps": steps, "variants": results}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
