"""Synthetic instruction tasks with checkable answers: an unbounded, seeded, random-access stream.

Record i of seed s depends on (s, i) alone, so any slice of the stream can be made without the rest, and a
held-out set is simply another seed. The project ships no third-party data: the quickstart trains on this
and scores exact-match accuracy on held-out tasks. A share of the records can instead carry verifiable
constraints (`constraints`): a task, or a record of the user's, with one to three IFEval constraints and a
response that satisfies them, for instruction following scored by `infinitune eval --metrics ifeval`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count, islice
from typing import Any

from infinitune.data_pipeline.config import SourceConfig
from infinitune.data_pipeline.constraints import GENERATED_TYPES, Base, make_constraint_record
from infinitune.data_pipeline.errors import DataError, RecordError
from infinitune.data_pipeline.formats import ASSISTANT, USER, detect_format, normalise
from infinitune.data_pipeline.sources import iter_records

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _word(rng: random.Random, syllables: int | None = None) -> str:
    n = syllables or rng.randint(1, 3)
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n))


def _numbers(rng: random.Random, lo=0, hi=99) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(3, 7))]


def _add(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"What is {a} + {b}? Answer with the number only.", "", str(a + b)


def _subtract(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"What is {a} - {b}? Answer with the number only.", "", str(a - b)


def _multiply(rng):
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    return f"What is {a} * {b}? Answer with the number only.", "", str(a * b)


def _reverse(rng):
    w = _word(rng, rng.randint(2, 4))
    return "Reverse the letters of the word.", w, w[::-1]


def _sort(rng):
    xs = _numbers(rng)
    return (
        "Sort the numbers in ascending order. Answer as a comma-separated list.",
        ", ".join(map(str, xs)),
        ", ".join(map(str, sorted(xs))),
    )


def _maximum(rng):
    xs = _numbers(rng)
    return "What is the largest number in the list?", ", ".join(map(str, xs)), str(max(xs))


def _count_letter(rng):
    words = [_word(rng) for _ in range(rng.randint(2, 5))]
    text = " ".join(words)
    letter = rng.choice(text.replace(" ", ""))
    return f"How many times does the letter '{letter}' appear in the text?", text, str(text.count(letter))


def _word_count(rng):
    text = " ".join(_word(rng) for _ in range(rng.randint(2, 9)))
    return "How many words are in the text?", text, str(len(text.split()))


def _uppercase(rng):
    text = " ".join(_word(rng) for _ in range(rng.randint(1, 4)))
    return "Convert the text to uppercase.", text, text.upper()


def _parity(rng):
    n = rng.randint(0, 10_000)
    return f"Is {n} even or odd? Answer with 'even' or 'odd'.", "", "even" if n % 2 == 0 else "odd"


def _json_to_lines(rng):
    obj = {_word(rng, 2): rng.randint(0, 99) for _ in range(rng.randint(2, 4))}
    lines = "\n".join(f"{k}={obj[k]}" for k in sorted(obj))
    return "Convert the JSON object to key=value lines, sorted by key.", json.dumps(obj), lines


def _acronym(rng):
    words = [_word(rng) for _ in range(rng.randint(2, 5))]
    return (
        "Write the first letter of each word, in uppercase.",
        " ".join(words),
        "".join(w[0] for w in words).upper(),
    )


TASKS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "reverse": _reverse,
    "sort": _sort,
    "maximum": _maximum,
    "count_letter": _count_letter,
    "word_count": _word_count,
    "uppercase": _uppercase,
    "parity": _parity,
    "json_to_lines": _json_to_lines,
    "acronym": _acronym,
}


@dataclass
class Mix:
    """Which records of the stream carry constraints: a share of them, of these types, built on synthetic tasks
    or on the user's own records (`bases`, taken in turn: record i uses base i mod len(bases))."""

    share: float = 0.0
    types: Sequence[str] = GENERATED_TYPES
    bases: Sequence[Base] = field(default_factory=list)


# Constraints that would contradict a task's own instruction ("Convert the text to uppercase" in lowercase).
CONTRADICTS: dict[str, set[str]] = {
    "uppercase": {"change_case:english_lowercase"},
    "acronym": {"change_case:english_lowercase"},
}

_ANSWER_FORM = re.compile(r"\s*Answer (with|as) [^.]*\.")


def base_task(rng: random.Random, tasks: Sequence[str]) -> Base:
    """A synthetic task as a constraint record's base; without the sentence that fixes the answer's form, which
    the constraints now decide."""
    task = tasks[rng.randrange(len(tasks))]
    instruction, extra, answer = TASKS[task](rng)
    return Base(_ANSWER_FORM.sub("", instruction).strip(), extra, answer, task)


def bases_from_records(path: str) -> tuple[list[Base], dict[str, int]]:
    """The user's single-turn records (any format `prepare` reads) as constraint bases: the question and its
    answer. The others are counted by reason."""
    records = list(iter_records(SourceConfig(path=path), "--from"))
    fmt = detect_format(r for _, r in records if not isinstance(r, RecordError))
    if fmt is None:
        raise DataError(f"--from {path}: cannot tell the records' format (alpaca, sharegpt or messages)")
    bases: list[Base] = []
    dropped: dict[str, int] = {}
    for location, record in records:
        try:
            if isinstance(record, RecordError):
                raise record
            turns = [m for m in normalise(record, fmt).messages if m["role"] in (USER, ASSISTANT)]
            if len(turns) != 2:
                raise RecordError("multi_turn", "constraints are added to single-turn records only")
            bases.append(Base(turns[0]["content"].strip(), "", turns[1]["content"].strip(), f"from:{location}"))
        except RecordError as e:
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
    if not bases:
        raise DataError(f"--from {path}: no single-turn record to add constraints to (left out: {dropped})")
    return bases, dropped


def make_record(
    seed: int, index: int, tasks: Sequence[str] = tuple(TASKS), fmt: str = "alpaca", mix: Mix | None = None
) -> dict[str, Any] | None:
    """Record `index` of the stream for `seed`: alpaca fields or OpenAI messages, plus its task name (and for
    a constraint record its `instruction_id_list` and `kwargs`). None: the user's base `index` could not be
    given constraints its answer satisfies."""
    if mix is not None and mix.share > 0:
        rng = random.Random(f"infinitune-constraints/{seed}/{index}")
        if rng.random() < mix.share:
            if mix.bases:
                return make_constraint_record(rng, mix.bases[index % len(mix.bases)], mix.types, fmt)
            for _ in range(100):  # a synthetic base that fits none of the drawn constraints is simply replaced
                base = base_task(rng, tasks)
                types = [t for t in mix.types if t not in CONTRADICTS.get(base.task, ())]
                record = make_constraint_record(rng, base, types, fmt) if types else None
                if record is not None:
                    return record
            raise DataError(f"constraint types {list(mix.types)} fit none of 100 tasks of {list(tasks)}; add types")
    rng = random.Random(f"infinitune-synthetic/{seed}/{index}")
    task = tasks[rng.randrange(len(tasks))]
    instruction, extra, answer = TASKS[task](rng)
    if fmt == "alpaca":
        return {"instruction": instruction, "input": extra, "output": answer, "task": task}
    if fmt == "messages":
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "task": task,
        }
    raise ValueError(f"fmt must be alpaca or messages; got {fmt!r}")


def stream(
    seed: int = 0, start: int = 0, tasks: Sequence[str] | None = None, fmt: str = "alpaca", mix: Mix | None = None
) -> Iterator[dict | None]:
    """Records start, start+1, ... of the stream for `seed`, without end (None: see `make_record`)."""
    names = tuple(tasks or TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    for i in count(start):
        yield make_record(seed, i, names, fmt, mix)


def write_jsonl(
    path: str, n: int, seed: int = 0, tasks: Sequence[str] | None = None, fmt: str = "alpaca", mix: Mix | None = None
) -> dict[str, int]:
    """Write the first `n` records of the stream to `path` (JSONL); returns the records written by kind
    (`plain`, `constraints`) and the user's bases left out (`no_constraint_fits`)."""
    counts = {"plain": 0, "constraints": 0, "no_constraint_fits": 0}
    with open(path, "w", encoding="utf-8") as f:
        for rec in islice(stream(seed, 0, tasks, fmt, mix), n):
            if rec is None:
                counts["no_constraint_fits"] += 1
                continue
            counts["constraints" if "instruction_id_list" in rec else "plain"] += 1
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return counts


def answer_of(record: dict[str, Any]) -> str:
    """The reference answer of a synthetic record in either form."""
    if "output" in record:
        return record["output"]
    return record["messages"][-1]["content"]
