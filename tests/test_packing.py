"""Packing: no token lost or duplicated, no sequence too long, documents never share a position run."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from infinitune.data_pipeline.packing import best_fit_decreasing, pack_documents
from infinitune.data_pipeline.template import IGNORE

PAD = 0


def make_docs(lengths, seed=0):
    """Documents whose tokens are unique numbers, so any loss or duplicate shows."""
    docs, next_id = [], 1
    rng = np.random.default_rng(seed)
    for n in lengths:
        ids = np.arange(next_id, next_id + n, dtype=np.int32)
        next_id += n
        labels = np.where(rng.random(n) < 0.5, ids, IGNORE).astype(np.int32)
        labels[0] = IGNORE
        docs.append((ids, labels))
    return docs


@settings(max_examples=300, deadline=None)
@given(st.integers(8, 300).flatmap(lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=200))))
def test_best_fit_places_every_item_once_within_capacity(case):
    capacity, lengths = case
    bins = best_fit_decreasing(lengths, capacity)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Best fit never opens a bin an item would have fitted in: at most one bin is at most half full.
    assert sum(1 for b in bins if sum(lengths[i] for i in b) <= capacity / 2) <= 1


@settings(max_examples=150, deadline=None)
@given(
    st.integers(8, 256).flatmap(lambda L: st.tuples(st.just(L), st.lists(st.integers(1, L), max_size=60))),
    st.booleans(),
)
def test_packing_keeps_every_token_once_and_separates_documents(case, packing):
    seq_len, lengths = case
    docs = make_docs(lengths)
    packed = pack_documents(docs, seq_len, PAD, packing)
    assert packed.input_ids.shape == (len(packed), seq_len)
    real = packed.input_ids[packed.input_ids != PAD]
    want = np.concatenate([d[0] for d in docs]) if docs else np.zeros(0, np.int32)
    assert sorted(real.tolist()) == sorted(want.tolist())  # nothing lost, nothing duplicated
    assert packed.real_tokens.sum() == sum(lengths)
    assert packed.documents.sum() == len(docs)
    # Labels are carried with their tokens; padding never carries loss.
    label_of = {int(t): int(lab) for ids, labels in docs for t, lab in zip(ids, labels)}
    for row_ids, row_labels in zip(packed.input_ids, packed.labels):
        for t, lab in zip(row_ids.tolist(), row_labels.tolist()):
            assert lab == (label_of[t] if t != PAD else IGNORE)
    # Each document is one run of positions 0..n-1 over consecutive token ids; the padding is its own run.
    for row_ids, row_pos, n_real in zip(packed.input_ids, packed.position_ids, packed.real_tokens):
        starts = np.flatnonzero(row_pos == 0).tolist() + [seq_len]
        for a, b in zip(starts, starts[1:]):
            assert row_pos[a:b].tolist() == list(range(b - a))
            run = row_ids[a:b]
            assert (run == PAD).all() or ((np.diff(run) == 1).all() and run[0] in {int(d[0][0]) for d in docs})
        assert (row_ids[n_real:] == PAD).all()
    if not packing:
        assert len(packed) == len(docs)


def test_packing_is_deterministic_and_dense():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 600, size=2000).tolist()
    a = pack_documents(make_docs(lengths), 1024, PAD)
    b = pack_documents(make_docs(lengths), 1024, PAD)
    assert np.array_equal(a.input_ids, b.input_ids)
    assert a.real_tokens.sum() / a.input_ids.size > 0.99
