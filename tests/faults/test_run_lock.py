"""Two drivers on one run directory: the second is refused before it writes anything, the first goes on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from infinitune.launcher.lock import RunLock
from infinitune.testing.jobs import job_config, make_tiny_setup, run_dir_of, step_losses, wait_for_step
from infinitune.typed_config import ConfigError


def test_the_lock_names_its_holder_and_is_free_again_once_released(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError) as info:
            RunLock(tmp_path).__enter__()
        assert f"pid {os.getpid()}" in str(info.value) and "another name" in str(info.value)
    with RunLock(tmp_path):  # released: free again
        pass


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_is_refused_and_the_first_is_unharmed(tmp_path, tiny_tokenizer_dir):
    setup = make_tiny_setup(tmp_path / "setup", tiny_tokenizer_dir, records=600)
    config = job_config(setup, tmp_path / "runs", "shared", train={"max_steps": 40, "eval_every": 0})
    cli = [sys.executable, "-m", "infinitune.launcher.cli", "train", str(config), "--local"]
    first = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(config, 2)
        saved = (run_dir_of(config) / "config.yaml").read_bytes()
        second = subprocess.run([*cli, "train.lr=1e-4"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"in use by pid {first.pid}" in second.stderr
        assert (run_dir_of(config) / "config.yaml").read_bytes() == saved  # nothing of the second was written
        out, _ = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, out[-3000:]
    assert sorted(step_losses(config)) == list(range(1, 41))
