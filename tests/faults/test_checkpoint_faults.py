"""Faults while a checkpoint is being written, on real 2-rank DeepSpeed runs: a worker killed halfway (SIGKILL),
and the disk filling up (an injected ENOSPC on one rank). Afterwards: no partial checkpoint is loaded, no
complete one was deleted first, and the resumed run repeats the uninterrupted run's losses."""

from __future__ import annotations

import re

import pytest

from infinitune.testing.jobs import job_config, logs, make_tiny_setup, run, run_dir_of, step_losses
from infinitune.trainer.checkpoint_format import checkpoint_problem

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    return make_tiny_setup(tmp_path_factory.mktemp("disk-full"), tiny_tokenizer_dir, records=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("fault-runs")


@pytest.fixture(scope="module")
def reference(setup, runs):
    config = job_config(setup, runs, "reference", train={"eval_every": 0})
    assert run(config) == 0, logs(config)
    return config


def assert_same_losses(config, reference):
    want, got = step_losses(reference), step_losses(config)
    assert sorted(got) == list(range(1, 13))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_worker_killed_while_saving_leaves_the_previous_checkpoint_to_resume_from(setup, runs, reference, background):
    # keep_last 1: were anything deleted before the new checkpoint is complete, nothing would be left.
    # async: killed in the thread that writes the files, after the step loop has moved on.
    config = job_config(
        setup,
        runs,
        f"killed-saving-{background}",
        train={"eval_every": 0},
        checkpoint={"keep_last": 1, "async_save": background},
    )
    fault = "rank1:during_save:10"
    if background:
        # Checkpoint 5's writer waits 3 s first: the loop trains on while its copy waits. And rank 1 finds no
        # host memory for its copy of checkpoint 5, so it writes its files at once: the resume below reads a
        # checkpoint written half from copies, half directly.
        fault = "before_write:5:slow,rank1:snapshot:5:nomem," + fault
    assert run(config, env={"INFINITUNE_FAULT": fault}) != 0
    if background:
        seconds = re.search(r"checkpoint step_000005 complete, ([\d.]+) s", logs(config))
        assert seconds and float(seconds.group(1)) >= 3.0
        assert max(step_losses(config)) >= 10
        rank1 = (run_dir_of(config) / "logs" / "rank1.log").read_text()
        rank0 = (run_dir_of(config) / "logs" / "rank0.log").read_text()
        assert "step_000005: not enough free host memory" in rank1 and "not enough free" not in rank0
    checkpoints = run_dir_of(config) / "checkpoints"
    assert checkpoint_problem(checkpoints / "step_000005", "sha256") is None  # complete, and still there
    assert checkpoint_problem(checkpoints / "step_000010") is not None  # half-written
    assert run(config) == 0, logs(config)
    assert "step_000005 (step 5)" in logs(config)  # the half-written one was not loaded
    assert_same_losses(config, reference)


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_full_disk_during_a_save_fails_clearly_and_the_run_resumes(setup, runs, reference, background):
    config = job_config(
        setup, runs, f"disk-full-{background}", train={"eval_every": 0}, checkpoint={"async_save": background}
    )
    code = run(config, env={"INFINITUNE_FAULT": "rank1:during_save:10:enospc"})
    assert code not in (0, 137)
    text = logs(config)
    for rank in (0, 1):  # every rank stops with the same clear message; none waits forever for the other
        log = (run_dir_of(config) / "logs" / f"rank{rank}.log").read_text()
        assert "checkpoint step_000010 could not be written" in log
    assert "No space left on device" in text and "step_000005 is intact" in text and "infinitune resume" in text
    checkpoints = run_dir_of(config) / "checkpoints"
    assert checkpoint_problem(checkpoints / "step_000005", "sha256") is None
    assert checkpoint_problem(checkpoints / "step_000010") is not None  # half-written, and never loaded

    assert run(config) == 0, logs(config)  # space is back
    assert "step_000005 (step 5)" in logs(config)
    assert_same_losses(config, reference)
    assert not (checkpoints / "step_000010").exists() or checkpoint_problem(checkpoints / "step_000010") is None


def test_killed_at_random_points_the_run_still_sees_each_sample_once_and_repeats_the_losses(setup, runs, reference):
    import json
    import random

    rng = random.Random(20261129)  # fixed, so that a failure can be replayed
    kills = sorted(rng.sample(range(2, 12), 3))
    config = job_config(setup, runs, "random-kills", train={"eval_every": 0}, logging={"log_samples": True})
    for step in kills:
        point = "during_save" if step % 5 == 0 else "after_step"
        fault = f"rank{rng.choice([0, 1])}:{point}:{step}"
        assert run(config, env={"INFINITUNE_FAULT": fault}) != 0, fault
    assert run(config) == 0, logs(config)
    assert_same_losses(config, reference)
    by_step = {}
    for line in (run_dir_of(config) / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = row["ids"]  # a step run again after a restart keeps its last record
    seen = [i for s in sorted(by_step) for i in by_step[s]]
    assert len(seen) == 12 * 8 and len(set(seen)) == len(seen)  # 96 samples of the first epoch, none twice
