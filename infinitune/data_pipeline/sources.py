"""Reading raw records, each with its location (file and line) so that any problem can be pointed at.

Yields `(location, record)` where record is the parsed object, or a RecordError when the bytes at that
location are not a record (bad JSON, bad UTF-8). Files are read by us (JSON, JSONL, parquet) to know line
numbers; everything else goes through `datasets`.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infinitune.data_pipeline.config import SourceConfig
from infinitune.data_pipeline.errors import DataError, RecordError

_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
# Other local files, read through `datasets` with the builder for their type.
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".arrow": "arrow", ".gz": "json", ".zst": "json", ".xz": "json"}
# A lone surrogate is how `surrogateescape` decoding marks a byte that is not valid UTF-8.
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def source_files(src: SourceConfig, key: str) -> list[Path] | None:
    """The files a source names (sorted), or None when it is a dataset for `datasets` to load."""
    path = src.path
    if any(c in path for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{key}: the pattern {path} matches no file")
        return files
    p = Path(path).expanduser()
    if p.is_dir():
        if any((p / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return None  # written by save_to_disk
        files = sorted(f for f in p.rglob("*") if f.suffix in (*_FILE_SUFFIXES, *_BUILDERS) and f.is_file())
        if not files:
            raise DataError(f"{key}: the directory {path} holds no .json, .jsonl, .parquet, .csv or .arrow file")
        return files
    if p.is_file():
        return [p]
    if path.startswith((".", "/", "~")) or p.suffix in _FILE_SUFFIXES:
        raise DataError(f"{key}: {path} does not exist")
    return None  # a dataset name, for datasets.load_dataset


def iter_records(src: SourceConfig, key: str) -> Iterator[tuple[str, Any]]:
    files = source_files(src, key)
    if files is None:
        yield from _iter_hf(src, key)
        return
    for f in files:
        if f.suffix == ".parquet":
            yield from _iter_parquet(f)
        elif f.suffix in (".json", ".jsonl"):
            yield from _iter_json(f)
        elif f.suffix in _BUILDERS:
            yield from _iter_datasets_file(f, key)
        else:
            raise DataError(
                f"{key}: cannot read {f} (suffix {f.suffix!r}); use JSON, JSONL, parquet, CSV or Arrow files"
            )


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"[") and path.suffix != ".jsonl":  # a .jsonl is one record per line, whatever it holds
        yield from _iter_json_array(path)
    else:
        yield from _iter_jsonl(path)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, RecordError("bad_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1}")
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                if lineno == 1 and path.suffix == ".json" and _is_one_object(path):
                    raise DataError(
                        f"{path}: holds one JSON object, not records; put the records in a top-level array "
                        "[{...}, {...}] or write one record per line (JSONL)"
                    ) from None
                yield where, RecordError("bad_json", f"{e.msg} at column {e.colno}")


def _is_one_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_bytes()), dict)
    except ValueError:
        return False


def _iter_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    if text.startswith("]", pos):
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}). A JSON array cannot be read past a "
                "syntax error, even with --skip-invalid: fix the file, or write it as JSONL (one record per "
                "line), where a bad line can be skipped."
            ) from None
        where = f"{path}:{line}"
        bad = _BAD_BYTE.search(text, pos, end)
        if bad:
            byte = ord(bad.group()) - 0xDC00
            yield (
                where,
                RecordError("bad_utf8", f"byte 0x{byte:02x} on line {line + text.count(chr(10), pos, bad.start())}"),
            )
        else:
            yield where, value
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return
        else:
            at = line + text.count("\n", counted, pos)
            raise DataError(f"{path}:{at}: expected ',' or ']' after a record; fix the JSON syntax there")


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors are of several types
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    index = 0
    batches = pf.iter_batches(batch_size=2048)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged row group in the middle of the file
            raise DataError(f"{path}#row{index}: the parquet file is damaged from here on ({e})") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            yield f"{path}#row{index}", row
            index += 1


def _iter_datasets_file(path: Path, key: str) -> Iterator[tuple[str, Any]]:
    import datasets

    builder = _BUILDERS[path.suffix]
    kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises many types; the user needs the file and the cause
        raise DataError(f"{key}: `datasets` cannot read {path} as {builder}: {e}") from None
    for index, row in enumerate(ds):
        yield f"{path}#row{index}", row


def _iter_hf(src: SourceConfig, key: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        p = Path(src.path)
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise DataError(f"{key}.split: {src.path} has splits {list(ds)}, not {src.split!r}")
                ds = ds[src.split]
        else:
            ds = datasets.load_dataset(src.path, split=src.split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the source and the cause
        raise DataError(f"{key}: `datasets` cannot load {src.path!r} (split {src.split!r}): {e}") from None
    for index, row in enumerate(ds):
        yield f"{src.path}[{src.split}]#{index}", row
