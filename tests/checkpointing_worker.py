"""Run alone, under the deepspeed launcher or under torchrun: adapter gradients of one global batch with and
without gradient checkpointing, for lora and bilora, saved per rank. Usage: checkpointing_worker.py ENGINE MODEL OUT
The run's own stages build, inject and wrap (trainer.build_model_and_adapters, attach_and_wrap); checkpointing
is switched on and off on the wrapped model between the two passes.
"""

import sys
from pathlib import Path

import torch

from bilora_dist.config import parse_config
from bilora_dist.data import Example, collate, to_device
from bilora_dist.engines import make_engine
from bilora_dist.loss import token_loss_sum
from bilora_dist.trainer import attach_and_wrap, build_model_and_adapters

if __name__ == "__main__":
    kind, model_path, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    engine = make_engine(parse_config(["--engine", kind]))
    gen = torch.Generator().manual_seed(3)
    examples = [Example(ids, list(ids)) for ids in (torch.randint(1, 1000, (int(k),), generator=gen).tolist()
                                                   for k in torch.randint(8, 30, (8,), generator=gen))]
    share = len(examples) // engine.world_size
    batch = to_device(collate(examples[engine.rank * share:(engine.rank + 1) * share], 0), engine.device)
    grads = {}
    for method in ("lora", "bilora"):
        cfg = parse_config(["--engine", kind, "--model", model_path, "--method", method])
        model, bank = build_model_and_adapters(cfg, engine, model_path)
        with torch.no_grad():  # B != 0, so that every factor has a gradient
            for branch in bank.branches():
                branch.flat.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
        model = attach_and_wrap(cfg, engine, model, bank)
        calls = []  # forward calls of an adapted layer: twice per pass when its block is recomputed in backward
        model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda module, args: calls.append(1))
        for checkpointing in (False, True):
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for branch in bank.branches():
                branch.flat.grad = None
            loss, _ = token_loss_sum(model, batch)
            loss.backward()
            for branch in bank.branches():
                engine.all_reduce_sum_(branch.flat.grad)
            grads[method, checkpointing] = [branch.flat.grad.cpu() for branch in bank.branches()]
            grads[method, checkpointing, "calls"] = len(calls)
            calls.clear()
            engine.release()
        model.gradient_checkpointing_disable()
    torch.save(grads, Path(out) / f"rank{engine.rank}.pt")
    engine.close()
