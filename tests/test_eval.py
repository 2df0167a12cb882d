"""Evaluation: the metrics on hand-computed cases, `infinitune eval` on a base model, an export and a run
directory (same figures), the answer-token loss recomputed by hand, seeded sampling, several Ray workers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from infinitune.data_pipeline import synthetic
from infinitune.testing.jobs import job_config, logs, make_tiny_setup, run, run_dir_of
from infinitune.trainer import scoring

from .conftest import write_jsonl


def test_exact_match_ignores_surrounding_and_repeated_whitespace_only():
    assert scoring.exact_match(" Paris\n", "Paris") == 1.0
    assert scoring.exact_match("a  b", "a b") == 1.0
    assert scoring.exact_match("paris", "Paris") == 0.0


def test_rouge_l_of_a_partial_overlap():
    # LCS of "the cat sat on the mat" and "the cat lay on the mat" is 5 of 6 tokens each way: F1 = 5/6.
    assert scoring.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert scoring.rouge_l("dog", "the cat") == 0.0


def test_corpus_bleu_matches_sacrebleus_own_example():
    # sacrebleu's README: BLEU = 48.53 for these three sentences against two reference sets.
    refs = [
        ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
    ]
    system = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    assert scoring.corpus_bleu(system, *refs) == pytest.approx(48.53, abs=0.005)
    assert scoring.sentence_bleu("The dog bit the man.", "The dog bit the man.") == pytest.approx(100.0)


def test_score_rows_aggregates_and_weights_loss_by_tokens():
    rows = [
        {"answer": "a b c", "reference": "a b c", "loss_sum": 3.0, "loss_tokens": 3},
        {"answer": "x", "reference": "a b c", "loss_sum": 9.0, "loss_tokens": 1},
    ]
    out = scoring.score_rows(rows, ["exact_match", "rouge_l", "loss"])
    assert out["exact_match"] == 0.5 and rows[0]["exact_match"] == 1.0 and rows[1]["exact_match"] == 0.0
    assert out["rouge_l"] == pytest.approx(0.5)
    assert out["loss"] == pytest.approx(12.0 / 4) and rows[1]["loss"] == pytest.approx(9.0)
    with pytest.raises(ValueError, match="rouge_x"):
        scoring.parse_metrics("exact_match,rouge_x")


def eval_cli(*args, timeout=600):
    out = subprocess.run(
        [sys.executable, "-m", "infinitune.launcher.cli", "eval", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("eval")
    setup = make_tiny_setup(root, tiny_tokenizer_dir, records=600)
    records = [
        {"instruction": "Reverse the letters of the word.", "input": "abc", "output": "cba"},
        {"instruction": "Uppercase this.", "input": "hello", "output": "HELLO"},
        {"messages": [{"role": "user", "content": "no answer here"}]},
        "not json",
        {"instruction": "Parity of 3?", "input": "", "output": "odd"},
    ]
    data = write_jsonl(root / "heldout.jsonl", records)
    # Constraint tasks for the in-training ifeval (generated as the quickstart's are).
    synthetic.write_jsonl(str(root / "constraints.jsonl"), 6, seed=1, mix=synthetic.Mix(share=1.0))
    return setup, data, root


def test_eval_of_a_base_model_scores_records_counts_left_out_ones_and_recomputes_the_loss(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    setup, data, _ = tiny
    out = tmp_path / "report.json"
    stdout = eval_cli(setup["model"], "--data", data, "--max-new-tokens", 4, "--out", out)
    report = json.loads(out.read_text())
    assert report["examples"] == 3 and len(report["rows"]) == 3
    assert report["dropped"] == {"bad_json": 1, "missing_field": 1}  # an alpaca file: the messages record lacks fields
    assert set(report["metrics"]) >= {"exact_match", "rouge_l", "bleu", "loss", "ppl"}
    assert "records left out: bad_json 1, missing_field 1" in stdout and "rouge_l" in stdout

    # The loss of the first answer, recomputed from the chat template by hand.
    tok = AutoTokenizer.from_pretrained(setup["model"])
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    conv = [
        {"role": "user", "content": "Reverse the letters of the word.\n\nabc"},
        {"role": "assistant", "content": "cba"},
    ]
    prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(conv, tokenize=False)
    assert full.startswith(prompt)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    answer_end = len(ids)  # the answer turn, end-of-turn included, is the rest of the rendering
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    targets = torch.tensor(ids[len(p_ids) : answer_end])
    want = torch.nn.functional.cross_entropy(logits[len(p_ids) - 1 : answer_end - 1], targets).item()
    assert report["rows"][0]["loss"] == pytest.approx(want, rel=1e-4)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    setup, _, root = tiny
    train = {
        "max_steps": 4,
        "eval_every": 4,
        "eval_tasks": str(root / "constraints.jsonl"),
        "eval_metrics": ["exact_match", "ifeval"],
        "eval_generations": 3,
    }
    config = job_config(setup, root / "runs", "eval-run", train=train)
    assert run(config) == 0, logs(config)
    export = root / "export"
    subprocess.run(
        [sys.executable, "-m", "infinitune.launcher.cli", "export", str(run_dir_of(config)), "--out", str(export)],
        check=True,
        capture_output=True,
    )
    return run_dir_of(config), export


def test_eval_scores_ifevals_own_prompts_and_several_sets_with_one_load(tiny, tmp_path):
    setup, data, _ = tiny
    ifeval = [
        {
            "key": 1,
            "prompt": "Say hi without commas.",
            "instruction_id_list": ["punctuation:no_comma"],
            "kwargs": [{}],
        },
        {
            "key": 2,
            "prompt": "Say hi in fewer than 50 words and end with 'Bye.'",
            "instruction_id_list": ["length_constraints:number_words", "startend:end_checker"],
            "kwargs": [{"num_words": 50, "relation": "less than", "keywords": None}, {"end_phrase": "Bye."}],
        },
        {"key": 3, "prompt": "Do it.", "instruction_id_list": ["keywords:made_up"], "kwargs": [{}]},
        {"key": 4, "prompt": "Do it.", "instruction_id_list": ["keywords:existence"], "kwargs": [{}]},
        {
            "key": 5,
            "prompt": "Do it.",
            "instruction_id_list": ["length_constraints:number_words"],
            "kwargs": [{"n": 1}],
        },
        {"key": 6, "prompt": "Do it.", "instruction_id_list": [], "kwargs": []},
    ]
    prompts = write_jsonl(tmp_path / "input_data.jsonl", ifeval)
    out = tmp_path / "report.json"
    args = ["--data", prompts, "--data", data, "--metrics", "exact_match,ifeval,loss", "--max-new-tokens", 8]
    stdout = eval_cli(setup["model"], *args, "--out", out)
    report = json.loads(out.read_text())
    # Missing or misspelt parameters and an empty list are refused: the verifier would draw its own at random.
    assert report["dropped"] == {"unknown_instruction": 1, "bad_constraints": 3, "bad_json": 1, "missing_field": 1}
    assert report["examples"] == 5 and report["metrics"]["ifeval_prompts"] == 2
    by = report["by_data"]
    assert set(by[str(prompts)]) >= {"ifeval_prompt_strict", "ifeval_instruction_loose"}
    assert "exact_match" not in by[str(prompts)] and "loss" not in by[str(prompts)]  # prompts alone: no reference
    assert by[str(data)]["exact_match"] == report["metrics"]["exact_match"]  # only the answered set has references
    rows = {r["where"]: r for r in report["rows"]}
    assert all(r["data"] in (str(prompts), str(data)) for r in rows.values())
    first = rows[f"{prompts}:1"]
    assert first["reference"] is None and "loss" not in first and len(first["ifeval"]) == 1
    assert first["ifeval_prompt_strict"] == float("," not in first["answer"] and bool(first["answer"].strip()))
    assert set(report["ifeval_by_type"]) == {
        "punctuation:no_comma",
        "length_constraints:number_words",
        "startend:end_checker",
    }
    assert "instruction-level accuracy by type" in stdout
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "infinitune.launcher.cli",
            "eval",
            setup["model"],
            "--data",
            data,
            "--metrics",
            "ifeval",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode != 0 and "carries constraints" in missing.stderr


@pytest.mark.slow
def test_in_training_eval_scores_ifeval_on_the_eval_tasks(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = trained
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"eval/{m}" for m in scoring.IFEVAL_SCORES} <= tags and "eval/exact_match" in tags
    [event] = acc.Scalars("eval/ifeval_prompts")
    assert event.step == 4 and event.value == 3


@pytest.mark.slow
def test_eval_of_an_export_and_of_its_run_directory_agree(tiny, trained, tmp_path):
    setup, _, _ = tiny
    run_dir, export = trained
    shards = setup["data"]["shards_dir"]
    reports = {}
    for name, target in (("export", export), ("run", run_dir)):
        eval_cli(target, "--data", shards, "--limit", 6, "--max-new-tokens", 6, "--out", tmp_path / f"{name}.json")
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    a, b = reports["export"], reports["run"]
    assert a["examples"] == b["examples"] == 6
    assert [r["answer"] for r in a["rows"]] == [r["answer"] for r in b["rows"]]
    for name in ("exact_match", "rouge_l", "bleu", "loss"):
        assert a["metrics"][name] == pytest.approx(b["metrics"][name], abs=1e-6)


@pytest.mark.slow
def test_seeded_sampling_and_ray_workers_give_the_same_rows(tiny, trained, tmp_path):
    _, data, _ = tiny
    _, export = trained
    runs = []
    for i, extra in enumerate(([], [], ["--workers", 2])):
        out = tmp_path / f"r{i}.json"
        args = ["--data", data, "--sample", "--seed", 3, "--batch-size", 1, "--max-new-tokens", 6, "--out", out]
        eval_cli(export, *args, *extra)
        runs.append([r["answer"] for r in json.loads(out.read_text())["rows"]])
    assert runs[0] == runs[1] == runs[2]
    greedy = tmp_path / "greedy.json"
    eval_cli(export, "--data", data, "--batch-size", 1, "--max-new-tokens", 6, "--temperature", 5, "--out", greedy)
    assert json.loads(greedy.read_text())["settings"]["sampling"] is None


def test_before_after_shows_exact_match_for_plain_sets_and_ifeval_for_constrained_ones():
    from infinitune.launcher.eval_report import before_after

    def report(em, strict):
        return {
            "data": ["plain.jsonl", "constrained.jsonl"],
            "by_data": {
                "plain.jsonl": {"exact_match": em},
                "constrained.jsonl": {
                    "exact_match": 0.0,
                    "ifeval_prompt_strict": strict,
                    "ifeval_instruction_strict": strict + 0.1,
                    "ifeval_prompts": 40,
                },
            },
        }

    lines = before_after(report(0.0, 0.2), report(0.275, 0.45)).splitlines()
    assert lines[1].split() == ["plain.jsonl", "exact_match", "0.0%", "27.5%"]
    assert lines[2].split() == ["constrained.jsonl", "ifeval_prompt_strict", "20.0%", "45.0%"]
    assert lines[3].split() == ["constrained.jsonl", "ifeval_instruction_strict", "30.0%", "55.0%"]
    assert len(lines) == 4  # no exact match for the constrained set: its references are one response of many
