"""Token ids and loss labels against the tokenizer's own apply_chat_template, prefix by prefix."""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import pytest

from infinitune.data_pipeline import synthetic
from infinitune.data_pipeline.formats import normalise
from infinitune.data_pipeline.template import IGNORE, ChatEncoder
from infinitune.data_pipeline.tokenizer import FALLBACK_CHAT_TEMPLATE, resolve_chat_template

from .conftest import needs_smollm2, shared_data

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6, since 3+3=6."},
    ]
}
TOOLS = {
    "messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
        {"role": "tool", "content": '{"temp": 3}'},
        {"role": "assistant", "content": "It is 3 degrees."},
    ]
}


def template_ids(tok, messages, template, generation_prompt=False) -> list[int]:
    out = tok.apply_chat_template(
        messages, chat_template=template, tokenize=True, add_generation_prompt=generation_prompt
    )
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def reference(tok, messages, template, train_on="assistant"):
    """Expected (ids, labels) from token ids of each prefix, as apply_chat_template tokenizes them."""
    full = template_ids(tok, messages, template)
    labels = [IGNORE] * len(full)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "all":
        labels = list(full)
    for i in turns[-1:] if train_on == "last" else [] if train_on == "all" else turns:
        before = template_ids(tok, messages[:i], template, generation_prompt=True)
        upto = template_ids(tok, messages[: i + 1], template)
        assert full[: len(before)] == before and full[: len(upto)] == upto, "template not prefix-stable"
        labels[len(before) : len(upto)] = full[len(before) : len(upto)]
    labels[0] = IGNORE  # the first token of a document is never predicted
    return full, labels


def records():
    yield [normalise(synthetic.make_record(0, i), "alpaca") for i in range(40)]
    yield [normalise(synthetic.make_record(1, i, fmt="messages"), "messages") for i in range(40)]
    yield [normalise(MULTI_TURN, "messages"), normalise(TOOLS, "messages")]


@pytest.mark.parametrize("train_on", ["assistant", "all", "last"])
def test_labels_match_prefix_spans_tiny_tokenizer(tiny_tokenizer, train_on):
    _check(tiny_tokenizer, train_on)


@needs_smollm2
@pytest.mark.parametrize("train_on", ["assistant", "last"])
def test_labels_match_prefix_spans_smollm2(smol_tokenizer, train_on):
    _check(smol_tokenizer, train_on)


def _check(tok, train_on):
    template = resolve_chat_template(tok, None)
    enc = ChatEncoder(tok, template, train_on)
    for convs in records():
        for conv, out in zip(convs, enc.encode(convs)):
            ids, labels = out
            want_ids, want_labels = reference(tok, conv.messages, template, train_on)
            assert ids.tolist() == want_ids
            assert labels.tolist() == want_labels
            assert ids.dtype == np.int32 and labels.dtype == np.int32


@needs_smollm2
def test_glaive_toolcall_records_match_smollm2(smol_tokenizer):
    data = json.loads(shared_data("glaive_toolcall_en_demo.json").read_text())[:30]
    template = resolve_chat_template(smol_tokenizer, None)
    enc = ChatEncoder(smol_tokenizer, template)
    convs = [normalise(r, "sharegpt") for r in data]
    with_tools = 0
    for conv, (ids, labels) in zip(convs, enc.encode(convs)):
        messages = enc.messages_for(conv)
        if conv.tools:  # this template has no `tools` variable: the definitions go into the system turn
            with_tools += 1
            assert messages[0]["role"] == "system" and "You can call these tools" in messages[0]["content"]
        want_ids, want_labels = reference(smol_tokenizer, messages, template)
        assert ids.tolist() == want_ids and labels.tolist() == want_labels
    assert with_tools > 10


@needs_smollm2
def test_end_of_turn_is_trained_although_pad_is_eos(smol_tokenizer):
    assert smol_tokenizer.pad_token_id == smol_tokenizer.eos_token_id == 2
    enc = ChatEncoder(smol_tokenizer, resolve_chat_template(smol_tokenizer, None))
    conv = normalise(MULTI_TURN, "messages")
    ((ids, labels),) = enc.encode([conv])
    eos = np.flatnonzero(ids == 2)
    trained_eos = eos[labels[eos] == 2]
    assert len(trained_eos) == 2  # one per assistant turn
    assert len(eos) == 5  # system, 2 user and 2 assistant turns each end with <|im_end|>
    text = smol_tokenizer.decode(ids[labels != IGNORE])
    assert text == "4<|im_end|>\n6, since 3+3=6.<|im_end|>\n"


def test_tokenizer_without_template_gets_the_fallback(tiny_tokenizer_dir, tmp_path):
    from infinitune.testing.tiny import train_tiny_tokenizer

    tok = train_tiny_tokenizer(tmp_path, chat_template=None)
    template = resolve_chat_template(tok, None)
    assert template == FALLBACK_CHAT_TEMPLATE
    enc = ChatEncoder(tok, template)
    conv = normalise({"instruction": "Say hi.", "output": "hi"}, "alpaca")
    ((ids, labels),) = enc.encode([conv])
    assert tok.decode(ids) == "<|im_start|>### User:\nSay hi.\n### Assistant:\nhi<|im_end|>\n"
    assert tok.decode(ids[labels != IGNORE]) == "hi<|im_end|>\n"
    assert ids.tolist() == template_ids(tok, conv.messages, template)


def test_a_template_that_refuses_a_record_is_a_record_error(tiny_tokenizer):
    strict = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    enc = ChatEncoder(tiny_tokenizer, strict)
    (out,) = enc.encode([normalise(TOOLS, "messages")])
    assert out.reason == "template_error" and "no tools" in out.detail


def test_chat_template_override_from_a_file(tiny_tokenizer, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(FALLBACK_CHAT_TEMPLATE)
    assert resolve_chat_template(tiny_tokenizer, str(path)) == FALLBACK_CHAT_TEMPLATE
    with pytest.raises(ValueError, match="neither a Jinja template nor an existing template file"):
        resolve_chat_template(tiny_tokenizer, str(tmp_path / "absent.jinja"))


def test_an_answer_token_merged_with_the_prompts_space_is_trained(tiny_tokenizer):
    """A generation prompt ending in a space ("Assistant: "): byte-level BPE merges " 4" into one token,
    which starts inside the prompt's text; it is still the answer's first token and must carry loss."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
        "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    )
    enc = ChatEncoder(tiny_tokenizer, template)
    conv = normalise({"instruction": "What is 2 + 2?", "output": "4"}, "alpaca")
    ((ids, labels),) = enc.encode([conv])
    trained = tiny_tokenizer.decode(ids[labels != IGNORE])
    assert trained.strip() == "4<|im_end|>"


@needs_smollm2
def test_a_gguf_tokenizer_is_converted_once_then_read_from_the_cache(
    smol_tokenizer, infinitune_cache, monkeypatch, caplog
):
    """Converting SmolLM2's GGUF tokenizer takes ~10 s in every process that loads it (each worker, at each
    restart): the first conversion (the fixture's) is cached, later loads read the cache, a damaged cache
    entry is converted again and replaced."""
    import transformers

    from infinitune.data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

    (entry,) = (infinitune_cache / "gguf-tokenizers").iterdir()
    assert (entry / "tokenizer.json").is_file()
    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(source, **kwargs):
        calls.append((str(source), kwargs.get("gguf_file")))
        if kwargs.get("gguf_file"):  # a conversion: the fixture's result stands in for another 10 s of it
            return smol_tokenizer
        return real(source, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    again = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert calls == [(str(entry), None)]  # from the cache, not converted
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(smol_tokenizer)
    assert again.chat_template == smol_tokenizer.chat_template

    (entry / "tokenizer.json").write_text("{not json")
    calls.clear()
    with caplog.at_level("WARNING"):
        repaired = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "unreadable" in caplog.text and calls[0] == (str(entry), None) and calls[1][1].endswith(".gguf")
    assert tokenizer_fingerprint(repaired) == tokenizer_fingerprint(smol_tokenizer)
    assert tokenizer_fingerprint(real(str(entry))) == tokenizer_fingerprint(smol_tokenizer)  # replaced, whole
