"""Per-rank memory plan of a run, computed from shapes alone (the model is built on the meta device).

What a rank holds: its part of the frozen base (whole for single / ZeRO-1/2, a 1/N partition for
ZeRO-3 plus the small parameters it keeps resident, a dim-0 shard for FSDP2; under 4-bit each
quantised linear weight is its packed NF4 bytes plus its quantisation state), the replicated fp32
adapters with their gradient bucket and AdamW moments, the activations one micro-batch saves for
backward (activations.py), and transiently the largest block gathered for a forward or backward
(under ZeRO-3 at least twice the largest module's own partitioned parameters: zero3_fetch_bytes),
the output head's loss, the block recomputed under gradient checkpointing, and under 4-bit the
dequantised weight of the largest quantised linear. Under ZeRO-3 also the parameters DeepSpeed's reuse distance
keeps gathered from forward into backward (zero3_retention) and one prefetch bucket's flat buffer.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass

from torch import nn

from bilora_dist.memory.activations import ActivationTrace
from bilora_dist.model.loading import NF4_BLOCK, NF4_NESTED_BLOCK, quantized_linears, shard_units

ADAPTER_BYTES = 4  # adapters, their gradients and optimizer moments are fp32 whatever the base dtype
DEFAULT_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default
DEFAULT_REUSE_DISTANCE = 1_000_000_000  # DeepSpeed's stage3_max_reuse_distance default
DEFAULT_PREFETCH_BUCKET = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size default
DEFAULT_MAX_LIVE = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters default


def nf4_bytes(numel: int) -> tuple[int, int]:
    """(packed weight, quantisation state) bytes of one weight as bitsandbytes stores it in NF4 with double
    quantisation: two values a byte; per 64-value block a uint8 absmax, itself quantised in blocks of 256
    (an fp32 absmax each) around an fp32 offset; the 256-entry dynamic code and the 16-entry NF4 code, fp32."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2), blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 + 4 * 256 + 4 * 16


def quantized_weights(model: nn.Module) -> dict[int, nn.Parameter]:
    """The weights `--quantize 4bit` stores in NF4 (modeling.quantized_linears), by id."""
    return {id(m.weight): m.weight for _, m in quantized_linears(model)}


def loss_peak_bytes(tokens: int, chunk: int, vocab: int, hidden: int, dtype_bytes: int) -> int:
    """Peak of the output head's loss (loss.linear_cross_entropy) over `tokens` supervised tokens, `chunk` at a
    time (0: all at once). Per logit of a chunk: its fp32 logits, turned in place into the gradient (4), and in
    a narrower base dtype the head's output before its fp32 cast and the gradient's cast back (2 x dtype bytes:
    together on a CPU, whose bf16 matmul keeps an fp32 working copy; a GPU's peak is one of them). Per token:
    the head's contiguous, flattened and supervised copies of its input and the input's gradient that the
    loss saves (4 x hidden, base dtype)."""
    chunk = tokens if chunk == 0 else min(chunk, tokens)
    per_logit = 4 + (2 * dtype_bytes if dtype_bytes < 4 else 0)
    return chunk * vocab * per_logit + 4 * tokens * hidden * dtype_bytes


@dataclass(frozen=True)
class Transients:
    """What one micro-batch adds to a rank's resident memory, the same on every rank."""

    activation_bytes: int = 0  # saved for backward (a checkpointed block: its inputs)
    recompute_bytes: int = 0  # the largest checkpointed block's saved tensors, rebuilt in backward
    loss_peak_bytes: int = 0  # the output head's loss (loss_peak_bytes)
    dequant_bytes: int = 0  # the largest quantised linear's weight dequantised for its matmul (4-bit)


@dataclass(frozen=True)
class RankPlan:
    rank: int
    base_bytes: int
    adapter_bytes: int
    adapter_grad_bytes: int
    optimizer_bytes: int
    gathered_block_bytes: int
    activation_bytes: int = 0
    recompute_bytes: int = 0
    loss_peak_bytes: int = 0
    dequant_bytes: int = 0
    retained_bytes: int = 0  # ZeRO-3: gathered parameters its reuse distance keeps from forward into backward
    retained_fetch_bytes: int = 0  # ZeRO-3: the most gathered at once in forward, those kept and one fetch
    prefetch_bytes: int = 0  # ZeRO-3: the flat all-gather buffer of one prefetch bucket

    @property
    def resident_bytes(self) -> int:
        return self.base_bytes + self.adapter_bytes + self.adapter_grad_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        """Resident state plus the gathered block (no activations: see peak_bytes)."""
        return self.resident_bytes + self.gathered_block_bytes

    @property
    def peak_bytes(self) -> int:
        """Resident state + all saved activations + the largest of the transients that follow one another.

        The saved activations are all alive where the backward pass starts, which is where the loss runs
        (its peak), and stay mostly alive while the first blocks are gathered again and, under gradient
        checkpointing, recomputed: those three overlap the activations but not each other. A dequantised
        4-bit weight exists only inside one matmul, during a gathered block's or a recomputed block's
        pass. Gradients of the hidden states (one micro-batch x hidden) are inside the loss peak.

        Under ZeRO-3 the parameters its reuse distance keeps gathered (zero3_retention) are alive with the loss
        and the first recomputed block, and with each later fetch of forward (retained_fetch_bytes, in place of
        the gathered block where larger); backward releases them before it gathers anything else. A prefetch
        bucket's flat buffer may be alive at any time."""
        return self.resident_bytes + self.activation_bytes + self.prefetch_bytes + max(
            self.loss_peak_bytes + self.retained_bytes,
            max(self.gathered_block_bytes, self.retained_fetch_bytes) + self.dequant_bytes,
            self.recompute_bytes + self.dequant_bytes + self.retained_bytes)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes, "peak_bytes": self.peak_bytes}


def _shard_rows(rows: int, world: int, rank: int) -> int:
    """Rows of a dim-0 shard that `rank` holds (torch.chunk semantics, as FSDP2's Shard(0))."""
    per = math.ceil(rows / world)
    return max(0, min(per, rows - rank * per))


def _stored(p: nn.Parameter, quantized: Collection[int]) -> tuple[int, int, int, int]:
    """(elements, element bytes, rows, replicated bytes) of the tensor the engine shards for parameter `p`:
    itself, or for an NF4 weight its packed bytes (one row each) and, replicated, its quantisation state."""
    if id(p) in quantized:
        packed, state = nf4_bytes(p.numel())
        return packed, 1, packed, state
    return p.numel(), p.element_size(), p.shape[0] if p.dim() else 0, 0


def base_bytes_on_rank(model: nn.Module, engine: str, world: int, rank: int,
                       persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD,
                       quantized: Collection[int] = ()) -> int:
    """Bytes of the frozen base resident on `rank` once training runs (gathered copies released)."""
    total = 0
    for p in model.parameters():
        n, size, rows, state = _stored(p, quantized)
        if engine == "zero3":
            total += (math.ceil(n / world) + (n if n <= persistence_threshold else 0)) * size
        elif engine == "fsdp" and rows:
            total += _shard_rows(rows, world, rank) * (n // rows) * size
        else:
            total += n * size
        total += state
    return total


def zero3_fetch_bytes(model: nn.Module, persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD) -> int:
    """The most one ZeRO-3 fetch holds at once. DeepSpeed gathers a module's own partitioned parameters (those
    above the persistence threshold) before its forward and its backward; two or more are all-gathered into one
    flat buffer and copied out of it parameter by parameter, buffer and copies alive together (DeepSpeed 0.19's
    AllGatherCoalescedHandle.wait): twice their bytes. A lone parameter is gathered in place. An experts module
    (3-D gate_up_proj and down_proj) is such a pair, larger than the rest of its block."""
    most = 0
    for module in model.modules():
        sizes = [p.numel() * p.element_size() for p in module.parameters(recurse=False)
                 if p.numel() > persistence_threshold]
        most = max(most, 2 * sum(sizes) if len(sizes) > 1 else sum(sizes))
    return most


def zero3_trace(model: nn.Module) -> tuple[list[list[nn.Parameter]], int]:
    """DeepSpeed's module trace of one step as each traced module's own parameters (modules without any left
    out: they add nothing to a reuse distance), and how many of them are the forward pass. Forward: the modules
    in registration order (HF registers a block's large linears in call order; a norm or router may sit
    elsewhere). Backward: the same in reverse, less the input embedding (frozen, fed token ids) and the output
    head (the chunked loss detaches its input): their outputs need no gradient, so DeepSpeed's pre-backward
    hook never fires for them."""
    forward = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    skip = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    backward = [m for m in reversed(forward) if id(m) not in skip]
    return [list(m.parameters(recurse=False)) for m in forward + backward], len(forward)


def zero3_retention(model: nn.Module, reuse_distance: int = DEFAULT_REUSE_DISTANCE,
                    persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD) -> tuple[int, int, int]:
    """(bytes gathered at the end of forward, the most gathered at once during forward, their numel at the end)
    under DeepSpeed 0.19's reuse distance, once its module trace is recorded (from the second step).

    After module s of the trace runs, PartitionedParameterCoordinator.__params_to_release keeps each of its
    partitioned parameters that a module of the trace after s uses, scanning modules s+1, s+2, ... while the
    elements of all parameters of the modules scanned before (persistent ones and repeats included) number
    fewer than `reuse_distance`; the others it releases. A forward parameter's next use is its module's
    backward, about twice the parameters that follow it later: the last modules of forward stay gathered.
    A module's fetch gathers those of its partitioned parameters not already gathered (two or more: flat
    buffer and copies, as zero3_fetch_bytes)."""
    trace, n_forward = zero3_trace(model)
    # cumulative elements before each trace position, and each position's next use of each parameter
    before = [0]
    for params in trace:
        before.append(before[-1] + sum(p.numel() for p in params))
    next_use: list[dict[int, int]] = [{} for _ in trace]
    seen: dict[int, int] = {}
    for s in range(len(trace) - 1, -1, -1):
        next_use[s] = {id(p): seen[id(p)] for p in trace[s] if id(p) in seen}
        for p in trace[s]:
            seen[id(p)] = s
    gathered: dict[int, nn.Parameter] = {}
    most = 0
    for s in range(n_forward):
        fetch = [p for p in trace[s] if p.numel() > persistence_threshold and id(p) not in gathered]
        fetch_bytes = sum(p.numel() * p.element_size() for p in fetch)
        held = sum(p.numel() * p.element_size() for p in gathered.values())
        most = max(most, held + (2 * fetch_bytes if len(fetch) > 1 else fetch_bytes))
        gathered.update((id(p), p) for p in fetch)
        for p in trace[s]:
            j = next_use[s].get(id(p))
            if j is None or before[j] - before[s + 1] >= reuse_distance:  # module j is beyond the scan
                gathered.pop(id(p), None)
    return (sum(p.numel() * p.element_size() for p in gathered.values()), most,
            sum(p.numel() for p in gathered.values()))


def largest_gathered_block_bytes(model: nn.Module, engine: str, quantized: Collection[int] = (),
                                 persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD) -> int:
    """The largest unit whose full weights a sharding engine materialises at once (0 when nothing is sharded);
    under ZeRO-3 at least its largest fetch (zero3_fetch_bytes)."""
    if engine not in ("zero3", "fsdp"):
        return 0
    block = max(sum(n * size for n, size, _, _ in (_stored(p, quantized) for p in unit.parameters()))
                for unit in shard_units(model))
    return max(block, zero3_fetch_bytes(model, persistence_threshold)) if engine == "zero3" else block


def micro_batch_transients(model: nn.Module, trace: ActivationTrace, tokens: int, recomputed: Collection[int],
                           loss_chunk: int, quantize: bool = False) -> Transients:
    """Transients of one micro-batch of `tokens` tokens for `model` (on meta), whose forward `trace` recorded, with
    the decoder blocks `recomputed` checkpointed."""
    head = model.get_output_embeddings()
    loss = loss_peak_bytes(tokens, loss_chunk, head.out_features, head.in_features, head.weight.element_size())
    dequant = max((w.numel() * w.element_size() for w in quantized_weights(model).values()), default=0)
    return Transients(trace.activations(recomputed), trace.recompute(recomputed), loss, dequant if quantize else 0)


def zero3_prefetch_bytes(model: nn.Module, prefetch_bucket: int = DEFAULT_PREFETCH_BUCKET,
                         max_live: int = DEFAULT_MAX_LIVE, retained_numel: int = 0,
                         persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD) -> int:
    """The flat buffer of one ZeRO-3 prefetch bucket: up to `prefetch_bucket` elements of partitioned parameters,
    and no more than `max_live` less those gathered (the only use DeepSpeed 0.19 makes of max_live_parameters).
    The bucket is all-gathered as one flat tensor that lives until the last parameter in it is fetched for its
    module (every in-flight parameter's registry entry holds the handle); its copies are what later modules
    gather. In the largest element size of the partitioned parameters."""
    partitioned = [p for p in model.parameters() if p.numel() > persistence_threshold]
    numel = max(0, min(prefetch_bucket, max_live - retained_numel, sum(p.numel() for p in partitioned)))
    return numel * max((p.element_size() for p in partitioned), default=0)


def plan_memory(model: nn.Module, adapter_numel: int, engine: str, world: int,
                persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD, quantize: bool = False,
                transients: Transients = Transients(), reuse_distance: int = DEFAULT_REUSE_DISTANCE,
                prefetch_bucket: int = DEFAULT_PREFETCH_BUCKET, max_live: int = DEFAULT_MAX_LIVE) -> list[RankPlan]:
    """One RankPlan per rank; `engine` is single, replicated (ZeRO-1/2, plain data parallel), zero3 or fsdp;
    `quantize`: the linear weights in NF4 (quantized_weights). Under ZeRO-3, DeepSpeed's reuse distance,
    prefetch bucket and max live parameters (stage3_max_reuse_distance, stage3_prefetch_bucket_size,
    stage3_max_live_parameters) size what stays gathered (zero3_retention) and the prefetch buffer."""
    quantized = quantized_weights(model) if quantize else {}
    adapters = adapter_numel * ADAPTER_BYTES
    block = largest_gathered_block_bytes(model, engine, quantized, persistence_threshold)
    retained = forward_most = prefetch = 0
    if engine == "zero3":
        retained, forward_most, retained_numel = zero3_retention(model, reuse_distance, persistence_threshold)
        prefetch = zero3_prefetch_bytes(model, prefetch_bucket, max_live, retained_numel, persistence_threshold)
    return [RankPlan(rank, base_bytes_on_rank(model, engine, world, rank, persistence_threshold, quantized),
                     adapters, adapters, 2 * adapters, block, **asdict(transients), retained_bytes=retained,
                     retained_fetch_bytes=forward_most, prefetch_bytes=prefetch) for rank in range(world)]


def format_plan(plans: list[RankPlan], header: str) -> str:
    """A table, one row per rank, in GiB."""
    gib = 1024 ** 3
    cols = ("base_bytes", "adapter_bytes", "adapter_grad_bytes", "optimizer_bytes", "gathered_block_bytes",
            "total_bytes", "activation_bytes", "recompute_bytes", "loss_peak_bytes", "dequant_bytes", "retained_bytes",
            "retained_fetch_bytes", "prefetch_bytes", "peak_bytes")
    names = ("base shard", "adapters", "adapter grads", "AdamW state", "gathered block", "total", "activations",
             "recompute", "loss peak", "dequantised", "kept gathered",
             "kept + fetch", "prefetch", "peak")
    lines = [header, "rank " + "".join(f"{n:>16}" for n in names)]
    for p in plans:
        d = p.as_dict()
        lines.append(f"{p.rank:>4} " + "".join(f"{d[c] / gib:>12.3f} GiB" for c in cols))
    return "\n".join(lines)
