"""The stream: one global order for any world size, every sample once per epoch, exact resume anywhere."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from infinitune.data_pipeline import shards as shards_module
from infinitune.data_pipeline import synthetic
from infinitune.data_pipeline.config import DataConfig
from infinitune.data_pipeline.errors import DataError
from infinitune.data_pipeline.prepare import prepare
from infinitune.data_pipeline.shards import check_tokenizer, iter_shard, read_manifest
from infinitune.data_pipeline.stream import BatchLayout, StatefulLoader, verify_shards
from infinitune.data_pipeline.template import IGNORE
from infinitune.data_pipeline.tokenizer import tokenizer_fingerprint
from infinitune.typed_config import from_dict

from .conftest import write_jsonl

G, M = 8, 2  # global batch, micro-batch


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("stream")
    src = write_jsonl(tmp / "synth.jsonl", (synthetic.make_record(7, i) for i in range(1500)))
    cfg = from_dict(
        DataConfig,
        {
            "sources": [{"path": str(src)}],
            "seq_len": 64,
            "samples_per_shard": 7,
            "records_per_chunk": 400,
            "val_fraction": 0.05,
            "shards_dir": str(tmp / "shards"),
        },
    )
    prepare(cfg, tiny_tokenizer, num_proc=1, progress=False)
    return cfg.shards_dir


def loaders(base, world, workers=0, split="train", seed=0, window=40, **kw):
    layout = BatchLayout(G, world, M)
    return [
        StatefulLoader(base, split, layout=layout, rank=r, seed=seed, shuffle_window=window, num_workers=workers, **kw)
        for r in range(world)
    ]


def global_batches(ranks, steps):
    """`steps` global batches: each rank's micro-batches for a step, concatenated in rank order."""
    its = [iter(r) for r in ranks]
    accumulation = ranks[0].layout.accumulation
    out = []
    for _ in range(steps):
        parts = (
            [next(it) for it in its for _ in range(accumulation)]
            if len(its) == 1
            else [mb for it in its for mb in itertools.islice(it, accumulation)]
        )
        out.append({k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]})
    return out


def test_every_sample_once_per_epoch_over_2_ranks_x_2_workers(shards):
    ranks = loaders(shards, world=2, workers=2)
    n = ranks[0].num_samples
    steps = 2 * n // G + 2  # two epochs and a bit
    batches = global_batches(ranks, steps)
    ids = np.concatenate([b["sample_index"] for b in batches])
    assert sorted(ids[:n].tolist()) == list(range(n))
    assert sorted(ids[n : 2 * n].tolist()) == list(range(n))
    assert not np.array_equal(ids[:n], ids[n : 2 * n])  # each epoch has its own order
    assert ranks[0].epoch == ranks[1].epoch == 2
    # What arrives is what the shard holds for that sample.
    manifest = read_manifest(shards)
    first = manifest.splits["train"].shards[0]
    stored = dict(iter_shard(f"{shards}/{first.name}"))
    for pos in np.flatnonzero(ids[:n] < first.samples)[:5]:
        sample = stored[int(ids[pos])]
        b, i = divmod(int(pos), G)
        assert np.array_equal(batches[b]["input_ids"][i], sample["input_ids"])
        assert np.array_equal(batches[b]["labels"][i], sample["labels"])
        assert np.array_equal(batches[b]["position_ids"][i], sample["position_ids"])


def test_the_global_order_is_independent_of_ranks_and_workers(shards):
    reference = global_batches(loaders(shards, world=1), 40)
    for world, workers in ((2, 0), (2, 2), (4, 1)):
        got = global_batches(loaders(shards, world=world, workers=workers), 40)
        for a, b in zip(reference, got):
            for k in a:
                assert np.array_equal(a[k], b[k]), (world, workers, k)


@pytest.mark.parametrize("stop", [1, 5, 13, 60])
def test_resume_gives_the_same_next_batches(shards, stop):
    reference = global_batches(loaders(shards, world=2, workers=2), stop + 6)
    first = loaders(shards, world=2, workers=2)
    global_batches(first, stop)
    states = [r.state_dict() for r in first]
    assert states[0] == states[1] and states[0]["position"] == stop * G
    resumed = loaders(shards, world=2, workers=2)
    for r, s in zip(resumed, states):
        r.load_state_dict(s)
    for a, b in zip(reference[stop:], global_batches(resumed, 6)):
        assert np.array_equal(a["sample_index"], b["sample_index"])
        assert np.array_equal(a["input_ids"], b["input_ids"])


def test_a_state_from_2_ranks_resumes_on_4(shards):
    reference = global_batches(loaders(shards, world=2), 30)
    two = loaders(shards, world=2, workers=1)
    global_batches(two, 11)
    state = two[0].state_dict()
    four = loaders(shards, world=4, workers=2)
    for r in four:
        r.load_state_dict(state)
    for a, b in zip(reference[11:], global_batches(four, 19)):
        assert np.array_equal(a["sample_index"], b["sample_index"])
        assert np.array_equal(a["labels"], b["labels"])


def test_resume_reads_a_window_not_the_past(shards, monkeypatch):
    """Resuming far into the run opens about as many shards as resuming near its start: no replay."""
    opened = []
    real = shards_module.open_url
    monkeypatch.setattr(shards_module, "open_url", lambda url: opened.append(url) or real(url))
    costs = {}
    for stop in (2, 400):  # 400 steps is several epochs in
        (loader,) = loaders(shards, world=1)
        loader.load_state_dict({**loader.state_dict(), "position": stop * G})
        opened.clear()
        global_batches([loader], 1)
        costs[stop] = len([u for u in opened if u.endswith(".tar")])
    assert costs[400] <= max(2 * costs[2], 16)


def test_a_state_for_another_order_is_refused(shards):
    (a,) = loaders(shards, world=1, seed=0)
    (b,) = loaders(shards, world=1, seed=1)
    with pytest.raises(DataError, match="another sample order"):
        b.load_state_dict(a.state_dict())


def test_a_finite_split_gives_every_rank_the_same_count_and_every_sample_once(shards):
    n = read_manifest(shards).splits["val"].samples
    ranks = loaders(shards, world=2, workers=2, split="val", end=n)
    expected = len(ranks[0])
    seen = [list(r) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == expected > 0
    assert [len(list(r)) for r in ranks] == [expected, expected]  # and again, whole, the next time
    ids = np.concatenate([mb["sample_index"].numpy() for rank in seen for mb in rank])
    real = ids[ids >= 0]
    assert sorted(real.tolist()) == list(range(n))
    fillers = [mb["labels"][i] for rank in seen for mb in rank for i in range(M) if mb["sample_index"][i] < 0]
    assert len(fillers) == len(ids) - n and all((f == IGNORE).all() for f in fillers)


def test_batch_layout_must_divide():
    with pytest.raises(DataError, match="multiple of micro_batch_size"):
        BatchLayout(10, 4, 2)


@pytest.fixture()
def shards_copy(shards, tmp_path):
    import shutil

    return shutil.copytree(shards, tmp_path / "copy")


def test_a_flipped_byte_is_refused_naming_the_shard(shards_copy):
    manifest = read_manifest(str(shards_copy))
    victim = manifest.splits["train"].shards[3]
    path = shards_copy / victim.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{victim.name}: sha256 .* does not match the manifest"):
        verify_shards(str(shards_copy), manifest)
    # Spread over ranks, the rank holding it finds it.
    found = []
    for rank in range(3):
        try:
            verify_shards(str(shards_copy), manifest, rank=rank, world_size=3)
        except DataError:
            found.append(rank)
    assert found == [3 % 3]


def test_truncated_and_missing_shards_are_refused(shards, shards_copy):
    manifest = read_manifest(str(shards_copy))
    truncated, missing = manifest.splits["train"].shards[1:3]
    path = shards_copy / truncated.name
    path.write_bytes(path.read_bytes()[: truncated.bytes // 2])
    with pytest.raises(DataError, match=rf"{truncated.name}: shard has \d+ bytes, the manifest says"):
        verify_shards(str(shards_copy), manifest, mode="size")
    # Unverified, reading it still fails with the shard's name, not a tar library traceback.
    with pytest.raises(DataError, match=truncated.name):
        list(iter_shard(str(path), count=truncated.samples))
    path.write_bytes(Path(shards, truncated.name).read_bytes())  # mended: now only one is missing
    os.remove(shards_copy / missing.name)
    with pytest.raises(DataError, match=rf"{missing.name}: shard listed in the manifest is missing"):
        verify_shards(str(shards_copy), manifest)


def test_a_manifest_from_another_tokenizer_is_refused(shards, tmp_path, tiny_tokenizer):
    from infinitune.testing.tiny import train_tiny_tokenizer

    manifest = read_manifest(shards)
    check_tokenizer(manifest, tokenizer_fingerprint(tiny_tokenizer), tiny_tokenizer.chat_template, shards)
    other = train_tiny_tokenizer(tmp_path, vocab_size=600)
    with pytest.raises(DataError, match="another tokenizer"):
        check_tokenizer(manifest, tokenizer_fingerprint(other), other.chat_template, shards)
    with pytest.raises(DataError, match="another chat template"):
        check_tokenizer(manifest, tokenizer_fingerprint(tiny_tokenizer), "{{ messages }}", shards)


def test_a_manifest_cannot_point_outside_its_directory(shards_copy):
    text = (shards_copy / "manifest.json").read_text()
    first = read_manifest(str(shards_copy)).splits["train"].shards[0].name
    (shards_copy / "manifest.json").write_text(text.replace(f'"{first}"', '"../../etc/passwd.tar"'))
    with pytest.raises(DataError, match=r"not a plain \.tar file name"):
        read_manifest(str(shards_copy))


@pytest.mark.parametrize("scheme", ["file", "pipe", "fsspec"])
def test_shards_stream_from_urls(shards, scheme, tmp_path):
    """The same batches from a file: URL, a pipe: command and an fsspec filesystem (what s3:// goes through)."""
    if scheme == "file":
        base = f"file://{shards}"
    elif scheme == "pipe":
        base = f"pipe:cat {shards}"  # webdataset's pipe: reads a command's output; the name is appended
    else:
        import fsspec

        fs = fsspec.filesystem("memory")
        for p in Path(shards).iterdir():
            fs.pipe(f"/bench-{tmp_path.name}/{p.name}", p.read_bytes())
        base = f"memory://bench-{tmp_path.name}"
    reference = global_batches(loaders(shards, world=1), 5)
    manifest = read_manifest(base)
    verify_shards(base, manifest)
    got = global_batches(loaders(base, world=1), 5)
    for a, b in zip(reference, got):
        assert np.array_equal(a["input_ids"], b["input_ids"])


def test_with_8_ranks_each_reads_its_own_samples_and_not_the_others(shards):
    """Bytes counted, not timed: over an epoch each of 8 ranks reads at most 1.2x the bytes of the samples it
    trains on (plus the shards' indexes), where streaming whole shards read every sample of every window."""
    from infinitune.data_pipeline import sample_index
    from infinitune.data_pipeline.stream import ShardStream

    manifest = read_manifest(shards)
    infos = manifest.splits["train"].shards
    indexes = [sample_index.load_index(shards, info) for info in infos]
    offsets = np.concatenate([[0], np.cumsum([info.samples for info in infos])])
    layout = BatchLayout(16, 8, 2)
    n = manifest.splits["train"].samples
    for rank in range(8):
        sample_index.READ.clear()
        stream = ShardStream(shards, manifest, "train", layout, rank, shuffle_window=40)
        ids = [
            int(i)
            for mb in itertools.islice(stream.micro_batches(), n // layout.global_batch_size)
            for i in mb["sample_index"]
        ]
        shard = np.searchsorted(offsets, ids, side="right") - 1
        own = sum(
            int(indexes[s][i - offsets[s]]["end"] - indexes[s][i - offsets[s]]["start"]) for s, i in zip(shard, ids)
        )
        assert own <= sample_index.READ["bytes"] <= 1.2 * own, (rank, sample_index.READ["bytes"], own)
    whole = sum(info.bytes for info in infos)
    assert sample_index.READ["bytes"] < whole / 6  # a rank's share, not the dataset


def test_a_flipped_byte_in_one_sample_is_refused_naming_the_shard_and_the_sample(shards, tmp_path):
    import shutil

    from infinitune.data_pipeline.sample_index import load_index, read_samples

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    info = read_manifest(str(copy)).splits["train"].shards[1]
    start = int(load_index(str(copy), info)[3]["start"])
    path = copy / info.name
    data = bytearray(path.read_bytes())
    data[start + 512 + 200] ^= 0x01  # inside the first member's data, past its header
    path.write_bytes(bytes(data))
    assert [i for i, _ in read_samples(str(copy), info, [2, 4])] == [2, 4]  # its neighbours read fine
    with pytest.raises(DataError, match=rf"{info.name}: sample 3 does not match its checksum"):
        list(read_samples(str(copy), info, [2, 3, 4]))


def test_shards_prepared_without_an_index_stream_as_before_and_can_be_indexed(shards, tmp_path, caplog):
    import json
    import shutil
    import subprocess
    import sys

    from infinitune.data_pipeline import sample_index

    old = tmp_path / "old"
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["index_sha256"]  # as an older infinitune wrote it
            (old / (shard["name"] + sample_index.INDEX_SUFFIX)).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    reference = global_batches(loaders(shards, world=2), 6)
    with caplog.at_level("WARNING"):
        got = global_batches(loaders(str(old), world=2), 6)
    assert f"infinitune index {old}" in caplog.text
    for a, b in zip(reference, got):
        assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["sample_index"], b["sample_index"])

    out = subprocess.run(
        [sys.executable, "-m", "infinitune.launcher.cli", "index", str(old)], capture_output=True, text=True
    )
    assert out.returncode == 0 and "indexed" in out.stdout, out.stderr
    assert read_manifest(str(old)).splits["train"].shards[0].index_sha256
    sample_index.READ.clear()
    for a, b in zip(reference, global_batches(loaders(str(old), world=2), 6)):
        assert np.array_equal(a["input_ids"], b["input_ids"])
    assert sample_index.READ["bytes"] > 0  # read by range now
