"""Record formats normalise to one conversation shape; bad records are refused with their reason."""

from __future__ import annotations

import pytest

from infinitune.data_pipeline.errors import RecordError
from infinitune.data_pipeline.formats import detect_format, normalise, rename_columns

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6"},
]


def as_alpaca(chat):
    turns = [m for m in chat if m["role"] != "system"]
    pairs = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 2, 2)]
    return {
        "system": chat[0]["content"],
        "history": pairs,
        "instruction": turns[-2]["content"],
        "input": "",
        "output": turns[-1]["content"],
    }


def as_sharegpt(chat):
    names = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in chat]}


def as_messages(chat):
    return {"messages": [dict(m) for m in chat]}


@pytest.mark.parametrize("convert, fmt", [(as_alpaca, "alpaca"), (as_sharegpt, "sharegpt"), (as_messages, "messages")])
def test_each_format_round_trips_to_the_same_conversation(convert, fmt):
    record = convert(CHAT)
    assert detect_format([record]) == fmt
    assert normalise(record, fmt).messages == CHAT


def test_alpaca_input_joins_the_instruction():
    conv = normalise({"instruction": "Reverse it.", "input": "abc", "output": "cba"}, "alpaca")
    assert conv.messages == [
        {"role": "user", "content": "Reverse it.\n\nabc"},
        {"role": "assistant", "content": "cba"},
    ]


def test_sharegpt_tool_roles_and_variants_are_normalised():
    rec = {
        "conversations": [
            {"from": "Human", "value": "weather in Oslo?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": '{"temp": 3}'},
            {"from": "GPT", "value": "3 degrees."},
        ],
        "tools": '[{"name": "weather"}]',
    }
    conv = normalise(rec, "sharegpt")
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    assert conv.tools == [{"name": "weather"}]


def test_openai_content_parts_and_tool_calls():
    rec = {
        "messages": [
            {"role": "developer", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": "done"},
        ]
    }
    conv = normalise(rec, "messages")
    assert conv.messages[0] == {"role": "system", "content": "sys"}
    assert conv.messages[1]["content"] == "hi there"
    assert '"name": "f"' in conv.messages[2]["content"]


def test_custom_roles_and_columns():
    rec = rename_columns({"prompt": "q", "response": "a"}, {"prompt": "instruction", "response": "output"})
    assert detect_format([rec]) == "alpaca"
    conv = normalise(
        {
            "conversations": [
                {"from": "narrator", "value": "s"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
        "sharegpt",
        roles={"narrator": "system"},
    )
    assert conv.messages[0]["role"] == "system"


@pytest.mark.parametrize(
    "record, fmt, reason",
    [
        ({"instruction": "x"}, "alpaca", "missing_field"),
        ({"instruction": "x", "output": "  "}, "alpaca", "empty_answer"),
        ({"instruction": "x", "output": 3}, "alpaca", "wrong_type"),
        ({"instruction": "", "input": "", "output": "y"}, "alpaca", "missing_field"),
        ({"instruction": "x", "output": "y", "history": [["only one"]]}, "alpaca", "wrong_type"),
        (
            {"conversations": [{"from": "wizard", "value": "x"}, {"from": "gpt", "value": "y"}]},
            "sharegpt",
            "unknown_role",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "a"},
                    {"from": "human", "value": "b"},
                    {"from": "gpt", "value": "c"},
                ]
            },
            "sharegpt",
            "not_alternating",
        ),
        ({"conversations": [{"from": "gpt", "value": "a"}]}, "sharegpt", "not_alternating"),
        (
            {
                "conversations": [
                    {"from": "human", "value": "a"},
                    {"from": "gpt", "value": "b"},
                    {"from": "system", "value": "c"},
                ]
            },
            "sharegpt",
            "not_alternating",
        ),
        ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt", "no_answer"),
        (
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
            "sharegpt",
            "empty_answer",
        ),
        ({"conversations": []}, "sharegpt", "missing_field"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages",
            "wrong_type",
        ),
        ({"messages": "hello"}, "messages", "wrong_type"),
        (["not", "a", "dict"], "messages", "not_an_object"),
    ],
)
def test_bad_records_name_their_reason(record, fmt, reason):
    with pytest.raises(RecordError) as info:
        normalise(record, fmt)
    assert info.value.reason == reason
    assert info.value.detail  # says what exactly


def test_detection_needs_a_telling_record():
    assert detect_format([{"text": "raw"}]) is None
    assert detect_format([["junk"], {"messages": []}]) == "messages"


def test_tool_calls_are_kept_beside_or_instead_of_text():
    calls = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    for content, starts in (("", '[{"type"'), (None, '[{"type"'), ("Let me look.", "Let me look.\n[{")):
        rec = {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": content, "tool_calls": calls},
                {"role": "tool", "content": "r"},
                {"role": "assistant", "content": "a"},
            ]
        }
        msg = normalise(rec, "messages").messages[1]["content"]
        assert msg.startswith(starts) and '"name": "f"' in msg


def test_custom_role_names_ignore_case():
    rec = {
        "conversations": [
            {"from": "NARRATOR", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert normalise(rec, "sharegpt", roles={"Narrator": "system"}).messages[0]["role"] == "system"


def turns(*pairs):
    return {"conversations": [{"from": who, "value": text} for who, text in pairs]}


BOTH = ("leading_assistant", "merge_consecutive")
REPAIRED = [
    # (record, repairs applied, messages after)
    (
        turns(("gpt", "orphan answer"), ("human", "q"), ("gpt", "a")),
        ["leading_assistant"],
        [("user", "q"), ("assistant", "a")],
    ),
    (
        {**turns(("gpt", "x"), ("observation", "{}"), ("human", "q"), ("gpt", "a")), "system": "be brief"},
        ["leading_assistant"],
        [("system", "be brief"), ("user", "q"), ("assistant", "a")],
    ),
    (
        turns(("human", "first"), ("human", "second"), ("gpt", "a")),
        ["merge_consecutive"],
        [("user", "first\n\nsecond"), ("assistant", "a")],
    ),
    (
        turns(("human", "q"), ("gpt", "part one"), ("gpt", ""), ("gpt", "part two")),
        ["merge_consecutive"],
        [("user", "q"), ("assistant", "part one\n\npart two")],
    ),
    (
        turns(("gpt", "orphan"), ("human", "q1"), ("human", "q2"), ("gpt", "a"), ("human", "q3"), ("gpt", "b")),
        ["leading_assistant", "merge_consecutive"],
        [("user", "q1\n\nq2"), ("assistant", "a"), ("user", "q3"), ("assistant", "b")],
    ),
    (turns(("human", "q"), ("gpt", "a")), [], [("user", "q"), ("assistant", "a")]),  # nothing to repair
]


@pytest.mark.parametrize("record, applied, after", REPAIRED)
def test_repairs_keep_what_real_dumps_lose_and_say_what_they_did(record, applied, after):
    conv = normalise(record, "sharegpt", repairs=BOTH)
    assert [(m["role"], m["content"]) for m in conv.messages] == after
    assert conv.repaired == applied
    if applied:  # without the repairs: refused, the error naming the repair that would keep it
        with pytest.raises(RecordError) as info:
            normalise(record, "sharegpt")
        assert info.value.reason == "not_alternating"
        assert f"the repairs {applied[0]!r}" in info.value.detail and "`repairs`" in info.value.detail


@pytest.mark.parametrize(
    "record, reason",
    [
        (turns(("gpt", "a"), ("gpt", "b")), "not_alternating"),  # no user turn at all: nothing left to keep
        (turns(("human", "q"), ("gpt", "a"), ("system", "s")), "not_alternating"),  # a system turn in the middle
        (turns(("human", "q1"), ("human", "q2")), "no_answer"),  # merged, and still no answer
    ],
)
def test_what_no_repair_can_fix_is_still_refused_without_a_hint(record, reason):
    with pytest.raises(RecordError) as info:
        normalise(record, "sharegpt", repairs=BOTH)
    assert info.value.reason == reason and "repair" not in info.value.detail
