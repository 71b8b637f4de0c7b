"""Record formats: detecting a dataset's format, checking each record, and alpaca/ShareGPT as chat messages.

Alpaca and ShareGPT follow LLaMA-Factory's conventions (data/README.md there): an alpaca user turn is
`instruction` and `input` joined by a newline (the empty ones left out), `history` is a list of earlier
[user, assistant] pairs and `system` an optional system prompt; a ShareGPT conversation's first turn may be
its system prompt, otherwise the optional `system` column is.
"""

from __future__ import annotations

from typing import Any

from bilora_dist.errors import UserError

FORMATS: tuple[str, ...] = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")

# Detection order: the first format whose columns are all present wins, so structured columns beat a
# `text` column that many alpaca and chat datasets also carry.
_COLUMNS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
            "prompt_completion": ("prompt", "completion"), "text": ("text",)}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def detect_format(columns: list[str], where: str) -> str:
    """The record format of a dataset with these column names."""
    for fmt, needed in _COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    forms = "; ".join(f"{f} ({', '.join(_COLUMNS[f])})" for f in FORMATS)
    raise UserError(f"{where}: no known record format in columns {sorted(columns)}; expected one of: {forms}")


def _optional_str(record: dict[str, Any], key: str) -> bool:
    return record.get(key) is None or isinstance(record[key], str)


def _alpaca_error(record: dict[str, Any]) -> str | None:
    if not (isinstance(record.get("instruction"), str) and _optional_str(record, "input")):
        return "'instruction' must be a string (and 'input', if given, a string)"
    if not (record["instruction"] or record.get("input")):
        return "'instruction' and 'input' are both empty"
    if not (isinstance(record.get("output"), str) and record["output"]):
        return "'output' must be a non-empty string"
    if not _optional_str(record, "system"):
        return "'system' must be a string"
    history = record.get("history")
    if history is not None and not (isinstance(history, list) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in history)):
        return "'history' must be a list of [user, assistant] string pairs"
    return None


def _sharegpt_error(record: dict[str, Any]) -> str | None:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "'conversations' must be a non-empty list of {from, value} turns"
    for i, t in enumerate(turns):
        if not (isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)):
            return f"conversations[{i}] must have string 'from' and 'value'"
        if t["from"] not in _SHAREGPT_ROLES:
            return (f"conversations[{i}]: unknown 'from' value '{t['from']}' "
                    "(expected system, human/user or gpt/assistant)")
    if not _optional_str(record, "system"):
        return "'system' must be a string"
    return None if any(_SHAREGPT_ROLES[t["from"]] == "assistant" for t in turns) else "'conversations' has no gpt turn"


def _messages_error(record: dict[str, Any]) -> str | None:
    msgs = record.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        return "'messages' must be a non-empty list of {role, content} strings"
    for i, m in enumerate(msgs):
        if m["role"] not in MESSAGE_ROLES:
            return f"messages[{i}]: unknown role '{m['role']}' (expected {', '.join(MESSAGE_ROLES)})"
    return None if any(m["role"] == "assistant" for m in msgs) else "'messages' has no assistant turn"


def _prompt_completion_error(record: dict[str, Any]) -> str | None:
    if not (isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)):
        return "'prompt' and 'completion' must both be strings"
    return None if record["completion"] else "'completion' is empty"


def _text_error(record: dict[str, Any]) -> str | None:
    return None if isinstance(record.get("text"), str) and record["text"] else "'text' must be a non-empty string"


_CHECKS = {"alpaca": _alpaca_error, "sharegpt": _sharegpt_error, "messages": _messages_error,
           "prompt_completion": _prompt_completion_error, "text": _text_error}


def record_error(record: dict[str, Any], fmt: str) -> str | None:
    """Why one record is not usable in format `fmt`, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if not any(record.get(c) is not None for c in _COLUMNS[fmt]):
        return (f"not a {fmt} record like the rest of the dataset (expected {', '.join(_COLUMNS[fmt])}; "
                f"keys are {sorted(record)})")
    return _CHECKS[fmt](record)


def to_messages(record: dict[str, Any], fmt: str) -> list[dict[str, Any]]:
    """The chat messages (role, content) of a checked alpaca, ShareGPT or messages record."""
    if fmt == "messages":
        return [dict(m) for m in record["messages"]]  # other keys (e.g. reasoning_content) reach the template
    system = record.get("system") or ""
    if fmt == "alpaca":
        turns = [m for user, assistant in record.get("history") or []
                 for m in ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})]
        query = "\n".join(s for s in (record["instruction"], record.get("input")) if s)
        turns += [{"role": "user", "content": query}, {"role": "assistant", "content": record["output"]}]
    else:
        turns = [{"role": _SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
        if turns[0]["role"] == "system":
            system, turns = turns[0]["content"], turns[1:]
    return ([{"role": "system", "content": system}] if system else []) + turns
