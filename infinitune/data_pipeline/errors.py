"""Errors of the data pipeline, each saying where the problem is and what to do about it."""

from __future__ import annotations

# Every reason a record can be dropped, and what the user can do about it. The keys appear in the
# manifest's accounting and in the skipped-records report.
REASONS: dict[str, str] = {
    "bad_json": "fix the JSON syntax of this record or remove it",
    "bad_utf8": "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
    "not_an_object": "each record must be a JSON object",
    "missing_field": "add the field, map your field names with `columns:`, or set the source's `format:`",
    "wrong_type": "give the field the type the format expects",
    "empty_answer": "give every assistant turn some text, or remove the record",
    "unknown_role": "use a known role name, or map yours with the source's `roles:` option",
    "not_alternating": "turns must go user -> assistant (-> tool -> assistant) ...; fix the order",
    "no_answer": "the conversation must end with an assistant turn",
    "template_error": "the chat template cannot render this record; check the template or the record",
    "too_long": "raise data.seq_len, or set data.too_long: truncate",
    "no_trained_tokens": "after truncation nothing is left to learn from; raise data.seq_len",
    "subsampled": "not an error: the source's weight < 1 leaves this record out",
    "multi_turn": "not an error: generate-data --from adds constraints to single-turn records only",
    "bad_constraints": "give instruction_id_list and kwargs as lists of the same length, one kwargs dict per id",
    "unknown_instruction": "use IFEval's instruction ids (e.g. keywords:existence); docs/evaluation.md lists them",
}

# Reasons that describe bad input (an error unless --skip-invalid), as opposed to policy.
INVALID = frozenset(REASONS) - {"too_long", "no_trained_tokens", "subsampled", "multi_turn"}


class RecordError(Exception):
    """One record cannot be used. `reason` is a key of REASONS; `detail` says what exactly is wrong."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")

    def __reduce__(self):  # crosses process boundaries in prepare
        return RecordError, (self.reason, self.detail)


class DataError(Exception):
    """Input or shards that cannot be used; the message names the file (and line) and the fix. `transient`: the
    storage could not be read (an I/O error), which trying again may fix, as opposed to data that is wrong."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):  # crosses process boundaries
        return DataError, (str(self), self.transient)

    @classmethod
    def for_record(cls, location: str, err: RecordError) -> DataError:
        return cls(
            f"{location}: {err.reason}: {err.detail}. To fix: {REASONS[err.reason]}; "
            "or pass --skip-invalid to skip such records (they are counted and written to skipped.jsonl)."
        )
