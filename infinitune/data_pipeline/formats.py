"""Record formats (alpaca, sharegpt, OpenAI messages) normalised to one conversation shape.

A normalised conversation is a list of `{"role": r, "content": str}` with r in system/user/assistant/tool,
optionally with tool definitions beside it. It always has this structure, or the record is refused with a
RecordError naming the reason:

    [system] user assistant ( (tool+ assistant) | (user assistant) )*

Conversations from real dumps often miss it in two ways that lose nothing worth training on when repaired
(`REPAIRS`, chosen per source): the scrape lost the first user message, so the conversation begins with an
assistant turn, which has no question and is dropped (`leading_assistant`, as FastChat's trainer does); or one
side spoke twice in a row, and the two turns become one (`merge_consecutive`, joined by a blank line).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from infinitune.data_pipeline.errors import RecordError

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"

# Role names seen in the wild (sharegpt variants, OpenAI, LLaMA-Factory, FastChat) and what they mean.
ROLE_ALIASES: dict[str, str] = {
    "system": SYSTEM,
    "developer": SYSTEM,
    "human": USER,
    "user": USER,
    "prompter": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "chatgpt": ASSISTANT,
    "bing": ASSISTANT,
    "bard": ASSISTANT,
    "model": ASSISTANT,
    "bot": ASSISTANT,
    "function_call": ASSISTANT,
    "tool_call": ASSISTANT,
    "observation": TOOL,
    "tool": TOOL,
    "function": TOOL,
    "function_response": TOOL,
    "ipython": TOOL,
}

# What may follow each role (None: the start of the conversation, after an optional system turn).
_NEXT: dict[str | None, set[str]] = {
    None: {USER},
    USER: {ASSISTANT},
    ASSISTANT: {USER, TOOL},
    TOOL: {TOOL, ASSISTANT},
}

FORMATS = ("alpaca", "sharegpt", "messages")

# Repairs of a conversation's turn order, and what each does; every repaired record is counted by repair.
REPAIRS: dict[str, str] = {
    "leading_assistant": "assistant or tool turns before the first user turn dropped",
    "merge_consecutive": "consecutive user turns, or consecutive assistant turns, merged into one",
}


_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    tools: list[Any] | None = field(default=None)
    repaired: list[str] = field(default_factory=list)  # the REPAIRS applied to it


def detect_format(records: Iterable[Mapping[str, Any]]) -> str | None:
    """The format of the first record that reveals one, or None."""
    for rec in records:
        if not isinstance(rec, Mapping):
            continue
        if "messages" in rec:
            return "messages"
        if "conversations" in rec or "conversation" in rec:
            return "sharegpt"
        if "instruction" in rec and "output" in rec:
            return "alpaca"
    return None


def rename_columns(record: Any, columns: Mapping[str, str]) -> Any:
    if not columns or not isinstance(record, Mapping):
        return record
    return {columns.get(k, k): v for k, v in record.items()}


def normalise(
    record: Any, fmt: str, roles: Mapping[str, str] | None = None, repairs: Iterable[str] = ()
) -> Conversation:
    """The record as a checked Conversation, with `repairs` (names in REPAIRS) applied where they are needed, or
    RecordError."""
    if not isinstance(record, Mapping):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        conv = _from_alpaca(record)
    elif fmt == "sharegpt":
        conv = _from_turns(record, _sharegpt_turns(record), "from", "value", roles)
    elif fmt == "messages":
        conv = _from_turns(record, _field(record, "messages", list), "role", "content", roles)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    repairs = set(repairs)
    if fmt != "alpaca":
        conv.messages, conv.repaired = repair(conv.messages, repairs)
    try:
        check_structure(conv.messages)
    except RecordError as err:
        raise _with_repair_hint(err, conv.messages, repairs) from None
    for i, m in enumerate(conv.messages):
        bad = _SURROGATE.search(m["content"])
        if bad:  # valid JSON ("\\udcff") but no text: the tokenizer cannot encode it
            raise RecordError(
                "bad_utf8", f"turn {i + 1} holds a lone surrogate \\u{ord(bad.group()):04x} (a broken \\u escape)"
            )
    return conv


def repair(messages: list[dict[str, str]], repairs: set[str]) -> tuple[list[dict[str, str]], list[str]]:
    """The messages with `repairs` applied where they change something, and the names of those applied."""
    done = []
    if "leading_assistant" in repairs:
        start = 1 if messages and messages[0]["role"] == SYSTEM else 0
        end = start
        while end < len(messages) and messages[end]["role"] in (ASSISTANT, TOOL):
            end += 1
        if start < end < len(messages):  # something left to learn from
            messages = messages[:start] + messages[end:]
            done.append("leading_assistant")
    if "merge_consecutive" in repairs:
        merged: list[dict[str, str]] = []
        for m in messages:
            if merged and m["role"] == merged[-1]["role"] and m["role"] in (USER, ASSISTANT):
                parts = [t for t in (merged[-1]["content"], m["content"]) if t.strip()]
                merged[-1] = {"role": m["role"], "content": "\n\n".join(parts)}
            else:
                merged.append(m)
        if len(merged) < len(messages):
            messages = merged
            done.append("merge_consecutive")
    return messages, done


def _with_repair_hint(err: RecordError, messages: list[dict[str, str]], enabled: set[str]) -> RecordError:
    """`err`, saying which repairs the source does not allow would have kept the record."""
    missing = [name for name in REPAIRS if name not in enabled]
    if err.reason != "not_alternating" or not missing:
        return err
    for wanted in [[name] for name in missing] + ([missing] if len(missing) > 1 else []):
        fixed, _ = repair(messages, enabled | set(wanted))
        try:
            check_structure(fixed)
        except RecordError:
            continue
        what = "; ".join(f"{name!r} ({REPAIRS[name]})" for name in wanted)
        return RecordError(
            err.reason, f"{err.detail}; the repairs {what} would keep it: add it to the source's `repairs`"
        )
    return err


def check_structure(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise RecordError("missing_field", "the conversation has no turns")
    prev: str | None = None
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == SYSTEM:
            if i != 0:
                raise RecordError("not_alternating", f"turn {i} is a system turn; only the first turn may be")
            continue
        if role not in _NEXT[prev]:
            want = " or ".join(sorted(_NEXT[prev]))
            after = f"after a {prev} turn" if prev else "at the start"
            raise RecordError("not_alternating", f"turn {i} is {role}, but {after} comes {want}")
        if role == ASSISTANT and not msg["content"].strip():
            raise RecordError("empty_answer", f"assistant turn {i} is empty")
        prev = role
    if prev != ASSISTANT:
        raise RecordError("no_answer", f"the last turn is {prev or 'system'}, not assistant")


def _field(record: Mapping[str, Any], name: str, kind: type, required: bool = True) -> Any:
    if name not in record or record[name] is None:
        if required:
            raise RecordError("missing_field", f"field {name!r} is missing (fields present: {sorted(record)})")
        return None
    value = record[name]
    if not isinstance(value, kind):
        raise RecordError("wrong_type", f"field {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _from_alpaca(rec: Mapping[str, Any]) -> Conversation:
    instruction = _field(rec, "instruction", str)
    extra = _field(rec, "input", str, required=False) or ""
    output = _field(rec, "output", str)
    if not (instruction.strip() or extra.strip()):
        raise RecordError("missing_field", "both 'instruction' and 'input' are empty")
    if not output.strip():
        raise RecordError("empty_answer", "field 'output' is empty")
    messages = []
    system = _field(rec, "system", str, required=False)
    if system:
        messages.append({"role": SYSTEM, "content": system})
    for i, pair in enumerate(_field(rec, "history", list, required=False) or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError("wrong_type", f"history[{i}] must be a [question, answer] pair of strings")
        messages += [{"role": USER, "content": pair[0]}, {"role": ASSISTANT, "content": pair[1]}]
    prompt = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else instruction + extra
    messages += [{"role": USER, "content": prompt}, {"role": ASSISTANT, "content": output}]
    return Conversation(messages)


def _sharegpt_turns(rec: Mapping[str, Any]) -> list[Any]:
    name = "conversations" if "conversations" in rec or "conversation" not in rec else "conversation"
    return _field(rec, name, list)


def _content_text(content: Any, where: str) -> str:
    """Message content as text: a string, or OpenAI content parts of type text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RecordError("wrong_type", f"{where}: content part of type {kind!r} is not text")
        return "".join(texts)
    raise RecordError("wrong_type", f"{where}: content must be text, got {type(content).__name__}")


def _from_turns(
    rec: Mapping[str, Any],
    turns: list[Any],
    role_key: str,
    text_key: str,
    roles: Mapping[str, str] | None,
) -> Conversation:
    aliases = {**ROLE_ALIASES, **{k.strip().lower(): v for k, v in (roles or {}).items()}}
    messages: list[dict[str, str]] = []
    system = rec.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": SYSTEM, "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise RecordError("wrong_type", f"turn {i} must be an object, got {type(turn).__name__}")
        # Both key styles occur inside each format; accept either.
        raw_role = turn.get(role_key, turn.get("role" if role_key == "from" else "from"))
        if raw_role is None:
            raise RecordError("missing_field", f"turn {i} has no {role_key!r}")
        role = aliases.get(str(raw_role).strip().lower())
        if role is None:
            raise RecordError(
                "unknown_role", f"turn {i} has role {raw_role!r}; known roles: {', '.join(sorted(aliases))}"
            )
        content = turn.get(text_key, turn.get("content" if text_key == "value" else "value"))
        calls = turn.get("tool_calls") if role == ASSISTANT else None
        if content is None and not calls:
            raise RecordError("missing_field", f"turn {i} has no {text_key!r}")
        text = _content_text(content, f"turn {i}") if content is not None else ""
        if calls:  # the calls are what the model must learn to write: kept as JSON after any text
            text = (text + "\n" if text.strip() else "") + json.dumps(calls, ensure_ascii=False)
        messages.append({"role": role, "content": text})
    return Conversation(messages, _tools(rec))


def _tools(rec: Mapping[str, Any]) -> list[Any] | None:
    tools = rec.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RecordError("wrong_type", f"field 'tools' is not valid JSON: {e}") from None
    if isinstance(tools, Mapping):
        tools = [tools]
    if not isinstance(tools, list):
        raise RecordError("wrong_type", "field 'tools' must be a list of tool definitions")
    return tools
