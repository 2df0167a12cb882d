"""Verifiable constraints (IFEval's taxonomy): checking a response against them, and making training and
held-out records whose responses satisfy them.

A record carries its constraints the way IFEval's own `input_data.jsonl` does: `instruction_id_list` (ids
such as `keywords:existence`) and `kwargs` (one dict of parameters per id). The verifiers are IFEval's, from
the `if-verifiable` package (Google's code, Apache-2.0); strict and loose following are as the paper defines
them (loose: the response, or it with its first line, last line or both removed, or with `*` removed, passes).

Two of IFEval's verifiers need NLTK's `punkt_tab` English model (counting sentences, and words for
`change_case:capital_word_frequency`), which NLTK downloads at run time. Where it is not installed, the
package's own stand-in (`nltk_data/tokenizers/punkt_tab/english`: NLTK's Punkt algorithm with a list of
common abbreviations and no trained collocations) is used instead; `sentence_splitter()` says which.

Constraint records are made as the synthetic tasks are: record i of seed s depends on (s, i) alone. A base
request (a synthetic task, or a record the user passes) gets one to three constraints that do not conflict,
drawn with their parameters; its response is built to satisfy them and then checked by the verifiers before
it is kept. Counting constraints (words, sentences, letters, capital words) take their bound from the finished
response. Of IFEval's 25 types, `language:response_language` (a response in another language) and
`detectable_format:constrained_response` (a yes/no/maybe answer) are scored but not generated: neither can be
built from a base answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

_NLTK_DATA = Path(__file__).with_name("nltk_data")

# The types the generator makes (see the module docstring for the two it does not).
GENERATED_TYPES = (
    "keywords:existence",
    "keywords:frequency",
    "keywords:forbidden_words",
    "keywords:letter_frequency",
    "length_constraints:number_sentences",
    "length_constraints:number_paragraphs",
    "length_constraints:number_words",
    "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_format:title",
    "combination:two_responses",
    "combination:repeat_prompt",
    "startend:end_checker",
    "startend:quotation",
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "punctuation:no_comma",
)

# At most one of these per response: each lays out the whole response.
_LAYOUTS = {
    "length_constraints:number_paragraphs",
    "length_constraints:nth_paragraph_first_word",
    "detectable_format:number_bullet_lists",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "combination:two_responses",
}
# Counting constraints: their bound is read off the finished response.
_MEASURED = {
    "length_constraints:number_sentences",
    "length_constraints:number_words",
    "keywords:letter_frequency",
    "change_case:capital_word_frequency",
}

# The generator's own vocabulary (no third-party text).
_FILLER = (
    "I checked this twice before writing it down.",
    "The steps are short and easy to follow.",
    "Each part of the task was done in order.",
    "This is the whole result of the work.",
    "Nothing else is needed to get there.",
    "You can check the result by hand.",
    "The method works for other cases too.",
    "It took only a moment to find.",
    "I hope this helps you with your task.",
    "The question was clear and simple.",
    "There is only one correct result here.",
    "Small tasks like this are good practice.",
    "A careful reader will see why this holds.",
    "The same approach works every time.",
    "Please ask again if something is unclear.",
    "This answer follows the rules you gave.",
)
_WORDS = (
    "river", "garden", "window", "planet", "engine", "silver", "forest", "candle", "bridge", "castle",
    "pencil", "rocket", "island", "harbor", "meadow", "signal", "thunder", "mirror", "valley", "lantern",
    "market", "winter", "summer", "ocean", "mountain", "village", "orchard", "compass", "feather", "marble",
)  # fmt: skip
_PLACEHOLDERS = ("[name]", "[address]", "[date]", "[time]", "[place]", "[phone number]", "[email]", "[company]")
_END_PHRASES = (
    "Any other questions?",
    "Is there anything else I can help with?",
    "Let me know if you have additional questions.",
    "That is all for now.",
    "Hope this helps.",
)


@lru_cache(maxsize=1)
def registry() -> Mapping[str, Any]:
    """IFEval's verifiers by instruction id (imported on first use: the package pulls in nltk and langdetect)."""
    import langdetect
    import nltk
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0  # langdetect samples; seeded, a response is judged the same each time
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        nltk.data.path.append(str(_NLTK_DATA))
    return INSTRUCTION_DICT


@lru_cache(maxsize=1)
def conflicts() -> Mapping[str, set[str]]:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    registry()
    return INSTRUCTION_CONFLICTS


def sentence_splitter() -> str:
    """Which sentence splitter the verifiers use: NLTK's trained English model, or the package's stand-in."""
    import nltk

    registry()
    found = str(nltk.data.find("tokenizers/punkt_tab/english/"))
    return "punkt_tab (infinitune's stand-in)" if found.startswith(str(_NLTK_DATA)) else f"punkt_tab ({found})"


def checker_for(instruction_id: str, kwargs: Mapping[str, Any], prompt: str):
    """IFEval's verifier for one instruction, built with its parameters (and the prompt, where it reads it)."""
    checker = registry()[instruction_id](instruction_id)
    checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker


@dataclass
class Following:
    instruction_id: str
    strict: bool
    loose: bool


def follows(response: str, ids: Sequence[str], kwargs: Sequence[Mapping[str, Any]], prompt: str) -> list[Following]:
    """Whether the response follows each constraint, strictly and loosely (an empty response follows none).
    Loosely: the response, or it without its first line, last line or both, each also without `*`, passes (the
    package's `get_loose_transformations`, the paper's definition)."""
    from if_verifiable.common import get_loose_transformations

    variants = get_loose_transformations(response)
    out = []
    for instruction_id, kw in zip(ids, kwargs):
        checker = checker_for(instruction_id, kw, prompt)
        strict = bool(response.strip()) and bool(checker.check_following(response))
        loose = strict or any(v.strip() and checker.check_following(v) for v in variants)
        out.append(Following(instruction_id, strict, bool(loose)))
    return out


def describe(instruction_id: str, kwargs: Mapping[str, Any]) -> str:
    """The instruction's text, as IFEval's verifier words it."""
    return registry()[instruction_id](instruction_id).build_description(**kwargs)


# --- generation ---------------------------------------------------------------------------------------------


@dataclass
class Base:
    """What a constraint record starts from: a request (instruction and optional input) and its answer."""

    instruction: str
    input: str
    answer: str
    task: str

    @property
    def request(self) -> str:
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def _pick_types(rng: random.Random, types: Sequence[str], n: int) -> list[str]:
    chosen: list[str] = []
    pool = list(types)
    rng.shuffle(pool)
    for t in pool:
        if len(chosen) == n:
            break
        clash = any(t in conflicts().get(c, ()) or c in conflicts().get(t, ()) for c in chosen)
        if clash or (t in _LAYOUTS and any(c in _LAYOUTS for c in chosen)):
            continue
        chosen.append(t)
    return chosen


def _count_words(text: str) -> int:
    from if_verifiable.ifeval import instructions_util

    return instructions_util.count_words(text)


def _count_sentences(text: str) -> int:
    from if_verifiable.ifeval import instructions_util

    return instructions_util.count_sentences(text)


def _capital_words(text: str) -> int:
    import nltk

    return sum(w.isupper() for w in nltk.word_tokenize(text))


def _relative_bound(rng: random.Random, value: int, spread: int) -> tuple[str, int]:
    """A ("less than" | "at least", N) that `value` satisfies, N within `spread` of it."""
    if value >= 1 and rng.random() < 0.5:
        return "at least", max(1, value - rng.randint(0, spread))
    return "less than", value + rng.randint(1, spread)


def build_response(rng: random.Random, base: Base, types: Sequence[str]) -> tuple[str, list[dict[str, Any]]]:
    """A response to `base` that satisfies `types` by construction, and each type's parameters."""
    params: dict[str, dict[str, Any]] = {t: {} for t in types}
    core = base.answer.strip()
    sentences = [core if ("\n" in core or core.endswith((".", "!", "?"))) else f"The answer is {core}."]
    sentences += rng.sample(_FILLER, rng.randint(0, 2))
    words = rng.sample(_WORDS, 8)  # distinct words for keywords, forbidden words, first words and titles
    if "keywords:existence" in params:
        kws = words[:2]
        params["keywords:existence"] = {"keywords": kws}
        sentences.insert(rng.randint(1, len(sentences)), f"It brings a {kws[0]} and a {kws[1]} to mind.")
    if "keywords:frequency" in params:
        kw, n = words[2], rng.randint(1, 4)
        if rng.random() < 0.5:
            params["keywords:frequency"] = {"keyword": kw, "frequency": n, "relation": "at least"}
            sentences += [f"Think of the {kw} again." for _ in range(n)]
        else:
            params["keywords:frequency"] = {"keyword": kw, "frequency": n, "relation": "less than"}
            sentences += [f"Think of the {kw} again." for _ in range(n - 1)]
    if "keywords:forbidden_words" in params:
        params["keywords:forbidden_words"] = {"forbidden_words": words[3:5]}
    if "detectable_content:number_placeholders" in params:
        n = rng.randint(1, 4)
        params["detectable_content:number_placeholders"] = {"num_placeholders": n}
        sentences.append("Fill in " + " and ".join(rng.sample(_PLACEHOLDERS, n)) + " before you send it.")
    if "change_case:capital_word_frequency" in params and rng.random() < 0.5:
        sentences.append(rng.choice(("THIS IS IMPORTANT.", "READ THIS FIRST.", "PLEASE NOTE THIS.")))
    if "detectable_format:number_highlighted_sections" in params:
        n = rng.randint(1, 3)
        params["detectable_format:number_highlighted_sections"] = {"num_highlights": n}
        while len(sentences) < n + 1:
            sentences.append(rng.choice(_FILLER))
        for i in range(1, n + 1):
            sentences[i] = f"*{sentences[i]}*"

    body = _lay_out(rng, sentences, words, params)

    if "detectable_format:title" in params:
        body = f"<<{words[6].capitalize()} and {words[7].capitalize()}>>\n{body}"
    if "combination:repeat_prompt" in params:
        params["combination:repeat_prompt"] = {"prompt_to_repeat": base.request}
        body = f"{base.request}\n{body}"
    if "detectable_content:postscript" in params:
        marker = rng.choice(("P.S.", "P.P.S"))
        params["detectable_content:postscript"] = {"postscript_marker": marker}
        body += f"\n{marker} {rng.choice(_FILLER)}"
    if "startend:end_checker" in params:
        phrase = rng.choice(_END_PHRASES)
        params["startend:end_checker"] = {"end_phrase": phrase}
        body += f" {phrase}" if "detectable_format:json_format" not in params else ""
    if "punctuation:no_comma" in params:
        body = body.replace(", ", " ").replace(",", " ")
    if "change_case:english_capital" in params:
        body = body.upper()
    if "change_case:english_lowercase" in params:
        body = body.lower()
    if "startend:quotation" in params:
        body = f'"{body}"'

    if "length_constraints:number_words" in params:
        relation, n = _relative_bound(rng, _count_words(body), 20)
        params["length_constraints:number_words"] = {"num_words": n, "relation": relation}
    if "length_constraints:number_sentences" in params:
        relation, n = _relative_bound(rng, _count_sentences(body), 3)
        params["length_constraints:number_sentences"] = {"num_sentences": n, "relation": relation}
    if "keywords:letter_frequency" in params:
        letter = rng.choice("abcdefghilmnoprstuw")
        relation, n = _relative_bound(rng, body.lower().count(letter), 5)
        params["keywords:letter_frequency"] = {"letter": letter, "let_frequency": n, "let_relation": relation}
    if "change_case:capital_word_frequency" in params:
        relation, n = _relative_bound(rng, _capital_words(body), 4)
        params["change_case:capital_word_frequency"] = {"capital_frequency": n, "capital_relation": relation}
    return body, [params[t] for t in types]


def _lay_out(rng: random.Random, sentences: list[str], words: list[str], params: dict[str, dict[str, Any]]) -> str:
    """The sentences in the one layout constraint among `params` (if any), else as one paragraph."""

    def pad(n: int) -> list[str]:
        out = list(sentences)
        while len(out) < n:
            out.append(rng.choice(_FILLER))
        return out

    def groups(items: list[str], n: int) -> list[str]:
        cuts = sorted(rng.sample(range(1, len(items)), n - 1)) if n > 1 else []
        return [" ".join(items[a:b]) for a, b in zip([0, *cuts], [*cuts, len(items)])]

    if "length_constraints:number_paragraphs" in params:
        n = rng.randint(2, 4)
        params["length_constraints:number_paragraphs"] = {"num_paragraphs": n}
        return "\n***\n".join(groups(pad(n), n))
    if "length_constraints:nth_paragraph_first_word" in params:
        n = rng.randint(2, 4)
        nth, first = rng.randint(1, n), words[5]
        params["length_constraints:nth_paragraph_first_word"] = {
            "num_paragraphs": n,
            "nth_paragraph": nth,
            "first_word": first,
        }
        paragraphs = groups(pad(n), n)
        paragraphs[nth - 1] = f"{first.capitalize()} - {paragraphs[nth - 1]}"  # the verifier reads "word:" as is
        return "\n\n".join(paragraphs)
    if "detectable_format:number_bullet_lists" in params:
        n = rng.randint(1, 4)
        params["detectable_format:number_bullet_lists"] = {"num_bullets": n}
        items = pad(n + 1)
        return items[0] + "\n" + "\n".join(f"* {s}" for s in groups(items[1:], n))
    if "detectable_format:multiple_sections" in params:
        n, splitter = rng.randint(2, 4), rng.choice(("Section", "SECTION"))
        params["detectable_format:multiple_sections"] = {"section_spliter": splitter, "num_sections": n}
        return "\n".join(f"{splitter} {i}\n{text}" for i, text in enumerate(groups(pad(n), n), 1))
    if "detectable_format:json_format" in params:
        return json.dumps({"answer": " ".join(sentences)}, ensure_ascii=False)
    if "combination:two_responses" in params:
        first = " ".join(sentences)
        second = " ".join([sentences[0], *rng.sample(_FILLER, 2)])
        return f"{first}\n******\n{second}" if second != first else f"{first}\n******\n{second} Done."
    return " ".join(sentences)


def make_constraint_record(
    rng: random.Random,
    base: Base,
    types: Sequence[str],
    fmt: str = "alpaca",
    attempts: int = 20,
) -> dict[str, Any] | None:
    """A record of `base` with one to three of `types`, its response checked by the verifiers; None when no
    draw of `attempts` gave a response that passes (e.g. a base answer with commas under `no_comma`)."""
    for _ in range(attempts):
        chosen = _pick_types(rng, types, rng.randint(1, min(3, len(types))))
        response, kwargs = build_response(rng, base, chosen)
        descriptions = "\n".join(describe(t, kw) for t, kw in zip(chosen, kwargs))
        instruction = f"{base.instruction}\n{descriptions}"
        prompt = f"{instruction}\n\n{base.input}" if base.input else instruction
        if all(f.strict for f in follows(response, chosen, kwargs, prompt)):
            meta = {"task": "constraints", "base_task": base.task, "instruction_id_list": chosen, "kwargs": kwargs}
            if fmt == "alpaca":
                return {"instruction": instruction, "input": base.input, "output": response, **meta}
            if fmt == "messages":
                return {
                    "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                    **meta,
                }
            raise ValueError(f"fmt must be alpaca or messages; got {fmt!r}")
    return None


def check_types(types: Iterable[str], key: str) -> list[str]:
    names = list(types)
    unknown = [t for t in names if t not in GENERATED_TYPES]
    if unknown:
        raise ValueError(f"{key}: unknown or not generated constraint type(s) {unknown}; generated: {GENERATED_TYPES}")
    return names
