"""Peak memory and time of the head loss + backward: full fp32 logits vs the chunked loss, side by side.

    python benchmarks/logits_memory.py [--vocab 128256] [--hidden 2048] [--tokens 4096] [--chunk 1024]

Each variant runs in a fresh process: the full-logits loss (`F.cross_entropy` over `F.linear(h, W).float()`,
the loss before bilora_dist.training.loss chunked it), `linear_cross_entropy` in one chunk (--loss-chunk 0), and in
chunks of --chunk tokens. Peak = the process's peak resident set (ru_maxrss; CPU) or peak allocated device
memory (CUDA) during loss + backward, minus what it held before (h, W, targets). All variants must agree on
the loss and on the gradient of h; results go to benchmarks/results/logits_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bilora_dist.training.loss import linear_cross_entropy  # noqa: E402


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args: argparse.Namespace, chunk: int | None) -> dict:
    """One variant (chunk None: full logits) in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, generator=gen, device=device, dtype=dtype).mul_(args.hidden ** -0.5)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen, device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen, device=device)
    targets[::7] = -100  # unsupervised positions
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_bytes(device) if device.type == "cpu" else torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    if chunk is None:
        loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100, reduction="sum")
    else:
        loss = linear_cross_entropy(hidden, weight, None, targets, chunk)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"variant": "full logits" if chunk is None else f"chunked, --loss-chunk {chunk}", "chunk": chunk,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "peak_mb": round((peak_bytes(device) - before) / 2**20, 1), "seconds": round(seconds, 2),
            "loss": float(loss), "grad_norm": float(hidden.grad.float().norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--variant", type=int, help=argparse.SUPPRESS)  # -1 full logits, else the chunk
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(measure(args, None if args.variant < 0 else args.variant)))
        return
    shape = ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--tokens", str(args.tokens)]
    rows = [json.loads(subprocess.run([sys.executable, __file__, *shape, "--variant", str(v)], check=True,
                                      capture_output=True, text=True).stdout.splitlines()[-1])
            for v in (-1, 0, args.chunk)]
    for row in rows[1:]:
        assert abs(row["loss"] - rows[0]["loss"]) <= 1e-4 * abs(rows[0]["loss"]), rows
        assert abs(row["grad_norm"] - rows[0]["grad_norm"]) <= 1e-3 * rows[0]["grad_norm"], rows
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    result = {"vocab": args.vocab, "hidden": args.hidden, "tokens": args.tokens,
              "fp32_logits_mb": round(logits_mb, 1), "chunk_fp32_logits_mb": round(logits_mb * args.chunk / args.tokens, 1),
              "rows": rows}
    print(f"vocab {args.vocab}, hidden {args.hidden}, {args.tokens} tokens (fp32 logits {logits_mb:.0f} MB)")
    print(f"| variant | peak over inputs (MB) | loss + backward (s) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['peak_mb']:.0f} | {row['seconds']:.2f} |")
    out = ROOT / "benchmarks" / "results" / "logits_memory.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
