"""Scoring generated answers against references: exact match, ROUGE-L (`rouge-score`), BLEU (`sacrebleu`), the
answer tokens' loss, and instruction following on prompts with verifiable constraints (IFEval: prompt-level
and instruction-level accuracy, strict and loose). One implementation for `infinitune eval` and for
evaluation during training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from infinitune.data_pipeline.constraints import follows

REFERENCE_METRICS = ("exact_match", "rouge_l", "bleu")  # the answer against its reference
GENERATION_METRICS = (*REFERENCE_METRICS, "ifeval")
METRICS = (*GENERATION_METRICS, "loss")
# What `ifeval` writes: the share of prompts whose every constraint is followed, and of constraints followed.
IFEVAL_SCORES = ("ifeval_prompt_strict", "ifeval_prompt_loose", "ifeval_instruction_strict", "ifeval_instruction_loose")
# Which way is better, for early stopping and for `compare`.
HIGHER_IS_BETTER = {
    **dict.fromkeys((*REFERENCE_METRICS, *IFEVAL_SCORES), True),
    "loss": False,
    "ppl": False,
}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # a diverged run's loss must not overflow the metric


def parse_metrics(text: str | Sequence[str], key: str = "--metrics") -> list[str]:
    """Metric names from `a,b,c` or a list; unknown names refused, naming the known ones."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"{key}: unknown metric(s) {unknown or names}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def normalise(text: str) -> str:
    """What exact match compares: the text with surrounding whitespace removed and inner runs collapsed."""
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalise(answer) == normalise(reference))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of tokens), in [0, 1]."""
    return float(_rouge_scorer().score(reference, answer)["rougeL"].fmeasure)


def sentence_bleu(answer: str, reference: str) -> float:
    """sacrebleu's smoothed sentence BLEU, in [0, 100]."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(answer, [reference]).score)


def corpus_bleu(answers: Sequence[str], *reference_sets: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU, in [0, 100], against one or more reference sets (each one reference per
    answer): the standard aggregate, not the mean of sentence scores."""
    import sacrebleu

    if not answers:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(answers), [list(refs) for refs in reference_sets]).score)


def score_ifeval(row: dict[str, Any]) -> None:
    """Adds to a row with constraints (`instruction_id_list`, `kwargs`, `request`) whether its answer follows
    each, and all of them, strictly and loosely."""
    results = follows(row["answer"], row["instruction_id_list"], row["kwargs"], row.get("request", ""))
    row["ifeval"] = [{"id": r.instruction_id, "strict": r.strict, "loose": r.loose} for r in results]
    row["ifeval_prompt_strict"] = float(all(r.strict for r in results))
    row["ifeval_prompt_loose"] = float(all(r.loose for r in results))


def ifeval_by_type(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Instruction-level accuracy, strict and loose, per instruction id, over the rows scored by `ifeval`."""
    by: dict[str, dict[str, float]] = {}
    for row in rows:
        for r in row.get("ifeval", ()):
            entry = by.setdefault(r["id"], {"n": 0, "strict": 0.0, "loose": 0.0})
            entry["n"] += 1
            entry["strict"] += r["strict"]
            entry["loose"] += r["loose"]
    for entry in by.values():
        entry["strict"] /= entry["n"]
        entry["loose"] /= entry["n"]
    return dict(sorted(by.items()))


def score_rows(rows: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, float]:
    """Adds each requested metric to every row and returns the aggregates (`score_each`, then `aggregate`)."""
    score_each(rows, metrics)
    return aggregate(rows, metrics)


def score_each(rows: list[dict[str, Any]], metrics: Sequence[str]) -> None:
    """Adds each requested metric to every row (which holds `answer` and `reference`, for loss `loss_sum` and
    `loss_tokens`, for ifeval its constraints). Rows without a reference (IFEval's own prompts) get no
    reference metric, rows without constraints no ifeval."""
    for row in rows:
        if "loss" in metrics and row.get("loss_tokens"):
            row["loss"] = row["loss_sum"] / row["loss_tokens"]
        if "answer" not in row:
            continue
        if "ifeval" in metrics and "instruction_id_list" in row:
            score_ifeval(row)
        if row.get("reference") is None:
            continue
        if "exact_match" in metrics:
            row["exact_match"] = exact_match(row["answer"], row["reference"])
        if "rouge_l" in metrics:
            row["rouge_l"] = rouge_l(row["answer"], row["reference"])
        if "bleu" in metrics:
            row["bleu"] = sentence_bleu(row["answer"], row["reference"])


def aggregate(rows: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, float]:
    """The aggregates of rows `score_each` scored: means, corpus BLEU, token-weighted loss and its perplexity,
    IFEval's accuracies (prompt level: all of a prompt's constraints followed; instruction level: each)."""
    out: dict[str, float] = {}
    generated = [r for r in rows if "answer" in r and r.get("reference") is not None]
    constrained = [r for r in rows if "ifeval" in r]
    if "ifeval" in metrics and constrained:  # none: a set of plain tasks beside constrained ones
        followed = [f for r in constrained for f in r["ifeval"]]
        for level, items in (("prompt", constrained), ("instruction", followed)):
            for mode in ("strict", "loose"):
                key = f"ifeval_{level}_{mode}"
                values = [r[key] for r in items] if level == "prompt" else [float(f[mode]) for f in items]
                out[key] = sum(values) / max(len(values), 1)
        out["ifeval_prompts"] = len(constrained)
    if generated:  # none: prompts alone (IFEval's records), which have no reference to compare with
        for name in ("exact_match", "rouge_l"):
            if name in metrics:
                out[name] = sum(r[name] for r in generated) / len(generated)
        if "bleu" in metrics:
            out["bleu"] = corpus_bleu([r["answer"] for r in generated], [r["reference"] for r in generated])
    tokens = sum(r.get("loss_tokens", 0) for r in rows)
    if "loss" in metrics and tokens:
        out["loss"] = sum(r.get("loss_sum", 0.0) for r in rows) / tokens
        out["ppl"] = perplexity(out["loss"])
        out["loss_tokens"] = tokens
    return out
