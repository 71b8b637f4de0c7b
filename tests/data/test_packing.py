"""--packing: examples packed into rows with restarting position ids compute exactly the unpacked loss and
gradients, never attend across examples, and a packed run trains on the same examples with less padding."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from bilora_dist.adapters import build_bank, inject, layer_shapes, select_targets
from bilora_dist.data import IGNORE, BatchPlan, Example, collate, collate_packed, pack_rows, tokenize
from bilora_dist.training.loss import token_loss_sum
from bilora_dist.model.loading import load_frozen_model
from tests_support import relative_error, run_ok, step_rows

IMPLEMENTATIONS = ["sdpa", "eager", "packed"]


def _examples(tokenizer, records) -> list[Example]:
    """Prompt-masked prompt/completion examples and fully supervised text ones, of many lengths."""
    masked = [tokenize(r, tokenizer, 64) for r in records[:5]]
    text = [tokenize({"text": r["prompt"] + r["completion"]}, tokenizer, 64) for r in records[5:9]]
    return masked + text


def _segments(batch) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of every run of a packed batch whose position ids count 0, 1, 2, ..."""
    out = []
    for ids, labels, pos in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["position_ids"].tolist()):
        starts = [c for c, p in enumerate(pos) if p == 0] + [len(pos)]
        assert all(pos[a:b] == list(range(b - a)) for a, b in zip(starts, starts[1:]))
        out += [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]
    return out


def _adapted_model(model_dir: Path, implementation: str):
    """The tiny Llama with the given attention kernel and a Bi-LoRA bank whose every factor is non-zero."""
    model = load_frozen_model(str(model_dir))
    model.set_attn_implementation(implementation)
    bank = build_bank(layer_shapes(model, select_targets(model, "all-linear")), 4, 8.0, 2, 1.0, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for branch in bank.branches():
            branch.flat.copy_(torch.randn(branch.flat.shape, generator=g) * 0.1)
    inject(model, bank)
    return model, bank


# ---- collate_packed ----

def test_pack_rows_is_first_fit_decreasing():
    # longest first: 5 -> row 0, 4 -> row 1, 3 -> row 1 (row 0 has 2 left), 2 -> row 0
    assert pack_rows([5, 3, 2, 4], 7) == [[0, 2], [3, 1]]
    assert pack_rows([2, 2, 2], 6) == [[0, 1, 2]]
    with pytest.raises(ValueError):
        pack_rows([8], 7)


@pytest.mark.parametrize("seq_len", [64, 40, None])
def test_collate_packed_holds_every_example_once_with_restarting_positions(tokenizer, train_records, seq_len):
    examples = _examples(tokenizer, train_records)
    batch = collate_packed(examples, seq_len, tokenizer.pad_token_id)
    total = sum(len(e.input_ids) for e in examples)
    rows, width = batch["input_ids"].shape
    assert batch["attention_mask"] is None
    assert width <= (seq_len or total) and (rows == 1) == (seq_len is None)
    segments = _segments(batch)
    pads = [s for s in segments if set(s[0]) == {tokenizer.pad_token_id} and set(s[1]) == {IGNORE}]
    real = [s for s in segments if s not in pads]
    assert sum(len(ids) for ids, _ in pads) == rows * width - total  # padding only to square the rows
    assert bool(pads) == (seq_len is not None)  # rows of 61, 55, 53 and 36, 38, 37, 34, 24 tokens
    # every example once, its own first token never a target, the rest of its labels as tokenized
    want = sorted((e.input_ids, [IGNORE] + e.labels[1:]) for e in examples)
    assert sorted(real) == want
    assert batch["position_ids"].max() < max(len(e.input_ids) for e in examples)
    again = collate_packed(examples, seq_len, tokenizer.pad_token_id)
    assert all(torch.equal(batch[k], again[k]) for k in ("input_ids", "labels", "position_ids"))
    keep = batch["logits_to_keep"]  # every target lies in the kept span
    assert (batch["labels"][:, :width - keep + 1] == IGNORE).all()


# ---- the loss and gradients of a packed batch ----

def test_left_padding_never_makes_a_pad_predict_an_examples_first_token(tiny_model_dir, tokenizer, train_records):
    """Fully supervised examples of different lengths: the padded batch's loss is the sum of the singles'."""
    model = load_frozen_model(str(tiny_model_dir))
    examples = _examples(tokenizer, train_records)[5:]
    assert len({len(e.input_ids) for e in examples}) > 1 and all(e.labels[0] != IGNORE for e in examples)
    with torch.no_grad():
        loss, tokens = token_loss_sum(model, collate(examples, tokenizer.pad_token_id))
        singles = [token_loss_sum(model, collate([e], tokenizer.pad_token_id)) for e in examples]
    assert float(tokens) == sum(len(e.input_ids) - 1 for e in examples) == sum(float(t) for _, t in singles)
    assert float(loss) == pytest.approx(sum(float(s) for s, _ in singles), rel=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_packed_loss_and_gradients_equal_unpacked(tiny_model_dir, tokenizer, train_records, implementation):
    model, bank = _adapted_model(tiny_model_dir, implementation)
    examples = _examples(tokenizer, train_records)
    flats = [b.flat for b in bank.branches()]

    def loss_and_grads(batch):
        loss, tokens = token_loss_sum(model, batch)
        return loss, tokens, torch.autograd.grad(loss, flats)

    want_loss, want_tokens, want_grads = loss_and_grads(collate(examples, tokenizer.pad_token_id))
    for seq_len in (64, 40, None):  # rows without and with padding, and one row
        loss, tokens, grads = loss_and_grads(collate_packed(examples, seq_len, tokenizer.pad_token_id))
        assert float(tokens) == float(want_tokens)
        assert float(loss.detach()) == pytest.approx(float(want_loss.detach()), rel=1e-5)
        for got, want in zip(grads, want_grads):
            assert relative_error(got, want) < 1e-5, (seq_len, relative_error(got, want))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_attention_across_packed_examples(tiny_model_dir, tokenizer, train_records, implementation):
    """Changing the first example of a row leaves the second's logits exactly as they were; the same change
    moves them when the row is a plain concatenation (positions not restarted)."""
    model, _ = _adapted_model(tiny_model_dir, implementation)
    second, first = _examples(tokenizer, train_records)[:2]
    changed = Example([(t + 17) % len(tokenizer) for t in first.input_ids], first.labels)

    def second_logits(example: Example, naive: bool) -> torch.Tensor:
        batch = collate_packed([example, second], None, tokenizer.pad_token_id)
        start = len(example.input_ids)
        assert batch["input_ids"][0, start:].tolist() == second.input_ids
        positions = torch.arange(batch["input_ids"].shape[1])[None] if naive else batch["position_ids"]
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=positions, use_cache=False).logits
        return logits[0, start:]

    assert len(first.input_ids) > len(second.input_ids)  # first-fit decreasing puts the longer one first
    torch.testing.assert_close(second_logits(changed, False), second_logits(first, False), rtol=0, atol=1e-6)
    assert (second_logits(changed, True) - second_logits(first, True)).abs().max() > 1e-3


# ---- a packed run ----

def _padding_fraction(examples: list[Example], plan: BatchPlan, step: int, micro: int) -> float:
    """Pad tokens / all tokens of the step's left-padded micro-batches, from the examples' lengths."""
    lengths = [[len(examples[i].input_ids) for i in mb] for mb in plan.micro_batches(step, 0, 1, micro)]
    return 1 - sum(map(sum, lengths)) / sum(len(mb) * max(mb) for mb in lengths)


def test_packed_run_trains_on_the_same_examples_with_less_padding(tiny_model_dir, module_data, tokenizer,
                                                                  train_records, tmp_path):
    def run(out: Path, *extra: str) -> list[dict]:
        run_ok([sys.executable, "launch/train.py", "--model", str(tiny_model_dir), "--data", str(module_data[0]),
                "--eval-data", str(module_data[1]), "--method", "bilora", "--max-steps", "2",
                "--micro-batch-size", "4", "--grad-accum", "2", "--lr", "1e-2", "--warmup-ratio", "0",
                "--output-dir", str(out), *extra], timeout=600)
        return step_rows(out)

    unpacked, packed = run(tmp_path / "unpacked"), run(tmp_path / "packed", "--packing")
    examples = [tokenize(r, tokenizer, 256) for r in train_records[:48]]
    plan = BatchPlan(len(examples), 8, seed=0)
    for step, (u, p) in enumerate(zip(unpacked, packed)):
        assert p["loss"] == pytest.approx(u["loss"], rel=1e-5)
        assert u["padding_fraction"] == pytest.approx(_padding_fraction(examples, plan, step, 2), abs=1e-12)
        assert u["padding_fraction"] > 0.2
        # each micro-batch of 4 fits one row of 256 tokens: no padding at all
        assert all(sum(len(examples[i].input_ids) for i in mb) <= 256 for mb in plan.micro_batches(step, 0, 1, 2))
        assert p["padding_fraction"] == 0
        assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in (u, p))
    assert len(packed) == 2


def test_auto_attention_sends_packed_rows_to_the_packed_kernel_where_the_model_allows():
    from transformers import GptOssConfig, LlamaConfig, MistralConfig

    from bilora_dist.errors import UserError
    from bilora_dist.model.loading import resolve_attn_implementation

    llama, mistral, gpt_oss = LlamaConfig(), MistralConfig(sliding_window=64), GptOssConfig()
    assert resolve_attn_implementation("auto", torch.float32, packing=True, config=llama) == "packed"
    assert resolve_attn_implementation("auto", torch.float32, packing=False, config=llama) is None
    assert resolve_attn_implementation("auto", torch.float32, packing=True, config=mistral) is None
    assert resolve_attn_implementation("auto", torch.float32, packing=True, config=gpt_oss) is None
    with pytest.raises(UserError, match="packed reads the documents of packed rows from their position ids: add "
                                        "--packing"):
        resolve_attn_implementation("packed", torch.float32, packing=False, config=llama)
    with pytest.raises(UserError, match="mistral has sliding-window, soft-capped or sink attention"):
        resolve_attn_implementation("packed", torch.float32, packing=True, config=mistral)
