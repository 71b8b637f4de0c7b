"""One command for a GPU machine: core correctness on the device, then tokens/s, peak memory and model FLOPs
utilisation of lora, bilora and lora-sam next to PEFT LoRA on a Llama-3-8B-shaped model (bf16, then 4-bit).

    python benchmarks/gpu_check.py --out gpu_check            # one H100: a few minutes
    python benchmarks/gpu_check.py --smoke --device cpu --out /tmp/gpu_check   # tiny shapes, any device, seconds

Nothing is downloaded: every model is a random-weight Llama built from a config, directly on the device.
Needs torch, transformers and peft (which brings accelerate); bitsandbytes for the 4-bit part (skipped with a
line without it) and flash_attn optionally. Writes gpu_check.json and gpu_check.md under --out; exits 1 if a
correctness check fails. docs/GPU_CHECK.md explains the checks, the FLOPs formula and how to bring wheels.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bilora_dist.adapters import AdapterBank, build_bank, inject, layer_shapes, select_targets  # noqa: E402
from bilora_dist.config.train import parse_config  # noqa: E402
from bilora_dist.data.batching import IGNORE, Example, collate, collate_packed, to_device  # noqa: E402
from bilora_dist.engines.base import Engine  # noqa: E402
from bilora_dist.export.peft import copy_into_peft  # noqa: E402
from bilora_dist.model.kernels import KernelChoice, apply_kernels, choose_kernels, liger_model_types  # noqa: E402
from bilora_dist.training.loss import attach_head_loss, token_loss_sum  # noqa: E402
from bilora_dist.training.methods import METHOD_STEPS, build_optimizer  # noqa: E402
from bilora_dist.model.loading import LoadOptions, resolve_attn_implementation  # noqa: E402
from bilora_dist.memory.run_plan import build_run_plan  # noqa: E402
from bilora_dist.memory.recompute import Recompute, apply_recompute, choose, free_memory_bytes  # noqa: E402
from bilora_dist.squeeze.operator import factored_svd  # noqa: E402

METHODS = ("lora", "bilora", "lora-sam")
RHO = {"bilora": 0.05, "lora-sam": 0.01}  # train.py's defaults
AUX_RANK = 8  # train.py's default --aux-rank
WARMUP = 2  # untimed steps per variant
# dense bf16 tensor-core peak by device name, first match wins (vendor data sheets, without sparsity)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class Shapes:
    """The throughput model (a Llama) and its batches: `micro_batch` packed rows of `seq_len` tokens."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq_len: int
    micro_batch: int
    rank: int
    loss_chunk: int

    def config(self) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=8192,
                           tie_word_embeddings=False)


LLAMA3_8B = Shapes(4096, 32, 32, 8, 14336, 128256, seq_len=2048, micro_batch=4, rank=16, loss_chunk=1024)
SMOKE = Shapes(64, 2, 4, 2, 128, 512, seq_len=128, micro_batch=2, rank=16, loss_chunk=64)
# the correctness checks' model: small enough for a float64 CPU reference, weights large enough (std 0.5)
# that attending across an example boundary changes the loss by far more than the packing tolerance
TINY = Shapes(64, 2, 4, 2, 128, 256, seq_len=64, micro_batch=4, rank=8, loss_chunk=7)


@dataclass(frozen=True)
class Check:
    """One correctness check: its largest error against the reference and the tolerance."""

    name: str
    error: float
    tol: float
    note: str = ""
    ok: bool = True  # a further condition (e.g. the check is sensitive enough) held

    @property
    def passed(self) -> bool:
        return self.ok and self.error <= self.tol  # NaN fails

    def line(self) -> str:
        return (f"{'PASS' if self.passed else 'FAIL'}  {self.name}: max error {self.error:.2e} "
                f"(tolerance {self.tol:.0e}){'; ' + self.note if self.note else ''}")


# ---------------------------------------------------------------------------------------------- models, data


def random_model(config: LlamaConfig, dtype: torch.dtype, device: torch.device, attn: str | None = None,
                 std: float = 0.02) -> nn.Module:
    """A frozen causal LM of `config` with N(0, std) weights (norms 1), made directly on `device`: built on meta,
    then `to_empty` and `normal_`; buffers (rotary frequencies) as the model computes them."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for name, b in buffers.items():
            model.get_buffer(name).copy_(b)
    return model.requires_grad_(False)


def random_examples(lengths: list[int], vocab: int, generator: torch.Generator) -> list[Example]:
    """Random token sequences of the given lengths; the first quarter of each is prompt (no loss)."""
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        out.append(Example(ids, [IGNORE] * (n // 4) + ids[n // 4:]))
    return out


def full_row_lengths(seq_len: int, generator: torch.Generator) -> list[int]:
    """Example lengths that fill one row of `seq_len` exactly: uniform in [seq/16, seq/2], the last one the rest."""
    lengths, low, high = [], seq_len // 16, seq_len // 2
    while seq_len - sum(lengths) > high:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    return lengths + [seq_len - sum(lengths)]


def packed_step_batches(s: Shapes, steps: int, one_row: bool, seed: int = 0) -> list[tuple[dict, list[int]]]:
    """Per step: a padding-free packed batch of `micro_batch` full rows of `seq_len` tokens (with flash attention,
    the same examples in one row: its varlen path takes a batch of one row) and its example lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        rows = [random_examples(full_row_lengths(s.seq_len, g), s.vocab, g) for _ in range(s.micro_batch)]
        if one_row:
            batch = collate_packed([e for row in rows for e in row], None, 0)
        else:
            parts = [collate_packed(row, s.seq_len, 0) for row in rows]
            batch = {key: torch.cat([p[key] for p in parts]) for key in ("input_ids", "position_ids", "labels")}
            batch |= {"attention_mask": None, "logits_to_keep": max(p["logits_to_keep"] for p in parts)}
        out.append((batch, [len(e.input_ids) for row in rows for e in row]))
    return out


def random_bank(model: nn.Module, rank: int, aux_rank: int | None, seed: int = 7) -> AdapterBank:
    """A bank over every linear layer with every factor N(0, 0.1): a generic state (B != 0)."""
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), rank, 2.0 * rank, aux_rank, 1.0, 0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in bank.branches():
            branch.flat.copy_(torch.randn(branch.flat.shape, generator=g) * 0.1)
    return bank


# ---------------------------------------------------------------------------------------------- correctness


def _bilora_steps(model: nn.Module, batches: list[dict], dtype: torch.dtype,
                  device: torch.device) -> tuple[list[float], list[Tensor]]:
    """Losses of Bi-LoRA steps on `batches` and the change of each branch, model and bank in `dtype`."""
    model = copy.deepcopy(model).to(device=device, dtype=dtype)
    bank = random_bank(model, TINY.rank, 4).to(device=device, dtype=dtype)
    inject(model, bank)
    optimizer = build_optimizer(bank, 1e-2, 0.1)
    for group in optimizer.param_groups:
        group["eps"] = 1e-3  # Adam's g / (|g| + eps) turns float noise in near-zero gradients into update noise
    step = METHOD_STEPS["bilora"](model, bank, optimizer, Engine(), 0.05, RHO["bilora"])
    before = [b.flat.detach().clone() for b in bank.branches()]
    losses = [step([to_device(b, device)]).loss for b in batches]
    return losses, [(b.flat.detach() - x).cpu().double() for b, x in zip(bank.branches(), before)]


def check_bilora_step(model: nn.Module, batches: list[dict], device: torch.device) -> Check:
    """Two Bi-LoRA steps (clipping and projection active) in fp32 on the device against float64 on the CPU."""
    want_losses, want = _bilora_steps(model, batches, torch.float64, torch.device("cpu"))
    losses, got = _bilora_steps(model, batches, torch.float32, device)
    error = max([float((g - w).norm() / w.norm()) for g, w in zip(got, want)]
                + [abs(a - b) / abs(b) for a, b in zip(losses, want_losses)])
    return Check("bilora step: fp32 on device vs float64 CPU (relative, updates and losses)", error, 1e-4)


def check_peft_parity(model: nn.Module, batch: dict, device: torch.device) -> Check:
    """Our injected primary adapter's logits against PEFT LoRA holding the same A and B."""
    ours = copy.deepcopy(model).to(device)
    bank = random_bank(ours, TINY.rank, None).to(device)
    theirs = get_peft_model(copy.deepcopy(ours), LoraConfig(r=TINY.rank, lora_alpha=2 * TINY.rank,
                                                             target_modules="all-linear", lora_dropout=0.0))
    copy_into_peft(theirs, bank.primary)
    inject(ours, bank)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        got, want = ours(**inputs).logits, theirs(**inputs).logits
    error = float((got - want).abs().max() / want.abs().max())
    return Check("PEFT parity: logits, same A/B, fp32 (relative to the largest logit)", error, 1e-5)


def check_squeeze(device: torch.device) -> Check:
    """factored_svd (QR of the factors, SVD of the r x r core) against a dense float64 SVD of s·B A."""
    g = torch.Generator().manual_seed(0)
    L, r, n, m, k = 4, 16, 96, 80, 6
    A = torch.randn(L, r, n, generator=g) * torch.logspace(0, -3, r)[:, None]
    B, s = torch.randn(L, m, r, generator=g), torch.rand(L, generator=g) + 0.5
    spec = factored_svd(A.to(device), B.to(device), s.to(device), k)
    U, S, Vh = torch.linalg.svd((s[:, None, None] * B.double() @ A.double()).to(device))
    truncated = (U[..., :k] * S[:, None, :k]) @ Vh[:, :k]
    ours = (spec.U.double() * spec.S[:, None, :k].double()) @ spec.V.double().transpose(1, 2)
    error = max(float((spec.S.double() - S[:, :r]).abs().max() / S.max()),
                float((ours - truncated).norm() / truncated.norm()))
    return Check(f"squeeze: factored_svd vs dense SVD, rank {r}->{k} (singular values, truncation)", error, 1e-5)


def check_packing(model: nn.Module, device: torch.device, attn: str, dtype: torch.dtype, tol: float) -> Check:
    """Loss of examples packed (position ids restart per example) equals the loss of the same examples in a
    left-padded batch; a control whose positions run on across examples must differ by more than 10 x tol."""
    model = copy.deepcopy(model).to(device=device, dtype=dtype)
    model.set_attn_implementation(attn)
    attach_head_loss(model, TINY.loss_chunk)
    examples = random_examples([5, 40, 17, 33, 9, 28], TINY.vocab, torch.Generator().manual_seed(3))
    packed = collate_packed(examples, None if attn == "flash_attention_2" else TINY.seq_len, 0)
    control = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    with torch.no_grad():
        (want, n_want), (got, n_got), (leaked, _) = (
            token_loss_sum(model, to_device(b, device)) for b in (collate(examples, 0), packed, control))
    error = float(abs(got - want) / want) if int(n_got) == int(n_want) else math.inf
    leak = float(abs(leaked - want) / want)
    return Check(f"packing: packed vs padded loss, {attn}, {str(dtype).removeprefix('torch.')} (relative)", error,
                 tol, f"cross-example control differs by {leak:.1e}", ok=leak > 10 * tol)


def correctness(device: torch.device) -> list[Check]:
    """Every correctness check on `device`, printed as it finishes."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 checks compare fp32, not TF32
    torch.manual_seed(0)
    model = random_model(TINY.config(), torch.float32, torch.device("cpu"), "sdpa", std=0.5)
    examples = random_examples([12, 30, 7, 22, 16, 25, 9, 31], TINY.vocab, torch.Generator().manual_seed(1))
    batches = [collate(examples[:4], 0), collate(examples[4:], 0)]
    checks = [lambda: check_bilora_step(model, batches, device), lambda: check_peft_parity(model, batches[0], device),
              lambda: check_squeeze(device), lambda: check_packing(model, device, "sdpa", torch.float32, 1e-5),
              lambda: check_packing(model, device, "packed", torch.float32, 1e-5)]  # SDPA per document
    if device.type == "cuda":  # torch's varlen flash attention
        checks.append(lambda: check_packing(model, device, "packed", torch.bfloat16, 1e-3))
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        checks.append(lambda: check_packing(model, device, "flash_attention_2", torch.bfloat16, 1e-3))
    else:
        print("skip  packing with flash_attention_2: flash_attn is not installed or the device is not CUDA")
    results = []
    for run in checks:
        results.append(run())
        print(results[-1].line(), flush=True)
    torch.set_float32_matmul_precision(previous)
    return results


# ---------------------------------------------------------------------------------------------- throughput


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the card (PEAK_BF16_TFLOPS), None if unknown or not CUDA."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def base_matmul_params(model: nn.Module) -> int:
    """N: weights of every linear layer, the output head included (4-bit layers counted unpacked)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def step_flops(s: Shapes, n_base: int, n_adapter: int, lengths: list[int], passes: int) -> float:
    """Model FLOPs of one step (docs/GPU_CHECK.md): per token, frozen base forward 2N + input gradients 2N,
    adapters forward, input and weight gradients 6 N_adapter; causal attention 12 c d per layer for a token that
    sees c positions (forward QK^T and PV 4cd, backward 8cd), i.e. 6 L d l(l+1) per example of length l.
    Gradient-checkpointing recomputation is not counted (model FLOPs, not hardware FLOPs)."""
    tokens = sum(lengths)
    attention = 6 * s.layers * s.hidden * sum(n * (n + 1) for n in lengths)
    return passes * (tokens * (4 * n_base + 6 * n_adapter) + attention)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Collect dropped models, adapters and optimizer states and hand their device memory back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(step: Callable[[dict], object], batches: list[tuple[dict, list[int]]], warmup: int,
          device: torch.device) -> tuple[list[float], float | None]:
    """Seconds of each step after `warmup` untimed ones, and peak allocated GiB over all of them (CUDA only)."""
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i, (batch, _) in enumerate(batches):
        batch = to_device(batch, device)
        sync(device)
        start = time.perf_counter()
        step(batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return times, peak


def measure_ours(model: nn.Module, method: str, s: Shapes, batches: list, warmup: int, device: torch.device,
                 n_base: int, variant: str = "") -> dict:
    """One of our methods on `model`: adapters injected, timed, then removed (the row named `variant`, default
    the method)."""
    names = select_targets(model, "all-linear")
    bank = build_bank(layer_shapes(model, names), s.rank, 2.0 * s.rank, AUX_RANK if method == "bilora" else None,
                      1.0, seed=0).to(device)
    handles = inject(model, bank)
    step = METHOD_STEPS[method](model, bank, build_optimizer(bank, 1e-4, 0.0), Engine(), 1.0,
                                *([RHO[method]] if method in RHO else []))
    try:
        times, peak = timed(lambda b: step([b]), batches, warmup, device)
    finally:
        for handle in handles:
            handle.remove()
    n_adapter = sum(b.flat.numel() for b in bank.branches())
    return result_row(variant or method, times, peak, n_adapter, batches[warmup:],
                      lambda lengths: step_flops(s, n_base, n_adapter, lengths, step.passes))


def measure_peft(model: nn.Module, s: Shapes, batches: list, warmup: int, device: torch.device, n_base: int,
                 hf_loss: bool) -> dict:
    """PEFT LoRA (same rank, alpha and layers) with torch AdamW and clipping, then unloaded from `model`. Its loss
    is ours (token_loss_sum: the chunked head loss, reached through PEFT's attribute forwarding), or with
    `hf_loss` the model's own from `labels` (transformers' default: full-vocabulary fp32 logits, token mean), the
    baseline a user of PEFT with transformers' Trainer or TRL runs."""
    peft_model = get_peft_model(model, LoraConfig(r=s.rank, lora_alpha=2 * s.rank, target_modules="all-linear",
                                                  lora_dropout=0.0))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(batch: dict) -> None:
        if hf_loss:
            peft_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                       use_cache=False).loss.backward()
        else:
            loss, tokens = token_loss_sum(peft_model, batch)
            (loss / tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        times, peak = timed(step, batches, warmup, device)
    finally:
        peft_model.unload()
    n_adapter = sum(p.numel() for p in params)
    return result_row("peft, HF loss" if hf_loss else "peft", times, peak, n_adapter, batches[warmup:],
                      lambda lengths: step_flops(s, n_base, n_adapter, lengths, 1))


def default_policy(s: Shapes, device: torch.device, attn: str | None, quantize: bool) -> tuple[Recompute, KernelChoice]:
    """What train.py's defaults choose for this model and batch on `device`: the checkpointing from the memory plan
    (--gradient-checkpointing auto, for the free memory with this model's weights counted as free) and --kernels
    auto."""
    with tempfile.TemporaryDirectory() as folder:
        s.config().save_pretrained(folder)
        cfg = parse_config(["--model", folder, "--micro-batch-size", str(s.micro_batch), "--seq-len", str(s.seq_len),
                            "--rank", str(s.rank), "--loss-chunk", str(s.loss_chunk), "--packing",
                            "--attn-implementation", attn or "sdpa", "--quantize", "4bit" if quantize else "none",
                            "--bf16", "true" if device.type == "cuda" else "false"])
        plan = build_run_plan(cfg, 1)
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    recompute = choose(plan.blocks, plan.peak_bytes, free_memory_bytes(device) + held)
    return recompute, choose_kernels("auto", device, "llama", liger_model_types())


def result_row(variant: str, times: list[float], peak: float | None, n_adapter: int, batches: list,
               flops: Callable[[list[int]], float]) -> dict:
    """A table row over the timed `batches`: median step time, tokens/s (real tokens: packing leaves no padding),
    model TFLOP/s (`flops` of a step's example lengths)."""
    step_s = statistics.median(times)
    tokens = statistics.median(sum(lengths) for _, lengths in batches)
    return {"variant": variant, "step_s": step_s, "tokens_per_s": tokens / step_s, "peak_gib": peak,
            "adapter_params": n_adapter,
            "tflops_per_s": statistics.median(flops(lengths) for _, lengths in batches) / step_s / 1e12}


def quantize_4bit(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Swap every linear layer but the head for bitsandbytes' Linear4bit with the package's settings (NF4, double
    quantisation, compute and storage dtype `dtype`: LoadOptions.quantization_config), quantised in place."""
    import bitsandbytes as bnb

    qc = LoadOptions(dtype, "4bit").quantization_config()
    kwargs = {"compress_statistics": qc.bnb_4bit_use_double_quant, "quant_type": qc.bnb_4bit_quant_type,
              "quant_storage": qc.bnb_4bit_quant_storage}
    head = model.get_output_embeddings()
    for name in [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]:
        module = model.get_submodule(name)  # by name: each bf16 weight is freed once its layer is swapped
        assert module.bias is None, "a Llama has no linear biases"
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                  compute_dtype=qc.bnb_4bit_compute_dtype, device="meta", **kwargs)
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, module=layer, **kwargs).to(device)
        layer.support_avx512bf16_for_cpu = False  # as modeling loads it: no CPU repacking of the weights
        model.set_submodule(name, layer)
    model.is_loaded_in_4bit = True  # as from_pretrained marks it: PEFT then wraps the layers in its QLoRA Linear4bit


def throughput(s: Shapes, device: torch.device, quantize: bool, steps: int, warmup: int) -> dict:
    """lora, bilora, lora-sam, PEFT LoRA with our loss and with transformers', all with every block checkpointed,
    then lora and bilora as train.py's defaults choose (checkpointing, kernels), on one random model (4-bit base if
    `quantize`) and the same batches."""
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    attn = resolve_attn_implementation("auto", dtype, packing=True, config=s.config())  # flash-attn, else packed
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 adapters, as make_engine sets it
    model = random_model(s.config(), dtype, device, attn)
    n_base = base_matmul_params(model)
    if quantize:
        quantize_4bit(model, dtype, device)
    attach_head_loss(model, s.loss_chunk)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batches = packed_step_batches(s, warmup + steps, one_row=attn == "flash_attention_2")
    rows = [measure_ours(model, method, s, batches, warmup, device, n_base) for method in METHODS]
    rows += [measure_peft(model, s, batches, warmup, device, n_base, hf_loss) for hf_loss in (False, True)]
    recompute, kernels = default_policy(s, device, attn, quantize)  # last: Liger's patches stay on the model
    model.gradient_checkpointing_disable()
    apply_recompute(model, recompute)
    apply_kernels(model, kernels)
    policy = f"checkpointing {recompute.describe()} ({recompute.why}), {kernels.describe()}"
    rows += [measure_ours(model, method, s, batches, warmup, device, n_base, f"{method}, default policy")
             for method in ("lora", "bilora")]
    del model
    free(device)
    peak = peak_flops(device)
    for row in rows:
        row["mfu"] = row["tflops_per_s"] * 1e12 / peak if peak else None
    by = {row["variant"]: row for row in rows}
    speed = lambda a, b: by[a]["tokens_per_s"] / by[b]["tokens_per_s"]  # noqa: E731
    ratios = {"bilora/lora tokens/s": speed("bilora", "lora"), "lora-sam/lora tokens/s": speed("lora-sam", "lora"),
              "lora/peft tokens/s": speed("lora", "peft"), "lora/peft with HF loss tokens/s": speed("lora", "peft, HF loss"),
              "default-policy lora/peft with HF loss tokens/s": speed("lora, default policy", "peft, HF loss"),
              "default-policy lora/peft tokens/s": speed("lora, default policy", "peft"),
              "default-policy bilora/lora tokens/s": speed("bilora, default policy", "lora, default policy")}
    if by["lora"]["peak_gib"]:
        ratios["bilora/lora peak memory"] = by["bilora"]["peak_gib"] / by["lora"]["peak_gib"]
    return {"base": "nf4" if quantize else str(dtype).removeprefix("torch."), "attention": attn or "sdpa",
            "peak_tflops": peak and peak / 1e12, "rows": rows, "ratios": ratios, "default_policy": policy}


def four_bit_unavailable() -> str | None:
    """Why the 4-bit part cannot run here (None: it can)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (docs/GPU_CHECK.md: bring its wheel)"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken install (e.g. no CUDA library) must not stop the report
        return f"bitsandbytes does not import ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    """The report as markdown: the device, the correctness checks, one throughput table per base."""
    lines = [f"# GPU check: {report['device']}", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             "", "| check | result | max error | tolerance | note |", "|---|---|---|---|---|"]
    lines += [f"| {c['name']} | {'PASS' if c['passed'] else 'FAIL'} | {c['error']:.2e} | {c['tol']:.0e} | {c['note']} |"
              for c in report["checks"]]
    s = report["shapes"]
    for section in report["throughput"]:
        lines += ["", f"## {section['base']} base: {s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}, "
                  f"rank {s['rank']} on all linear layers, {s['micro_batch']} packed rows of {s['seq_len']}, "
                  f"{section['attention']}; gradient checkpointing on every block but in the default-policy rows "
                  f"({section['default_policy']})", "",
                  "| variant | tokens/s | step s | peak GiB | TFLOP/s | MFU | adapter params |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {_fmt(r['peak_gib'], '.2f')} | "
                  f"{r['tflops_per_s']:.3g} | {_fmt(r['mfu'], '.1%')} | {r['adapter_params']:,} |"
                  for r in section["rows"]]
        lines += [""] + [f"- {name}: {value:.3f}" for name, value in section["ratios"].items()]
        lines.append(f"- MFU: model FLOPs/s (docs/GPU_CHECK.md) over a dense bf16 peak of {section['peak_tflops']} "
                     "TFLOP/s" if section["peak_tflops"] else "- MFU: n/a (no bf16 peak known for this device)")
    lines += [f"\n{note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "flash_attn"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check", help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device (CPU included), seconds")
    parser.add_argument("--steps", type=int, default=5, help=f"timed steps per variant (after {WARMUP} warm-up steps)")
    parser.add_argument("--skip-4bit", action="store_true", help="leave out the 4-bit base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def write_report(out: Path, report: dict) -> None:
    """Writes the JSON and markdown report (after every part, so a run cut short keeps what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    shapes = SMOKE if args.smoke else LLAMA3_8B
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({device})"
    started = time.perf_counter()
    out = Path(args.out)
    checks = correctness(device)
    report = {"device": name, "versions": versions(), "shapes": asdict(shapes), "throughput": [],
              "checks": [asdict(c) | {"passed": c.passed} for c in checks], "notes": []}
    write_report(out, report)
    report["throughput"].append(throughput(shapes, device, False, args.steps, WARMUP))
    write_report(out, report)
    why = "--skip-4bit" if args.skip_4bit else four_bit_unavailable()
    if why is None:
        report["throughput"].append(throughput(shapes, device, True, args.steps, WARMUP))
    else:
        report["notes"].append(f"4-bit base skipped: {why}")
    report["notes"].append(f"Total {time.perf_counter() - started:.0f} s"
                           f"{' (--smoke: tiny shapes)' if args.smoke else ''}.")
    write_report(out, report)
    print("\n" + markdown(report))
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
