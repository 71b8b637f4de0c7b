"""Records, loss masks, left-padded batches and the step-indexed batch plan."""

from __future__ import annotations

import datasets
import pytest
import torch

from bilora_dist.data import IGNORE, BatchPlan, collate, load_records, tokenize
from bilora_dist.loss import token_loss_sum
from bilora_dist.modeling import load_frozen_model

CHAT = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]}


def _supervised_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE])


def test_prompt_completion_loss_covers_completion_and_eos_only(tokenizer):
    ex = tokenize({"prompt": "Definition: a tree\nCategory:", "completion": " plant"}, tokenizer, 64)
    assert _supervised_text(tokenizer, ex) == " plant" + tokenizer.eos_token
    assert ex.input_ids[:len(ex.input_ids) - 2] == tokenizer("Definition: a tree\nCategory:")["input_ids"]


def test_messages_loss_covers_assistant_turns_only(tokenizer):
    ex = tokenize(CHAT, tokenizer, 256)
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=False)
    assert ex.input_ids == list(full)
    supervised = _supervised_text(tokenizer, ex)
    assert "Blue." in supervised and "Green." in supervised
    assert "colour" not in supervised and "Another" not in supervised


def test_text_is_fully_supervised_and_truncation_keeps_the_completion(tokenizer):
    ex = tokenize({"text": "one two three four five"}, tokenizer, 3)
    assert len(ex.input_ids) == 3 and ex.labels == ex.input_ids
    long = tokenize({"prompt": "word " * 100, "completion": " plant"}, tokenizer, 16)
    assert len(long.input_ids) == 16
    assert _supervised_text(tokenizer, long) == " plant" + tokenizer.eos_token


def test_left_padded_batch_loss_equals_sum_of_single_sequence_losses(tiny_model_dir, tokenizer, train_records):
    model = load_frozen_model(str(tiny_model_dir))
    examples = [tokenize(r, tokenizer, 64) for r in train_records[:5]]
    assert len({len(e.input_ids) for e in examples}) > 1  # padding is exercised
    with torch.no_grad():
        batch_loss, batch_tokens = token_loss_sum(model, collate(examples, tokenizer.pad_token_id))
        singles = [token_loss_sum(model, collate([e], tokenizer.pad_token_id)) for e in examples]
    assert float(batch_tokens) == sum(float(t) for _, t in singles)
    assert float(batch_loss) == pytest.approx(sum(float(loss) for loss, _ in singles), rel=1e-5)


@pytest.mark.parametrize("world,accum", [(1, 4), (2, 2), (4, 1)])
def test_batch_plan_gives_every_world_size_the_same_global_batch(world, accum):
    plan = BatchPlan(n_examples=10, global_batch=8, seed=3)
    for step in range(5):
        shares = [i for r in range(world) for mb in plan.micro_batches(step, r, world, accum) for i in mb]
        assert shares == plan.global_indices(step)
    first_epoch = plan.global_indices(0) + plan.global_indices(1)[:2]
    assert sorted(first_epoch) == list(range(10))


def test_parquet_and_saved_dataset_directories_load(tmp_path, train_records):
    ds = datasets.Dataset.from_list(train_records[:6])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_records(str(tmp_path / "d.parquet"), "--data") == train_records[:6]
    assert load_records(str(tmp_path / "saved"), "--data") == train_records[:6]
