"""Helpers shared by tests and the worker scripts they launch: launching runs, reading their metrics, fixtures."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, DeepseekV3Config, GptOssConfig, LlamaConfig, MixtralConfig,
                          OlmoeConfig, PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig)

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.adapters.bank import AdapterBank, Branch, LayerShape
from bilora_dist.checkpoint.store import save_checkpoint
from bilora_dist.cli import run_cli, train_main
from bilora_dist.engines.base import Engine

# AdamW divides by sqrt(v) + eps: in the few entries whose gradient is near zero, float-order noise becomes update
# noise of up to ~lr (a 1-ulp change of every base weight moves single adapter entries by 4e-4 after 6 steps).
# A trained tensor is therefore compared as a whole (relative Frobenius error) and by its bulk (median error),
# never element by element; a 1-ulp change of the base reaches 2.4e-4 and 2.4e-6 of them.
TRAINED_RTOL, TRAINED_BULK_RTOL = 1e-3, 1e-5
# A squeeze re-factorises every layer by SVD: the noise, rounded into the new basis, reaches every entry of the
# products B A that later steps train on (2-rank ZeRO-3 vs 1 process, two squeezes in 6 steps: 1.3e-5).
SQUEEZED_BULK_RTOL = 1e-4
# loss, gradient norm and auxiliary norm of every step between engines: sums of the same terms in another order (a
# 1-ulp change of every base weight moves them by 2.3e-7, 16 ulps by 1.2e-6)
METRIC_RTOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def busy_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 held by a listening socket while the context lasts (another run's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def two_ranks(runner: str) -> list[str]:
    """The command prefix that starts 2 local processes under `deepspeed` or `torchrun`, on a free port."""
    if runner == "deepspeed":
        return ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
    return ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port())]


def ds_config_path(kind: str) -> str:
    """The ds_config of launcher kind `kind`: ds_configs/KIND.json, or the test-only tests/fixtures/KIND.json."""
    shipped = f"ds_configs/{kind}.json"
    return shipped if (ROOT / shipped).exists() else f"tests/fixtures/{kind}.json"


def launcher(kind: str) -> list[str]:
    """launch/train.py on one process ("single"), 2 DeepSpeed ranks ("zero2", "zero3", "zero3_offload", or
    "zero3_partitioned": every parameter partitioned, gathered for each module and released after it) or 2
    FSDP2 ranks ("fsdp")."""
    if kind == "single":
        return [sys.executable, "launch/train.py"]
    if kind.startswith("zero"):
        return two_ranks("deepspeed") + ["launch/train.py", "--ds_config", ds_config_path(kind)]
    return two_ranks("torchrun") + ["launch/train.py", "--engine", "fsdp"]


def run_env(**overrides: str) -> dict[str, str]:
    """The environment of a launched process: one thread each, the repository and tests/ importable."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path,
            **overrides}


def run_cmd(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 600,
            **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root with run_env() (unless `env`), capturing its output as text."""
    return subprocess.run(cmd, cwd=kwargs.pop("cwd", ROOT), env=run_env() if env is None else env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def run_ok(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """run_cmd that asserts exit status 0, showing the tail of both streams otherwise."""
    proc = run_cmd(cmd, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_metrics(out: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_rows(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl logged by training steps (those with a loss)."""
    return [r for r in read_metrics(out) if "loss" in r]


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """A 2-layer Llama of hidden size 32 with grouped-query attention and tied embeddings."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True)


MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3")


def tiny_moe_config(family: str, vocab_size: int) -> PretrainedConfig:
    """A 32-wide mixture-of-experts config of `family` with 4 experts, top-2: Qwen2-MoE with a shared expert and
    its gate, gpt-oss with its transposed, interleaved, biased experts, DeepSeek-V3 with a first dense layer."""
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, num_experts_per_tok=2,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {"qwen2_moe": lambda: Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16,
                                                shared_expert_intermediate_size=24, num_experts=4),
            "qwen3_moe": lambda: Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16,
                                                num_experts=4, head_dim=8),
            "mixtral": lambda: MixtralConfig(**common, intermediate_size=16, num_local_experts=4),
            "olmoe": lambda: OlmoeConfig(**common, intermediate_size=16, num_experts=4),
            "gpt_oss": lambda: GptOssConfig(**common, intermediate_size=16, num_local_experts=4, head_dim=8,
                                            sliding_window=8),
            "deepseek_v3": lambda: DeepseekV3Config(**{**common, "num_hidden_layers": 3, "num_key_value_heads": 4},
                                                    intermediate_size=48, moe_intermediate_size=16,
                                                    first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
                                                    n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
                                                    qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)}[family]()


def random_adapted_model(config: PretrainedConfig) -> tuple[torch.nn.Module, AdapterBank]:
    """A random frozen fp32 model of `config` with a Bi-LoRA bank of random (nonzero) factors injected."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().requires_grad_(False)
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 4, 8.0, 2, 1.0, 0)
    with torch.no_grad():
        for branch in bank.branches():
            branch.flat.normal_(0, 0.1)
    inject(model, bank)
    return model, bank


def random_branch(seed: int = 7) -> Branch:
    """Twelve layers of four shapes with decaying spectra, scale 2."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [LayerShape(f"l{i}", (24, 40, 16)[i % 3], (32, 16)[i % 2]) for i in range(12)]
    pairs = [(torch.randn(8, s.in_features, generator=gen) * torch.logspace(0, -2, 8)[:, None],
              torch.randn(s.out_features, 8, generator=gen)) for s in shapes]
    return Branch.from_factors(shapes, pairs, [2.0] * len(shapes))


def fixture_bank() -> AdapterBank:
    """A Bi-LoRA bank over three small layers with random primary and auxiliary factors."""
    shapes = [LayerShape(f"l{i}", 12, 10) for i in range(3)]
    gen = torch.Generator().manual_seed(3)
    primary = Branch(shapes, [4] * 3, [2.0] * 3, torch.randn(3 * 4 * 22, generator=gen))
    aux = Branch(shapes, [2] * 3, [1.0] * 3, torch.randn(3 * 2 * 22, generator=gen))
    return AdapterBank(shapes, primary, aux)


def checkpoint_fixture(out, step: int, keep_last: int = 0, return_state: bool = False):
    """Save a checkpoint of a fixture bank after one AdamW step, as the trainer would at `step`."""
    bank = fixture_bank()
    optimizer = torch.optim.AdamW([bank.primary.flat, bank.aux.flat], lr=1e-2)
    bank.primary.flat.grad = torch.ones_like(bank.primary.flat)
    bank.aux.flat.grad = torch.ones_like(bank.aux.flat)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = {"step": step, "consumed": 8 * step, "total_steps": 10, "global_batch": 8, "world_size": 1,
             "squeeze_history": [], "identity": {}}
    save_checkpoint(Path(out), state, bank, optimizer, scheduler, "", Engine(), keep_last)
    return (bank, optimizer) if return_state else None


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius, in float64): float-order noise scales with the tensor, not the entry."""
    want = want.detach().double()
    return float((got.detach().double() - want).norm() / want.norm())


def lora_products(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's B A from a PEFT adapter state dict (lora_A / lora_B pairs), keyed by the layer."""
    return {key.removesuffix(".lora_A.weight"): adapter[key.replace("lora_A", "lora_B")] @ A
            for key, A in adapter.items() if key.endswith(".lora_A.weight")}


def assert_trained_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                         bulk_rtol: float = TRAINED_BULK_RTOL) -> None:
    """Tensors trained by AdamW agree up to summation order: each within TRAINED_RTOL relative Frobenius error,
    and its median entry error within `bulk_rtol` of its median magnitude (a whole layer off by 1e-3 fails)."""
    assert got.keys() == want.keys()
    for key, ref in want.items():
        ref = ref.detach().double()
        error = relative_error(got[key], ref)
        bulk = float((got[key].detach().double() - ref).abs().median() / ref.abs().median())
        assert error < TRAINED_RTOL and bulk < bulk_rtol, f"{key}: relative error {error:.2e}, bulk {bulk:.2e}"


def assert_same_run(out: Path, ref: Path, steps: int, products: bool = False) -> None:
    """Every step's loss, gradient norm and auxiliary norm to METRIC_RTOL; the trained adapters layer by layer
    (with `products`, each layer's B A: after a squeeze the factors are an SVD basis, which float noise rotates)."""
    rows, ref_rows = step_rows(out), step_rows(ref)
    assert len(rows) == len(ref_rows) == steps
    for key in ("loss", "grad_norm", "aux_norm"):
        assert all((key in r) == (key in ref_rows[0]) for r in rows + ref_rows), key
        if key in ref_rows[0]:
            assert [r[key] for r in rows] == pytest.approx([r[key] for r in ref_rows], rel=METRIC_RTOL, abs=0), key
    got, want = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, ref))
    if products:
        got, want = lora_products(got), lora_products(want)
    assert_trained_close(got, want, SQUEEZED_BULK_RTOL if products else TRAINED_BULK_RTOL)


def error_line(capsys, argv: list[str], main=train_main) -> str:
    """The one `error:` line (exit 2, nothing else on stderr) that command `main` (default: training) gives `argv`."""
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def sft_trainer(model_dir: Path, data: Path, out: Path, callbacks: list, *, steps: int, mbs: int, accum: int,
                lr: float, seq_len: int, max_steps: int | None = None, save_steps: int = 0, **extra):
    """TRL's SFTTrainer (PEFT LoRA r 8, alpha 16, all-linear) on the project's tokenized examples of `data`, fed
    in its BatchPlan order through its collate, in fp32 with torch's AdamW and a cosine schedule: the run
    `bilora-dist train` makes with the same flags (tests/integrations). With W ranks the trainer deals
    consecutive micro-batches to the ranks in turn, so the order is step, then accumulation, then rank."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from bilora_dist.data import BatchPlan, collate, prepare_examples
    from bilora_dist.data.tokenize import TokenizeOptions
    from bilora_dist.model.loading import load_tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = load_tokenizer(str(model_dir))
    examples = prepare_examples(str(data), "--data", tokenizer, TokenizeOptions(seq_len), log=lambda _: None).examples
    plan = BatchPlan(len(examples), mbs * accum * world, seed=0)
    order = [i for t in range(steps) for a in range(accum) for r in range(world)
             for i in plan.micro_batches(t, r, world, accum)[a]]

    def collator(batch_examples):
        batch = collate(batch_examples, tokenizer.pad_token_id)
        batch.pop("logits_to_keep")
        return batch

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=mbs, gradient_accumulation_steps=accum,
                     max_steps=max_steps or steps, learning_rate=lr, lr_scheduler_type="cosine",
                     warmup_steps=math.ceil(0.05 * steps), optim="adamw_torch", max_grad_norm=1.0, bf16=False,
                     gradient_checkpointing=False, logging_steps=1, save_strategy="steps" if save_steps else "no",
                     save_steps=save_steps or 500, report_to=[], train_sampling_strategy="sequential",
                     dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, seed=0,
                     use_cpu=True, max_length=None, disable_tqdm=True, **extra)
    train_set = examples.select(order)
    return SFTTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=train_set,
                      eval_dataset=train_set.select(range(4)), processing_class=tokenizer, data_collator=collator,
                      callbacks=callbacks,
                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
