"""Preparing the training data on 2 ranks: the serial per-rank tokenization of commit c8b8406 against the cached
`datasets.map` pipeline (first run and cached run); wall time and per-rank peak memory.

    python benchmarks/data_prep.py [--records 200000] [--workers 0]

The records are synthesised from the embedded task: half prompt/completion records and half the same pairs as
two-turn `messages` conversations, written as two .jsonl files (one dataset per format, as --data and
--eval-data). Every phase starts 2 processes that each do what a rank does with both files:
  before        `git show c8b8406:bilora_dist/data.py` loaded as a module; load_records + tokenize_all on
                every rank (Python lists).
  after, first  prepare_examples over a gloo group: rank 0 tokenizes with --workers processes into an empty
                cache, rank 1 waits; both memory-map the result.
  after, cached the same again: both ranks read the cache.
Every rank then reads each example once (a digest of all tokens and labels, as one epoch would), so its
resident memory includes what training touches. Results go to benchmarks/results/data_prep.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "c8b8406"
PHASES = ("before", "after, first run", "after, cached run")


def _memory() -> dict[str, float]:
    """Peak RSS of this process and of its largest child (map workers), and the resident set now, in MiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    now = {k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "anon_now_mb": now["RssAnon"], "file_now_mb": now["RssFile"]}


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (map workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _digests(pairs) -> dict[str, str]:
    """sha256 of all token ids and of all labels, example by example."""
    ids_hash, labels_hash = hashlib.sha256(), hashlib.sha256()
    for ids, labels in pairs:
        ids_hash.update(json.dumps(list(ids)).encode())
        labels_hash.update(json.dumps(list(labels)).encode())
    return {"input_ids": ids_hash.hexdigest(), "labels": labels_hash.hexdigest()}


def rank_worker(args: argparse.Namespace) -> None:
    """One rank: prepare both files the way `args.phase` does, read every example, report."""
    from bilora_dist.model.embedded import default_model_dir
    from bilora_dist.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(default_model_dir()))
    files = [str(Path(args.data_dir) / name) for name in ("prompt_completion.jsonl", "messages.jsonl")]
    out = {"rank": int(os.environ["RANK"]), "baseline": _memory(), "datasets": {}, "prepare_s": 0.0, "cpu_s": 0.0}
    if args.phase == "before":
        old = _before_module(Path(args.data_dir) / "data_before.py")
        for path in files:
            start, cpu = time.perf_counter(), _cpu_s()
            examples = old.tokenize_all(old.load_records(path, "--data"), tokenizer, args.seq_len, "--data")
            out["prepare_s"] += time.perf_counter() - start
            out["cpu_s"] += _cpu_s() - cpu
            out["datasets"][Path(path).stem] = {"n": len(examples),
                                                **_digests((e.input_ids, e.labels) for e in examples)}
    else:
        from bilora_dist.data import prepare_examples
        from bilora_dist.data.tokenize import TokenizeOptions
        from bilora_dist.engines.distributed import DataParallelEngine

        engine = DataParallelEngine()
        lines: list[str] = []
        for path in files:
            start, cpu = time.perf_counter(), _cpu_s()
            ds = prepare_examples(path, "--data", tokenizer, TokenizeOptions(args.seq_len), workers=args.workers,
                                  cache=args.cache, engine=engine, log=lines.append).examples
            out["prepare_s"] += time.perf_counter() - start
            out["cpu_s"] += _cpu_s() - cpu
            pairs = ((i, l) for batch in ds.iter(batch_size=1000) for i, l in zip(batch["input_ids"], batch["labels"]))
            out["datasets"][Path(path).stem] = {"n": len(ds), **_digests(pairs)}
        out["log"] = lines
        engine.barrier()
    out["memory"] = _memory()
    print(json.dumps(out))


def _before_module(path: Path):
    """bilora_dist/data.py as of BEFORE_COMMIT (written to `path` by the driver), imported as a module."""
    spec = importlib.util.spec_from_file_location("data_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_before"] = module
    spec.loader.exec_module(module)
    return module


def synthesise(data_dir: Path, n: int) -> None:
    """n/2 prompt/completion records and n/2 two-turn conversations, cycling through the embedded train set."""
    from bilora_dist.model.embedded import DEFAULT_TRAIN

    base = [json.loads(line) for line in DEFAULT_TRAIN.read_text().splitlines()]
    pairs = [base[i % len(base)] for i in range(n // 2)]
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
             for r in pairs]
    for name, records in (("prompt_completion", pairs), ("messages", chats)):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def run_phase(phase: str, args: argparse.Namespace, data_dir: Path, cache: Path) -> dict:
    """Start the 2 rank processes of one phase together; their reports and the phase's wall time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--rank-worker", "--phase", phase, "--data-dir", str(data_dir),
           "--cache", str(cache), "--workers", str(args.workers), "--seq-len", str(args.seq_len)]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate() for p in procs]
    wall = time.perf_counter() - start
    for p, (_, err) in zip(procs, outputs):
        if p.returncode:
            raise SystemExit(f"{phase}: a rank failed:\n{err[-3000:]}")
    return {"wall_s": wall, "ranks": [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="records in all (half per format)")
    parser.add_argument("--workers", type=int, default=0, help="--data-workers of the new pipeline (0: auto)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_prep.json"))
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        return rank_worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, cache = Path(tmp) / "data", Path(tmp) / "cache"
        data_dir.mkdir()
        synthesise(data_dir, args.records)
        (data_dir / "data_before.py").write_text(subprocess.run(
            ["git", "show", f"{BEFORE_COMMIT}:bilora_dist/data.py"], cwd=ROOT, check=True, capture_output=True,
            text=True).stdout)
        results = {}
        for phase in PHASES:
            results[phase] = run_phase(phase, args, data_dir, cache)
            print(f"{phase}: {results[phase]['wall_s']:.1f} s", file=sys.stderr)
    before = results["before"]["ranks"][0]["datasets"]
    equal = {f"{name} {field}": all(r["datasets"][name][field] == before[name][field]
                                    for res in results.values() for r in res["ranks"])
             for name in before for field in ("n", "input_ids", "labels")}
    cpus = os.cpu_count()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": {k: v for k, v in vars(args).items() if k in
                                                     ("records", "workers", "seq_len")} | {"cpus": cpus},
                                          "identical_to_before": equal, "phases": results}, indent=2))
    print(f"{args.records:,} records ({args.records // 2:,} prompt/completion + {args.records // 2:,} messages), "
          f"2 ranks, {cpus} CPUs; examples identical to before: {equal}")
    print("| phase | prepare, rank 0 / rank 1 (s) | CPU, both ranks (s) | wall with start-up (s) "
          "| peak RSS, rank 0 / rank 1 (MB) | of which imports (MB) | largest map worker (MB) "
          "| rank 0 at end, anon / file-backed (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for phase, res in results.items():
        r0, r1 = res["ranks"]
        m0, m1 = r0["memory"], r1["memory"]
        print(f"| {phase} | {r0['prepare_s']:.1f} / {r1['prepare_s']:.1f} | {r0['cpu_s'] + r1['cpu_s']:.1f} "
              f"| {res['wall_s']:.1f} "
              f"| {m0['peak_rss_mb']:.0f} / {m1['peak_rss_mb']:.0f} | {r0['baseline']['peak_rss_mb']:.0f} "
              f"| {m0['children_peak_rss_mb']:.0f} | {m0['anon_now_mb']:.0f} / {m0['file_now_mb']:.0f} |")


if __name__ == "__main__":
    main()
