"""Under the deepspeed launcher (2 ranks): ZeRO-3 with a ds_config, and what a gathered parameter leaves behind.
Usage: zero3_worker.py DS_CONFIG OUT [--measure MODEL_DIR [--also DS_CONFIG]...] MODEL_DIR...; writes
OUT/rank{R}.json.

For each MODEL_DIR the engine builds the model (under deepspeed.zero.Init, as the trainer does), a Bi-LoRA bank
with nonzero factors is injected with the chunked loss, the engine wraps it, and STEPS forward + backward passes
run (the first records DeepSpeed's module trace, the next release by it). Recorded, per parameter of every experts
module: how it rests (its partition, persistence, the size of param.data); after the module's forward returns
(DeepSpeed's release has run) and after backward, its status and the size of param.data; and, through
saved_tensors_hooks, every tensor autograd saves that shares the storage of a gathered parameter -- the parameter
itself, which follows DeepSpeed's release and re-gather, or another tensor on that storage (a transposed view, a
detached alias), which keeps the gathered storage alive after DeepSpeed released the parameter: those still
alive after the module's forward and at the end of the forward pass, by parameter, in bytes.

With --measure, MODEL_DIR's step is also measured as tests/memory_worker.py measures a one-process step (two
warm-up steps, then one under torch.profiler: peak bytes above the state before it, plus the resident state),
and again under each --also DS_CONFIG (an engine of its own, in the same processes); each measured step also
records the partitioned parameters still gathered when its forward pass and loss have run (DeepSpeed's reuse
distance keeps them from the second step on, once its module trace is recorded).
"""

import json
import sys
import time
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from deepspeed.runtime.zero import partition_parameters
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from torch.profiler import ProfilerActivity, profile, record_function

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.adapters.experts import is_experts_module
from bilora_dist.config.train import parse_config
from bilora_dist.data import Example, collate
from bilora_dist.engines import make_engine
from bilora_dist.training.loss import attach_head_loss, token_loss_sum
from bilora_dist.training.methods import build_optimizer
from bilora_dist.model.loading import LoadOptions
from memory_worker import MARK, alive_curve, resident_bytes

STEPS = 2
# the measured step: as test_memory_plan.py's (one row padded), shorter
BATCH, SEQ, CHUNK, RANK = 4, 64, 64, 8


class SavedOnGathered:
    """saved_tensors_hooks recording each saved tensor on the storage of a gathered partitioned parameter."""

    def __init__(self, model: torch.nn.Module):
        self.params = {n: p for n, p in model.named_parameters() if hasattr(p, "ds_id")}
        self.itself: dict[str, int] = defaultdict(int)  # name -> times the parameter itself was saved
        self.others: list[tuple[str, weakref.ref, int, list[int]]] = []  # name, the saved tensor, storage bytes, shape

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        for name, p in self.params.items():
            if ptr and p.ds_status == ZeroParamStatus.AVAILABLE and p.data.numel() \
                    and p.data.untyped_storage().data_ptr() == ptr:
                if t is p:
                    self.itself[name] += 1
                else:
                    self.others.append((name, weakref.ref(t), t.untyped_storage().nbytes(), list(t.shape)))
        return t

    def alive(self, prefix: str = "") -> dict[str, int]:
        """Bytes of gathered storage still held by saved tensors other than the parameters, by parameter."""
        held: dict[str, int] = defaultdict(int)
        for name, ref, nbytes, _ in self.others:
            if name.startswith(prefix) and ref() is not None:
                held[name] += nbytes
        return dict(held)


def state_of(p: torch.nn.Parameter) -> dict:
    return {"status": p.ds_status.name, "data_numel": p.data.numel()}


def random_batch(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    lengths = [seq] * (batch - 1) + [seq - seq // 4]  # one padded row: the 4-D mask exists, as in training
    return collate([Example(ids, list(ids)) for ids in
                    (torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths)], 0)


def build(engine, model_dir: str):
    model = engine.build(model_dir, LoadOptions(torch.float32))
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), RANK, 16.0, RANK, 1.0, 0)
    with torch.no_grad():
        for branch in bank.branches():
            branch.flat.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    inject(model, bank)
    attach_head_loss(model, CHUNK)
    model = engine.wrap(model)
    model.train()
    return model, bank


def release_report(engine, model_dir: str) -> dict:
    model, bank = build(engine, model_dir)
    experts = {path: m for path, m in model.named_modules() if is_experts_module(m)}
    params = {f"{path}.{n}": p for path, m in experts.items() for n, p in m.named_parameters(recurse=False)}
    at_rest = {name: {"ds_numel": p.ds_numel, "ds_shape": list(p.ds_shape), "partition_numel": p.ds_tensor.numel(),
                      "persist": bool(p.ds_persist), "element_size": p.element_size(), **state_of(p)}
               for name, p in params.items()}
    watch = SavedOnGathered(model)
    steps = []
    for _ in range(STEPS):
        record: dict = {"after_forward": {}, "kept_after_module_forward": {}}

        def after_forward(path):
            def hook(module, args, output):  # registered after DeepSpeed's: its release has run
                for n, p in module.named_parameters(recurse=False):
                    record["after_forward"][f"{path}.{n}"] = state_of(p)
                record["kept_after_module_forward"].update(watch.alive(path + "."))
            return hook

        handles = [m.register_forward_hook(after_forward(path)) for path, m in experts.items()]
        watch.itself.clear(), watch.others.clear()
        batch = random_batch(model.config.vocab_size, BATCH, SEQ)
        with torch.autograd.graph.saved_tensors_hooks(watch.pack, lambda t: t):
            loss, _ = token_loss_sum(model, batch)
        record["kept_until_backward"] = watch.alive()
        record["saved_views_of_gathered"] = sorted({(n, tuple(s)) for n, _, _, s in watch.others})
        record["saved_params_itself"] = dict(watch.itself)
        loss.backward()
        record["after_backward"] = {name: state_of(p) for name, p in params.items()}
        record["kept_after_backward"] = watch.alive()
        for h in handles:
            h.remove()
        bank.zero_grad(set_to_none=True)
        steps.append(record)
    engine.release()
    return {"world_size": engine.world_size, "at_rest": at_rest, "steps": steps}


def settled_allgathers() -> None:
    """Make every ZeRO-3 all-gather wait, then yield a moment, before DeepSpeed goes on. A finished gloo all-gather's
    work object (holding the gathered buffer) is let go by gloo's worker thread too; when that thread lets go last,
    the buffer is freed there, and torch.profiler, which records this thread's allocations only, never sees the
    free (two runs of the same step differed by one or two experts modules' size)."""
    gather = partition_parameters._dist_allgather_fn
    if getattr(gather, "settles", False):  # a second measured engine in this process
        return

    def gather_and_settle(*args, **kwargs):
        work = gather(*args, **kwargs)
        work.wait()
        time.sleep(0.002)
        return work

    gather_and_settle.settles = True
    partition_parameters._dist_allgather_fn = gather_and_settle


def measure(engine, model_dir: str) -> dict:
    settled_allgathers()
    model, bank = build(engine, model_dir)
    bucket = bank.bind_grad_bucket()
    optimizer = build_optimizer(bank, 1e-3, 0.0)
    batch = random_batch(model.config.vocab_size, BATCH, SEQ)
    kept, gathered = [], []
    params = list(model.parameters())

    def step() -> None:
        watch = SavedOnGathered(model)
        with torch.autograd.graph.saved_tensors_hooks(watch.pack, lambda t: t):
            loss, _ = token_loss_sum(model, batch)
        kept.append(sum(watch.alive().values()))
        gathered.append(sum(p.ds_numel * p.element_size() for p in params
                            if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist))
        with record_function(MARK):
            pass
        loss.backward()
        optimizer.step()
        bucket.zero_()

    step(), step()  # AdamW's state; DeepSpeed's module trace
    resident = resident_bytes(*(p.ds_tensor for p in params), *model.buffers(), *bank.parameters(), bucket.flat,
                              *(t for s in optimizer.state.values() for t in s.values() if t.dim()))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak, after_loss = alive_curve(prof)
    engine.release()
    return {"resident": resident, "peak": resident + peak, "after_loss_forward": after_loss,
            "partitions": sum(p.ds_tensor.untyped_storage().nbytes() for p in params),
            "gathered_at_rest": sum(p.data.numel() * p.element_size() for p in params),
            "kept_until_backward": kept[-1], "gathered_after_forward": gathered[-1], "batch": BATCH, "seq": SEQ,
            "chunk": CHUNK, "rank": RANK}


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    ds_config, out, *rest = args
    to_measure = rest[rest.index("--measure") + 1] if "--measure" in rest else None
    flags = ("--measure", "--also")
    also = [d for i, d in enumerate(rest) if i and rest[i - 1] == "--also"]
    model_dirs = [d for i, d in enumerate(rest) if d not in flags and (i == 0 or rest[i - 1] not in flags)]
    engine = make_engine(parse_config(["--engine", "deepspeed", "--ds_config", ds_config]))
    result = {"release": {Path(d).name: release_report(engine, d) for d in model_dirs}}
    if to_measure:
        result["measured"] = measure(engine, to_measure)
        result["measured_under"] = {
            config: measure(make_engine(parse_config(["--engine", "deepspeed", "--ds_config", config])), to_measure)
            for config in also}
    Path(out, f"rank{engine.rank}.json").write_text(json.dumps(result))
    engine.close()
