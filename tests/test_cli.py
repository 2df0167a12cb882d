"""The command line: generate-data and prepare run end to end; bad input ends in one clear line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import needs_smollm2, shared_data


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "infinitune.launcher.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def job(tmp_path, tokenizer_dir, data, **data_kw):
    cfg = {
        "name": "t",
        "model": {"path": str(tokenizer_dir)},
        "data": {
            "sources": [{"path": str(data)}],
            "seq_len": 128,
            "shards_dir": str(tmp_path / "shards"),
            **data_kw,
        },
        "train": {"global_batch_size": 4, "micro_batch_size": 2},
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_generate_then_prepare(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "synth.jsonl"
    out = run("generate-data", "--n", "300", "--seed", "1", "--out", str(data), "--format", "messages")
    assert out.returncode == 0, out.stderr
    assert len(data.read_text().splitlines()) == 300
    out = run("prepare", str(job(tmp_path, tiny_tokenizer_dir, data)), "data.val_fraction=0.1", "--num-proc", "1")
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["sources"][0]["records"] == 300 and manifest["sources"][0]["format"] == "messages"
    assert "300 records = 300 kept" in out.stdout and "packing efficiency" in out.stdout


def test_bad_record_is_one_clear_line(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n')
    cfg = job(tmp_path, tiny_tokenizer_dir, data)
    out = run("prepare", str(cfg), "--num-proc", "1")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"error: {data}:2: empty_answer" in out.stderr
    out = run("prepare", str(cfg), "--num-proc", "1", "--skip-invalid")
    assert out.returncode == 0, out.stderr
    assert "dropped: empty_answer 1" in out.stdout and "skipped.jsonl" in out.stdout


def test_bad_config_fails_fast_naming_the_key(tmp_path, tiny_tokenizer_dir):
    cfg = job(tmp_path, tiny_tokenizer_dir, tmp_path / "x.jsonl")
    out = run("prepare", str(cfg), "data.seq_lenn=64")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: data.seq_lenn: unknown key. Did you mean 'seq_len'?" in out.stderr
    assert not (tmp_path / "shards").exists() and not list(tmp_path.glob("shards.tmp-*"))  # nothing started
    out = run("generate-data", "--n", "3", "--out", str(tmp_path / "g.jsonl"), "--tasks", "add,telepathy")
    assert out.returncode == 2 and "unknown task" in out.stderr
    out = run("generate-data", "--n", "-5", "--out", str(tmp_path / "g.jsonl"))
    assert out.returncode == 2 and "expected a count >= 0" in out.stderr and "Traceback" not in out.stderr


@needs_smollm2
@pytest.mark.slow
def test_prepare_shipped_quickstart_config_on_real_alpaca(tmp_path):
    """The README's command: the quickstart config on the shared alpaca sample, SmolLM2's tokenizer."""
    from .conftest import REPO

    data = shared_data("alpaca_en_demo.json")
    out = run(
        "prepare",
        str(REPO / "configs" / "quickstart.yaml"),
        f"data.sources.0.path={data}",
        f"data.shards_dir={tmp_path / 'shards'}",
        "data.seq_len=1024",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["sources"][0]["records"] == 999
    assert manifest["splits"]["train"]["totals"]["packing_efficiency"] > 0.99


def test_train_refuses_a_bad_config_or_missing_shards_before_ray_starts(tmp_path, tiny_tokenizer_dir):
    cfg = job(tmp_path, tiny_tokenizer_dir, tmp_path / "x.jsonl")
    out = run("train", str(cfg), "train.max_stepz=3")
    assert out.returncode == 2 and "error: train.max_stepz: unknown key" in out.stderr
    out = run("train", str(cfg))  # no shards were prepared
    assert out.returncode == 2 and "no manifest here; run `infinitune prepare" in out.stderr
    for text in (out.stdout, out.stderr):
        assert "Ray" not in text and "Traceback" not in text  # refused before any cluster resource


def test_train_refuses_what_the_manifest_tells_before_ray_starts(tmp_path, tiny_tokenizer_dir):
    # Evaluation asked for, shards without a validation split: a worker would fail the same way at every restart.
    data = tmp_path / "synth.jsonl"
    assert run("generate-data", "--n", "60", "--out", str(data)).returncode == 0
    cfg = job(tmp_path, tiny_tokenizer_dir, data, val_fraction=0.0)
    assert run("prepare", str(cfg), "--num-proc", "1").returncode == 0
    out = run("train", str(cfg), "train.eval_every=5", "cluster.storage_path=" + str(tmp_path / "runs"))
    assert out.returncode == 2, out.stderr
    assert "needs a validation split and these shards have none" in out.stderr
    assert "train.eval_every" in out.stderr
    for text in (out.stdout, out.stderr):
        assert "Ray" not in text and "Traceback" not in text
    assert not (tmp_path / "runs").exists()  # nothing written, nothing started
