"""Row formats: detect which one a dataset uses and turn a row into plain text or a conversation.

- text:        {"text": ...}
- instruction: {"instruction": ..., "input": optional, "output": ..., "system": optional}  (Alpaca)
               -> [system?, user: instruction (+ "\\n\\n" + input), assistant: output]
- chat:        {"messages": [{"role": ..., "content": ...}, ...]}  (speaker aliases: CHAT_ROLE_ALIASES)
- sharegpt:    {"conversations": [{"from": ..., "value": ...}, ...]}  (roles mapped below)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

__all__ = ["detect_format", "row_to_sample", "MissingField", "Empty", "SHAREGPT_ROLES", "CHAT_ROLE_ALIASES"]

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "function_call": "assistant",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")
# other datasets' names for the speakers in "messages" rows (Gemma-style "model", ShareGPT's names
# carried over): the chat templates and completion-only labels know only user / assistant, so a
# "model" reply would be rendered as an unknown role and never trained
CHAT_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant",
                     "chatgpt": "assistant"}


@dataclass(frozen=True)
class MissingField:
    """The row lacks a field (or a turn lacks a key) that its format needs."""

    field: str
    detail: str = ""


@dataclass(frozen=True)
class Empty:
    """Nothing to train on in the row (no fields, or only empty values)."""


Sample = Union[str, list]  # plain text, or a list of {"role", "content"} messages


def _get(row: Mapping, name: str, fields: Mapping[str, str]) -> Any:
    return row.get(fields.get(name, name))


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict)):
        return len(value) == 0
    return False


def detect_format(row: Mapping, fields: Mapping[str, str], where: str) -> str:
    """The format of a dataset from one of its rows."""
    from .sources import DataError

    has = lambda name: _get(row, name, fields) is not None  # noqa: E731
    if has("messages"):
        return "chat"
    if has("conversations"):
        return "sharegpt"
    if has("instruction") and has("output"):
        return "instruction"
    if has("text"):
        return "text"
    raise DataError(
        f"{where}: cannot tell the data format from the fields {sorted(row)}; expected 'text', "
        "'instruction'+'output', 'messages' or 'conversations' -- set data.format, or map your column names "
        "with data.fields (e.g. fields: {output: response})"
    )


def row_to_sample(row: Mapping, fmt: str, fields: Mapping[str, str]) -> Union[Sample, MissingField, Empty]:
    if not row or all(_is_blank(v) for v in row.values()):
        return Empty()
    if fmt == "text":
        text = _get(row, "text", fields)
        if text is None:
            return MissingField(fields.get("text", "text"))
        if not isinstance(text, str):
            return MissingField(fields.get("text", "text"), f"is a {type(text).__name__}, not a string")
        return Empty() if not text.strip() else text
    if fmt == "instruction":
        instruction = _get(row, "instruction", fields)
        output = _get(row, "output", fields)
        for name, value in (("instruction", instruction), ("output", output)):
            if value is None:
                return MissingField(fields.get(name, name))
            if not isinstance(value, str):
                return MissingField(fields.get(name, name), f"is a {type(value).__name__}, not a string")
        extra = _get(row, "input", fields)
        system = _get(row, "system", fields)
        if _is_blank(output):  # nothing to learn from
            return Empty()
        user = instruction if _is_blank(extra) else f"{instruction}\n\n{extra}"
        msgs = [] if _is_blank(system) else [{"role": "system", "content": str(system)}]
        return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt in ("chat", "sharegpt"):
        key = "messages" if fmt == "chat" else "conversations"
        turns = _get(row, key, fields)
        if turns is None:
            return MissingField(fields.get(key, key))
        if not isinstance(turns, (list, tuple)):
            return MissingField(fields.get(key, key), f"is a {type(turns).__name__}, not a list of turns")
        if not turns:
            return Empty()
        role_key, content_key = ("role", "content") if fmt == "chat" else ("from", "value")
        msgs = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, Mapping):
                return MissingField(f"{key}[{i}]", f"is a {type(turn).__name__}, not an object")
            role, content = turn.get(role_key), turn.get(content_key)
            if role is None:
                return MissingField(f"{key}[{i}].{role_key}")
            if content is None:
                return MissingField(f"{key}[{i}].{content_key}")
            if fmt == "sharegpt":
                mapped = SHAREGPT_ROLES.get(str(role).lower())
                if mapped is None:
                    return MissingField(f"{key}[{i}].{role_key}", f"has the unknown speaker {role!r}")
                role = mapped
            elif isinstance(role, str):
                role = CHAT_ROLE_ALIASES.get(role.lower(), role)
            if not isinstance(content, str):
                return MissingField(f"{key}[{i}].{content_key}", f"is a {type(content).__name__}, not a string")
            msgs.append({"role": str(role), "content": content})
        if all(_is_blank(m["content"]) for m in msgs):
            return Empty()
        return msgs
    raise ValueError(f"unknown format {fmt!r}")
