"""Packing documents into fixed-length sequences.

Best-fit decreasing: documents in order of decreasing length, each into the open sequence whose free space
fits it most tightly. Free space is an integer in [0, seq_len], so the open sequences are kept in buckets
by free space, and a sorted list of the non-empty bucket sizes finds the tightest fit with one bisect.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from infinitune.data_pipeline.template import IGNORE


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of indices into `lengths`, ascending) whose lengths sum to at most `capacity`.

    Deterministic: ties in length are taken in index order, and bins are numbered in creation order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    buckets: dict[int, list[int]] = {}  # free space -> bins with exactly that much free space
    free_sizes: list[int] = []  # sorted, the keys of buckets that are non-empty
    for i in order:
        n = lengths[i]
        if n > capacity or n <= 0:
            raise ValueError(f"item {i} has length {n}, outside (0, {capacity}]")
        k = bisect.bisect_left(free_sizes, n)
        if k < len(free_sizes):
            free = free_sizes[k]
            b = buckets[free].pop()
            if not buckets[free]:
                del buckets[free]
                del free_sizes[k]
        else:
            free = capacity
            b = len(bins)
            bins.append([])
        bins[b].append(i)
        left = free - n
        if left > 0:
            if left not in buckets:
                buckets[left] = []
                bisect.insort(free_sizes, left)
            buckets[left].append(b)
    for b in bins:
        b.sort()
    return bins


@dataclass
class Packed:
    """Fixed-length samples: each row of the arrays is one sample of seq_len tokens."""

    input_ids: np.ndarray  # int32 [n, seq_len]
    labels: np.ndarray  # int32 [n, seq_len], IGNORE where no loss
    position_ids: np.ndarray  # int32 [n, seq_len], restarting at 0 at every document (and the padding)
    documents: np.ndarray  # int32 [n], documents per sample
    real_tokens: np.ndarray  # int32 [n], tokens that are not padding

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_documents(
    docs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, packing: bool = True
) -> Packed:
    """Place documents (input_ids, labels; each at most seq_len long) into samples of exactly seq_len.

    Padding fills the end of a sample; it is its own position run starting at 0 and carries no loss, so it
    neither attends to nor is attended by a document.
    """
    lengths = [len(ids) for ids, _ in docs]
    bins = best_fit_decreasing(lengths, seq_len) if packing else [[i] for i in range(len(docs))]
    n = len(bins)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int32)
    position_ids = np.zeros((n, seq_len), dtype=np.int32)
    arange = np.arange(seq_len, dtype=np.int32)
    real = np.zeros(n, dtype=np.int32)
    for row, members in enumerate(bins):
        at = 0
        for i in members:
            ids, lab = docs[i]
            end = at + len(ids)
            input_ids[row, at:end] = ids
            labels[row, at:end] = lab
            position_ids[row, at:end] = arange[: len(ids)]
            at = end
        real[row] = at
        position_ids[row, at:] = arange[: seq_len - at]
    documents = np.fromiter((len(b) for b in bins), dtype=np.int32, count=n)
    return Packed(input_ids, labels, position_ids, documents, real)
