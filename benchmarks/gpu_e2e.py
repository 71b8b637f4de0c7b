"""The trainer end to end on a GPU machine: short `launch/train.py` runs on a random-weight Llama.

    python3 benchmarks/gpu_e2e.py OUT TOKENIZER_DIR [--small] [--runs NAME,NAME...]

TOKENIZER_DIR holds the embedded tokenizer (`load_tokenizer(str(default_model_dir())).save_pretrained(DIR)`
on a machine with the package's extras; 3.4 MB), since the GGUF of the embedded model is too large to carry.
The model: hidden 1024, 8 layers, GQA 16/4 (`--small`: hidden 64, 2 layers, 2 steps, for a CPU). Runs bilora
packed with gradient checkpointing, bilora packed on a 4-bit base, lora under FSDP2 through torchrun, and the
4-bit bilora run again under FSDP2 (its NF4 bytes sharded), and lora on one process, under FSDP2 and under
`deepspeed --num_gpus 1 ... --ds_config ds_configs/zero3.json` (deepspeed as scripts/gpu_wheels.sh builds it),
whose held-out losses must agree (ENGINE_RTOL). Writes each run's log and OUT/e2e.json (exit code, seconds, the
last metrics rows, the engines' held-out losses and whether they agree).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

ENGINE_RTOL = 2e-3  # held-out loss of one run on three engines, bf16: the same sums in another order
RUNS = {
    "bilora_bf16_packing": ["python3", "launch/train.py", "--method", "bilora", "--packing", "--gradient-checkpointing"],
    "lora_single": ["python3", "launch/train.py", "--method", "lora"],
    "lora_zero3_1gpu": ["deepspeed", "--num_gpus", "1", "launch/train.py", "--method", "lora", "--ds_config",
                        "ds_configs/zero3.json"],
    "bilora_4bit_packing": ["python3", "launch/train.py", "--method", "bilora", "--packing", "--quantize", "4bit"],
    "lora_fsdp_1gpu": ["torchrun", "--nproc_per_node", "1", "launch/train.py", "--method", "lora", "--engine", "fsdp"],
    "bilora_4bit_fsdp_1gpu": ["torchrun", "--nproc_per_node", "1", "launch/train.py", "--method", "bilora", "--packing",
                              "--quantize", "4bit", "--engine", "fsdp"],
}


def random_model(tokenizer_dir: str, path: Path, small: bool) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64 if small else 1024,
                      intermediate_size=128 if small else 2816, num_hidden_layers=2 if small else 8,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def held_out_losses(summary: dict) -> dict:
    """The final held-out loss of the lora runs on each engine, and whether they agree to ENGINE_RTOL."""
    losses = {name: next((r["eval_loss"] for r in reversed(summary[name]["last_rows"]) if "eval_loss" in r), None)
              for name in ("lora_single", "lora_fsdp_1gpu", "lora_zero3_1gpu") if name in summary}
    found = [v for v in losses.values() if v is not None]
    agree = len(found) == len(losses) > 1 and max(found) - min(found) <= ENGINE_RTOL * abs(losses["lora_single"])
    return {"held_out_loss": losses, "engines_agree": agree}


def main(out: Path, tokenizer_dir: str, small: bool, only: list[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    random_model(tokenizer_dir, model_dir, small)
    common = ["--model", str(model_dir), "--max-steps", "2" if small else "12", "--micro-batch-size", "8",
              "--seq-len", "512", "--eval-every", "0", "--log-every", "4", "--data-cache", "none"]
    summary = {}
    for name, cmd in RUNS.items():
        if only and name not in only:
            continue
        started = time.perf_counter()
        run_dir = out / name
        proc = subprocess.run(cmd + common + ["--output-dir", str(run_dir)], capture_output=True, text=True, timeout=300)
        log = proc.stdout + proc.stderr
        (out / f"{name}.log").write_text(log)
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
        summary[name] = {"rc": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
                         "last_rows": rows[-3:], "tail": log[-1500:]}
        print(f"{name}: exit {proc.returncode}, {summary[name]['seconds']} s\n{log[-1500:]}", flush=True)
    engines = held_out_losses(summary)
    print(f"lora held-out loss by engine: {engines['held_out_loss']}; agree: {engines['engines_agree']}")
    (out / "e2e.json").write_text(json.dumps({**summary, "engines": engines}, indent=1) + "\n")


if __name__ == "__main__":
    flags = sys.argv[3:]
    only = flags[flags.index("--runs") + 1].split(",") if "--runs" in flags else None
    main(Path(sys.argv[1]), sys.argv[2], "--small" in flags, only)
