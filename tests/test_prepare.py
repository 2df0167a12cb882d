"""`prepare`: sources to shards, with accounting that adds up and output independent of the process count."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from infinitune.data_pipeline import synthetic
from infinitune.data_pipeline.config import DataConfig
from infinitune.data_pipeline.errors import DataError
from infinitune.data_pipeline.formats import normalise
from infinitune.data_pipeline.prepare import SKIPPED_REPORT, prepare
from infinitune.data_pipeline.shards import iter_shard, read_manifest
from infinitune.data_pipeline.template import IGNORE, ChatEncoder
from infinitune.data_pipeline.tokenizer import resolve_chat_template, tokenizer_fingerprint
from infinitune.typed_config import ConfigError, from_dict

from .conftest import needs_smollm2, shared_data, write_jsonl


def data_config(tmp_path, sources, **kw) -> DataConfig:
    kw.setdefault("seq_len", 128)
    kw.setdefault("shards_dir", str(tmp_path / "shards"))
    return from_dict(DataConfig, {"sources": sources, **kw})


def read_split(shards_dir, manifest, split):
    rows = []
    for shard in manifest.splits[split].shards:
        rows += [arrays for _, arrays in iter_shard(f"{shards_dir}/{shard.name}")]
    return rows


def documents_of(rows):
    """The documents in packed rows, as (token tuple, label tuple), split where positions restart."""
    docs = []
    for r in rows:
        starts = np.flatnonzero(r["position_ids"] == 0).tolist() + [len(r["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            if (r["labels"][a:b] != IGNORE).any():  # padding runs carry no loss
                docs.append((tuple(r["input_ids"][a:b].tolist()), tuple(r["labels"][a:b].tolist())))
    return docs


def test_prepare_writes_what_the_encoder_makes_and_accounts_for_every_record(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "synth.jsonl", (synthetic.make_record(0, i) for i in range(600)))
    cfg = data_config(tmp_path, [{"path": str(src)}], val_fraction=0.1, samples_per_shard=20, records_per_chunk=250)
    manifest = prepare(cfg, tiny_tokenizer, num_proc=1, progress=False)

    assert read_manifest(cfg.shards_dir).to_json() == manifest.to_json()
    (acc,) = manifest.sources
    assert acc["format"] == "alpaca" and acc["records"] == 600
    assert acc["records"] == acc["kept"] + sum(acc["dropped"].values())
    assert acc["kept"] == 600 and 30 <= acc["validation"] <= 90
    assert acc["train_documents"] == acc["kept"] - acc["validation"]
    assert manifest.tokenizer["fingerprint"] == tokenizer_fingerprint(tiny_tokenizer)
    assert manifest.chat_template == tiny_tokenizer.chat_template
    assert len(manifest.splits["train"].shards) > 3  # several chunks, several shards each

    # The shards hold exactly the encoder's documents: train and validation together, each once.
    enc = ChatEncoder(tiny_tokenizer, resolve_chat_template(tiny_tokenizer, None))
    encoded = enc.encode([normalise(synthetic.make_record(0, i), "alpaca") for i in range(600)])
    want = Counter((tuple(ids.tolist()), tuple(lab.tolist())) for ids, lab in encoded)
    train = documents_of(read_split(cfg.shards_dir, manifest, "train"))
    val = documents_of(read_split(cfg.shards_dir, manifest, "val"))
    assert Counter(train) + Counter(val) == want
    assert len(val) == acc["validation"]
    totals = manifest.splits["train"].totals(cfg.seq_len)
    assert totals["documents"] == len(train)
    assert totals["trained_tokens"] == sum(sum(1 for x in lab if x != IGNORE) for _, lab in train)


def test_duplicates_never_straddle_the_validation_split(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [synthetic.make_record(0, i % 50) for i in range(150)])
    b = write_jsonl(tmp_path / "b.jsonl", [synthetic.make_record(0, i, fmt="messages") for i in range(50)])
    cfg = data_config(tmp_path, [{"path": str(a)}, {"path": str(b)}], val_fraction=0.3)
    manifest = prepare(cfg, tiny_tokenizer, num_proc=1, progress=False)
    train = set(documents_of(read_split(cfg.shards_dir, manifest, "train")))
    val = set(documents_of(read_split(cfg.shards_dir, manifest, "val")))
    assert len(train) + len(val) == 50 and 5 <= len(val) <= 25
    assert not train & val


def test_output_is_identical_for_any_number_of_processes(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "synth.jsonl", (synthetic.make_record(3, i) for i in range(900)))
    shas = {}
    for nproc in (1, 2):
        cfg = data_config(
            tmp_path,
            [{"path": str(src), "weight": 1.5}],
            records_per_chunk=200,
            samples_per_shard=16,
            shards_dir=str(tmp_path / f"shards{nproc}"),
        )
        manifest = prepare(cfg, tiny_tokenizer, num_proc=nproc, progress=False)
        shas[nproc] = [(s.name, s.sha256) for split in manifest.splits.values() for s in split.shards]
    assert shas[1] == shas[2] and len(shas[1]) > 5


def test_weights_repeat_and_subsample(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", (synthetic.make_record(0, i) for i in range(200)))
    b = write_jsonl(tmp_path / "b.jsonl", (synthetic.make_record(1, i, fmt="messages") for i in range(400)))
    cfg = data_config(tmp_path, [{"path": str(a), "weight": 2.0}, {"path": str(b), "weight": 0.25}], val_fraction=0)
    manifest = prepare(cfg, tiny_tokenizer, num_proc=1, progress=False)
    sa, sb = manifest.sources
    assert sa["kept"] == 200 and sa["train_documents"] == 400
    assert sb["format"] == "messages"
    assert sb["records"] == sb["kept"] + sb["dropped"]["subsampled"]
    assert 60 <= sb["kept"] <= 140 and sb["train_documents"] == sb["kept"]
    rows = read_split(cfg.shards_dir, manifest, "train")
    assert len(documents_of(rows)) == 400 + sb["kept"]
    # The two copies of a repeated record never share a sample.
    for r in rows:
        docs = documents_of([r])
        assert len(docs) == len(set(docs))


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_too_long_records_are_truncated_or_dropped_and_counted(tmp_path, tiny_tokenizer, policy):
    long = {"instruction": "Repeat.", "input": "", "output": "word " * 300}
    short = {"instruction": "Hi", "input": "", "output": "hello"}
    hopeless = {"instruction": "x " * 400, "input": "", "output": "y"}  # the answer lies beyond seq_len
    src = write_jsonl(tmp_path / "d.jsonl", [long, short, hopeless, short])
    cfg = data_config(tmp_path, [{"path": str(src)}], seq_len=64, too_long=policy, val_fraction=0)
    manifest = prepare(cfg, tiny_tokenizer, num_proc=1, progress=False)
    (acc,) = manifest.sources
    if policy == "truncate":
        assert acc["kept"] == 3 and acc["truncated"] == 1 and acc["dropped"] == {"no_trained_tokens": 1}
    else:
        assert acc["kept"] == 2 and acc["truncated"] == 0 and acc["dropped"] == {"too_long": 2}
    rows = read_split(cfg.shards_dir, manifest, "train")
    assert all(len(r["input_ids"]) == 64 for r in rows)
    report = [json.loads(x) for x in (tmp_path / "shards" / SKIPPED_REPORT).read_text().splitlines()]
    assert [r["location"].rsplit(":", 1)[1] for r in report] == (["3"] if policy == "truncate" else ["1", "3"])


GOOD_SHAREGPT = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
BAD_LINES = [
    ('{"instruction": "a", "output": "b"', "bad_json"),
    ('{"instruction": "a"}', "missing_field"),
    ('{"instruction": "a", "output": ""}', "empty_answer"),
    ('{"conversations": [{"from": "wizard", "value": "a"}, {"from": "gpt", "value": "b"}]}', "unknown_role"),
    (  # a system turn in the middle: no repair applies
        '{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "system", "value": "c"}]}',
        "not_alternating",
    ),
    (b'{"instruction": "caf\xe9", "output": "b"}', "bad_utf8"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_input_stops_with_file_line_and_fix(tmp_path, tiny_tokenizer, line, reason):
    fmt = "sharegpt" if "conversations" in str(line) else "alpaca"
    good = json.dumps(GOOD_SHAREGPT if fmt == "sharegpt" else synthetic.make_record(0, 0)).encode()
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([good, good, line if isinstance(line, bytes) else line.encode(), good]) + b"\n")
    cfg = data_config(tmp_path, [{"path": str(path), "format": fmt}], val_fraction=0)
    with pytest.raises(DataError) as info:
        prepare(cfg, tiny_tokenizer, num_proc=1, progress=False)
    msg = str(info.value)
    assert f"{path}:3: {reason}" in msg and "To fix:" in msg and "--skip-invalid" in msg
    assert not (tmp_path / "shards").exists()  # nothing half-written is left behind


def test_skip_invalid_counts_every_reason_and_reports_the_records(tmp_path, tiny_tokenizer):
    good = json.dumps(synthetic.make_record(0, 0)).encode()
    alpaca_bad = [b for b, r in BAD_LINES if "conversations" not in str(b)]
    lines = [good] + [b if isinstance(b, bytes) else b.encode() for b in alpaca_bad] + [good]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    conv_bad = [json.loads(b) for b, r in BAD_LINES if "conversations" in str(b)]
    sg = tmp_path / "sg.json"
    sg.write_text(json.dumps([GOOD_SHAREGPT, *conv_bad], indent=2))
    cfg = data_config(tmp_path, [{"path": str(path), "format": "alpaca"}, {"path": str(sg)}], val_fraction=0)
    manifest = prepare(cfg, tiny_tokenizer, skip_invalid=True, num_proc=2, progress=False)
    a, s = manifest.sources
    assert a["dropped"] == {"bad_json": 1, "bad_utf8": 1, "empty_answer": 1, "missing_field": 1}
    assert a["records"] == 6 and a["kept"] == 2
    assert s["format"] == "sharegpt" and s["dropped"] == {"not_alternating": 1, "unknown_role": 1} and s["kept"] == 1
    report = [json.loads(x) for x in (tmp_path / "shards" / SKIPPED_REPORT).read_text().splitlines()]
    assert sorted(r["reason"] for r in report) == sorted([*a["dropped"], *s["dropped"]])
    # In a JSON array, a record's location is the line of its opening brace.
    wizard_line = [i for i, x in enumerate(sg.read_text().splitlines(), 1) if x == "  {"][1]  # 2nd record
    assert {r["location"] for r in report if r["reason"] == "unknown_role"} == {f"{sg}:{wizard_line}"}
    assert all(r["detail"] for r in report)


def test_json_array_syntax_error_names_line_and_column(tmp_path, tiny_tokenizer):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    cfg = data_config(tmp_path, [{"path": str(path)}])
    with pytest.raises(DataError, match=rf"{path}:3:\d+: not valid JSON"):
        prepare(cfg, tiny_tokenizer, skip_invalid=True, num_proc=1, progress=False)


def test_undetectable_format_and_missing_file_are_clear(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "raw.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"data\.sources\.0: cannot tell the format .*keys \['text'\]"):
        prepare(data_config(tmp_path, [{"path": str(path)}]), tiny_tokenizer, num_proc=1, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare(data_config(tmp_path, [{"path": str(tmp_path / "nope.jsonl")}]), tiny_tokenizer, progress=False)


def test_parquet_and_saved_datasets_and_directories(tmp_path, tiny_tokenizer):
    import datasets

    records = [synthetic.make_record(5, i, fmt="messages") for i in range(50)]
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "a.jsonl", records[:20])
    (tmp_path / "dir" / "b.json").write_text(json.dumps(records[20:]))
    counts = {}
    for name in ("d.parquet", "saved", "dir"):
        cfg = data_config(
            tmp_path,
            [{"path": str(tmp_path / name)}],
            shards_dir=str(tmp_path / f"s-{name}"),
            val_fraction=0.2,
        )
        manifest = prepare(cfg, tiny_tokenizer, num_proc=1, progress=False)
        counts[name] = (manifest.sources[0]["kept"], manifest.splits["train"].totals(128)["real_tokens"])
    # Same records, same result: the validation choice depends on the conversation, not on the file.
    assert counts["d.parquet"] == counts["saved"] == counts["dir"] and counts["dir"][0] == 50


def test_prepare_replaces_old_shards_but_not_a_foreign_directory(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "s.jsonl", (synthetic.make_record(0, i) for i in range(100)))
    cfg = data_config(tmp_path, [{"path": str(src)}])
    prepare(cfg, tiny_tokenizer, num_proc=1, progress=False)
    (tmp_path / "shards" / "stale.tar").write_bytes(b"old")
    prepare(cfg, tiny_tokenizer, num_proc=1, progress=False)
    assert not (tmp_path / "shards" / "stale.tar").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="refusing to replace"):
        prepare(
            data_config(tmp_path, [{"path": str(src)}], shards_dir=str(foreign)),
            tiny_tokenizer,
            progress=False,
        )
    assert (foreign / "thesis.tex").read_text() == "precious"


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("name, fmt", [("alpaca_en_demo.json", "alpaca"), ("glaive_toolcall_en_demo.json", "sharegpt")])
def test_real_data_with_smollm2(tmp_path, smol_tokenizer, name, fmt):
    path = shared_data(name)
    cfg = data_config(tmp_path, [{"path": str(path)}], seq_len=1024)
    manifest = prepare(cfg, smol_tokenizer, num_proc=2, progress=False)
    (acc,) = manifest.sources
    n = len(json.loads(path.read_text()))
    assert acc["format"] == fmt and acc["records"] == n
    assert acc["records"] == acc["kept"] + sum(acc["dropped"].values())
    assert acc["kept"] >= 0.98 * n
    assert manifest.splits["train"].totals(1024)["packing_efficiency"] > 0.98


def test_output_and_template_problems_are_refused_before_any_work(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "s.jsonl", (synthetic.make_record(0, i) for i in range(10)))
    with pytest.raises(ConfigError, match=r"data\.shards_dir: prepare writes to a local"):
        prepare(data_config(tmp_path, [{"path": str(src)}], shards_dir="s3://bucket/x"), tiny_tokenizer)
    with pytest.raises(ConfigError, match=r"data\.chat_template: the chat template does not compile"):
        prepare(
            data_config(tmp_path, [{"path": str(src)}], chat_template="{% for m in messages %}{{ m"),
            tiny_tokenizer,
        )
    assert not list(tmp_path.glob("shards*"))


def test_csv_through_datasets_and_one_object_json(tmp_path, tiny_tokenizer):
    import csv

    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["instruction", "input", "output"])
        w.writeheader()
        for i in range(30):
            r = synthetic.make_record(2, i)
            w.writerow({k: r[k] for k in ("instruction", "input", "output")})
    manifest = prepare(
        data_config(tmp_path, [{"path": str(tmp_path / "d.csv")}]), tiny_tokenizer, num_proc=1, progress=False
    )
    assert manifest.sources[0]["format"] == "alpaca" and manifest.sources[0]["kept"] == 30
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"data": [synthetic.make_record(0, 0)]}, indent=2))
    with pytest.raises(DataError, match="holds one JSON object, not records"):
        prepare(
            data_config(tmp_path, [{"path": str(one)}], shards_dir=str(tmp_path / "s2")),
            tiny_tokenizer,
            num_proc=1,
            progress=False,
        )


def test_repaired_conversations_are_kept_counted_and_listed(tmp_path, tiny_tokenizer):
    """A dump whose scrape lost first questions or split turns: repaired by default (counted within kept, by
    repair, and listed in repaired.jsonl); with `repairs: []` the same records are refused, naming the repair."""
    from infinitune.data_pipeline.prepare import REPAIRED_REPORT

    def conv(*pairs):
        return {"conversations": [{"from": who, "value": text} for who, text in pairs]}

    dump = [
        GOOD_SHAREGPT,
        conv(("gpt", "an answer whose question was lost"), ("human", "q"), ("gpt", "a")),
        conv(("human", "q1"), ("human", "q2"), ("gpt", "a")),
        conv(("gpt", "lost"), ("human", "q1"), ("human", "q2"), ("gpt", "a")),
        conv(("human", "q"), ("gpt", "a"), ("system", "mid")),  # no repair applies
    ]
    path = tmp_path / "dump.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in dump))
    cfg = data_config(tmp_path, [{"path": str(path)}], val_fraction=0)
    (s,) = prepare(cfg, tiny_tokenizer, skip_invalid=True, num_proc=1, progress=False).sources
    assert s["records"] == 5 == s["kept"] + sum(s["dropped"].values())
    assert s["kept"] == 4 and s["dropped"] == {"not_alternating": 1} and s["train_documents"] == 4
    assert s["repaired"] == {"leading_assistant": 2, "merge_consecutive": 2}
    rows = [json.loads(x) for x in (tmp_path / "shards" / REPAIRED_REPORT).read_text().splitlines()]
    assert [(r["location"].rsplit(":", 1)[1], r["repairs"]) for r in rows] == [
        ("2", ["leading_assistant"]),
        ("3", ["merge_consecutive"]),
        ("4", ["leading_assistant", "merge_consecutive"]),
    ]

    strict = data_config(tmp_path, [{"path": str(path), "repairs": []}], val_fraction=0)
    with pytest.raises(DataError) as info:
        prepare(strict, tiny_tokenizer, num_proc=1, progress=False)
    assert f"{path}:2: not_alternating" in str(info.value) and "'leading_assistant'" in str(info.value)
    (s,) = prepare(strict, tiny_tokenizer, skip_invalid=True, num_proc=1, progress=False).sources
    assert s["kept"] == 1 and s["dropped"] == {"not_alternating": 4} and s["repaired"] == {}
    assert not (tmp_path / "shards" / REPAIRED_REPORT).exists()
