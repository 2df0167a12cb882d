"""Chat-templated token ids and loss labels for normalised conversations.

The loss mask comes from the tokenizer's own template, not from token ids: for an assistant turn i, its
trained text is what `apply_chat_template(messages[:i+1])` adds beyond
`apply_chat_template(messages[:i], add_generation_prompt=True)`, i.e. the answer and the template's
end-of-turn marker. Masking by id would break where pad and eos share an id (SmolLM2, Llama), since the
end-of-turn token must be trained for generation to stop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from infinitune.data_pipeline.errors import RecordError
from infinitune.data_pipeline.formats import ASSISTANT, SYSTEM, Conversation

IGNORE = -100


class ChatEncoder:
    """Turns conversations into (input_ids, labels) with a fast tokenizer and a Jinja chat template."""

    def __init__(self, tokenizer: Any, chat_template: str, train_on: str = "assistant"):
        if train_on not in ("assistant", "all", "last"):
            raise ValueError(f"train_on must be assistant, all or last; got {train_on!r}")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.train_on = train_on
        # Templates that know nothing of tools would drop tool definitions silently.
        self.template_handles_tools = "tools" in chat_template
        # transformers' own compiled template, rendered with the variables apply_chat_template gives it,
        # without its per-call conversion of messages (which we already hold as plain dicts): 3x faster.
        # Tests compare the result with tokenizer.apply_chat_template.
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._compiled = _compile_jinja_template(chat_template)
        except ImportError:  # a transformers without it: the public, slower path
            self._compiled = None
        self._variables = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self._backend = tokenizer.backend_tokenizer

    def render(self, messages: Sequence[dict[str, str]], tools: Any = None, generation_prompt=False) -> str:
        tools = tools if tools and self.template_handles_tools else None
        try:
            if self._compiled is not None:
                return self._compiled.render(
                    messages=messages,
                    tools=tools,
                    documents=None,
                    add_generation_prompt=generation_prompt,
                    **self._variables,
                )
            return self.tokenizer.apply_chat_template(
                list(messages),
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                **({"tools": tools} if tools else {}),
            )
        except Exception as e:  # jinja2 errors, and templates that raise_exception() on what they refuse
            raise RecordError("template_error", f"{type(e).__name__}: {e}") from None

    def messages_for(self, conv: Conversation) -> list[dict[str, str]]:
        """The messages to render: tool definitions go into the system turn when the template has no
        `tools` variable, so a function-calling record still shows the model what it may call."""
        messages = conv.messages
        if conv.tools and not self.template_handles_tools:
            tool_text = "You can call these tools:\n" + json.dumps(conv.tools, ensure_ascii=False)
            if messages[0]["role"] == SYSTEM:
                system = {"role": SYSTEM, "content": messages[0]["content"] + "\n\n" + tool_text}
                messages = [system, *messages[1:]]
            else:
                messages = [{"role": SYSTEM, "content": tool_text}, *messages]
        return messages

    def text_and_spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans that carry loss."""
        messages = self.messages_for(conv)
        text = self.render(messages, conv.tools)
        if self.train_on == "all":
            return text, [(0, len(text))]
        turns = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
        if self.train_on == "last":
            turns = turns[-1:]
        spans = []
        for i in turns:
            before = self.render(messages[:i], conv.tools, generation_prompt=True)
            upto = text if i == len(messages) - 1 else self.render(messages[: i + 1], conv.tools)
            if not (text.startswith(before) and text.startswith(upto) and len(before) < len(upto)):
                raise RecordError(
                    "template_error",
                    f"the template's rendering of the first {i + 1} turns is not a prefix of the whole "
                    "conversation, so the answer tokens cannot be located; use a prefix-stable template "
                    "(data.chat_template)",
                )
            spans.append((len(before), len(upto)))
        return text, spans

    def encode(self, convs: Sequence[Conversation]) -> list[tuple[np.ndarray, np.ndarray] | RecordError]:
        """(input_ids, labels) as int32 arrays for each conversation, or the RecordError it raised.

        The whole batch goes to the Rust tokenizer in one call (its own threads; what `tokenizer(texts,
        add_special_tokens=False)` does inside), and the spans are mapped to tokens with `char_to_token`
        rather than by converting every token's offsets to Python.
        """
        rendered: list[tuple[str, list[tuple[int, int]]] | RecordError] = []
        for conv in convs:
            try:
                rendered.append(self.text_and_spans(conv))
            except RecordError as e:
                rendered.append(e)
        texts = [r[0] for r in rendered if not isinstance(r, RecordError)]
        encodings = iter(self._backend.encode_batch(texts, add_special_tokens=False) if texts else [])
        out: list[tuple[np.ndarray, np.ndarray] | RecordError] = []
        for r in rendered:
            if isinstance(r, RecordError):
                out.append(r)
                continue
            encoding = next(encodings)
            ids = np.asarray(encoding.ids, dtype=np.int32)
            trained = np.zeros(len(ids), dtype=bool)
            for lo, hi in r[1]:
                trained[_span_to_tokens(encoding, lo, hi, len(r[0]))] = True
            # The first token of a document is never predicted: in a packed sequence the position before it
            # belongs to another document.
            if len(trained):
                trained[0] = False
            if not trained.any():
                out.append(RecordError("template_error", "the rendered conversation has no trained tokens"))
                continue
            out.append((ids, np.where(trained, ids, IGNORE).astype(np.int32)))
        return out


def _span_to_tokens(encoding: Any, lo: int, hi: int, length: int) -> slice:
    """The tokens that carry characters [lo, hi). A token reaching across either edge is included: at the
    start, a merged " 4" after a prompt ending in a space is the answer's first token; at the end, a token
    holding the end-of-turn marker and a newline is still the end of the turn."""
    first = _token_at(encoding, lo)
    if hi >= length:
        return slice(first, len(encoding.ids))
    last = _token_at(encoding, hi)
    start, _ = encoding.token_to_chars(last) if last < len(encoding.ids) else (hi, hi)
    return slice(first, last + 1 if start < hi else last)


def _token_at(encoding: Any, char: int) -> int:
    """The token holding character `char`, or the next one if none does (a character the normaliser
    dropped)."""
    token = encoding.char_to_token(char)
    if token is None:
        ends = [end for _, end in encoding.offsets]
        return int(np.searchsorted(ends, char, side="right"))
    return token
