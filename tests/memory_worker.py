"""Measure real CPU training steps for test_memory_plan.py, each case on a fresh model in this process.
Usage: memory_worker.py MODEL_DIR CASES_JSON; prints one JSON line per case.

A case is {"dtype", "checkpointing" (Recompute.every: 0 none, 1 all, K every K-th block), "chunk", "batch", "seq",
"rank", "aux_rank"}. The model (random weights)
gets a Bi-LoRA bank, the chunked head loss and, if asked, HF's non-reentrant gradient checkpointing, as the
trainer attaches them; one step warms AdamW's state up, the next runs under torch.profiler (one thread, no
garbage collection during it), whose allocation events give the bytes alive after the loss's forward and the
step's peak above what existed before it.
Measured that way, nothing here shares code with the plan (activations.py traces meta tensors instead).
"""

import gc
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AutoConfig, AutoModelForCausalLM

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.data import Example, collate
from bilora_dist.training.loss import attach_head_loss, token_loss_sum
from bilora_dist.training.methods import build_optimizer
from bilora_dist.memory.recompute import Recompute, apply_recompute

MARK = "after_loss_forward"


def resident_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def alive_curve(prof: profile) -> tuple[int, int]:
    """(peak bytes above the start, bytes alive above the start when MARK was recorded) from the allocations."""
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    alive = peak = at_mark = 0
    for e in events:
        if e.name() == "[memory]":
            alive += e.nbytes()
            peak = max(peak, alive)
        elif e.name() == MARK:
            at_mark = alive
    return peak, at_mark


def measure(model_dir: str, case: dict) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                             dtype=getattr(torch, case["dtype"]))
    model.requires_grad_(False)
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), case["rank"], 16.0,
                      case["aux_rank"], 1.0, 0)
    inject(model, bank)
    attach_head_loss(model, case["chunk"])
    apply_recompute(model, Recompute(int(case["checkpointing"]), model.config.num_hidden_layers, ""))
    model.train()
    bucket = bank.bind_grad_bucket()
    optimizer = build_optimizer(bank, 1e-3, 0.0)
    gen = torch.Generator().manual_seed(0)
    seq, vocab = case["seq"], model.config.vocab_size
    lengths = [seq] * (case["batch"] - 1) + [seq - 56]  # one padded row: the 4-D mask exists, as in training
    batch = collate([Example(ids, list(ids)) for ids in
                     (torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths)], 0)

    def step() -> None:
        loss, _ = token_loss_sum(model, batch)
        with record_function(MARK):
            pass
        loss.backward()
        optimizer.step()
        bucket.zero_()

    step()
    resident = resident_bytes(*model.parameters(), *model.buffers(), *bank.parameters(), bucket.flat,
                              *(t for s in optimizer.state.values() for t in s.values() if t.dim()))
    gc.collect()
    gc.disable()  # what the step frees it frees by reference counts, not when a collection happens to run
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        gc.enable()
    peak, after_loss = alive_curve(prof)
    return {**case, "resident": resident, "peak": resident + peak, "after_loss_forward": after_loss}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for case in json.loads(sys.argv[2]):
        print(json.dumps(measure(sys.argv[1], case)), flush=True)
