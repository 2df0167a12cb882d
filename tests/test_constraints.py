"""Verifiable constraints: IFEval's verifiers on hand-written passing and failing responses, our scoring against
the library's own on records in IFEval's format, and generated constraint records that follow their constraints
(thousands of seeds), hold out whole types, and come from the user's records too."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice

import pytest
from if_verifiable.common import evaluate_instructions

from infinitune.data_pipeline import constraints, synthetic
from infinitune.data_pipeline.errors import DataError
from infinitune.trainer import scoring

from .conftest import write_jsonl

# (instruction id, kwargs, a response that follows it, one that does not): written by hand, one per type.
CASES = [
    ("keywords:existence", {"keywords": ["river", "lamp"]}, "A lamp by the river.", "A lamp by the sea."),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": "at least"},
        "The cat saw another cat.",
        "The cat slept.",
    ),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": "less than"},
        "The cat slept.",
        "Cat after cat.",
    ),
    ("keywords:forbidden_words", {"forbidden_words": ["red"]}, "A blue car.", "A Red car."),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
        "Zany zebras buzz.",
        "Zany cats.",
    ),
    (
        "language:response_language",
        {"language": "de"},
        "Das ist ein kleines Haus mit einem roten Dach und einem großen Garten.",
        "This is a small house with a red roof and a big garden.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "less than"},
        "One sentence. Two sentences.",
        "One. Two. Three. Four.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "at least"},
        "Dr. Smith came home. He slept.",
        "Dr. Smith came home.",
    ),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.", "Only one."),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        "Four words right here.",
        "These are six words right here.",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "First we went.\n\nThen we came back.",
        "First we went.\n\nAfter that we came back.",
    ),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [place].", "Dear [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. Bye.", "Hello. Bye."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Items:\n* one\n* two", "Items:\n* one"),
    (
        "detectable_format:constrained_response",
        {},
        "My answer is yes.",
        "Yes, I think so.",
    ),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one* and two"),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nHi.\nSection 2\nBye.",
        "Section 1\nHi and bye.",
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "a: 1"),
    ("detectable_format:title", {}, "<<My Day>>\nIt was fine.", "My Day\nIt was fine."),
    ("combination:two_responses", {}, "Yes.\n******\nNo.", "Yes.\n******\nYes."),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "What is 2 + 2?"},
        "What is 2 + 2? It is 4.",
        "It is 4. What is 2 + 2?",
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Done. Any other questions?",
        "Any other questions? Done.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "THIS is VERY loud.",
        "This is VERY loud.",
    ),
    (
        "change_case:english_capital",
        {},
        "THE WEATHER IS VERY NICE TODAY AND WE WILL GO FOR A WALK IN THE PARK.",
        "The weather is very nice today and we will go for a walk in the park.",
    ),
    (
        "change_case:english_lowercase",
        {},
        "the weather is very nice today and we will go for a walk in the park.",
        "The weather is very nice today and we will go for a walk in the park.",
    ),
    ("punctuation:no_comma", {}, "No commas here.", "Well, a comma."),
    ("startend:quotation", {}, '"All of it quoted."', 'Not "all" of it.'),
]


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_verifier_passes_the_followed_and_fails_the_broken_response(iid, kwargs, good, bad):
    [passed] = constraints.follows(good, [iid], [kwargs], prompt="")
    [failed] = constraints.follows(bad, [iid], [kwargs], prompt="")
    assert passed.strict and passed.loose
    assert not failed.strict


def test_every_ifeval_type_has_a_hand_written_case():
    assert {c[0] for c in CASES} == set(constraints.registry())
    assert set(constraints.GENERATED_TYPES) <= set(constraints.registry())


def test_loose_forgives_a_first_line_and_markdown_stars_as_the_paper_does():
    response = 'Sure, here it is:\n"All of it quoted."'
    [r] = constraints.follows(response, ["startend:quotation"], [{}], prompt="")
    assert not r.strict and r.loose
    [r] = constraints.follows("**Done.** Any other questions?", ["startend:end_checker"], [{"end_phrase": "Done."}], "")
    assert not r.strict and not r.loose  # the phrase must end the response, loosely too
    assert constraints.follows("", ["punctuation:no_comma"], [{}], "")[0].strict is False  # empty follows nothing


def test_sentences_are_split_with_the_stand_in_when_nltk_has_no_punkt_model():
    # Without NLTK's punkt_tab (it cannot be downloaded here) the package's stand-in counts, abbreviations kept.
    from if_verifiable.ifeval import instructions_util

    assert instructions_util.count_sentences("Dr. Smith met Mr. Brown at 3 p.m. today. It rained! Did it?") == 3


# Records in IFEval's own input format (our prompts), each with a response to score.
IFEVAL_RECORDS = [
    (
        {
            "key": 1,
            "prompt": "Write a note to a friend about a trip. Include the keywords trip and train. End with 'See you soon.'",
            "instruction_id_list": ["keywords:existence", "startend:end_checker"],
            "kwargs": [{"keywords": ["trip", "train"]}, {"end_phrase": "See you soon."}],
        },
        "The trip by train was long. See you soon.",
    ),
    (
        {
            "key": 2,
            "prompt": "Describe a cat in fewer than 10 words, without commas, wrapped in double quotes.",
            "instruction_id_list": [
                "length_constraints:number_words",
                "punctuation:no_comma",
                "startend:quotation",
            ],
            "kwargs": [{"num_words": 10, "relation": "less than"}, {}, {}],
        },
        'Here you go:\n"A small, soft cat."',
    ),
    (
        {
            "key": 3,
            "prompt": "List two fruits as markdown bullets and give the answer a title in double angular brackets.",
            "instruction_id_list": ["detectable_format:number_bullet_lists", "detectable_format:title"],
            "kwargs": [
                {"num_bullets": 2, "keywords": None, "num_words": None},
                {"keywords": None},
            ],
        },
        "<<Fruits>>\n* apple\n* pear",
    ),
    (
        {
            "key": 4,
            "prompt": "Answer in all lowercase letters and end with a postscript starting with P.S.",
            "instruction_id_list": ["change_case:english_lowercase", "detectable_content:postscript"],
            "kwargs": [{}, {"postscript_marker": "P.S."}],
        },
        "the sky is blue because of the way air scatters light from the sun.\np.s. look up.",
    ),
    (
        {
            "key": 5,
            "prompt": "First repeat the request word for word without change, then answer: what is 2 + 2?",
            "instruction_id_list": ["combination:repeat_prompt"],
            "kwargs": [{"prompt_to_repeat": "what is 2 + 2?"}],
        },
        "The answer is 4.",
    ),
    (
        {
            "key": 6,
            "prompt": "Write three sentences about rain, highlight two parts with markdown, in JSON.",
            "instruction_id_list": [
                "length_constraints:number_sentences",
                "detectable_format:number_highlighted_sections",
                "detectable_format:json_format",
            ],
            "kwargs": [{"num_sentences": 3, "relation": "at least"}, {"num_highlights": 2}, {}],
        },
        '```json\n{"text": "Rain falls. *It is wet.* It *stops* later."}\n```',
    ),
]


def test_eval_scores_ifeval_records_as_the_library_does(tmp_path):
    rows = []
    for record, response in IFEVAL_RECORDS:
        rows.append({"answer": response, "reference": None, "request": record["prompt"], **record})
    ours = scoring.score_rows(rows, ["ifeval"])
    theirs = [
        evaluate_instructions(r, rec["instruction_id_list"], rec["kwargs"], rec["prompt"], constraints.registry())
        for rec, r in IFEVAL_RECORDS
    ]
    for row, (results, scores) in zip(rows, theirs):
        assert [(f["id"], f["strict"], f["loose"]) for f in row["ifeval"]] == [
            (r.instruction_id, r.strict_pass, r.loose_pass) for r in results
        ]
        assert row["ifeval_prompt_strict"] == scores.binary_strict
        assert row["ifeval_prompt_loose"] == scores.binary_loose
    n_instructions = sum(len(rec["instruction_id_list"]) for rec, _ in IFEVAL_RECORDS)
    assert ours["ifeval_prompt_strict"] == pytest.approx(sum(s.binary_strict for _, s in theirs) / len(theirs))
    assert ours["ifeval_prompt_loose"] == pytest.approx(sum(s.binary_loose for _, s in theirs) / len(theirs))
    assert ours["ifeval_instruction_strict"] == pytest.approx(
        sum(r.strict_pass for rs, _ in theirs for r in rs) / n_instructions
    )
    assert ours["ifeval_instruction_loose"] == pytest.approx(
        sum(r.loose_pass for rs, _ in theirs for r in rs) / n_instructions
    )
    # The cases were written to differ: some pass, some fail, and loose forgives where strict does not.
    assert 0 < ours["ifeval_prompt_strict"] < ours["ifeval_prompt_loose"] < 1
    by_type = scoring.ifeval_by_type(rows)
    assert by_type["startend:quotation"] == {"n": 1, "strict": 0.0, "loose": 1.0}
    assert by_type["combination:repeat_prompt"]["strict"] == 0.0


def test_every_generated_record_follows_its_own_constraints_over_thousands_of_seeds():
    mix = synthetic.Mix(share=1.0)
    seen: set[str] = set()
    for seed in range(2000):
        record = synthetic.make_record(seed, seed % 7, fmt="alpaca", mix=mix)
        ids, kwargs = record["instruction_id_list"], record["kwargs"]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        prompt = f"{record['instruction']}\n\n{record['input']}" if record["input"] else record["instruction"]
        results = constraints.follows(record["output"], ids, kwargs, prompt)
        assert all(r.strict for r in results), (seed, record)
        for iid, kw in zip(ids, kwargs):
            assert constraints.describe(iid, kw) in record["instruction"]  # the prompt states each constraint
        seen.update(ids)
    assert seen == set(constraints.GENERATED_TYPES)


def test_no_case_constraint_contradicts_its_task():
    mix = synthetic.Mix(share=1.0, types=["change_case:english_lowercase", "punctuation:no_comma"])
    records = list(islice(synthetic.stream(seed=9, tasks=["uppercase", "acronym", "reverse"], mix=mix), 150))
    for r in records:
        if r["base_task"] in ("uppercase", "acronym"):
            assert r["instruction_id_list"] == ["punctuation:no_comma"]
    assert any("change_case:english_lowercase" in r["instruction_id_list"] for r in records)  # reverse gets it
    with pytest.raises(DataError, match="fit none"):
        next(synthetic.stream(seed=9, tasks=["uppercase"], mix=synthetic.Mix(1.0, ["change_case:english_lowercase"])))


def test_a_constraint_share_keeps_the_plain_tasks_unchanged_and_is_seeded():
    plain = list(islice(synthetic.stream(seed=5), 200))
    mixed = list(islice(synthetic.stream(seed=5, mix=synthetic.Mix(share=0.5)), 200))
    constrained = [i for i, r in enumerate(mixed) if "instruction_id_list" in r]
    assert 60 < len(constrained) < 140
    assert all(mixed[i] == plain[i] for i in range(200) if i not in constrained)
    assert mixed == list(islice(synthetic.stream(seed=5, mix=synthetic.Mix(share=0.5)), 200))


def test_held_out_types_are_never_drawn_and_chosen_types_are_the_only_ones():
    held_out = {"detectable_format:title", "startend:quotation", "punctuation:no_comma"}
    kept = [t for t in constraints.GENERATED_TYPES if t not in held_out]
    train = list(islice(synthetic.stream(seed=0, mix=synthetic.Mix(share=1.0, types=kept)), 400))
    assert not held_out & {t for r in train for t in r["instruction_id_list"]}
    test = list(islice(synthetic.stream(seed=1, mix=synthetic.Mix(share=1.0, types=sorted(held_out))), 100))
    assert {t for r in test for t in r["instruction_id_list"]} == held_out


def test_constraints_on_the_users_records_and_those_left_out_are_counted(tmp_path):
    records = [
        {"instruction": "Name a colour of the sky.", "input": "", "output": "The sky is blue on a clear day."},
        {"instruction": "Say hello.", "output": "Hello there, friend."},
        {"instruction": "Q", "output": "A", "history": [["earlier", "turn"]]},
        "not json",
    ]
    path = write_jsonl(tmp_path / "mine.jsonl", records)
    bases, dropped = synthetic.bases_from_records(str(path))
    assert [b.answer for b in bases] == ["The sky is blue on a clear day.", "Hello there, friend."]
    assert dropped == {"multi_turn": 1, "bad_json": 1}
    mix = synthetic.Mix(share=1.0, bases=bases)
    out = tmp_path / "out.jsonl"
    counts = synthetic.write_jsonl(str(out), 30, seed=3, mix=mix)
    assert counts["constraints"] + counts["no_constraint_fits"] == 30 and counts["constraints"] >= 25
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        assert rec["base_task"].startswith("from:") and rec["instruction"].startswith(("Name a colour", "Say hello"))
        assert all(r.strict for r in constraints.follows(rec["output"], rec["instruction_id_list"], rec["kwargs"], ""))


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "infinitune.launcher.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_generate_data_writes_constraint_records_and_refuses_unknown_types(tmp_path):
    out = tmp_path / "c.jsonl"
    done = cli("generate-data", "--n", 50, "--seed", 2, "--constraints", 0.5, "--hold-out-types",
               "startend:quotation", "--out", out)  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    n_constrained = sum("instruction_id_list" in r for r in records)
    assert f"({50 - n_constrained} plain, {n_constrained} with constraints)" in done.stdout
    assert not any("startend:quotation" in r.get("instruction_id_list", ()) for r in records)
    bad = cli("generate-data", "--n", 5, "--constraints", 1, "--hold-out-types", "startend:quote", "--out", out)
    assert bad.returncode != 0 and "--hold-out-types" in bad.stderr and "startend:quote" in bad.stderr
    bad = cli("generate-data", "--n", 5, "--hold-out-types", "startend:quotation", "--out", out)
    assert bad.returncode != 0 and "--constraints" in bad.stderr
    bad = cli("generate-data", "--n", 5, "--constraints", 0.5, "--from", out, "--out", tmp_path / "x.jsonl")
    assert bad.returncode != 0 and "--constraints 1" in bad.stderr
