"""Run alone, under the deepspeed launcher or under torchrun: adapter gradients of one global batch without
gradient checkpointing, with it on every other block and on all, for lora and bilora, saved per rank, with the
forward calls of each block's first adapted layer. Usage: checkpointing_worker.py ENGINE MODEL OUT
The run's own stages build, inject and wrap (recipe.stages.build_model_and_adapters, attach_and_wrap); checkpointing
is set on the wrapped model between the passes (recompute.apply_recompute).
"""

import sys
from pathlib import Path

import torch

from bilora_dist.config.train import parse_config
from bilora_dist.data import Example, collate, to_device
from bilora_dist.engines import make_engine
from bilora_dist.training.loss import token_loss_sum
from bilora_dist.memory.recompute import Recompute, apply_recompute
from bilora_dist.recipe.stages import attach_and_wrap, build_model_and_adapters

SETTINGS = {"off": 0, "every 2": 2, "all": 1}  # Recompute.every

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
        model = attach_and_wrap(cfg, engine, model, bank, Recompute(0, 0, "--gradient-checkpointing false"))
        calls = [[], []]  # forward calls of each block's q_proj: twice per pass when the block is recomputed
        for layer, seen in zip(model.model.layers, calls):
            layer.self_attn.q_proj.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(1))
        for setting, every in SETTINGS.items():
            model.activation_checkpointing_disable()
            apply_recompute(model, Recompute(every, len(model.model.layers), setting))
            for branch in bank.branches():
                branch.flat.grad = None
            loss, _ = token_loss_sum(model, batch)
            loss.backward()
            for branch in bank.branches():
                engine.all_reduce_sum_(branch.flat.grad)
            grads[method, setting] = [branch.flat.grad.cpu() for branch in bank.branches()]
            grads[method, setting, "calls"] = [len(seen) for seen in calls]
            for seen in calls:
                seen.clear()
            engine.release()
        model.activation_checkpointing_disable()
    torch.save(grads, Path(out) / f"rank{engine.rank}.pt")
    engine.close()
