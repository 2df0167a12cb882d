"""SIGTERM to the driver of a job on an embedded Ray cluster (what a scheduler or `ray job stop` sends): the
workers save one complete checkpoint at the next step boundary and end, the driver exits with 75 and says
how to resume, and `infinitune resume` continues to the same losses as an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from infinitune.trainer.checkpoint import checkpoint_problem, step_dirs

from ..train_helpers import job_config, make_tiny_setup, run_dir_of, step_losses, wait_for_step

pytestmark = pytest.mark.slow
STEPS = 30


def cli(*args, **kwargs):
    return [sys.executable, "-m", "infinitune.launcher.cli", *map(str, args)]


def test_sigterm_to_the_driver_saves_stops_and_resume_continues(tmp_path, tiny_tokenizer_dir):
    setup = make_tiny_setup(tmp_path / "setup", tiny_tokenizer_dir, records=600)
    runs = tmp_path / "runs"
    train = {"max_steps": STEPS, "eval_every": 0}
    reference = job_config(setup, runs, "reference", train=train, checkpoint={"every_steps": 100})
    done = subprocess.run(cli("train", reference), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    config = job_config(setup, runs, "stopped", train=train, checkpoint={"every_steps": 100})
    driver = subprocess.Popen(cli("train", config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(config, 3)
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 75, out[-3000:]
    assert "SIGTERM: the workers save at the next step boundary" in out
    assert f"infinitune resume {run_dir_of(config)}" in out
    saved = step_dirs(run_dir_of(config) / "checkpoints")
    assert len(saved) == 1 and 3 <= saved[0][0] < STEPS  # saved at once, not at the scheduled interval
    assert checkpoint_problem(saved[0][1], "sha256") is None

    resumed = subprocess.run(cli("resume", run_dir_of(config)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    want, got = step_losses(reference), step_losses(config)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
