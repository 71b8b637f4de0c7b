"""Record formats, chat tokenization and loss masks, left-padded batches and the step-indexed batch plan."""

from __future__ import annotations

from copy import deepcopy
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from bilora_dist.config.train import TrainConfig, parse_config
from bilora_dist.data import IGNORE, BatchPlan, collate, tokenize
from bilora_dist.data.formats import FORMATS, detect_format, record_error, to_messages
from bilora_dist.data.tokenize import TokenizeOptions, tokenize_record
from bilora_dist.errors import UserError
from bilora_dist.training.loss import token_loss_sum
from bilora_dist.model.loading import load_frozen_model

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


# ---- record formats and chat tokenization ----

QWEN3_TEMPLATE = (Path(__file__).parents[1] / "fixtures" / "qwen3_chat_template.jinja").read_text()
# ChatML with the assistant turn, its end token and the newline after it marked as generated.
GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}] + CHAT["messages"]


def _with_template(tokenizer, template: str | None):
    copy = deepcopy(tokenizer)
    copy.chat_template = template
    return copy


def _supervised_runs(tokenizer, out: dict) -> list[str]:
    """The decoded maximal runs of consecutive supervised tokens."""
    runs, run = [], []
    for token, label in zip(out["input_ids"], out["labels"]):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            runs, run = runs + [tokenizer.decode(run)], []
    return runs + ([tokenizer.decode(run)] if run else [])


def _render_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def _prefix_differencing(tokenizer, messages) -> list[int]:
    """The old tokenization: each turn's tokens as the difference of the renders of successive prefixes."""
    ids: list[int] = []
    for i in range(len(messages)):
        ids += _render_ids(tokenizer, messages[:i + 1])[len(ids):]
    return ids


@pytest.mark.parametrize("messages", [CHAT["messages"], SYSTEM_CHAT])
def test_chat_ids_are_the_full_render_and_loss_covers_assistant_contents_and_end_tokens(tokenizer, messages):
    out = tokenize_record({"messages": messages}, "messages", tokenizer, TokenizeOptions(256))
    assert out["input_ids"] == _render_ids(tokenizer, messages)
    assistant = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert _supervised_runs(tokenizer, out) == assistant
    last = tokenize_record({"messages": messages}, "messages", tokenizer, TokenizeOptions(256, last_turn_only=True))
    assert last["input_ids"] == out["input_ids"] and _supervised_runs(tokenizer, last) == assistant[-1:]
    every = tokenize_record({"messages": messages}, "messages", tokenizer, TokenizeOptions(256, train_on_prompt=True))
    assert every["input_ids"] == out["input_ids"] == every["labels"]
    cut = tokenize_record({"messages": messages}, "messages", tokenizer, TokenizeOptions(20))
    assert cut == {"input_ids": out["input_ids"][:20], "labels": out["labels"][:20]}


def test_qwen3_template_is_tokenized_as_its_full_render_or_refused_in_one_line(tokenizer):
    qwen3 = _with_template(tokenizer, QWEN3_TEMPLATE)
    messages = [{"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nBlue."},
                {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "<think>\nAgain.\n</think>\n\nGreen."}]
    full = _render_ids(qwen3, messages)
    old = _prefix_differencing(qwen3, messages)  # what the old tokenization fed the model
    assert old != full and "Another?" in qwen3.decode(full) and "Another?" not in qwen3.decode(old)
    with pytest.raises(UserError, match=r"assistant turn 1 of 2 .*use --last-turn-only") as refused:
        tokenize_record({"messages": messages}, "messages", qwen3, TokenizeOptions(256))
    assert "\n" not in str(refused.value)
    last = tokenize_record({"messages": messages}, "messages", qwen3, TokenizeOptions(256, last_turn_only=True))
    assert last["input_ids"] == full
    assert _supervised_runs(qwen3, last) == ["<think>\nAgain.\n</think>\n\nGreen.<|im_end|>"]
    every = tokenize_record({"messages": messages}, "messages", qwen3, TokenizeOptions(256, train_on_prompt=True))
    assert every["input_ids"] == every["labels"] == full


def test_generation_template_loss_mask_is_the_templates_assistant_mask(tokenizer):
    marked = _with_template(tokenizer, GENERATION_TEMPLATE)
    own = marked.apply_chat_template(SYSTEM_CHAT, return_dict=True, return_assistant_tokens_mask=True)
    out = tokenize_record({"messages": SYSTEM_CHAT}, "messages", marked, TokenizeOptions(256))
    assert out["input_ids"] == own["input_ids"]
    assert [int(lab != IGNORE) for lab in out["labels"]] == own["assistant_masks"]
    assert _supervised_runs(marked, out) == ["Blue.<|im_end|>\n", "Green.<|im_end|>\n"]  # the newline: the template's
    last = tokenize_record({"messages": SYSTEM_CHAT}, "messages", marked, TokenizeOptions(256, last_turn_only=True))
    assert _supervised_runs(marked, last) == ["Green.<|im_end|>\n"]


def test_alpaca_with_system_and_history_tokenizes_as_the_same_messages_written_by_hand(tokenizer):
    record = {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "Be brief.",
              "history": [["Hi", "Hello!"], ["2+2?", "4"]]}
    by_hand = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "4"}, {"role": "user", "content": "Translate.\nchat"},
               {"role": "assistant", "content": "cat"}]
    opts = TokenizeOptions(256)
    assert to_messages(record, "alpaca") == by_hand
    assert tokenize_record(record, "alpaca", tokenizer, opts) == tokenize_record({"messages": by_hand}, "messages",
                                                                                  tokenizer, opts)
    bare = {"instruction": "Name a colour.", "input": "", "output": "Blue.", "system": None, "history": None}
    assert to_messages(bare, "alpaca") == CHAT["messages"][:2]


def test_sharegpt_roles_and_system_prompts_become_messages(tokenizer):
    turns = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
             {"from": "user", "value": "Another?"}, {"from": "assistant", "value": "Green."}]
    assert to_messages({"conversations": turns}, "sharegpt") == CHAT["messages"]
    assert to_messages({"conversations": turns, "system": "Be brief."}, "sharegpt") == SYSTEM_CHAT
    own_system = [{"from": "system", "value": "Be brief."}] + turns
    assert to_messages({"conversations": own_system, "system": "ignored"}, "sharegpt") == SYSTEM_CHAT
    opts = TokenizeOptions(256)
    assert (tokenize_record({"conversations": own_system}, "sharegpt", tokenizer, opts)
            == tokenize_record({"messages": SYSTEM_CHAT}, "messages", tokenizer, opts))


@pytest.mark.parametrize("columns,fmt", [
    (["instruction", "input", "output"], "alpaca"), (["instruction", "output", "text"], "alpaca"),
    (["conversations", "system"], "sharegpt"), (["prompt", "prompt_id", "messages"], "messages"),
    (["prompt", "completion"], "prompt_completion"), (["text", "prompt", "completion"], "prompt_completion"),
    (["text", "id"], "text")])
def test_format_is_detected_from_the_columns(columns, fmt):
    assert detect_format(columns, "--data d.jsonl") == fmt


def test_undetectable_columns_and_forced_formats(tokenizer):
    with pytest.raises(UserError, match=r"^--data d.jsonl: no known record format in columns \['answer', 'question'\]"):
        detect_format(["question", "answer"], "--data d.jsonl")
    record = {"prompt": "Say", "completion": " yes", "text": "all of it"}
    forced = tokenize_record(record, "text", tokenizer, TokenizeOptions(64))
    assert forced["input_ids"] == forced["labels"] == tokenizer("all of it")["input_ids"] + [tokenizer.eos_token_id]
    assert record_error(record, "alpaca") == ("not a alpaca record like the rest of the dataset (expected "
                                              "instruction, output; keys are ['completion', 'prompt', 'text'])")
    assert record_error({"instruction": 3, "output": "a"}, "alpaca") == \
        "'instruction' must be a string (and 'input', if given, a string)"


@pytest.mark.parametrize("record,fmt,problem", [
    ({"instruction": "", "input": None, "output": "x"}, "alpaca", "'instruction' and 'input' are both empty"),
    ({"instruction": "q", "output": ""}, "alpaca", "'output' must be a non-empty string"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "alpaca",
     "'history' must be a list of [user, assistant] string pairs"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "sharegpt",
     "conversations[1]: unknown 'from' value 'bot' (expected system, human/user or gpt/assistant)"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt", "'conversations' has no gpt turn"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", "conversations[0] must have string 'from' and 'value'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "'messages' has no assistant turn"),
    ({"prompt": "q", "completion": ""}, "prompt_completion", "'completion' is empty"),
    ({"text": ""}, "text", "'text' must be a non-empty string"),
    (["not", "a", "dict"], "text", "not a JSON object")])
def test_each_bad_record_is_named_in_one_line(record, fmt, problem):
    assert record_error(record, fmt) == problem
    good = {"alpaca": {"instruction": "q", "input": None, "output": "a", "system": None, "history": None},
            "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "messages": CHAT, "prompt_completion": {"prompt": "q", "completion": "a"}, "text": {"text": "t"}}
    assert record_error(good[fmt], fmt) is None


def test_train_on_prompt_supervises_the_prompt_of_prompt_completion_records(tokenizer):
    record = {"prompt": "Definition: a tree\nCategory:", "completion": " plant"}
    default = tokenize_record(record, "prompt_completion", tokenizer, TokenizeOptions(64))
    every = tokenize_record(record, "prompt_completion", tokenizer, TokenizeOptions(64, train_on_prompt=True))
    assert every["input_ids"] == default["input_ids"] == every["labels"]


def test_chat_template_problems_and_flag_conflicts_are_one_line_errors(tokenizer):
    with pytest.raises(UserError, match="need a tokenizer with a chat template"):
        tokenize_record(CHAT, "messages", _with_template(tokenizer, None), TokenizeOptions(64))
    strict = _with_template(tokenizer, "{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(UserError, match="cannot render this conversation: Conversation roles must alternate$"):
        tokenize_record(CHAT, "messages", strict, TokenizeOptions(64))
    with pytest.raises(UserError, match="exclude each other"):
        TokenizeOptions(64, train_on_prompt=True, last_turn_only=True)


def test_turns_that_never_render_as_in_the_whole_conversation_are_refused(tokenizer):
    counting = _with_template(tokenizer, "{{ messages|length }}" + GENERATION_TEMPLATE.replace(
        "{% generation %}", "").replace("{% endgeneration %}", ""))  # the message count changes every prefix
    with pytest.raises(UserError, match=r"assistant turn 1 of 2 .*; use --train-on-prompt or a chat template"):
        tokenize_record(CHAT, "messages", counting, TokenizeOptions(64))
    with pytest.raises(UserError, match="cannot mask the last assistant turn faithfully"):
        tokenize_record(CHAT, "messages", counting, TokenizeOptions(64, last_turn_only=True))
    greeting = {"messages": [{"role": "assistant", "content": "Hi!"}] + CHAT["messages"]}
    with pytest.raises(UserError, match="opens with an assistant turn"):
        tokenize_record(greeting, "messages", tokenizer, TokenizeOptions(64))
    last = tokenize_record(greeting, "messages", tokenizer, TokenizeOptions(64, last_turn_only=True))
    assert _supervised_runs(tokenizer, last) == ["Green.<|im_end|>"]


def test_data_format_flag_offers_auto_and_every_format():
    choices = next(f for f in fields(TrainConfig) if f.name == "data_format").metadata["choices"]
    assert choices == ("auto",) + FORMATS
    cfg = parse_config(["--data-format", "sharegpt", "--last-turn-only"])
    assert (cfg.data_format, cfg.last_turn_only, cfg.train_on_prompt) == ("sharegpt", True, False)
