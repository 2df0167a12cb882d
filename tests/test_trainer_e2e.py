"""The trainer end to end: real DeepSpeed ZeRO-3 over gloo in 2 worker processes, a tiny Llama from a config."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import pytest
import torch

from infinitune.testing.jobs import (
    job_config,
    logs,
    make_tiny_setup,
    run,
    run_dir_of,
    start_cli,
    step_losses,
    wait_for_step,
    worker_pid,
)
from infinitune.trainer.checkpoint_format import checkpoint_problem
from infinitune.trainer.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

SCALARS = [
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "perf/tokens_per_s",
    "perf/trained_tokens_per_s",
    "perf/mfu",
    "perf/step_time_s",
    "perf/data_wait_fraction",
    "memory/host_rss_gb",
    "memory/host_peak_gb",
    "memory/device_allocated_gb",
    "eval/loss",
    "eval/ppl",
    "eval/exact_match",
    "eval/rouge_l",
    "eval/bleu",
    "perf/checkpoint_s",
    *(f"setup/{phase}_s" for phase in ("process", "distributed", "data", "model", "engine", "loaders_and_resume")),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    return make_tiny_setup(tmp_path_factory.mktemp("trainer"), tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(setup, runs):
    """An uninterrupted 12-step ZeRO-3 run (checkpoints at 5, 10 and the end)."""
    config = job_config(setup, runs, "reference", logging={"save_logits_probe": True})
    assert run(config) == 0, logs(config)
    return config


def test_zero3_trains_and_keeps_complete_checkpoints(reference):
    losses = step_losses(reference)
    assert sorted(losses) == list(range(1, 13))
    assert sum(losses[s] for s in (10, 11, 12)) / 3 < losses[1] - 1.0  # it learns the synthetic tasks
    checkpoints = run_dir_of(reference) / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000010", "step_000012"]  # keep_last 2
    for d in checkpoints.glob("step_*"):
        assert checkpoint_problem(d, "sha256") is None
        names = {p.name for p in d.iterdir()}
        assert {"files.rank0.json", "files.rank1.json", "rng.rank0.pt", "rng.rank1.pt"} <= names
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names  # every rank's shard
    assert (checkpoints / "latest").read_text() == "step_000012"


def test_tensorboard_holds_every_scalar_and_the_config(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir_of(reference) / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert set(SCALARS) <= scalars, set(SCALARS) - scalars
    assert len(acc.Scalars("train/loss")) == 12 and len(acc.Scalars("eval/loss")) == 2
    text = {t.rsplit("/", 1)[0] for t in acc.Tags()["tensors"]}
    assert {"config", "eval/generations"} <= text
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "zero_stage: 3" in config_text
    assert hparams(reference)["deepspeed.zero_stage"] == 3
    assert 0 < acc.Scalars("perf/mfu")[-1].value < 1


def test_export_reloads_with_transformers_and_matches_the_engine(reference, tmp_path):
    from transformers import AutoModelForCausalLM

    from infinitune.trainer.export import export

    out = export(run_dir_of(reference), tmp_path / "export", dtype="float32", max_shard_size="300KB")
    assert (out / "model.safetensors.index.json").exists()  # sharded, with its index
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    probe = torch.load(run_dir_of(reference) / "logits_probe.pt", weights_only=True)
    with torch.no_grad():
        logits = model(**probe["batch"], use_cache=False).logits
    assert torch.allclose(logits, probe["logits"], atol=1e-5, rtol=0), (logits - probe["logits"]).abs().max()


def test_resume_after_a_crash_repeats_the_same_losses(setup, runs, reference):
    config = job_config(setup, runs, "crashed")
    code = run(config, env={"INFINITUNE_FAULT": "after_step:7"})  # SIGKILL both ranks after step 7
    assert code == 137
    assert max(step_losses(config)) == 7
    assert run(config) == 0, logs(config)  # resume: auto, from the checkpoint of step 5
    assert "resumed from" in logs(config) and "step_000005" in logs(config)
    want, got = step_losses(reference), step_losses(config)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])


def test_a_worker_killed_is_restarted_by_torchruns_agent_and_the_losses_do_not_change(setup, runs, reference, tmp_path):
    config = job_config(setup, runs, "restarted")
    fired = tmp_path / "fired"
    env = {"INFINITUNE_FAULT": "rank1:after_step:7", "INFINITUNE_FAULT_ONCE": str(fired)}  # SIGKILL, once
    assert run(config, env=env, max_restarts=1) == 0, logs(config)
    assert fired.exists()
    rank1 = (run_dir_of(config) / "logs" / "rank1.log").read_text()
    assert len(set(re.findall(r"worker rank 1 of 2: pid (\d+)", rank1))) == 2  # a second process after the kill
    assert "step_000005 (step 5)" in logs(config)  # the restart resumed from the last checkpoint
    want, got = step_losses(reference), step_losses(config)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])


def test_sigterm_to_one_rank_saves_one_complete_checkpoint(setup, runs):
    config = job_config(
        setup, runs, "preempted", train={"max_steps": 1000, "eval_every": 0}, checkpoint={"every_steps": 0}
    )
    launcher = start_cli(config, "cluster.max_failures=0")
    wait_for_step(config, 3)
    os.kill(worker_pid(config, 1), signal.SIGTERM)  # one rank only: the other learns of it at the next step boundary
    out, _ = launcher.communicate(timeout=180)
    assert launcher.returncode == EXIT_PREEMPTED, out[-3000:]
    checkpoints = sorted((run_dir_of(config) / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1
    assert checkpoint_problem(checkpoints[0], "sha256") is None
    saved = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert saved["step"] == max(step_losses(config)) < 1000
    for rank, why in ((0, "another rank's request"), (1, "SIGTERM")):  # both ranks stopped there, none was killed
        log = (run_dir_of(config) / "logs" / f"rank{rank}.log").read_text()
        assert f"stopped at step {saved['step']} on {why} with a complete checkpoint" in log, log[-3000:]
    assert "SIGTERM received" in logs(config)


def test_workers_whose_launcher_is_killed_save_and_stop(setup, runs):
    import psutil

    config = job_config(
        setup, runs, "orphaned", train={"max_steps": 1000, "eval_every": 0}, checkpoint={"every_steps": 0}
    )
    launcher = start_cli(config, "cluster.max_failures=0")
    wait_for_step(config, 2)
    workers = [psutil.Process(worker_pid(config, rank)) for rank in (0, 1)]
    launcher.kill()  # no handler runs: only the kernel tells the workers (in sessions of their own)
    launcher.communicate(timeout=60)

    def alive(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 120
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in workers), logs(config)[-3000:]
    (checkpoint,) = (run_dir_of(config) / "checkpoints").glob("step_*")
    assert checkpoint_problem(checkpoint, "sha256") is None
    assert "SIGTERM received" in (run_dir_of(config) / "logs" / "rank0.log").read_text()


def test_a_damaged_checkpoint_is_skipped_for_the_one_before(setup, runs, reference):
    config = job_config(setup, runs, "damaged", train={"max_steps": 13})
    shutil.copytree(run_dir_of(reference) / "checkpoints", run_dir_of(config) / "checkpoints")
    victim = run_dir_of(config) / "checkpoints" / "step_000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    assert run(config) == 0, logs(config)
    text = logs(config)
    assert "step_000012 is not usable" in text and "truncated" in text
    assert "resumed from" in text and "step_000010 (step 10)" in text
    assert sorted(step_losses(config)) == [11, 12, 13]
    # The damaged one is set aside, not deleted, and can never be resumed by mistake later.
    assert len(list((run_dir_of(config) / "checkpoints").glob("step_000012.set-aside-*"))) == 1


def test_compiled_layers_under_zero3_continue_the_reference_run(setup, runs, reference):
    # Steps 11-12 from the reference's checkpoint of step 10 with each decoder layer and the loss compiled, then
    # an eval (loss and generations). Compiled layers under ZeRO-3 once broke the graph at every linear and norm
    # (DeepSpeed's hooks), each break logged here, until torch's recompile limit sent them back to eager; made
    # DeepSpeed leaf modules they compile whole.
    config = job_config(setup, runs, "compiled", model={"compile_layers": True})
    shutil.copytree(run_dir_of(reference) / "checkpoints", run_dir_of(config) / "checkpoints")
    shutil.rmtree(run_dir_of(config) / "checkpoints" / "step_000012")
    (run_dir_of(config) / "checkpoints" / "latest").write_text("step_000010")
    assert run(config, env={"TORCH_LOGS": "graph_breaks,recompiles"}) == 0, logs(config)
    text = logs(config)
    assert "step_000010 (step 10)" in text
    want, got = step_losses(reference), step_losses(config)
    assert sorted(got) == [11, 12]
    for step in (11, 12):
        assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])
    assert "Graph break" not in text and "recompile_limit" not in text  # never fell back to eager
    # Compiled, and compiled again for the eval's no_grad forward: the layers and the loss both ran under dynamo.
    assert "Recompiling function forward" in text and "Recompiling function cross_entropy_sum" in text
    rows = [json.loads(line) for line in (run_dir_of(config) / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in row and row["step"] == 12 for row in rows)


def test_lora_trains_and_exports_merged(setup, runs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from infinitune.trainer.export import export

    # With compiled layers: under ZeRO-3 they are leaf modules, whose gradients DeepSpeed reduces from a hook
    # that fired too early for the first layer while the frozen embeddings gave it no input gradient.
    config = job_config(
        setup,
        runs,
        "lora",
        model={
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "compile_layers": True,
        },
        train={"lr": 1e-2, "max_steps": 8, "eval_every": 0},
    )
    assert run(config) == 0, logs(config)
    losses = step_losses(config)
    assert losses[8] < losses[1]
    out = export(run_dir_of(config), tmp_path / "merged", dtype="float32")
    weights = load_file(out / "model.safetensors")
    assert not [k for k in weights if "lora" in k]
    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    k = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(weights[q], base[q])  # the adapter is merged in
    assert torch.equal(weights[k], base[k])  # what was not adapted is the base, unchanged
    assert (
        AutoModelForCausalLM.from_pretrained(out)
        .generate(max_new_tokens=3, do_sample=False, input_ids=torch.tensor([[1, 5, 6]]))
        .shape[1]
        >= 4
    )


def test_ctrl_c_on_the_launcher_saves_and_stops_every_worker(setup, runs):
    import subprocess
    import sys

    config = job_config(
        setup, runs, "interrupted", train={"max_steps": 1000, "eval_every": 0}, checkpoint={"every_steps": 0}
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "infinitune.launcher.cli", "train", str(config), "--local"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_step(config, 2)
    launcher.send_signal(signal.SIGINT)
    out, _ = launcher.communicate(timeout=180)
    assert launcher.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "infinitune resume" in out
    (checkpoint,) = (run_dir_of(config) / "checkpoints").glob("step_*")
    assert checkpoint_problem(checkpoint, "sha256") is None


# Loaded by every worker (PYTHONPATH): records each torch.distributed collective and each read of a tensor's
# value into a Python number (a device sync on a GPU), with the loop's step and whether the project's code made
# it, one JSON line per event. Host-side values are read with `.numpy()`, which a device tensor refuses, so
# they cannot hide a device sync and are not counted.
SYNC_RECORDER = r"""
import json, os, sys
import torch
import torch.distributed as dist

_OUT = open(os.path.join(os.environ["SYNC_RECORD_DIR"], f"rank{os.environ.get('RANK', '0')}.jsonl"), "a", buffering=1)
_PASS_THROUGH = (os.sep + "torch" + os.sep, os.sep + "deepspeed" + os.sep + "comm" + os.sep)


def _record(kind, name):
    frame = sys._getframe(2)
    while frame is not None and any(p in frame.f_code.co_filename for p in _PASS_THROUGH):
        frame = frame.f_back
    caller = frame.f_code.co_filename if frame is not None else ""
    step, completing, f = None, False, frame
    while f is not None:
        if f.f_code.co_name == "_complete" and f.f_code.co_filename.endswith("checkpoint.py"):
            completing = True
        if f.f_code.co_name == "_loop" and f.f_code.co_filename.endswith(os.path.join("trainer", "loop.py")):
            step = f.f_locals["state"].step
            break
        f = f.f_back
    ours = os.sep + "infinitune" + os.sep in caller and os.sep + "data_pipeline" + os.sep not in caller
    where = f"{os.path.basename(caller)}:{frame.f_lineno}" if frame is not None else "?"
    _OUT.write(json.dumps({"kind": kind, "name": name, "step": step, "ours": ours, "where": where,
                           "completing": completing}) + "\n")


def _wrap(owner, name, kind):
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        _record(kind, name)
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


for _name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
              "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
              "all_to_all_single", "gather", "scatter", "barrier"):
    _wrap(dist, _name, "collective")
for _name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu"):
    _wrap(torch.Tensor, _name, "sync")
"""


def test_a_step_that_does_not_log_waits_on_the_device_for_nothing(setup, runs, reference, tmp_path):
    """Between log, eval and save steps the loop's own code makes one collective per step (over the host's
    process group) and reads no tensor's value: the losses and token counts stay those of the reference run,
    which logged every step."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SYNC_RECORDER)
    (tmp_path / "events").mkdir()
    config = job_config(
        setup,
        runs,
        "no_syncs",
        train={"eval_every": 0},
        checkpoint={"every_steps": 8, "async_save": True},
        logging={"tensorboard": True, "log_every": 4},
    )
    env = {
        "PYTHONPATH": str(tmp_path / "hook"),
        "SYNC_RECORD_DIR": str(tmp_path / "events"),
        # Rank 1 writes the step-8 background checkpoint slowly: the steps after it run while it writes.
        "INFINITUNE_FAULT": "rank1:before_write:8:slow",
        "INFINITUNE_FAULT_SLOW_S": "2",
    }
    assert run(config, env=env) == 0, logs(config)

    host_steps = {4, 8, 12}  # logged; saved (8 in the background, 12 the last)
    for rank in (0, 1):
        events = [json.loads(line) for line in (tmp_path / "events" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert any(e["kind"] == "collective" and not e["ours"] for e in events), "DeepSpeed's collectives unseen"
        # Events are labelled with the loop's step counter, which the step increments after its backward: label
        # j holds the end of step j and the start of step j + 1.
        completing = {e["step"] for e in events if e["completing"]}  # where a save was completed
        per_label: dict[int, list] = {}
        for e in events:
            if e["ours"] and e["step"] is not None:
                per_label.setdefault(e["step"], []).append(e)
        assert any(e["kind"] == "sync" for e in per_label[4]), "the log step's read of the loss was not seen"
        plain = [j for j in range(1, 12) if not ({j, j + 1} & host_steps or j in completing)]
        assert len(plain) >= 4, plain
        for j in plain:
            kinds = [(e["kind"], e["name"], e["where"]) for e in per_label.get(j, [])]
            assert len([k for k in kinds if k[0] == "collective"]) == 1, (rank, j, kinds)
            assert not [k for k in kinds if k[0] == "sync"], (rank, j, kinds)

    got, want = step_losses(config), step_losses(reference)
    assert sorted(got) == [4, 8, 12]
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-9), step
    rows = [json.loads(line) for line in (run_dir_of(config) / "metrics.jsonl").read_text().splitlines()]
    ref_rows = map(json.loads, (run_dir_of(reference) / "metrics.jsonl").read_text().splitlines())
    ref = {r["step"]: r for r in ref_rows if "train/trained_tokens" in r}
    for row in rows:
        if "train/trained_tokens" in row:
            assert row["train/trained_tokens"] == ref[row["step"]]["train/trained_tokens"]
            assert row["train/grad_norm"] == pytest.approx(ref[row["step"]]["train/grad_norm"], abs=1e-9)
    assert any(row.get("perf/checkpoint_write_s", 0) >= 2 for row in rows)  # the slow save was completed


def hparams(config) -> dict:
    """The hparams a run wrote to TensorBoard (its resolved config, flattened)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir_of(config) / "tensorboard"))
    acc.Reload()
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            values = data.session_start_info.hparams
            return {k: getattr(v, v.WhichOneof("kind")) for k, v in values.items()}
    raise AssertionError("no hparams written")


def test_zero_stage_auto_runs_the_stage_it_shows_first_and_in_tensorboard(setup, runs):
    """One worker whose whole model fits: auto is stage 0, said in the launcher's first lines, trained at (no
    ZeRO optimizer) and recorded in the hparams; the loss in fused pieces and sdpa per packed document."""
    config = job_config(
        setup,
        runs,
        "auto-stage",
        train={"max_steps": 3, "eval_every": 0},
        deepspeed={"zero_stage": "auto"},
        checkpoint={"every_steps": 0},
        cluster={"num_workers": 1},
    )
    launcher = start_cli(config)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out[-3000:]
    head = out.splitlines()[:10]
    assert any(re.match(r"ZeRO stage: +0 \(auto: at stage 0 a worker holds", line) for line in head), head
    assert "on 1 workers at ZeRO stage 0" in (run_dir_of(config) / "logs" / "rank0.log").read_text()
    assert hparams(config)["deepspeed.zero_stage"] == 0
    assert sorted(step_losses(config)) == [1, 2, 3]
    # The loop clips at stage 0 in fp32 and reports the norm (DeepSpeed's stage 0 keeps none: it read 0).
    rows = [json.loads(x) for x in (run_dir_of(config) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/grad_norm"] > 0 for r in rows if "train/loss" in r)
