"""Each sample's place in its tar shard, so that a rank reads its own samples and no others.

`prepare` writes beside every shard `NAME.tar.idx.npy`: per sample, the byte range of its three tar members
(`start`, `end`: from its first header to the end of its last member's padding) and a 16-byte blake2b digest of
those bytes. The manifest holds the index's sha256. A rank then reads only the ranges of the samples it needs,
neighbours coalesced into one read: a seek on a local file, a range read through fsspec on object storage
(`cat_ranges`), a `Range` request over HTTP. Each sample is checked against its digest before it is decoded.

Shards prepared before the index existed (or read through `pipe:`) are streamed whole, as before.
`infinitune index SHARDS_DIR` writes the indexes of such a dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from infinitune.data_pipeline.errors import DataError
from infinitune.data_pipeline.shards import (
    FIELDS,
    MANIFEST,
    ShardInfo,
    iter_shard,
    join_url,
    open_url,
    read_manifest,
    verify_shard,
)

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".idx.npy"
INDEX_DTYPE = np.dtype([("start", "<i8"), ("end", "<i8"), ("digest", "V16")])
# Bytes this process has read from shards and from indexes (benchmarks and tests count them).
READ = Counter()
_indexes: dict[tuple[str, str], np.ndarray] = {}  # this process's loaded indexes, by shard URL and index sha256
_warned: set[str] = set()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def build_index(tar_path: str) -> np.ndarray:
    """The index of a local shard: each sample's byte range and digest, in sample order."""
    spans: dict[str, list[int]] = {}
    with tarfile.open(tar_path, "r:") as tar:  # headers only: the data is seeked over
        for member in tar:
            key = member.name.split(".", 1)[0]
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            spans.setdefault(key, [member.offset, end])[1] = end
    index = np.zeros(len(spans), dtype=INDEX_DTYPE)
    with open(tar_path, "rb") as f:
        for i, (key, (start, end)) in enumerate(spans.items()):
            if key != f"{i:07d}":
                raise DataError(f"{tar_path}: sample {i} has key {key!r}; not a shard prepare wrote")
            f.seek(start)
            index[i] = (start, end, _digest(f.read(end - start)))
    return index


def write_index(tar_path: str, info: ShardInfo) -> ShardInfo:
    """Write the index beside a local shard; returns `info` with the index's sha256."""
    path = tar_path + INDEX_SUFFIX
    buf = io.BytesIO()
    np.save(buf, build_index(tar_path), allow_pickle=False)
    data = buf.getvalue()
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return dataclasses.replace(info, index_sha256=hashlib.sha256(data).hexdigest())


def index_dataset(shards_dir: str) -> int:
    """Write the indexes of a local dataset prepared without them, then its manifest; returns how many."""
    base = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    done = 0
    for split in manifest.splits.values():
        for k, info in enumerate(split.shards):
            if not info.index_sha256:
                verify_shard(shards_dir, info, "sha256")  # digests of a damaged shard would vouch for it
                split.shards[k] = write_index(str(base / info.name), info)
                done += 1
    tmp = base / (MANIFEST + ".partial")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, base / MANIFEST)
    return done


def load_index(base: str, info: ShardInfo) -> np.ndarray | None:
    """The shard's index (checked against the manifest), or None where it has none."""
    url = join_url(base, info.name)
    if not info.index_sha256:
        if base not in _warned:
            _warned.add(base)
            log.warning(
                "%s: the shards have no sample index (prepared by an older infinitune): every rank reads whole "
                "shards; write the indexes with `infinitune index %s`",
                base,
                base,
            )
        return None
    if (url, info.index_sha256) in _indexes:
        return _indexes[url, info.index_sha256]
    try:
        with open_url(url + INDEX_SUFFIX) as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{url}{INDEX_SUFFIX}: the manifest lists an index that is missing; re-run prepare") from None
    except OSError as e:
        raise DataError(f"{url}{INDEX_SUFFIX}: cannot read the index ({e})", transient=True) from None
    READ["index_bytes"] += len(data)
    if hashlib.sha256(data).hexdigest() != info.index_sha256:
        raise DataError(f"{url}{INDEX_SUFFIX}: does not match the manifest's sha256; re-run prepare")
    index = np.load(io.BytesIO(data), allow_pickle=False)
    if index.dtype != INDEX_DTYPE or len(index) != info.samples:
        raise DataError(f"{url}{INDEX_SUFFIX}: not an index of {info.samples} samples; re-run prepare")
    if len(_indexes) > 256:
        _indexes.clear()
    _indexes[url, info.index_sha256] = index
    return index


def read_samples(base: str, info: ShardInfo, wanted: Iterable[int]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(index in shard, arrays) of the `wanted` samples of a shard, in index order: read by range where the
    shard has an index, else streamed whole."""
    url = join_url(base, info.name)
    wanted = sorted(set(wanted))
    index = load_index(base, info) if urlparse(url).scheme != "pipe" else None
    if index is None:
        yield from iter_shard(url, set(wanted), count=info.samples)
        return
    if wanted and not 0 <= wanted[0] <= wanted[-1] < len(index):
        raise ValueError(f"{url}: samples {wanted[0]}..{wanted[-1]} asked of {len(index)}")
    runs: list[list[int]] = []  # consecutive samples: one read (a shard's members lie end to end)
    for i in wanted:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    ranges = [(int(index[run[0]]["start"]), int(index[run[-1]]["end"])) for run in runs]
    for run, (begin, _), blob in zip(runs, ranges, _read_ranges(url, ranges)):
        for i in run:
            start, end = int(index[i]["start"]) - begin, int(index[i]["end"]) - begin
            piece = blob[start:end]
            if _digest(piece) != index[i]["digest"].tobytes():
                raise DataError(
                    f"{url}: sample {i} does not match its checksum in the index: the shard was damaged or "
                    "changed after prepare; restore it or re-run `infinitune prepare`"
                )
            yield i, _decode(url, i, piece)


def _decode(url: str, i: int, piece: bytes) -> dict[str, np.ndarray]:
    arrays = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(piece), mode="r:") as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                if key != f"{i:07d}":
                    raise DataError(f"{url}: sample {i} has key {key!r}; not a shard prepare wrote")
                data = tar.extractfile(member).read()
                arrays[field.removesuffix(".npy")] = np.load(io.BytesIO(data), allow_pickle=False)
    except (tarfile.TarError, ValueError, EOFError) as e:
        raise DataError(f"{url}: sample {i} is malformed ({e}); re-run infinitune prepare") from None
    if set(arrays) != set(FIELDS):
        raise DataError(f"{url}: sample {i} holds {sorted(arrays)}, not {list(FIELDS)}; re-run infinitune prepare")
    return arrays


def _read_ranges(url: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes [start, end) of each range: a seek locally, fsspec's range reads or HTTP Range requests else."""
    scheme = urlparse(url).scheme
    try:
        if scheme in ("", "file"):
            with open(url.removeprefix("file://"), "rb") as f:
                blobs = []
                for start, end in ranges:
                    f.seek(start)
                    blobs.append(f.read(end - start))
        elif scheme in ("http", "https"):
            blobs = [_http_range(url, start, end) for start, end in ranges]
        else:
            import fsspec

            fs, path = fsspec.core.url_to_fs(url)
            blobs = fs.cat_ranges([path] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges])
    except FileNotFoundError:
        raise DataError(f"{url}: shard listed in the manifest is missing; restore it or re-run prepare") from None
    except urllib.error.HTTPError as e:  # 404 and 410 stay so; a server error may pass
        gone = e.code in (404, 410)
        what = "is missing; restore it or re-run prepare" if gone else f"could not be read (HTTP {e.code})"
        raise DataError(f"{url}: shard listed in the manifest {what}", transient=not gone) from None
    except OSError as e:  # the storage, not the shard: a restart may read it
        raise DataError(f"{url}: cannot read the shard ({type(e).__name__}: {e})", transient=True) from None
    for (start, end), blob in zip(ranges, blobs):
        if len(blob) != end - start:
            raise DataError(
                f"{url}: ends before byte {end} (read {len(blob)} of {end - start} from {start}): the shard was "
                "truncated after prepare; restore it or re-run `infinitune prepare`"
            )
        READ["bytes"] += len(blob)
    return blobs


def _http_range(url: str, start: int, end: int) -> bytes:
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end - 1}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        data = response.read()
        if response.status != 206:  # a server that ignores ranges sends the whole shard
            data = data[start:end]
    return data
