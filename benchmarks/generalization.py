"""Limited-data generalization study: lora, lora-sam and bilora with held-out accuracy or loss and the sharpness
of every final adapter, on two tasks of different kinds.

    python benchmarks/generalization.py [--task wordnet|quotes] [--sizes 8,16,32] [--seeds 0,1,2] [--configs ...]

Tasks (the data directories say how they were built):
- `wordnet`: classification. `benchmarks/data/wordnet_study/`: WordNet noun supersenses, gloss -> one-token label,
  24 classes, 32 training glosses per class, 45 held-out per class = 1080 (`scripts/build_wordnet_task.py
  --train-per-class 32 --eval-per-class 45 --skip-small --seed 1 --out-dir benchmarks/data/wordnet_study` from the
  wordnet-base Debian package). A size k trains on the first k of each class in file order; held-out accuracy
  and loss on all 1080.
- `quotes`: style tuning (language modelling). `benchmarks/data/quotes_study/`: 256 training and 900 held-out
  attributed quotations, plain text (`scripts/build_quotes_task.py --fortunes DIR --copyright FILE --eval 900
  --out-dir benchmarks/data/quotes_study` from the fortunes Debian package). A size k trains on the first k
  quotations; held-out loss (perplexity = exp) on all 900.

Every configuration of one size trains the same number of steps (`--epochs` passes over the training records,
micro-batch 8) with the same seeds. Each run is one `launch/train.py` on the embedded model, evaluated once at
the end on the whole held-out set, then `launch/sharpness.py --measure adversarial` on its adapter (the loss
increase under the adversarial perturbation of radius rho of the adapted weights, 3 ascent steps) over the first
`--sharpness-examples` held-out examples.

Every finished run is added to `--out` at once (with the settings it ran under) and is not run again, so the
study can be run in parts (`--sizes`, `--seeds`, `--configs`), one part after another, and resumed; a results file
made under other settings is refused rather than mixed. `--jobs 2` runs two at a time, one CPU thread each.
`--out` holds every run and the mean and standard error per size and configuration; a markdown table goes to
stdout; `--plot` draws accuracy (wordnet) or held-out loss (quotes) against data size, its difference to lora
paired by seed, and the adversarial sharpness against rho. Run directories (adapters, metrics) go under `--work`;
a run missing from `--out` is trained again from scratch.
"""

from __future__ import annotations

import argparse
import json
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
TASKS = {  # name -> (data directory, what a size counts, default sizes)
    "wordnet": (DATA / "wordnet_study", "examples per class", "8,16,32"),
    "quotes": (DATA / "quotes_study", "training quotations", "64,128,256"),
}
CONFIGS = {
    "lora": ["--method", "lora"],
    "lora-sam rho 0.01": ["--method", "lora-sam", "--rho", "0.01"],
    "lora-sam rho 0.05": ["--method", "lora-sam", "--rho", "0.05"],
    "bilora rho 0.01": ["--method", "bilora", "--rho", "0.01"],
    "bilora rho 0.05": ["--method", "bilora", "--rho", "0.05"],
    "bilora rho 0.1": ["--method", "bilora", "--rho", "0.1"],
    "bilora rho 0.05 refresh 1": ["--method", "bilora", "--rho", "0.05", "--aux-refresh", "1"],
    "bilora rho 0.05 refresh 10": ["--method", "bilora", "--rho", "0.05", "--aux-refresh", "10"],
    "bilora rho 0.01 refresh 10": ["--method", "bilora", "--rho", "0.01", "--aux-refresh", "10"],
}
MICRO_BATCH = 8
EVAL_BATCH = 32  # held-out batches are length-sorted, so a large batch costs little padding


def subset(task: str, k: int, folder: Path) -> Path:
    """The training records of size k, in file order, as a .jsonl file: the first k of each class (wordnet), or
    the first k records (quotes)."""
    path = folder / task / f"train_{k}.jsonl"
    if not path.exists():
        lines = (TASKS[task][0] / "train.jsonl").read_text().splitlines()
        if task == "wordnet":
            seen: dict[str, int] = {}
            rows = []
            for line in lines:
                label = json.loads(line)["completion"]
                seen[label] = seen.get(label, 0) + 1
                if seen[label] <= k:
                    rows.append(line)
        else:
            rows = lines[:k]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")
    return path


def child(cmd: list[str], env: dict[str, str]) -> None:
    """Run a launch script from the repository root; on failure, stop with the last lines of its output."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"error: {' '.join(cmd[1:3])} failed (exit {proc.returncode}):\n{tail}")


def run_one(size: int, config: str, seed: int, args: argparse.Namespace) -> dict:
    """Train, evaluate and probe one run; train_s is the wall time of the training call (loading, training and
    the held-out evaluation), probe_s that of the probe."""
    out = args.work / args.task / f"k{size}" / config.replace(" ", "_") / f"seed{seed}"
    train, held_out = subset(args.task, size, args.work), TASKS[args.task][0] / "eval.jsonl"
    records = sum(1 for _ in train.open())
    steps = max(1, round(args.epochs * records / MICRO_BATCH))
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted attempt left: not in the results, so not done
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this checkout
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"  # one core per run
    child([sys.executable, "launch/train.py", *CONFIGS[config], "--data", str(train), "--eval-data",
                    str(held_out), "--max-steps", str(steps), "--micro-batch-size", str(MICRO_BATCH),
                    "--eval-batch-size", str(EVAL_BATCH), "--seed", str(seed), "--eval-on-start", "false",
                    "--output-dir", str(out), "--data-cache", "none", "--replica-check-every", "0", "--bf16", args.bf16,
                    *(["--model", args.model] if args.model else [])], env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval_loss" in r][-1]
    train_s = time.perf_counter() - started
    child([sys.executable, "launch/sharpness.py", "--adapter", str(out / "adapter"), "--data",
                    str(held_out), "--max-examples", str(args.sharpness_examples), "--rho",
                    args.sharpness_rhos, "--measure", "adversarial", "--adv-steps", "3", "--batch-size",
                    str(EVAL_BATCH), "--seed", str(seed), "--out", str(out / "sharpness.json"), "--data-cache",
                    "none", "--bf16", args.bf16], env)
    sharp = json.loads((out / "sharpness.json").read_text())
    result = {"size": size, "config": config, "seed": seed, "steps": steps, "accuracy": final.get("accuracy"),
              "eval_loss": final["eval_loss"], "train_s": train_s, "probe_s": time.perf_counter() - started - train_s,
              "sharpness": {str(r["rho"]): {"adversarial": r["adversarial"]} for r in sharp["results"]}}
    return result


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def summarise(runs: list[dict]) -> list[dict]:
    """Per (size, config): seeds, steps, and the mean and standard error of accuracy (None without classes),
    held-out loss and the adversarial sharpness at each rho."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["size"], r["config"]), []).append(r)
    rows = []
    for (size, config), group in sorted(groups.items(), key=lambda g: (g[0][0], list(CONFIGS).index(g[0][1]))):
        row = {"size": size, "config": config, "seeds": len(group), "steps": group[0]["steps"]}
        for key in ("accuracy", "eval_loss"):
            row[key] = mean_se([r[key] for r in group]) if group[0][key] is not None else None
        row["adversarial"] = {rho: mean_se([r["sharpness"][rho]["adversarial"] for r in group])
                              for rho in group[0]["sharpness"]}
        rows.append(row)
    return rows


def paired_vs_lora(runs: list[dict]) -> list[dict]:
    """Per (size, config other than lora): mean and standard error over seeds of the difference to the lora run
    of the same size and seed (same data order), for accuracy (None without classes), held-out loss and the
    adversarial sharpness at each rho. Pairing removes what a seed does to every method alike."""
    lora = {(r["size"], r["seed"]): r for r in runs if r["config"] == "lora"}
    groups: dict[tuple[int, str], list[tuple[dict, dict]]] = {}
    for r in runs:
        if r["config"] != "lora" and (r["size"], r["seed"]) in lora:
            groups.setdefault((r["size"], r["config"]), []).append((r, lora[r["size"], r["seed"]]))
    rows = []
    for (size, config), pairs in sorted(groups.items(), key=lambda g: (g[0][0], list(CONFIGS).index(g[0][1]))):
        row = {"size": size, "config": config, "seeds": len(pairs)}
        for key in ("accuracy", "eval_loss"):
            row[key] = mean_se([r[key] - b[key] for r, b in pairs]) if pairs[0][0][key] is not None else None
        row["adversarial"] = {rho: mean_se([r["sharpness"][rho]["adversarial"] - b["sharpness"][rho]["adversarial"]
                                            for r, b in pairs]) for rho in pairs[0][0]["sharpness"]}
        rows.append(row)
    return rows


def table(rows: list[dict], unit: str, paired: bool = False) -> str:
    """Markdown table of `summarise` rows, or with `paired` of `paired_vs_lora` rows (signed, no steps column)."""
    rhos = list(rows[0]["adversarial"]) if rows else []
    sign, places = ("+", 4) if paired else ("", 3)  # paired loss differences are often below 0.001
    middle = ("config − lora, same seed | seeds | accuracy (points)" if paired
              else "config | seeds | steps | accuracy %")
    head = f"| {unit} | {middle} | held-out loss | " + " | ".join(f"adv. sharpness rho {rho}" for rho in rhos) + " |"
    lines = [head, "|" + "---|" * (5 + (not paired) + len(rhos))]
    for r in rows:
        acc, loss = r["accuracy"], r["eval_loss"]
        accuracy = f"{100 * acc[0]:{sign}.1f} ± {100 * acc[1]:.1f}" if acc else "—"
        steps = "" if paired else f"{r['steps']} | "
        lines.append(f"| {r['size']} | {r['config']} | {r['seeds']} | {steps}{accuracy} | "
                     f"{loss[0]:{sign}.{places}f} ± {loss[1]:.{places}f} | " + " | ".join(
                         f"{r['adversarial'][rho][0]:{sign}.4f} ± {r['adversarial'][rho][1]:.4f}"
                         for rho in rhos) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], paired: list[dict], path: Path, unit: str) -> None:
    """Three panels, one line per configuration, mean ± s.e. over seeds: held-out accuracy (or loss, for a task
    without classes) against data size; its difference to lora paired by seed, against data size, with the
    +0.5-point target of a classification task; adversarial sharpness against rho at the smallest size."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.2))
    smallest = min(r["size"] for r in rows)
    key, scale, label = ("accuracy", 100, "held-out accuracy (%)") if rows[0]["accuracy"] else (
        "eval_loss", 1, "held-out loss (nats per token)")
    for i, config in enumerate(CONFIGS):
        shift = 2 ** (0.03 * (i - len(CONFIGS) / 2))  # side by side at each size
        for axis, source in ((left, rows), (middle, paired)):
            points = [r for r in source if r["config"] == config]
            if points:
                axis.errorbar([r["size"] * shift for r in points], [scale * r[key][0] for r in points],
                              yerr=[scale * r[key][1] for r in points], marker="o", capsize=3, label=config,
                              color=f"C{i}")
        first = next((r for r in rows if r["config"] == config and r["size"] == smallest), None)
        if first:
            rhos = sorted(first["adversarial"], key=float)
            right.errorbar([float(rho) for rho in rhos], [first["adversarial"][rho][0] for rho in rhos],
                           yerr=[first["adversarial"][rho][1] for rho in rhos], marker="o", capsize=3, label=config,
                           color=f"C{i}")
    middle.axhline(0, color="C0", linewidth=1)
    if key == "accuracy":
        middle.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="target: lora + 0.5 points")
    sizes = sorted({r["size"] for r in rows})
    for axis in (left, middle):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes, [str(size) for size in sizes])
        axis.minorticks_off()
        axis.set_xlabel(unit)
        axis.legend(fontsize=8)
    left.set_ylabel(f"{label}, mean ± s.e.")
    middle.set_ylabel("minus lora, same seed" + (" (points)" if key == "accuracy" else ""))
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("ρ (Frobenius radius of the weight perturbation)")
    right.set_ylabel(f"adversarial loss increase, {smallest} {unit}")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def settings(args: argparse.Namespace) -> dict:
    """What makes two runs of one (size, config, seed) comparable (the evaluation batch size is not: held-out sums
    differ by float rounding only)."""
    import torch

    auto = torch.cuda.is_available() and torch.cuda.is_bf16_supported()  # TrainConfig.resolved's rule
    bf16 = args.bf16 == "true" or (args.bf16 == "auto" and auto)
    data = hashlib.sha256()
    for name in ("train.jsonl", "eval.jsonl"):
        data.update((TASKS[args.task][0] / name).read_bytes())
    return {"task": args.task, "data_sha256": data.hexdigest()[:16], "epochs": args.epochs, "micro_batch": MICRO_BATCH,
            "sharpness_examples": args.sharpness_examples, "sharpness_rhos": args.sharpness_rhos,
            "model": args.model or "embedded", "bf16": bf16}


def load_results(path: Path, wanted: dict) -> list[dict]:
    """The runs already in `path`, refused when they ran under other settings."""
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    if report.get("settings") != wanted:
        raise SystemExit(f"error: {path} holds runs made with other settings ({report.get('settings')} vs "
                         f"{wanted}); pass another --out")
    return report["runs"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="wordnet", choices=list(TASKS))
    parser.add_argument("--sizes", default="", help="training data sizes (default: wordnet 8,16,32 per class; "
                        "quotes 64,128,256 quotations)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--sharpness-examples", type=int, default=64, help="first N held-out examples of the probe")
    parser.add_argument("--sharpness-rhos", default="0.01,0.05", help="radii of the probe, comma-separated")
    parser.add_argument("--bf16", default="auto", choices=["auto", "true", "false"], help="as in launch/train.py")
    parser.add_argument("--model", default="", help="base model (default: the embedded one)")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "generalization_runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results/generalization_<task>.json)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each on one CPU thread when > 1)")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; one of: {', '.join(CONFIGS)}")
    args.sizes = args.sizes or TASKS[args.task][2]
    args.out = args.out or ROOT / "benchmarks" / "results" / f"generalization_{args.task}.json"
    wanted = settings(args)
    runs = load_results(args.out, wanted)
    done = {(r["size"], r["config"], r["seed"]) for r in runs}
    plan = [(int(k), c, int(s)) for k in args.sizes.split(",") for c in configs for s in args.seeds.split(",")]
    todo = [p for p in plan if p not in done]
    for size in {p[0] for p in todo}:  # written afresh from the data, once, before runs share it
        (args.work / args.task / f"train_{size}.jsonl").unlink(missing_ok=True)
        subset(args.task, size, args.work)
    lock = threading.Lock()

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        ordered = sorted(runs, key=lambda r: (r["size"], list(CONFIGS).index(r["config"]), r["seed"]))
        partial = args.out.with_suffix(".partial")
        partial.write_text(json.dumps({"settings": wanted, "runs": ordered, "summary": summarise(ordered),
                                       "paired_vs_lora": paired_vs_lora(ordered)}, indent=1) + "\n")
        os.replace(partial, args.out)  # never a half-written results file

    def one(i: int) -> None:
        size, config, seed = todo[i]
        r = run_one(size, config, seed, args)
        with lock:
            runs.append(r)
            save()
        accuracy = f"accuracy {100 * r['accuracy']:.1f} %, " if r["accuracy"] is not None else ""
        print(f"[{i + 1}/{len(todo)}] size {size}, {config}, seed {seed}: {accuracy}loss {r['eval_loss']:.3f}, "
              f"{r['train_s']:.0f} s + probe {r['probe_s']:.0f} s", flush=True)

    print(f"{len(plan) - len(todo)} of {len(plan)} runs already in {args.out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, range(len(todo))))
    save()  # the summaries as this version of the script computes them
    mine = [r for r in runs if (r["size"], r["config"], r["seed"]) in set(plan)]
    print(table(summarise(mine), TASKS[args.task][1]))
    paired = paired_vs_lora(mine)
    if paired:
        print("\n" + table(paired, TASKS[args.task][1], paired=True))
    if args.plot:
        plot(summarise(runs), paired_vs_lora(runs), args.plot, TASKS[args.task][1])


if __name__ == "__main__":
    main()
