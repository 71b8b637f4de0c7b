"""Run alone, under the deepspeed launcher or under torchrun: for each hub id, the engine builds the model,
shards it and injects a Bi-LoRA bank and the chunked loss; the logits of the probe batch (OUT/probe.pt), then two bilora steps on a
global batch of 8 random sequences, are saved per rank. Usage: arch_worker.py ENGINE OUT HUB_ID...
One engine (one process group) serves every model.
"""

import sys
from pathlib import Path

import torch

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.config.train import parse_config
from bilora_dist.data import BatchPlan, Example, collate, to_device
from bilora_dist.engines import make_engine
from bilora_dist.training.loss import attach_head_loss
from bilora_dist.training.methods import METHOD_STEPS, build_optimizer
from bilora_dist.model.loading import LoadOptions, resolve_model

GLOBAL_BATCH, STEPS = 8, 2


def random_examples(vocab: int, n: int = 16) -> list[Example]:
    """Sequences of 10 to 24 tokens (left padding in every batch), loss on every token."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(10, 25, (n,), generator=gen).tolist()
    return [Example(ids, list(ids)) for ids in (torch.randint(1, vocab, (k,), generator=gen).tolist() for k in lengths)]


if __name__ == "__main__":
    kind, out, *hub_ids = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out = Path(out)
    probe = torch.load(out / "probe.pt")
    engine = make_engine(parse_config(["--engine", kind]))
    # single: micro 4 x accumulation 2; two ranks: micro 4 each -- the same global batch
    accum = GLOBAL_BATCH // 4 // engine.world_size
    for hub_id in hub_ids:
        model = engine.build(resolve_model(hub_id), LoadOptions(torch.float32))
        bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 8, 16.0, 8, 1.0, 0)
        bank = bank.to(engine.device)
        inject(model, bank)
        attach_head_loss(model, 5)  # the chunked loss, in chunks short enough to split every batch
        model = engine.wrap(model).eval()
        with torch.no_grad():  # B = 0: the adapted model computes the base's logits
            logits = model(input_ids=probe.to(engine.device)).logits.cpu()
        engine.release()
        model.train()
        step = METHOD_STEPS["bilora"](model, bank, build_optimizer(bank, 1e-3, 0.0), engine, 1.0, 0.05)
        examples = random_examples(model.config.vocab_size)
        plan = BatchPlan(len(examples), GLOBAL_BATCH, 0)
        losses = [step([to_device(collate([examples[i] for i in mb], 0), engine.device)
                        for mb in plan.micro_batches(s, engine.rank, engine.world_size, accum)]).loss
                  for s in range(STEPS)]
        torch.save({"logits": logits, "losses": losses, "primary": bank.primary.flat.detach().cpu(),
                    "digest": bank.digest()}, out / f"{kind}-{hub_id.replace('/', '--')}-rank{engine.rank}.pt")
        engine.release()
    engine.close()
