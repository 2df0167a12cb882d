"""The training stream: one global sample order, sliced per rank and DataLoader worker, resumable anywhere.

The global order. For (seed, epoch), the shards are permuted, cut into windows of whole shards holding at
least `shuffle_window` samples, and the samples of each window permuted. Epochs follow one another into one
unending sequence of positions 0, 1, 2, ...; position p is sample `order.ids(p)`, whatever the number of
ranks or workers. Every sample appears exactly once in each epoch's span of N positions.

Batches. Global batch b holds positions [start + b*G, start + (b+1)*G). Rank r takes the r-th slice of
G/W consecutive positions and cuts it into micro-batches of m; DataLoader worker k of K produces the
rank's micro-batches k, k+K, ... and the DataLoader's round-robin hands them out in order.

Resume. The state is one number, the position of the next unconsumed global batch (plus what identifies
the order). Restoring it costs reading at most the window(s) that position falls in, never a replay, and
is valid for any world size: the global batches are the same, only their slicing differs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from infinitune.data_pipeline.errors import DataError
from infinitune.data_pipeline.sample_index import read_samples
from infinitune.data_pipeline.shards import FIELDS, Manifest, join_url, read_manifest, verify_shard
from infinitune.data_pipeline.template import IGNORE

STATE_VERSION = 1


@dataclass
class _Epoch:
    shards: np.ndarray  # shard indices in this epoch's order
    window_starts: np.ndarray  # epoch offset where each window starts, plus N at the end
    window_shards: list[np.ndarray]  # the shards of each window, in order


class GlobalOrder:
    """Position -> sample id (shard offset + index in shard) for one split, seed and shuffle setting."""

    def __init__(self, counts: list[int], seed: int, shuffle: bool = True, window: int = 16384):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.shard_offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.num_samples = int(self.shard_offsets[-1])
        if self.num_samples == 0:
            raise DataError(
                "the split has no samples: add data (for the train split) or raise data.val_fraction (for val)"
            )
        self.seed, self.shuffle, self.window = seed, shuffle, window
        self._epochs: dict[int, _Epoch] = {}
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def epoch(self, e: int) -> _Epoch:
        if e not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.clear()
            n = len(self.counts)
            shards = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else np.arange(n)
            starts, groups, size, begin = [0], [], 0, 0
            for i, s in enumerate(shards):
                size += int(self.counts[s])
                if size >= self.window or i == n - 1:
                    groups.append(shards[begin : i + 1])
                    starts.append(starts[-1] + size)
                    size, begin = 0, i + 1
            self._epochs[e] = _Epoch(shards, np.asarray(starts, dtype=np.int64), groups)
        return self._epochs[e]

    def window_ids(self, e: int, w: int) -> np.ndarray:
        """Sample ids of window w of epoch e, in stream order."""
        key = (e, w)
        if key not in self._windows:
            if len(self._windows) > 8:
                self._windows.clear()
            ids = np.concatenate(
                [np.arange(self.shard_offsets[s], self.shard_offsets[s + 1]) for s in self.epoch(e).window_shards[w]]
            )
            if self.shuffle:
                ids = np.random.default_rng([self.seed, e, w]).permutation(ids)
            self._windows[key] = ids
        return self._windows[key]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, window, offset within the window) of each position."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_samples)
        windows = np.empty_like(positions)
        within = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            starts = self.epoch(int(e)).window_starts
            w = np.searchsorted(starts, offsets[sel], side="right") - 1
            windows[sel] = w
            within[sel] = offsets[sel] - starts[w]
        return epochs, windows, within

    def window_span(self, e: int, w: int) -> tuple[int, int]:
        """Global positions [begin, end) of window w of epoch e."""
        starts = self.epoch(e).window_starts
        base = e * self.num_samples
        return base + int(starts[w]), base + int(starts[w + 1])

    def ids(self, positions: np.ndarray) -> np.ndarray:
        epochs, windows, within = self.locate(positions)
        out = np.empty(len(epochs), dtype=np.int64)
        for e, w in set(zip(epochs.tolist(), windows.tolist())):
            sel = (epochs == e) & (windows == w)
            out[sel] = self.window_ids(e, w)[within[sel]]
        return out

    def shard_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, index within the shard) of sample ids."""
        shard = np.searchsorted(self.shard_offsets, ids, side="right") - 1
        return shard, ids - self.shard_offsets[shard]

    def fingerprint(self, shard_hashes: list[str]) -> str:
        blob = json.dumps([self.seed, self.shuffle, self.window, self.counts.tolist(), shard_hashes])
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is sliced: G samples, W ranks, micro-batches of m, A micro-batches per rank."""

    global_batch_size: int
    world_size: int
    micro_batch_size: int

    def __post_init__(self):
        g, w, m = self.global_batch_size, self.world_size, self.micro_batch_size
        if min(g, w, m) <= 0 or g % (w * m):
            raise DataError(
                f"train.global_batch_size ({g}) must be a positive multiple of micro_batch_size ({m}) x "
                f"number of workers ({w})"
            )

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro_batch_size

    def positions(self, start: int, rank: int, t: int) -> np.ndarray:
        """Global positions of this rank's micro-batch t (counted from the batch at `start`)."""
        b, j = divmod(t, self.accumulation)
        first = start + b * self.global_batch_size + rank * self.per_rank + j * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    def micro_index(self, positions: np.ndarray, start: int, rank: int) -> np.ndarray:
        """This rank's micro-batch index for each position, or -1 where another rank owns it."""
        b, within = np.divmod(np.asarray(positions, dtype=np.int64) - start, self.global_batch_size)
        r, inner = np.divmod(within, self.per_rank)
        t = b * self.accumulation + inner // self.micro_batch_size
        return np.where(r == rank, t, -1)


class ShardStream(IterableDataset):
    """This rank's micro-batches from a split of prepared shards, from global position `start`.

    Without `end` the stream never ends (epochs follow one another). With `end`, the batches up to the one
    holding position end-1 are produced, and positions >= end are filler rows (labels all IGNORE, sample
    index -1) so that every rank yields the same number of micro-batches, which ZeRO-3 needs.
    """

    def __init__(
        self,
        base: str,
        manifest: Manifest,
        split: str,
        layout: BatchLayout,
        rank: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 16384,
        start: int = 0,
        end: int | None = None,
    ):
        super().__init__()
        if split not in manifest.splits:
            raise DataError(f"{base}: the manifest has no split {split!r}")
        if not 0 <= rank < layout.world_size:
            raise ValueError(f"rank {rank} outside world size {layout.world_size}")
        self.base, self.split, self.layout, self.rank = base, split, layout, rank
        self.shards = manifest.splits[split].shards
        self.seq_len = manifest.seq_len
        self.pad_id = int(manifest.tokenizer.get("pad_id") or 0)
        self.order = GlobalOrder([s.samples for s in self.shards], seed, shuffle, shuffle_window)
        self.start, self.end = start, end

    def num_micro_batches(self) -> int | None:
        """Micro-batches this rank yields (None: unending)."""
        if self.end is None:
            return None
        return math.ceil(max(self.end - self.start, 0) / self.layout.global_batch_size) * self.layout.accumulation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.micro_batches(worker, workers)

    def micro_batches(self, worker: int = 0, workers: int = 1) -> Iterator[dict[str, Any]]:
        """Micro-batches worker, worker+workers, ... of this rank (all of them for 0, 1)."""
        total = self.num_micro_batches()
        cache: dict[tuple[int, int], dict[int, dict[str, np.ndarray]]] = {}
        t = worker
        while total is None or t < total:
            positions = self.layout.positions(self.start, self.rank, t)
            real = positions < self.end if self.end is not None else np.ones(len(positions), dtype=bool)
            ids = np.full(len(positions), -1, dtype=np.int64)
            keys: list[tuple[int, int] | None] = [None] * len(positions)
            if real.any():
                ids[real] = self.order.ids(positions[real])
                epochs, windows, _ = self.order.locate(positions[real])
                for i, key in zip(np.flatnonzero(real).tolist(), zip(epochs.tolist(), windows.tolist())):
                    keys[i] = key
                needed = sorted({k for k in keys if k is not None})
                # Windows are visited in order: those before this micro-batch's first are done with.
                for old in [k for k in cache if k < needed[0]]:
                    del cache[old]
                for key in needed:
                    if key not in cache:
                        cache[key] = self._load_window(*key, worker, workers, t)
            rows = [self._filler() if key is None else cache[key][sid] for key, sid in zip(keys, ids.tolist())]
            b, j = divmod(t, self.layout.accumulation)
            yield {
                **{k: torch.from_numpy(np.stack([r[k] for r in rows]).astype(np.int64)) for k in FIELDS},
                "sample_index": torch.from_numpy(ids),
                "batch_end": self.start + (b + 1) * self.layout.global_batch_size,
                "last_micro": j == self.layout.accumulation - 1,
            }
            t += workers

    def _filler(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": np.full(self.seq_len, self.pad_id, dtype=np.int32),
            "labels": np.full(self.seq_len, IGNORE, dtype=np.int32),
            "position_ids": np.arange(self.seq_len, dtype=np.int32),
        }

    def _load_window(self, e: int, w: int, worker: int, workers: int, t_now: int) -> dict[int, dict]:
        """The samples of window (e, w) that this rank's worker will still need, by sample id."""
        begin, end = self.order.window_span(e, w)
        begin = max(begin, self.start)
        if self.end is not None:
            end = min(end, self.end)
        positions = np.arange(begin, end, dtype=np.int64)
        t = self.layout.micro_index(positions, self.start, self.rank)
        mine = positions[(t >= t_now) & ((t - worker) % workers == 0)]
        shard, index = self.order.shard_of(self.order.ids(mine))
        samples: dict[int, dict[str, np.ndarray]] = {}
        for s in np.unique(shard).tolist():
            wanted = set(index[shard == s].tolist())
            info = self.shards[s]
            url = join_url(self.base, info.name)
            for i, arrays in read_samples(self.base, info, wanted):
                if any(a.shape != (self.seq_len,) for a in arrays.values()):
                    raise DataError(f"{url}: sample {i} is not {self.seq_len} tokens long; re-run prepare")
                samples[int(self.order.shard_offsets[s]) + i] = arrays
        return samples


class StatefulLoader:
    """A DataLoader over ShardStream whose position can be saved and restored (`state_dict`).

    Iterating starts at the saved position; after `load_state_dict` start a new iteration.
    """

    def __init__(
        self,
        base: str,
        split: str = "train",
        *,
        layout: BatchLayout,
        rank: int = 0,
        manifest: Manifest | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 16384,
        num_workers: int = 0,
        end: int | None = None,
        prefetch_factor: int = 4,
    ):
        self.manifest = manifest or read_manifest(base)
        self.base, self.split, self.layout, self.rank = base, split, layout, rank
        self.seed, self.shuffle, self.shuffle_window = seed, shuffle, shuffle_window
        self.num_workers, self.prefetch_factor, self.end = num_workers, prefetch_factor, end
        self.position = 0
        order = self._stream(0).order
        self.num_samples = order.num_samples
        self._fingerprint = order.fingerprint([s.sha256 for s in self.manifest.splits[split].shards])

    def _stream(self, start: int) -> ShardStream:
        return ShardStream(
            self.base,
            self.manifest,
            self.split,
            self.layout,
            self.rank,
            self.seed,
            self.shuffle,
            self.shuffle_window,
            start=start,
            end=self.end,
        )

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples

    def __len__(self) -> int:
        n = self._stream(self.position).num_micro_batches()
        if n is None:
            raise TypeError("an unending stream has no length")
        return n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self._stream(self.position)
        if self.num_workers > 0:
            batches = DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=False,
                # Its own generator: starting workers must not draw from the global one, or a resumed run's
                # random state (dropout) would differ from the uninterrupted run's.
                generator=torch.Generator(),
            )
        else:
            batches = stream.micro_batches()
        for mb in batches:
            end, last = int(mb.pop("batch_end")), bool(mb.pop("last_micro"))
            if last:
                self.position = end
            yield mb
        if self.end is not None:  # a finite split (validation) is read whole each time
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "epoch": self.epoch,
            "order": self._fingerprint,
            "global_batch_size": self.layout.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"data stream state version {state.get('version')!r}; this infinitune reads {STATE_VERSION}"
            )
        if state["order"] != self._fingerprint:
            raise DataError(
                "the saved data position belongs to another sample order (the shards, seed, shuffle or "
                "shuffle_window changed since the checkpoint); resuming would not continue where it stopped. "
                "Restore the original data settings, or start a new run."
            )
        self.position = int(state["position"])


def verify_shards(base: str, manifest: Manifest, mode: str = "sha256", rank: int = 0, world_size: int = 1) -> int:
    """Check this rank's share of all shards (every world_size-th) against the manifest; returns how many."""
    shards = [s for split in manifest.splits.values() for s in split.shards]
    mine = shards[rank::world_size]
    for s in mine:
        verify_shard(base, s, mode)
    return len(mine)
