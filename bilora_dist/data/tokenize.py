"""Tokenizing one record into input ids and a loss mask (labels IGNORE where no loss is taken).

A chat record (messages, or alpaca / ShareGPT turned into messages) is tokenized exactly as the tokenizer
renders the whole conversation. Its loss mask is the template's own assistant mask where the template marks
assistant turns with `{% generation %}`. Otherwise it is derived from character spans of the full render:
assistant turn i starts where the render of the turns before it plus the generation prompt ends, and stops
where the render of the turns through it ends (trailing whitespace left out, so it covers the content and the
end tokens). Both renders must be string prefixes of the full render; a template that renders earlier turns
differently once later turns exist (such as Qwen3's, which drops earlier `<think>` blocks) is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from bilora_dist.data.batching import IGNORE, Example
from bilora_dist.data.formats import detect_format, to_messages
from bilora_dist.errors import UserError

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class TokenizeOptions:
    seq_len: int
    train_on_prompt: bool = False  # loss on prompt/user/system tokens too
    last_turn_only: bool = False  # loss only on the last assistant turn

    def __post_init__(self) -> None:
        if self.train_on_prompt and self.last_turn_only:
            raise UserError("--train-on-prompt and --last-turn-only exclude each other")


def tokenize_record(record: dict[str, Any], fmt: str, tokenizer: Any, options: TokenizeOptions) -> dict[str, list[int]]:
    """Token ids and labels of a checked record in format `fmt`, truncated to options.seq_len."""
    if fmt == "prompt_completion":
        ids, labels = _prompt_completion(record, tokenizer, options)
    elif fmt == "text":
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids = (tokenizer(record["text"])["input_ids"] + eos)[:options.seq_len]
        labels = list(ids)
    else:
        ids, labels = _chat(to_messages(record, fmt), tokenizer, options)
    return {"input_ids": ids, "labels": labels}


def tokenize(record: dict[str, Any], tokenizer: Any, seq_len: int) -> Example:
    """One record, its format read from its own keys, with the default loss mask."""
    out = tokenize_record(record, detect_format(list(record), "record"), tokenizer, TokenizeOptions(seq_len))
    return Example(out["input_ids"], out["labels"])


def _prompt_completion(record: dict[str, Any], tokenizer: Any, options: TokenizeOptions) -> tuple[list[int], list[int]]:
    """Prompt + completion + EOS; truncation drops the prompt's start, never the completion's."""
    seq_len = options.seq_len
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt = tokenizer(record["prompt"])["input_ids"]
    answer = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + eos
    answer = answer[:seq_len]
    prompt = prompt[len(prompt) - (seq_len - len(answer)):] if len(prompt) + len(answer) > seq_len else prompt
    return prompt + answer, (prompt if options.train_on_prompt else [IGNORE] * len(prompt)) + answer


def _render(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except (TemplateError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"the tokenizer's chat template cannot render this conversation: {reason}") from None


def _turn_span(tokenizer: Any, messages: list[dict[str, Any]], i: int, full: str) -> tuple[int, int] | None:
    """Character span of assistant turn i in the full render, or None if its prefixes do not render as in it."""
    if i == 0:
        raise UserError("the conversation opens with an assistant turn, which has no prompt to mask it from; "
                        "start it with a user turn or use --train-on-prompt")
    start = _render(tokenizer, messages[:i], tokenize=False, add_generation_prompt=True)
    through = _render(tokenizer, messages[:i + 1], tokenize=False)
    if not (full.startswith(start) and full.startswith(through) and len(through) > len(start)):
        return None
    return len(start), len(start) + len(through[len(start):].rstrip())


def _chat(messages: list[dict[str, Any]], tokenizer: Any, options: TokenizeOptions) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("chat records need a fast tokenizer (one with a tokenizer.json) to map turns to tokens")
    try:
        generation = bool(_GENERATION_BLOCK.search(tokenizer.get_chat_template()))
    except ValueError:
        raise UserError("chat records need a tokenizer with a chat template (or prompt/completion records)") from None
    enc = _render(tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=generation,
                  tokenizer_kwargs={"return_offsets_mapping": True})
    ids = list(enc["input_ids"])
    if options.train_on_prompt:
        return ids[:options.seq_len], ids[:options.seq_len]
    full = _render(tokenizer, messages, tokenize=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if options.last_turn_only:
        turns = turns[-1:]
    if generation:  # the template's own mask; only where the last turn starts may be needed
        start = _checked_spans(tokenizer, messages, turns, full, options)[0][0] if options.last_turn_only else 0
        keep = [bool(m) and end > start for m, (_, end) in zip(enc["assistant_masks"], enc["offset_mapping"])]
    else:
        spans = _checked_spans(tokenizer, messages, turns, full, options)
        keep = [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
    labels = [t if k else IGNORE for t, k in zip(ids, keep)]
    return ids[:options.seq_len], labels[:options.seq_len]


def _checked_spans(tokenizer: Any, messages: list[dict[str, Any]], turns: list[int], full: str,
                   options: TokenizeOptions) -> list[tuple[int, int]]:
    """Character spans of the given assistant turns; one error line if any cannot be verified."""
    spans = [_turn_span(tokenizer, messages, i, full) for i in turns]
    if None not in spans:
        return spans
    bad = spans.index(None)
    which = "the last assistant turn" if options.last_turn_only else f"assistant turn {bad + 1} of {len(turns)}"
    remedy = "--last-turn-only, --train-on-prompt" if spans[-1] is not None else "--train-on-prompt"
    raise UserError(f"cannot mask {which} faithfully: the chat template renders the conversation up to it "
                    "differently from the whole conversation (e.g. it drops earlier turns' <think> blocks); use "
                    f"{remedy} or a chat template that marks assistant turns with {{% generation %}}")
