"""Evaluation: held-out tasks (from records or prepared shards) answered by batched generation and scored, the
answer tokens' loss, and validation loss over a whole split. The same code serves `infinitune eval` and the
evaluations during training."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from infinitune.data_pipeline import constraints
from infinitune.data_pipeline.config import SourceConfig
from infinitune.data_pipeline.errors import DataError, RecordError
from infinitune.data_pipeline.formats import detect_format, normalise
from infinitune.data_pipeline.shards import Manifest, check_tokenizer, iter_shard, join_url, read_manifest
from infinitune.data_pipeline.sources import iter_records
from infinitune.data_pipeline.stream import StatefulLoader
from infinitune.data_pipeline.template import IGNORE, ChatEncoder
from infinitune.data_pipeline.tokenizer import resolve_chat_template, tokenizer_fingerprint
from infinitune.trainer import distributed
from infinitune.trainer.generation import Sampling, generate
from infinitune.trainer.loading import load_for_eval
from infinitune.trainer.scoring import GENERATION_METRICS, REFERENCE_METRICS

log = logging.getLogger(__name__)


def validation_loss(engine, loader: StatefulLoader) -> tuple[float, int]:
    """(mean loss per trained token over the whole split, trained tokens), the same on every rank."""
    engine.eval()
    total, tokens = 0.0, 0
    device = distributed.device()
    with torch.no_grad():
        for mb in loader:
            loss, n = engine(mb["input_ids"].to(device), mb["labels"].to(device), mb["position_ids"].to(device))
            total += float(loss)
            tokens += int(n)
    engine.train()
    total_t, tokens_t = distributed.all_reduce(total), distributed.all_reduce(tokens)
    return float(total_t / max(tokens_t.item(), 1)), int(tokens_t.item())


@dataclass
class Example:
    """A held-out task: the conversation up to its answer, the reference answer, and (for the answer-token loss)
    the whole conversation's ids with labels on the answer."""

    prompt_ids: list[int]
    reference: str | None  # None: a prompt alone (IFEval's own records), scored by its constraints only
    where: str  # file:line, or shard#document
    ids: list[int] | None = None
    labels: list[int] | None = None
    constraints: dict[str, Any] | None = None  # instruction_id_list, kwargs, and the request they are about
    data: str | None = None  # which of several --data it came from


def examples_from_shards(base: str, manifest: Manifest, tokenizer, n: int | None, split: str = "val") -> list[Example]:
    """The first `n` documents of a prepared split, cut at their first answer (loss: all their trained tokens)."""
    examples: list[Example] = []
    if split not in manifest.splits:
        raise DataError(f"{base}: the shards have no {split!r} split (they have {sorted(manifest.splits)})")
    for shard in manifest.splits[split].shards:
        for index, sample in iter_shard(join_url(base, shard.name), count=shard.samples):
            ids, labels, pos = sample["input_ids"], sample["labels"], sample["position_ids"]
            starts = [*np.flatnonzero(pos == 0).tolist(), len(ids)]
            for a, b in zip(starts, starts[1:]):
                trained = np.flatnonzero(labels[a:b] != IGNORE)
                if len(trained) == 0:
                    continue  # padding
                first = end = int(trained[0])
                while end < b - a and labels[a + end] != IGNORE:
                    end += 1
                examples.append(
                    Example(
                        prompt_ids=ids[a : a + first].tolist(),
                        reference=tokenizer.decode(ids[a + first : a + end].tolist(), skip_special_tokens=True).strip(),
                        where=f"{shard.name}#{index}@{a}",
                        ids=ids[a:b].tolist(),
                        labels=labels[a:b].tolist(),
                    )
                )
                if n is not None and len(examples) >= n:
                    return examples
    return examples


def _constraints(record: Any, request: str) -> dict[str, Any] | None:
    """A record's verifiable constraints (IFEval's `instruction_id_list` and `kwargs`), or None; RecordError for
    constraints the verifiers cannot score."""
    if not isinstance(record, dict) or "instruction_id_list" not in record:
        return None
    ids, kwargs = record["instruction_id_list"], record.get("kwargs")
    if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
        raise RecordError("bad_constraints", "instruction_id_list and kwargs must be lists of the same length")
    if not ids:
        raise RecordError("bad_constraints", "instruction_id_list is empty: a prompt with no constraint scores nothing")
    unknown = [i for i in ids if i not in constraints.registry()]
    if unknown:
        raise RecordError("unknown_instruction", f"unknown instruction id(s) {unknown}; see IFEval's list")
    kwargs = [k or {} for k in kwargs]
    for instruction_id, kw in zip(ids, kwargs):
        # The verifiers draw missing parameters from the global random state: a record must give them all.
        if not isinstance(kw, dict):
            raise RecordError("bad_constraints", f"the kwargs of {instruction_id} must be a dict; got {kw!r}")
        try:
            wanted = set(constraints.checker_for(instruction_id, kw, request).get_instruction_args_keys() or ())
        except (TypeError, ValueError, AttributeError) as e:
            raise RecordError("bad_constraints", f"{instruction_id} cannot take kwargs {kw}: {e}") from None
        missing = sorted(wanted - {"prompt"} - {k for k, v in kw.items() if v is not None})
        if missing:
            raise RecordError("bad_constraints", f"{instruction_id} needs kwargs {missing}; got {kw}")
    return {"instruction_id_list": ids, "kwargs": kwargs, "request": request}


def _is_ifeval_prompt(record: Any) -> bool:
    """IFEval's own `input_data.jsonl` record: a prompt and its constraints, no answer."""
    return isinstance(record, dict) and "prompt" in record and "instruction_id_list" in record


def examples_from_records(
    path: str, tokenizer, limit: int | None = None, key: str = "--data"
) -> tuple[list[Example], dict[str, int]]:
    """Held-out tasks from a file of records in any format `prepare` reads: the conversation without its last
    answer is the prompt (through the tokenizer's chat template), that answer the reference. Records with
    verifiable constraints keep them, and IFEval's own prompt records (no answer) are read too. Records that
    cannot be used are counted by reason, never silently left out."""
    records = []
    for location, record in iter_records(SourceConfig(path=path), key):
        records.append((location, record))
        if limit is not None and len(records) >= limit:
            break
    usable = [r for _, r in records if not isinstance(r, RecordError)]
    ifeval = bool(usable) and all(_is_ifeval_prompt(r) for r in usable)
    fmt = None if ifeval else detect_format(usable)
    if fmt is None and not ifeval:
        raise DataError(
            f"{key} {path}: cannot tell the records' format (alpaca, sharegpt, messages, or IFEval's prompts)"
        )
    encoder = ChatEncoder(tokenizer, resolve_chat_template(tokenizer, None), train_on="last")
    examples: list[Example] = []
    dropped: dict[str, int] = {}
    for location, record in records:
        try:
            if isinstance(record, RecordError):
                raise record
            if ifeval:
                if not isinstance(record["prompt"], str) or not record["prompt"].strip():
                    raise RecordError("missing_field", "field 'prompt' is empty")
                messages = [{"role": "user", "content": record["prompt"]}]
                prompt = encoder.render(messages, None, generation_prompt=True)
                examples.append(
                    Example(
                        prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"],
                        reference=None,
                        where=location,
                        constraints=_constraints(record, record["prompt"]),
                    )
                )
                continue
            conv = normalise(record, fmt)
            if conv.messages[-1]["role"] != "assistant":
                raise RecordError("no_answer", "the last turn is not an answer to compare with")
            messages = encoder.messages_for(conv)
            prompt = encoder.render(messages[:-1], conv.tools, generation_prompt=True)
            encoded = encoder.encode([conv])[0]
            if isinstance(encoded, RecordError):
                raise encoded
            constraints = _constraints(record, conv.messages[-2]["content"])
        except RecordError as e:
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
            log.warning("%s: skipped (%s)", location, e)
            continue
        ids, labels = encoded
        examples.append(
            Example(
                prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"],
                reference=conv.messages[-1]["content"].strip(),
                where=location,
                ids=ids.tolist(),
                labels=labels.tolist(),
                constraints=constraints,
            )
        )
    return examples, dropped


def answer_losses(lm, examples: list[Example], batch_size: int = 8, progress=None) -> list[tuple[float, int]]:
    """(summed cross-entropy, tokens) of each example's answer tokens under the model (right-padded batches);
    all of `examples` must have an answer (`ids`)."""
    device = distributed.device()
    out: list[tuple[float, int]] = []
    was_training = lm.training
    lm.eval()
    with torch.no_grad():
        for lo in range(0, len(examples), batch_size):
            batch = examples[lo : lo + batch_size]
            width = max(len(e.ids) for e in batch)
            ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in batch], device=device)
            labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.ids)) for e in batch], device=device)
            mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in batch], device=device)
            logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            targets = labels[:, 1:]
            losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
            for row, target in zip(losses, targets):
                out.append((float(row.sum()), int((target != IGNORE).sum())))
            if progress is not None:
                progress.update(len(batch))
    lm.train(was_training)
    return out


def evaluate_examples(
    lm,
    tokenizer,
    examples: list[Example],
    metrics: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    sampling: Sampling | None = None,
    synced: bool = False,
    first_index: int = 0,
    progress=None,
) -> list[dict[str, Any]]:
    """One row per example: prompt, answer, reference, and the loss sums; `scoring.score_rows` scores them."""
    rows: list[dict[str, Any]] = [
        {
            "where": e.where,
            "prompt": tokenizer.decode(e.prompt_ids, skip_special_tokens=False),
            "reference": e.reference,
            **(e.constraints or {}),
            **({"data": e.data} if e.data else {}),
        }
        for e in examples
    ]
    generating = any(m in GENERATION_METRICS for m in metrics)
    if generating:
        answers = generate(
            lm,
            tokenizer,
            [e.prompt_ids for e in examples],
            max_new_tokens,
            batch_size,
            synced,
            sampling,
            first_index,
            progress,
        )
        for row, answer in zip(rows, answers):
            row["answer"] = answer
    if "loss" in metrics:
        # The progress counts examples once: by the generation when there is one. Prompts alone have no loss.
        answered = [(row, e) for row, e in zip(rows, examples) if e.ids is not None]
        losses = answer_losses(lm, [e for _, e in answered], batch_size, None if generating else progress)
        for (row, _), (total, n) in zip(answered, losses):
            row["loss_sum"], row["loss_tokens"] = total, n
    return rows


def as_markdown(rows: list[dict]) -> str:
    """Rows as a markdown table (TensorBoard text), with whichever scores they carry."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    scores = [m for m in (*REFERENCE_METRICS, "ifeval_prompt_strict", "loss") if rows and m in rows[0]]
    lines = ["| " + " | ".join(["prompt", "answer", "reference", *scores]) + " |", "|---" * (3 + len(scores)) + "|"]
    for r in rows:
        values = [f"{r[m]:.3g}" if m in r else "" for m in scores]
        lines.append(
            "| "
            + " | ".join([cell(r["prompt"][-300:]), cell(r.get("answer", "")), cell(r["reference"] or ""), *values])
            + " |"
        )
    return "\n".join(lines)


def load_examples(data: str | list[str], tokenizer, limit: int | None) -> tuple[list[Example], dict[str, int]]:
    """Examples from a prepared shards directory (its validation split) or a file/directory of records; from
    several, one after the other (`limit` then applies to each), each row knowing which it came from."""
    if not isinstance(data, str):
        examples, dropped = [], {}
        for one in data:
            part, left = load_examples(one, tokenizer, limit)
            for e in part:
                e.data = one
            examples += part
            for reason, n in left.items():
                dropped[reason] = dropped.get(reason, 0) + n
        return examples, dropped
    if (Path(data) / "manifest.json").is_file() or "://" in data:
        manifest = read_manifest(data)
        # Token ids only mean the same text under the tokenizer that made them (the prompts carry their template).
        check_tokenizer(manifest, tokenizer_fingerprint(tokenizer), manifest.chat_template, f"--data {data}")
        split = "val" if "val" in manifest.splits else "train"
        return examples_from_shards(data, manifest, tokenizer, limit, split), {}
    return examples_from_records(data, tokenizer, limit)


def require_constraints(examples: list[Example], metrics: list[str], data) -> None:
    """`ifeval` on data of which no record carries constraints is refused before anything is generated."""
    if "ifeval" in metrics and not any(e.constraints for e in examples):
        raise DataError(
            f"--metrics ifeval: no record of --data {data} carries constraints (instruction_id_list and kwargs); "
            "make some with `infinitune generate-data --constraints 1`, or pass IFEval's input_data.jsonl"
        )


@dataclass
class EvalSettings:
    """How `infinitune eval` answers and scores."""

    metrics: list[str]
    max_new_tokens: int = 64
    batch_size: int = 8
    limit: int | None = None
    sampling: Sampling | None = None
    step: int | None = None


def eval_slice(
    target: str, data: str | list[str], settings: EvalSettings, lo: int = 0, hi: int | None = None, progress=True
):
    """(rows of examples lo..hi, records left out by reason, examples in all): one worker's share."""
    lm, tokenizer = load_for_eval(target, settings.step)
    examples, dropped = load_examples(data, tokenizer, settings.limit)
    require_constraints(examples, settings.metrics, data)
    mine = examples[lo:hi]
    with tqdm(total=len(mine), unit="ex", desc="eval", disable=not progress) as bar:
        rows = evaluate_examples(
            lm,
            tokenizer,
            mine,
            settings.metrics,
            settings.max_new_tokens,
            settings.batch_size,
            settings.sampling,
            first_index=lo,
            progress=bar,
        )
    return rows, dropped, len(examples)
