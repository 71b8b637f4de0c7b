"""Limited-data generalization study: lora, lora-sam and bilora on the WordNet supersense task, with held-out
accuracy, loss and the sharpness of every final adapter.

    python benchmarks/generalization.py [--sizes 8,16,32] [--seeds 0,1,2] [--configs NAME,...] [--epochs 3]

Data: `benchmarks/data/wordnet_study/` (24 classes, 32 training glosses per class, 45 held-out per class =
1080; rebuilt by `scripts/build_wordnet_task.py --train-per-class 32 --eval-per-class 45 --skip-small --seed 1
--out-dir benchmarks/data/wordnet_study` from the wordnet-base Debian package). A run with k examples per class
trains on the first k of each class in file order. Every configuration of one size trains the same number of
steps (`--epochs` passes over the k x 24 examples, micro-batch 8) with the same seeds. Each run is one
`launch/train.py` on the embedded model, evaluated once at the end on all 1080 held-out examples, then
`launch/sharpness.py` on its adapter over the first `--sharpness-examples` held-out examples.

Runs are kept under `--work` (one directory each, reused when its results exist), so the study can be run in
parts (`--sizes`, `--seeds`, `--configs`) and resumed; `--jobs 2` runs two at a time, one CPU thread each.
Results: `--out` (every run, and the mean and standard error per size and configuration) and a markdown table
on stdout; `--plot` draws accuracy against data size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "wordnet_study"
CONFIGS = {
    "lora": ["--method", "lora"],
    "lora-sam rho 0.01": ["--method", "lora-sam", "--rho", "0.01"],
    "lora-sam rho 0.05": ["--method", "lora-sam", "--rho", "0.05"],
    "bilora rho 0.01": ["--method", "bilora", "--rho", "0.01"],
    "bilora rho 0.05": ["--method", "bilora", "--rho", "0.05"],
    "bilora rho 0.1": ["--method", "bilora", "--rho", "0.1"],
}
MICRO_BATCH = 8
SHARPNESS_RHOS = "0.01,0.05,0.1"


def subset(k: int, folder: Path) -> Path:
    """The first k training records of each class, in file order, as a .jsonl file."""
    path = folder / f"train_{k}.jsonl"
    if not path.exists():
        seen: dict[str, int] = {}
        rows = []
        for line in (DATA / "train.jsonl").read_text().splitlines():
            label = json.loads(line)["completion"]
            seen[label] = seen.get(label, 0) + 1
            if seen[label] <= k:
                rows.append(line)
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")
    return path


def run_one(size: int, config: str, seed: int, args: argparse.Namespace) -> dict:
    """Train, evaluate and probe one run (or read its results if it ran before)."""
    out = args.work / f"k{size}" / config.replace(" ", "_") / f"seed{seed}"
    result_file = out / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    train = subset(size, args.work)
    records = sum(1 for _ in train.open())
    steps = max(1, round(args.epochs * records / MICRO_BATCH))
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else None  # one core per run
    subprocess.run([sys.executable, "launch/train.py", *CONFIGS[config], "--data", str(train), "--eval-data",
                    str(DATA / "eval.jsonl"), "--max-steps", str(steps), "--micro-batch-size", str(MICRO_BATCH),
                    "--seed", str(seed), "--eval-on-start", "false", "--output-dir", str(out), "--data-cache",
                    "none", "--replica-check-every", "0", *(["--model", args.model] if args.model else [])], cwd=ROOT, check=True, capture_output=True,
                   text=True, env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "accuracy" in r][-1]
    train_s = time.perf_counter() - started
    subprocess.run([sys.executable, "launch/sharpness.py", "--adapter", str(out / "adapter"), "--data",
                    str(DATA / "eval.jsonl"), "--max-examples", str(args.sharpness_examples), "--rho",
                    SHARPNESS_RHOS, "--draws", "3", "--adv-steps", "3", "--seed", str(seed), "--out",
                    str(out / "sharpness.json"), "--data-cache", "none"],
                   cwd=ROOT, check=True, capture_output=True, text=True, env=env)
    sharp = json.loads((out / "sharpness.json").read_text())
    result = {"size": size, "config": config, "seed": seed, "steps": steps, "accuracy": final["accuracy"],
              "eval_loss": final["eval_loss"], "train_s": train_s, "probe_s": time.perf_counter() - started - train_s,
              "sharpness": {str(r["rho"]): {k: r[k] for k in ("random_mean", "adversarial", "lora_adversarial")}
                            for r in sharp["results"]}}
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def summarise(runs: list[dict]) -> list[dict]:
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["size"], r["config"]), []).append(r)
    rows = []
    for (size, config), group in sorted(groups.items(), key=lambda g: (g[0][0], list(CONFIGS).index(g[0][1]))):
        row = {"size": size, "config": config, "seeds": len(group), "steps": group[0]["steps"]}
        for key in ("accuracy", "eval_loss"):
            row[key] = mean_se([r[key] for r in group])
        row["adversarial"] = {rho: mean_se([r["sharpness"][rho]["adversarial"] for r in group])
                              for rho in group[0]["sharpness"]}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    rhos = list(rows[0]["adversarial"]) if rows else []
    head = "| per class | config | seeds | steps | accuracy % | held-out loss | " + " | ".join(
        f"adv. sharpness rho {rho}" for rho in rhos) + " |"
    lines = [head, "|" + "---|" * (6 + len(rhos))]
    for r in rows:
        acc, loss = r["accuracy"], r["eval_loss"]
        lines.append(f"| {r['size']} | {r['config']} | {r['seeds']} | {r['steps']} | {100 * acc[0]:.1f} ± "
                     f"{100 * acc[1]:.1f} | {loss[0]:.3f} ± {loss[1]:.3f} | " + " | ".join(
                         f"{r['adversarial'][rho][0]:.4f} ± {r['adversarial'][rho][1]:.4f}" for rho in rhos) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for config in CONFIGS:
        points = [r for r in rows if r["config"] == config]
        if points:
            ax.errorbar([r["size"] for r in points], [100 * r["accuracy"][0] for r in points],
                        yerr=[100 * r["accuracy"][1] for r in points], marker="o", capsize=3, label=config)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("held-out accuracy (%), mean ± s.e.")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="8,16,32")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--sharpness-examples", type=int, default=128)
    parser.add_argument("--model", default="", help="base model (default: the embedded one)")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "generalization_runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generalization.json")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each on one CPU thread when > 1)")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; one of: {', '.join(CONFIGS)}")
    plan = [(int(k), c, int(s)) for k in args.sizes.split(",") for c in configs for s in args.seeds.split(",")]
    for size in {p[0] for p in plan}:
        subset(size, args.work)  # written once, before runs share it

    def one(i: int) -> dict:
        size, config, seed = plan[i]
        r = run_one(size, config, seed, args)
        print(f"[{i + 1}/{len(plan)}] {size}/class, {config}, seed {seed}: accuracy {100 * r['accuracy']:.1f} %, "
              f"loss {r['eval_loss']:.3f}, {r['train_s']:.0f} s + probe {r['probe_s']:.0f} s", flush=True)
        return r

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one, range(len(plan))))
    rows = summarise(runs)
    args.out.write_text(json.dumps({"runs": runs, "summary": rows}, indent=1) + "\n")
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
