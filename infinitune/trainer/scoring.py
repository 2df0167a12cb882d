"""Scoring generated answers against references: exact match, ROUGE-L (`rouge-score`), BLEU (`sacrebleu`), and
the answer tokens' loss. One implementation for `infinitune eval` and for evaluation during training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

GENERATION_METRICS = ("exact_match", "rouge_l", "bleu")
METRICS = (*GENERATION_METRICS, "loss")
# Which way is better, for early stopping and for `compare`.
HIGHER_IS_BETTER = {**dict.fromkeys(GENERATION_METRICS, True), "loss": False, "ppl": False}


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


def score_rows(rows: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, float]:
    """Adds each requested generation metric to every row (which holds `answer` and `reference`, and for loss
    `loss_sum` and `loss_tokens`), and returns the aggregates: means, corpus BLEU, token-weighted loss and its
    perplexity."""
    out: dict[str, float] = {}
    for row in rows:
        if "answer" not in row:
            continue
        if "exact_match" in metrics:
            row["exact_match"] = exact_match(row["answer"], row["reference"])
        if "rouge_l" in metrics:
            row["rouge_l"] = rouge_l(row["answer"], row["reference"])
        if "bleu" in metrics:
            row["bleu"] = sentence_bleu(row["answer"], row["reference"])
    generated = [r for r in rows if "answer" in r]
    for name in ("exact_match", "rouge_l"):
        if name in metrics:
            out[name] = sum(r[name] for r in generated) / max(len(generated), 1)
    if "bleu" in metrics:
        out["bleu"] = corpus_bleu([r["answer"] for r in generated], [r["reference"] for r in generated])
    if "loss" in metrics:
        tokens = sum(r.get("loss_tokens", 0) for r in rows)
        out["loss"] = sum(r.get("loss_sum", 0.0) for r in rows) / max(tokens, 1)
        out["ppl"] = perplexity(out["loss"])
        out["loss_tokens"] = tokens
        for r in rows:
            if r.get("loss_tokens"):
                r["loss"] = r["loss_sum"] / r["loss_tokens"]
    return out
