"""Bad input, generated: configs and records of every wrong shape go into the config loader and `prepare`. The
outcome is always a clear error (ConfigError / DataError naming where) or a counted skip; never an unhandled
exception, never a record missing from the accounting."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinitune.launcher.job_config import JobConfig, load_job_config
from infinitune.typed_config import ConfigError, describe

from .test_config import BASE

KEYS = [row[0].replace("[]", ".0") for row in describe(JobConfig)]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", " ", "auto", "-1", "1e999", "nan", "[", "{a: [", "\udcff", "~", "!!python/object:os.system"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def as_override_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), values.map(as_override_text)),
        min_size=1,
        max_size=4,
    )
)
def test_any_override_is_taken_or_refused_with_a_config_error(tmp_path, overrides):
    path = tmp_path / "job.yaml"
    path.write_text(BASE)
    try:
        cfg = load_job_config(path, [f"{k}={v}" for k, v in overrides])
    except ConfigError as e:
        assert str(e)  # a message, naming the key (tested case by case in test_config.py)
        return
    assert isinstance(cfg, JobConfig)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(values.map(lambda v: json.dumps(v, default=str)), st.text(max_size=200), st.binary(max_size=200)))
def test_any_config_file_is_loaded_or_refused_with_a_config_error(tmp_path, content):
    path = tmp_path / "job.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        load_job_config(path)
    except ConfigError as e:
        assert str(path) in str(e) or e.key  # says which file, or which key


texts = st.one_of(st.text(max_size=40), st.sampled_from(["a\udcffb", "\ud800", "\x00", "\u202e", "🙂" * 30]))
good = st.fixed_dictionaries({"instruction": texts.filter(bool), "input": texts, "output": texts})
odd_fields = st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "messages", "conversations", "role", "x"]), values, max_size=4
)
lines = st.lists(
    st.one_of(
        good.map(json.dumps),
        odd_fields.map(lambda d: json.dumps(d, default=str)),
        values.map(lambda v: json.dumps(v, default=str)),
        st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"") or b"\xff"),
        st.integers(1, 60).map(lambda depth: "[" * depth + "]" * depth),
    ),
    min_size=1,
    max_size=12,
)


@pytest.fixture(scope="module")
def fuzz_tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines)
def test_prepare_keeps_or_counts_every_record(tmp_path_factory, fuzz_tokenizer, rows):
    from infinitune.data_pipeline.config import DataConfig
    from infinitune.data_pipeline.errors import DataError
    from infinitune.data_pipeline.prepare import prepare
    from infinitune.typed_config import from_dict

    root = tmp_path_factory.mktemp("fuzz")
    data = root / "records.jsonl"
    encoded = [r if isinstance(r, bytes) else r.encode("utf-8", "surrogatepass") for r in rows]
    # Blank lines are not records (nor is a byte-order mark alone on the first line: such lines are left out).
    encoded = [r for r in encoded if r.replace(b"\xef\xbb\xbf", b"").strip()]
    if not encoded:
        return
    data.write_bytes(b"\n".join(encoded) + b"\n")
    cfg = from_dict(
        DataConfig,
        {
            "sources": [{"path": str(data), "format": "alpaca"}],
            "seq_len": 64,
            "shards_dir": str(root / "shards"),
            "val_fraction": 0.0,
        },
    )
    try:
        manifest = prepare(cfg, fuzz_tokenizer, skip_invalid=True, num_proc=1, progress=False)
    except DataError as e:  # only when nothing at all is usable: the message says so and where
        assert str(data) in str(e) or "no " in str(e).lower(), str(e)
        return
    (src,) = manifest.sources
    assert src["records"] == len(encoded)
    assert src["kept"] + sum(src["dropped"].values()) == src["records"]
