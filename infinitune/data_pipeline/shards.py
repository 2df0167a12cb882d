"""WebDataset tar shards of packed samples, and manifest.json that describes and checksums them.

A sample is three `.npy` members (`input_ids`, `labels`, `position_ids`, int32, seq_len each) under the key
`NNNNNNN` (its index in the shard). Nothing is pickled: members are read with `allow_pickle=False`, and
shard names in a manifest are plain file names, so a manifest cannot point outside its directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlparse

import numpy as np

from infinitune.data_pipeline.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FIELDS = ("input_ids", "labels", "position_ids")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.tar$")


@dataclass
class ShardInfo:
    name: str
    samples: int
    real_tokens: int
    trained_tokens: int
    documents: int
    bytes: int
    sha256: str
    index_sha256: str = ""  # of NAME.tar.idx.npy, each sample's byte range and digest (sample_index.py); "": none


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def totals(self, seq_len: int) -> dict[str, Any]:
        real = sum(s.real_tokens for s in self.shards)
        return {
            "samples": self.samples,
            "documents": sum(s.documents for s in self.shards),
            "tokens": self.samples * seq_len,
            "real_tokens": real,
            "trained_tokens": sum(s.trained_tokens for s in self.shards),
            "packing_efficiency": real / (self.samples * seq_len) if self.samples else 0.0,
        }


@dataclass
class Manifest:
    seq_len: int
    tokenizer: dict[str, Any]  # fingerprint, name_or_path, vocab_size, pad_id, eos_id
    chat_template: str
    splits: dict[str, SplitInfo]
    sources: list[dict[str, Any]]  # per-source accounting (see prepare.py)
    settings: dict[str, Any]  # packing, train_on, too_long, val_fraction, seed, ...
    format_version: int = FORMAT_VERSION
    created_by: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        for name, split in self.splits.items():
            data["splits"][name]["totals"] = split.totals(self.seq_len)
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
            version = data.get("format_version")
            if version != FORMAT_VERSION:
                raise DataError(
                    f"{where}: manifest format_version {version!r}, this infinitune reads {FORMAT_VERSION}; "
                    "re-run `infinitune prepare` with this version"
                )
            splits = {
                name: SplitInfo([ShardInfo(**s) for s in split["shards"]]) for name, split in data["splits"].items()
            }
            fields = {k: data[k] for k in ("seq_len", "tokenizer", "chat_template", "sources", "settings")}
            manifest = cls(splits=splits, format_version=version, created_by=data.get("created_by", ""), **fields)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{where}: not a valid infinitune manifest ({type(e).__name__}: {e})") from None
        for split in manifest.splits.values():
            for s in split.shards:
                if not _SAFE_NAME.match(s.name):
                    raise DataError(f"{where}: shard name {s.name!r} is not a plain .tar file name; refused")
        return manifest


def join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def open_url(url: str) -> BinaryIO:
    """A readable stream for a path or URL: webdataset's gopen (file, pipe:, http(s), ...), else fsspec."""
    from webdataset.gopen import gopen, gopen_schemes

    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec  # s3://, gs://, az://, memory:// ... through the installed fsspec implementations

    return fsspec.open(url, "rb").open()


def require_validation_split(manifest: Manifest, base: str, needed: bool) -> int:
    """The validation split's sample count; refused when evaluation (or the logits probe) is `needed` and the
    shards have none."""
    samples = manifest.splits["val"].samples if "val" in manifest.splits else 0
    if needed and not samples:
        raise DataError(
            f"{base}: train.eval_every (or logging.save_logits_probe) needs a validation split and these shards have "
            "none; raise data.val_fraction and re-run prepare, or set train.eval_every=0"
        )
    return samples


def read_manifest(base: str) -> Manifest:
    url = join_url(base, MANIFEST)
    try:
        with open_url(url) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{url}: no manifest here; run `infinitune prepare CONFIG` to write the shards") from None
    except OSError as e:
        raise DataError(f"{url}: cannot read the manifest: {e}", transient=True) from None
    return Manifest.from_json(text, url)


class _HashingWriter(io.RawIOBase):
    """A file that hashes and counts what is written through it."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_shard(path: str, rows: Iterable[dict[str, np.ndarray]], stats: dict[str, int]) -> ShardInfo:
    """Write samples into the tar at `path` (through a temporary name) and describe it.

    The tar is byte-for-byte reproducible (fixed mtime and owner), so the same input always gives the same
    sha256 whatever the number of processes.
    """
    try:
        return _write_shard(path, rows, stats)
    except OSError as e:  # a full disk, a read-only or vanished directory
        raise DataError(f"{path}: cannot write the shard ({e}); free space or fix the directory and re-run") from None


def _write_shard(path: str, rows: Iterable[dict[str, np.ndarray]], stats: dict[str, int]) -> ShardInfo:
    import webdataset as wds

    tmp = path + ".partial"
    count = 0
    with open(tmp, "wb") as f:
        hashing = _HashingWriter(f)
        with wds.TarWriter(hashing, encoder=False, mtime=0, user="infinitune", group="infinitune") as tar:
            for count, row in enumerate(rows, start=1):
                key = f"{count - 1:07d}"
                tar.write({"__key__": key, **{f"{k}.npy": _npy_bytes(row[k]) for k in FIELDS}})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return ShardInfo(
        name=os.path.basename(path),
        samples=count,
        real_tokens=int(stats["real_tokens"]),
        trained_tokens=int(stats["trained_tokens"]),
        documents=int(stats["documents"]),
        bytes=hashing.size,
        sha256=hashing.sha.hexdigest(),
    )


def iter_shard(
    url: str, wanted: set[int] | None = None, count: int | None = None
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(index in shard, sample arrays) for each sample (only those in `wanted` are decoded and yielded).

    With `count` (the manifest's), a shard holding another number of samples is an error: a tar cut short
    ends without complaint from the tar reader.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    expected = -1
    try:
        with open_url(url) as stream:
            samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
            for expected, sample in enumerate(samples):
                key = sample["__key__"]
                if key != f"{expected:07d}":
                    raise DataError(f"{url}: sample {expected} has key {key!r}; not a shard prepare wrote")
                if wanted is not None and expected not in wanted:
                    continue
                try:
                    arrays = {k: np.load(io.BytesIO(sample[f"{k}.npy"]), allow_pickle=False) for k in FIELDS}
                except (KeyError, ValueError) as e:
                    raise DataError(f"{url}: sample {key} is malformed ({e}); re-run infinitune prepare") from None
                yield expected, arrays
        if count is not None and expected + 1 != count:
            raise DataError(
                f"{url}: holds {expected + 1} samples, the manifest says {count}: the shard was truncated or "
                "changed after prepare; restore it or re-run `infinitune prepare`"
            )
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{url}: shard listed in the manifest is missing; restore it or re-run prepare") from None
    except OSError as e:  # the storage, not the shard: a restart may read it
        raise DataError(f"{url}: cannot read the shard ({type(e).__name__}: {e})", transient=True) from None
    except (tarfile.TarError, EOFError, ValueError) as e:
        raise DataError(f"{url}: cannot read the shard ({type(e).__name__}: {e}); it is damaged") from None


def verify_shard(base: str, shard: ShardInfo, mode: str = "sha256") -> None:
    """Raise DataError unless the shard at `base` matches the manifest (by sha256, or by size only)."""
    if mode == "none":
        return
    url = join_url(base, shard.name)
    sha, size = hashlib.sha256(), 0
    try:
        with open_url(url) as f:
            while chunk := f.read(1 << 20):
                size += len(chunk)
                if mode == "sha256":
                    sha.update(chunk)
                if mode == "size" and size > shard.bytes:
                    break
    except FileNotFoundError:
        raise DataError(f"{url}: shard listed in the manifest is missing; restore it or re-run prepare") from None
    except OSError as e:
        raise DataError(f"{url}: cannot read shard: {e}", transient=True) from None
    if size != shard.bytes:
        raise DataError(
            f"{url}: shard has {size} bytes, the manifest says {shard.bytes}: it was truncated or changed "
            "after prepare; restore it or re-run `infinitune prepare`"
        )
    if mode == "sha256" and sha.hexdigest() != shard.sha256:
        raise DataError(
            f"{url}: sha256 {sha.hexdigest()[:16]}... does not match the manifest's {shard.sha256[:16]}...: the "
            "shard was corrupted or changed after prepare; restore it or re-run `infinitune prepare`"
        )


def check_tokenizer(manifest: Manifest, fingerprint: str, chat_template: str, where: str) -> None:
    """Refuse shards made with another tokenizer or chat template than the model's."""
    theirs = manifest.tokenizer.get("fingerprint")
    if theirs != fingerprint:
        raise DataError(
            f"{where}: the shards were tokenized with another tokenizer ({manifest.tokenizer.get('name_or_path')}, "
            f"fingerprint {str(theirs)[:12]}) than the model's (fingerprint {fingerprint[:12]}); token ids would "
            "not mean the same. Re-run `infinitune prepare` with this model's config."
        )
    if manifest.chat_template != chat_template:
        raise DataError(
            f"{where}: the shards were templated with another chat template than the one this job uses; "
            "re-run `infinitune prepare`, or set data.chat_template to the template in the manifest."
        )
