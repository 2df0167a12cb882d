"""Synthetic instruction tasks with checkable answers: an unbounded, seeded, random-access stream.

Record i of seed s depends on (s, i) alone, so any slice of the stream can be made without the rest, and a
held-out set is simply another seed. The project ships no third-party data: the quickstart trains on this
and scores exact-match accuracy on held-out tasks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from itertools import count, islice
from typing import Any

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


def make_record(seed: int, index: int, tasks: Sequence[str] = tuple(TASKS), fmt: str = "alpaca") -> dict[str, Any]:
    """Record `index` of the stream for `seed`: alpaca fields or OpenAI messages, plus its task name."""
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


def stream(seed: int = 0, start: int = 0, tasks: Sequence[str] | None = None, fmt: str = "alpaca") -> Iterator[dict]:
    """Records start, start+1, ... of the stream for `seed`, without end."""
    names = tuple(tasks or TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    for i in count(start):
        yield make_record(seed, i, names, fmt)


def write_jsonl(path: str, n: int, seed: int = 0, tasks: Sequence[str] | None = None, fmt: str = "alpaca") -> int:
    """Write the first `n` records of the stream to `path` (JSONL); returns n."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in islice(stream(seed, 0, tasks, fmt), n):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return n


def answer_of(record: dict[str, Any]) -> str:
    """The reference answer of a synthetic record in either form."""
    if "output" in record:
        return record["output"]
    return record["messages"][-1]["content"]
