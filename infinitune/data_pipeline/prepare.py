"""`infinitune prepare`: sources -> normalised, templated, masked, packed WebDataset shards + manifest.

The work is cut into chunks of `records_per_chunk` consecutive records of one source. A chunk is validated,
split (validation / train), weighted, tokenised, packed and written as its own shards by one process, and
every choice in it is a hash of (seed, source, record index), so the output is the same for any number
of processes. The main process reads the sources, hands out chunks (a bounded number in flight), adds up
the accounting and writes the manifest last; the shards land in a temporary directory that replaces
`shards_dir` only when everything is written, so a failed prepare leaves the previous shards intact.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from infinitune.data_pipeline.config import DataConfig, SourceConfig
from infinitune.data_pipeline.errors import INVALID, DataError, RecordError
from infinitune.data_pipeline.formats import detect_format, normalise, rename_columns
from infinitune.data_pipeline.packing import pack_documents
from infinitune.data_pipeline.sample_index import write_index
from infinitune.data_pipeline.shards import MANIFEST, Manifest, ShardInfo, SplitInfo, write_shard
from infinitune.data_pipeline.sources import iter_records
from infinitune.data_pipeline.template import IGNORE, ChatEncoder
from infinitune.data_pipeline.tokenizer import pad_token_id, resolve_chat_template, tokenizer_fingerprint
from infinitune.typed_config import ConfigError
from infinitune.version import __version__

log = logging.getLogger(__name__)
_SURROGATE = re.compile("[\ud800-\udfff]")
SKIPPED_REPORT = "skipped.jsonl"
REPAIRED_REPORT = "repaired.jsonl"


@dataclass
class Chunk:
    unit: int  # global chunk number: names its shards
    source: int  # index into data.sources
    fmt: str
    records: list[tuple[int, str, Any]]  # (index in source, location, record or RecordError)


@dataclass
class ChunkResult:
    unit: int
    source: int
    fmt: str
    counts: collections.Counter = field(default_factory=collections.Counter)  # records, kept, truncated, ...
    dropped: collections.Counter = field(default_factory=collections.Counter)  # reason -> records
    skipped: list[dict[str, Any]] = field(default_factory=list)  # rows of the skipped-records report
    repaired: collections.Counter = field(default_factory=collections.Counter)  # repair -> kept records
    repaired_rows: list[dict[str, Any]] = field(default_factory=list)  # rows of the repaired-records report
    train: list[ShardInfo] = field(default_factory=list)
    val: list[ShardInfo] = field(default_factory=list)


def uniform(seed: int, source: str, index: int, purpose: str) -> float:
    """A reproducible number in [0, 1) for one record and one decision."""
    digest = hashlib.blake2b(f"{seed}\0{source}\0{index}\0{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def copies_for(weight: float, u: float) -> int:
    """How many times a record is used for a source weight (the fractional part decided by `u`)."""
    whole = math.floor(weight)
    return whole + (1 if u < weight - whole else 0)


class _Worker:
    """What one process needs to turn chunks into shards."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, chat_template: str, out_dir: str, skip_invalid: bool):
        self.cfg = cfg
        self.encoder = ChatEncoder(tokenizer, chat_template, cfg.train_on)
        self.pad_id = pad_token_id(tokenizer)
        self.out_dir = out_dir
        self.skip_invalid = skip_invalid

    def _drop(self, res: ChunkResult, where: str, err: RecordError, record: Any) -> None:
        if err.reason in INVALID and not self.skip_invalid:
            raise DataError.for_record(where, err)
        res.dropped[err.reason] += 1
        if err.reason != "subsampled":
            raw = record if not isinstance(record, RecordError) else None
            res.skipped.append({"location": where, "reason": err.reason, "detail": err.detail, "record": raw})

    def run(self, chunk: Chunk) -> ChunkResult:
        cfg, src = self.cfg, self.cfg.sources[chunk.source]
        res = ChunkResult(chunk.unit, chunk.source, chunk.fmt)
        res.counts["records"] = len(chunk.records)
        keep = []  # (where, record, conversation, copies); copies 0 means validation
        for index, where, record in chunk.records:
            try:
                if isinstance(record, RecordError):
                    raise record
                conv = normalise(rename_columns(record, src.columns), chunk.fmt, src.roles, src.repairs)
            except RecordError as err:
                self._drop(res, where, err, record)
                continue
            # The held-out choice hangs on the conversation itself: duplicates, in any file or format, land
            # on the same side, so validation never holds a copy of a training record.
            if cfg.val_fraction and uniform(cfg.seed, json.dumps(conv.messages), 0, "val") < cfg.val_fraction:
                keep.append((where, record, conv, 0))
                continue
            copies = copies_for(src.weight, uniform(cfg.seed, src.path, index, "weight"))
            if copies == 0:
                self._drop(res, where, RecordError("subsampled", f"weight {src.weight}"), record)
                continue
            keep.append((where, record, conv, copies))

        passes: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(max([k[3] for k in keep] + [1]))]
        val_docs = []
        for (where, record, conv, copies), encoded in zip(keep, self.encoder.encode([k[2] for k in keep])):
            if isinstance(encoded, RecordError):
                self._drop(res, where, encoded, record)
                continue
            ids, labels = encoded
            if len(ids) > cfg.seq_len:
                if cfg.too_long == "drop":
                    reason = RecordError("too_long", f"{len(ids)} tokens > seq_len {cfg.seq_len}")
                    self._drop(res, where, reason, record)
                    continue
                ids, labels = ids[: cfg.seq_len], labels[: cfg.seq_len]
                if not (labels != IGNORE).any():
                    reason = RecordError("no_trained_tokens", f"no answer token within the first {cfg.seq_len}")
                    self._drop(res, where, reason, record)
                    continue
                res.counts["truncated"] += 1
            res.counts["kept"] += 1
            if conv.repaired:
                res.repaired.update(conv.repaired)
                res.repaired_rows.append({"location": where, "repairs": conv.repaired})
            if copies == 0:
                res.counts["validation"] += 1
                val_docs.append((ids, labels))
            for k in range(copies):
                passes[k].append((ids, labels))
            res.counts["train_documents"] += copies
        # Each copy of a repeated source is packed on its own, so no sample holds one document twice.
        for docs in passes:
            res.train += self._write(docs, "train", chunk.unit, len(res.train))
        res.val = self._write(val_docs, "val", chunk.unit, 0)
        return res

    def _write(self, docs, split: str, unit: int, first: int) -> list[ShardInfo]:
        if not docs:
            return []
        packed = pack_documents(docs, self.cfg.seq_len, self.pad_id, self.cfg.packing)
        infos = []
        step = self.cfg.samples_per_shard
        for k, lo in enumerate(range(0, len(packed), step), start=first):
            sl = slice(lo, lo + step)
            rows = (
                {"input_ids": a, "labels": b, "position_ids": c}
                for a, b, c in zip(packed.input_ids[sl], packed.labels[sl], packed.position_ids[sl])
            )
            stats = {
                "real_tokens": packed.real_tokens[sl].sum(),
                "trained_tokens": (packed.labels[sl] != IGNORE).sum(),
                "documents": packed.documents[sl].sum(),
            }
            path = os.path.join(self.out_dir, f"{split}-{unit:05d}-{k:04d}.tar")
            infos.append(write_index(path, write_shard(path, rows, stats)))
        return infos


_worker: _Worker | None = None


def _init_worker(*args) -> None:
    global _worker
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    _worker = _Worker(*args)


def _run_chunk(chunk: Chunk) -> ChunkResult:
    assert _worker is not None
    return _worker.run(chunk)


def _chunks(cfg: DataConfig) -> Iterator[Chunk]:
    unit = itertools.count()
    for s, src in enumerate(cfg.sources):
        key = f"data.sources.{s}"
        records = iter_records(src, key)
        fmt = src.format
        head: list[tuple[str, Any]] = []
        if fmt == "auto":
            head = list(itertools.islice(records, 100))
            fmt = detect_format(rename_columns(r, src.columns) for _, r in head)
            if fmt is None:
                first = next((r for _, r in head if isinstance(r, dict)), None)
                seen = f"keys {sorted(first)}" if first else "no readable record"
                raise DataError(
                    f"{key}: cannot tell the format of {src.path} from its first records ({seen}). Set "
                    f"{key}.format to alpaca, sharegpt or messages, and map field names with {key}.columns."
                )
            log.info("%s: %s format", src.path, fmt)
        numbered = enumerate(itertools.chain(head, records))
        while batch := list(itertools.islice(numbered, cfg.records_per_chunk)):
            yield Chunk(next(unit), s, fmt, [(i, where, rec) for i, (where, rec) in batch])


def _bounded_ordered_map(pool: ProcessPoolExecutor, fn, items: Iterator, in_flight: int) -> Iterator:
    """pool.map that reads `items` lazily: at most `in_flight` chunks of records are held at once."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _check_output_dir(shards_dir: str) -> Path:
    """Refuse, before any work, a shards_dir that prepare cannot write or must not replace."""
    if "://" in shards_dir or shards_dir.startswith("pipe:"):
        raise ConfigError(
            "data.shards_dir",
            f"prepare writes to a local or mounted directory, not {shards_dir}; prepare locally, copy the "
            "directory (e.g. `aws s3 sync`), and point training's data.shards_dir at the URL",
        )
    final = Path(shards_dir)
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / MANIFEST).exists())):
        raise ConfigError(
            "data.shards_dir",
            f"{final} exists and is not a shards directory (no manifest.json); refusing to replace it. Choose an "
            "empty or new directory.",
        )
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def prepare(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    skip_invalid: bool = False,
    num_proc: int | None = None,
    progress: bool = True,
) -> Manifest:
    """Write `cfg.shards_dir` (shards, manifest.json and, if anything was skipped, skipped.jsonl)."""
    chat_template = resolve_chat_template(tokenizer, cfg.chat_template)
    try:
        ChatEncoder(tokenizer, chat_template, cfg.train_on)
    except Exception as e:  # jinja2's TemplateSyntaxError and friends
        key = "data.chat_template" if cfg.chat_template else "model.path"
        raise ConfigError(key, f"the chat template does not compile: {type(e).__name__}: {e}") from None
    final = _check_output_dir(cfg.shards_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    nproc = num_proc if num_proc is not None else (cfg.num_proc or os.cpu_count() or 1)
    args = (cfg, tokenizer, chat_template, str(tmp), skip_invalid)
    results: list[ChunkResult] = []
    tqdm.monitor_interval = 0  # no monitor thread, so forking workers copies no thread
    bar = tqdm(desc="prepare", unit="rec", disable=not progress, dynamic_ncols=True)
    pool = None
    try:
        if nproc <= 1:
            worker = _Worker(*args)
            outputs: Iterator[ChunkResult] = (worker.run(c) for c in _chunks(cfg))
        else:
            # fork where there is one: a spawned worker spends seconds importing transformers again. The
            # parent holds no tokenizer threads (it has not tokenised) and no tqdm monitor thread.
            # A worker that dies makes the executor raise BrokenProcessPool instead of waiting forever.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            pool = ProcessPoolExecutor(nproc, mp.get_context(method), initializer=_init_worker, initargs=args)
            outputs = _bounded_ordered_map(pool, _run_chunk, _chunks(cfg), in_flight=2 * nproc)
        for res in outputs:
            results.append(res)
            bar.update(res.counts["records"])
            bar.set_postfix(dropped=sum(sum(r.dropped.values()) for r in results), refresh=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    try:
        manifest = _finish(cfg, tokenizer, chat_template, results, tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _finish(cfg: DataConfig, tokenizer: Any, chat_template: str, results: list[ChunkResult], tmp: Path) -> Manifest:
    """Write the skipped-records report and, last, the manifest into `tmp`."""

    manifest = Manifest(
        seq_len=cfg.seq_len,
        tokenizer={
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "name_or_path": getattr(tokenizer, "name_or_path", ""),
            "vocab_size": len(tokenizer),
            "pad_id": pad_token_id(tokenizer),
            "eos_id": tokenizer.eos_token_id,
        },
        chat_template=chat_template,
        splits={
            "train": SplitInfo([s for r in results for s in r.train]),
            "val": SplitInfo([s for r in results for s in r.val]),
        },
        sources=_accounting(cfg.sources, results),
        settings={
            "packing": "best_fit_decreasing" if cfg.packing else "none",
            "train_on": cfg.train_on,
            "too_long": cfg.too_long,
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
            "records_per_chunk": cfg.records_per_chunk,
            "samples_per_shard": cfg.samples_per_shard,
            "dtype": "int32",
        },
        created_by=f"infinitune {__version__}",
    )
    for name, rows in (
        (SKIPPED_REPORT, [row for r in results for row in r.skipped]),
        (REPAIRED_REPORT, [row for r in results for row in r.repaired_rows]),
    ):
        if not rows:
            continue
        with open(tmp / name, "w", encoding="utf-8") as f:
            for row in rows:
                text = json.dumps(row, ensure_ascii=False, default=str)
                if _SURROGATE.search(text):  # a lone surrogate (a JSON "\\udcff" escape) is no UTF-8: escape it
                    text = json.dumps(row, ensure_ascii=True, default=str)
                f.write(text + "\n")
    (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")  # last: its presence means complete
    return manifest


def _accounting(sources: list[SourceConfig], results: list[ChunkResult]) -> list[dict[str, Any]]:
    """Per source: records read = kept + dropped (by reason); kept = train + validation records; `repaired`
    counts, by repair, the kept records it was applied to (within kept; a record may have had two)."""
    out = []
    for s, src in enumerate(sources):
        counts: collections.Counter = collections.Counter()
        dropped: collections.Counter = collections.Counter()
        repaired: collections.Counter = collections.Counter()
        formats = set()
        for r in results:
            if r.source == s:
                counts.update(r.counts)
                dropped.update(r.dropped)
                repaired.update(r.repaired)
                formats.add(r.fmt)
        out.append(
            {
                "path": src.path,
                "format": formats.pop() if formats else src.format,
                "weight": src.weight,
                "records": counts["records"],
                "kept": counts["kept"],
                "validation": counts["validation"],
                "train_documents": counts["train_documents"],
                "truncated": counts["truncated"],
                "dropped": dict(sorted(dropped.items())),
                "repaired": dict(sorted(repaired.items())),
            }
        )
    return out
