"""A checkpoint continues on another number of workers: real DeepSpeed (ZeRO-3 through its universal checkpoint,
ZeRO-0 as it is, LoRA), a tiny Llama in fp32, worker processes as torchrun starts them."""

from __future__ import annotations

import json
import shutil

import pytest

from infinitune.testing.jobs import job_config, logs, make_tiny_setup, run, run_dir_of, step_losses
from infinitune.trainer import reshard
from infinitune.trainer.checkpoint_format import checkpoint_problem

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # another world size sums the same gradients in another order


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    return make_tiny_setup(tmp_path_factory.mktemp("resize"), tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("resize-runs")


def job(setup, runs, name, workers, steps=20, **sections):
    sections["train"] = {"max_steps": steps, "eval_every": 0, **sections.get("train", {})}
    sections["checkpoint"] = {"every_steps": steps // 2, **sections.get("checkpoint", {})}
    sections["cluster"] = {"num_workers": workers, **sections.get("cluster", {})}
    sections["logging"] = {"log_samples": True, **sections.get("logging", {})}
    return job_config(setup, runs, name, **sections)


def uninterrupted(setup, runs, name, workers, **sections):
    config = job(setup, runs, name, workers, **sections)
    assert run(config, nproc=workers) == 0, logs(config)
    return config


def continued(setup, runs, writer, name, workers, **sections):
    """`writer`'s checkpoint of its middle step, continued to the end on `workers` workers."""
    config = job(setup, runs, name, workers, **sections)
    middle = max(step_losses(writer)) // 2
    source = run_dir_of(writer) / "checkpoints" / f"step_{middle:06d}"
    shutil.copytree(source, run_dir_of(config) / "checkpoints" / source.name)
    assert run(config, nproc=workers) == 0, logs(config)
    assert f"{source.name} (step {middle})" in logs(config)
    return config


def samples(config) -> dict[int, list[int]]:
    rows = [json.loads(line) for line in (run_dir_of(config) / "samples.jsonl").read_text().splitlines()]
    return {row["step"]: row["ids"] for row in rows}


def assert_same_losses(got_config, want_config, steps):
    got, want = step_losses(got_config), step_losses(want_config)
    assert sorted(got) == list(steps)
    worst = max(abs(got[s] - want[s]) for s in steps)
    assert worst <= TOLERANCE, (worst, {s: (got[s], want[s]) for s in steps})
    return worst


def assert_each_sample_once(writer, continuation, reference):
    """The writer's steps then the continuation's are the reference's samples, in its order, none twice."""
    before, after, want = samples(writer), samples(continuation), samples(reference)
    joined = {s: ids for s, ids in before.items() if s not in after} | after
    ids = [i for s in sorted(joined) for i in joined[s]]
    assert ids == [i for s in sorted(want) for i in want[s]]
    assert len(set(ids)) == len(ids)


@pytest.fixture(scope="module")
def two(setup, runs):
    return uninterrupted(setup, runs, "two", 2)


@pytest.fixture(scope="module")
def one(setup, runs):
    return uninterrupted(setup, runs, "one", 1)


def test_one_and_two_workers_train_alike(one, two):
    assert_same_losses(one, two, range(1, 21))


def test_zero3_from_two_workers_continues_on_one(setup, runs, two):
    config = continued(setup, runs, two, "two-to-one", 1)
    assert_same_losses(config, two, range(11, 21))
    assert_each_sample_once(two, config, two)
    written = run_dir_of(config) / "checkpoints" / "step_000010"
    assert reshard.is_converted(written)  # converted once, where the run resumed, beside the checkpoint
    assert checkpoint_problem(written, "sha256") is None  # and the checkpoint itself is untouched
    assert "continuing on 1 workers from step 10, which 2 workers wrote" in logs(config)
    # Its own checkpoints are of its own world size, resumable as they are.
    assert (
        json.loads((run_dir_of(config) / "checkpoints" / "step_000020" / "COMPLETE.json").read_text())["world_size"]
        == 1
    )


def test_zero3_from_one_worker_continues_on_two(setup, runs, one):
    config = continued(setup, runs, one, "one-to-two", 2)
    assert_same_losses(config, one, range(11, 21))
    assert_each_sample_once(one, config, one)


def test_the_optimizer_state_is_what_makes_the_continuation_equal(setup, runs, two):
    # The same continuation with Adam's moments and step dropped: if this stayed within the tolerance, the
    # tests above could not tell a carried optimizer from a fresh one.
    config = continued(setup, runs, two, "two-to-one-fresh-optimizer", 1, checkpoint={"resume_optimizer": False})
    got, want = step_losses(config), step_losses(two)
    assert max(abs(got[s] - want[s]) for s in range(11, 21)) > 10 * TOLERANCE


def test_without_the_optimizer_state_the_configured_settings_apply(setup, runs, two):
    # DeepSpeed restores the optimizer's settings with its state; a fresh optimizer takes the configured ones: here
    # a third of the learning rate, at the same point of the schedule.
    config = continued(
        setup, runs, two, "fresh-optimizer-new-lr", 1, train={"lr": 1e-3}, checkpoint={"resume_optimizer": False}
    )
    rows = [json.loads(line) for line in (run_dir_of(config) / "metrics.jsonl").read_text().splitlines()]
    written = [json.loads(line) for line in (run_dir_of(two) / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    before = {r["step"]: r["train/lr"] for r in written if "train/lr" in r}
    for step in (11, 15, 20):
        assert lr[step] == pytest.approx(before[step] / 3, rel=1e-9), (step, lr[step], before[step])


@pytest.mark.parametrize(
    "name,sections",
    [
        ("zero0", {"deepspeed": {"zero_stage": 0}}),
        (
            "lora",
            {
                "model": {"adapter": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
                "train": {"lr": 1e-2},
            },
        ),
    ],
)
def test_zero0_and_lora_continue_on_another_number_of_workers(setup, runs, name, sections):
    writer = uninterrupted(setup, runs, f"{name}-two", 2, steps=8, **sections)
    config = continued(setup, runs, writer, f"{name}-two-to-one", 1, steps=8, **sections)
    assert_same_losses(config, writer, range(5, 9))
    assert_each_sample_once(writer, config, writer)
    # ZeRO-0's fp32 state is whole and loads as it is; LoRA's (under ZeRO-3) is cut per rank and was converted.
    assert reshard.is_converted(run_dir_of(config) / "checkpoints" / "step_000004") == (name == "lora")
