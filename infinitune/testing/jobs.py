"""Real 2-process DeepSpeed jobs for tests and benchmarks: a tiny model and shards, configs, launching and reading."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from infinitune.data_pipeline import synthetic
from infinitune.launcher.job_config import load_job_config, save_job_config
from infinitune.launcher.local import run_local


def make_tiny_setup(root: Path, tokenizer_dir: Path, records: int = 1500) -> dict:
    """A tiny Llama and prepared shards (seq 128) to train on: a learnable synthetic task."""
    from infinitune.data_pipeline.config import DataConfig
    from infinitune.data_pipeline.prepare import prepare
    from infinitune.data_pipeline.tokenizer import load_tokenizer
    from infinitune.testing.tiny import save_tiny_llama
    from infinitune.typed_config import from_dict

    model = save_tiny_llama(root / "model", tokenizer_dir, max_positions=256)
    synthetic.write_jsonl(str(root / "synth.jsonl"), records, seed=0, tasks=["reverse", "uppercase", "parity"])
    data = {
        "sources": [{"path": str(root / "synth.jsonl")}],
        "seq_len": 128,
        "val_fraction": 0.05,
        "shards_dir": str(root / "shards"),
        "num_workers": 0,
        "samples_per_shard": 64,
    }
    prepare(from_dict(DataConfig, data), load_tokenizer(str(model)), num_proc=1, progress=False)
    return {"model": str(model), "data": data}


def job_config(setup: dict, run_root: Path, name: str = "run", **sections) -> Path:
    """A job config for the tiny setup (ZeRO-3, fp32, 2 workers) with section overrides merged in."""
    cfg = {
        "name": name,
        # The loss in pieces of 64 positions (4 per micro-batch) in every end-to-end test, under ZeRO-3 too.
        "model": {"path": setup["model"], "dtype": "float32", "loss_chunk_tokens": 64},
        "data": dict(setup["data"]),
        "train": {
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "max_steps": 12,
            "lr": 3e-3,
            "warmup_steps": 2,
            "eval_every": 6,
            "eval_generations": 2,
            "max_new_tokens": 8,
        },
        "deepspeed": {"zero_stage": 3, "precision": "fp32", "param_persistence_threshold": 0},
        "checkpoint": {"every_steps": 5, "keep_last": 2},
        "cluster": {"num_workers": 2, "storage_path": str(run_root)},
        "logging": {"tensorboard": True},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = run_root / f"{name}.yaml"
    run_root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dir_of(config: Path) -> Path:
    """The run's local directory (with storage on a URI, the one under cluster.local_dir)."""
    cfg = yaml.safe_load(config.read_text())
    storage = cfg["cluster"]["storage_path"]
    return Path(cfg["cluster"].get("local_dir", "runs") if "://" in storage else storage) / cfg["name"]


def run(config: Path, env: dict | None = None, nproc: int = 2, max_restarts: int = 0) -> int:
    """Validate like the CLI, write RUN_DIR/config.yaml and run the workers under torchrun's agent (in this
    process); their logs go to RUN_DIR/logs."""
    cfg = load_job_config(config)
    run_dir = run_dir_of(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_job_config(cfg, run_dir / "config.yaml")
    return run_local(run_dir / "config.yaml", nproc, max_restarts, cfg.checkpoint.preemption_grace_s, env=env)


def start_cli(config: Path, *args: str) -> subprocess.Popen:
    """`infinitune train CONFIG --local ARGS` in the background, its output piped."""
    cli = [sys.executable, "-m", "infinitune.launcher.cli", "train", str(config), "--local", *args]
    return subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_pid(config: Path, rank: int, timeout: float = 120) -> int:
    """The pid of the rank's latest worker process, from the line each worker logs first."""
    deadline = time.monotonic() + timeout
    path = run_dir_of(config) / "logs" / f"rank{rank}.log"
    while time.monotonic() < deadline:
        pids = re.findall(rf"worker rank {rank} of \d+: pid (\d+)", path.read_text() if path.exists() else "")
        if pids:
            return int(pids[-1])
        time.sleep(0.2)
    raise TimeoutError(f"rank {rank} has not started")


def logs(config: Path) -> str:
    """Every rank's log, then everything the workers printed (torchrun's files under logs/console)."""
    root = run_dir_of(config) / "logs"
    files = sorted(root.glob("*.log")) + sorted((root / "console").rglob("*.log"), key=lambda p: p.stat().st_mtime)
    return "\n".join(p.read_text(errors="replace") for p in files)


def step_losses(config: Path) -> dict[int, float]:
    """train/loss by step; a step logged twice (run again after a crash) keeps its last value."""
    out = {}
    for line in (run_dir_of(config) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def wait_for_step(config: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir_of(config) / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(s >= step for s in step_losses(config)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")
