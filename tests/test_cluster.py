"""Ray: jobs on an embedded cluster and on a multi-node test cluster, surviving killed, preempted and lost
workers. Real Ray (no mocks), real DeepSpeed ZeRO-3 over gloo, a tiny Llama."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from infinitune.testing.jobs import job_config, make_tiny_setup, run_dir_of, step_losses, wait_for_step
from infinitune.trainer.checkpoint_format import checkpoint_problem

pytestmark = pytest.mark.slow

STEPS = 75  # a little over one epoch of the tiny setup's training samples at 8 per step


def train_cli(config, *extra, env=None, timeout=600):
    out = subprocess.run(
        [sys.executable, "-m", "infinitune.launcher.cli", "train", str(config), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    return out.returncode, out.stdout + out.stderr


def samples_by_step(config) -> dict[int, list[int]]:
    rows = {}
    for line in (run_dir_of(config) / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row["ids"]  # a step run again after a restart keeps its last record
    return rows


def assert_each_sample_once_per_epoch(config, setup):
    manifest = json.loads((setup["shards"] / "manifest.json").read_text())
    n = manifest["splits"]["train"]["totals"]["samples"]
    steps = samples_by_step(config)
    ids = [i for s in sorted(steps) for i in steps[s]]
    assert len(ids) >= n
    assert sorted(ids[:n]) == list(range(n))  # the first epoch: every sample exactly once


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    from pathlib import Path

    s = make_tiny_setup(tmp_path_factory.mktemp("cluster"), tiny_tokenizer_dir)
    s["shards"] = Path(s["data"]["shards_dir"])
    return s


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-runs")


def tiny_job(setup, runs, name, **sections):
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": STEPS, "eval_every": 0, **sections["train"]}
    sections.setdefault("logging", {})
    sections["logging"] = {"log_samples": True, **sections["logging"]}
    return job_config(setup, runs, name, **sections)


@pytest.fixture(scope="module")
def other_ray_head(tmp_path_factory):
    """Another Ray head on this machine (`ray start --head`), whose address file plain `ray.init()` would join,
    in a temp dir of its own (RAY_TMPDIR) so that nothing outside this test sees it; ended by its pid."""
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="rayo", dir="/tmp"))  # socket paths must stay under 108 bytes
    ports = [free_port() for _ in range(2)]
    env = {
        **os.environ,
        "RAY_TMPDIR": str(tmp),
        "RAY_AUTH_MODE": "disabled",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    ray_bin = Path(sys.executable).parent / "ray"
    args = [f"--port={ports[0]}", f"--ray-client-server-port={ports[1]}", "--dashboard-agent-listen-port=0"]
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--num-cpus=0", "--include-dashboard=false", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address_file = tmp / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 90
        while not address_file.exists():
            assert head.poll() is None and time.monotonic() < deadline, "the other Ray head did not start"
            time.sleep(0.5)
        yield {"RAY_TMPDIR": str(tmp), "address_file": address_file, "process": head}
    finally:
        head.terminate()  # `ray start --block` ends the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(setup, runs, other_ray_head):
    """An uninterrupted run on an embedded Ray cluster, while another Ray head runs on the machine (which a
    plain `ray.init()` would join, and fail: it refuses object_store_memory for an existing cluster)."""
    config = tiny_job(setup, runs, "ray-reference")
    staging = set(Path(tempfile.gettempdir()).glob("infinitune-*-rank*-*"))
    code, out = train_cli(config, env={"RAY_TMPDIR": other_ray_head["RAY_TMPDIR"]})
    assert code == 0, out[-5000:]
    assert other_ray_head["process"].poll() is None  # it ran alongside the whole time
    # The workers' checkpoint staging directories went with them (each checkpoint went to storage).
    assert set(Path(tempfile.gettempdir()).glob("infinitune-*-rank*-*")) == staging
    return config


def test_an_embedded_ray_job_finishes_and_persists_every_ranks_shards(reference, setup):
    assert sorted(step_losses(reference)) == list(range(1, STEPS + 1))
    checkpoints = sorted((run_dir_of(reference) / "checkpoints").glob("step_*"))
    assert [d.name for d in checkpoints] == ["step_000070", "step_000075"]  # keep_last 2, through Ray
    for d in checkpoints:
        assert checkpoint_problem(d, "sha256") is None
        names = {p.name for p in d.iterdir()}
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names
        assert {"files.rank0.json", "files.rank1.json", "COMPLETE.json"} <= names
    assert_each_sample_once_per_epoch(reference, setup)


@pytest.mark.faults
def test_a_killed_and_then_a_preempted_worker_are_restarted_and_the_losses_do_not_change(
    setup, runs, reference, tmp_path
):
    """One run, two faults: rank 1 SIGKILLed after step 14 (with background saves, a checkpoint reaches Ray when
    it completes: step 5's surely before step 10's begins, step 10's perhaps); then, once the restarted group is
    past step 30, SIGTERM to the new rank 1, which makes every rank save at once and Ray restart from exactly
    there. The losses are the uninterrupted run's, and every sample is seen once in the epoch."""
    config = tiny_job(setup, runs, "ray-faults", checkpoint={"async_save": True})
    env = {"INFINITUNE_FAULT": "rank1:after_step:14", "INFINITUNE_FAULT_ONCE": str(tmp_path / "fired")}
    with open(tmp_path / "driver.out", "w+") as out:  # a file: a pipe left unread could fill and block the driver
        proc = subprocess.Popen(
            [sys.executable, "-m", "infinitune.launcher.cli", "train", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        try:
            wait_for_step(config, 30, timeout=400)
            assert (tmp_path / "fired").exists()  # the worker was killed (SIGKILL) after step 14
            log1 = (run_dir_of(config) / "logs" / "rank1.log").read_text()
            pid = int(re.findall(r"worker rank 1 of 2: pid (\d+)", log1)[-1])  # the restarted one
            os.kill(pid, signal.SIGTERM)
            proc.wait(timeout=600)
        finally:
            proc.kill()
        out.seek(0)
        assert proc.returncode == 0, out.read()[-5000:]
    logs = (run_dir_of(config) / "logs" / "rank0.log").read_text()
    assert "checkpoint step_000005 complete" in logs
    assert re.search(r"resumed from \S+step_0000(05|10) ", logs)  # after the kill
    preempted = re.search(r"stopped at step (\d+) on another rank.s request", logs)
    assert preempted, "no coordinated save after the SIGTERM to the restarted rank 1"
    stopped = int(preempted.group(1))
    assert "SIGTERM received" in (run_dir_of(config) / "logs" / "rank1.log").read_text()
    assert 30 <= stopped < STEPS and f"step_{stopped:06d} (step {stopped})" in logs  # saved at once, resumed there
    want, got = step_losses(reference), step_losses(config)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in got) <= 1e-6
    assert_each_sample_once_per_epoch(config, setup)


@pytest.mark.faults
def test_a_deterministic_worker_error_ends_the_job_at_once(
    setup, runs, reference, other_ray_head, tiny_tokenizer_dir, tmp_path, monkeypatch
):
    """Evaluation on shards without a validation split, given to the Ray job directly (the CLI refuses it before
    Ray): every worker raises the same DataError at every restart, so the first failure ends the job with that
    message, not max_failures restarts. The embedded cluster starts after the other head has ended and left its
    address file behind (which a plain `ray.init()` would try to join)."""
    from infinitune.cluster.ray_job import JobFailed, run_job
    from infinitune.data_pipeline.config import DataConfig
    from infinitune.data_pipeline.prepare import prepare
    from infinitune.data_pipeline.tokenizer import load_tokenizer
    from infinitune.launcher.job_config import load_job_config
    from infinitune.typed_config import from_dict

    head = other_ray_head["process"]
    head.terminate()
    head.wait(timeout=60)
    assert other_ray_head["address_file"].exists()  # stale: its head is gone
    monkeypatch.setenv("RAY_TMPDIR", other_ray_head["RAY_TMPDIR"])

    data = {**setup["data"], "val_fraction": 0.0, "shards_dir": str(tmp_path / "no-val")}
    prepare(from_dict(DataConfig, data), load_tokenizer(setup["model"]), num_proc=1, progress=False)
    config = tiny_job(setup, runs, "ray-no-val", data=data, train={"eval_every": 5}, cluster={"max_failures": 3})
    cfg = load_job_config(config)
    started = time.monotonic()
    with pytest.raises(JobFailed) as failed:
        run_job(cfg.trainer_spec(run_dir_of(config)), cfg.cluster)
    message = str(failed.value)
    assert "training failed at once (a restart would fail the same way)" in message
    assert "DataError" in message and "needs a validation split and these shards have none" in message
    log0 = (run_dir_of(config) / "logs" / "rank0.log").read_text()
    assert log0.count("worker rank 0 of 2: pid") == 1, log0  # one attempt: no restart
    print(f"failed after {time.monotonic() - started:.0f} s")


@pytest.mark.faults
def test_exhausted_retries_say_what_failed_and_how_to_resume(setup, runs):
    config = tiny_job(setup, runs, "ray-doomed", cluster={"max_failures": 1})
    code, out = train_cli(config, env={"INFINITUNE_FAULT": "rank0:after_step:3"})
    assert code == 1
    assert "training failed after 1 restart(s)" in out
    assert f"infinitune resume {run_dir_of(config)}" in out and "logs" in out


@pytest.fixture
def s3_endpoint():
    """A local S3 (moto's server, the S3 protocol over HTTP) and the AWS_* environment that points at it."""
    import socket

    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client(
                    "s3",
                    endpoint_url=env["AWS_ENDPOINT_URL"],
                    region_name="us-east-1",
                    aws_access_key_id="testing",
                    aws_secret_access_key="testing-secret",
                ).create_bucket(Bucket="bkt")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # for this process's own reads of the storage (status, export)
        yield env
    finally:
        for k, v in locals().get("saved", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.faults
def test_a_run_on_s3_stopped_through_its_driver_resumes_from_s3_to_the_same_losses_and_exports(
    setup, runs, reference, tmp_path, s3_endpoint
):
    """Storage on S3 (a local moto server), the job on an embedded Ray cluster. SIGINT (Ctrl-C) to the driver (the same
    handler as for SIGTERM, which a scheduler or `ray job stop` sends): the workers save one complete checkpoint within three step boundaries, with
    every rank's shards, into S3 and end; the driver exits 75 naming how to resume. `infinitune status` lists the
    checkpoint, `infinitune resume` continues from S3 to the uninterrupted run's losses (each sample once per
    epoch), and `infinitune export` fetches the newest checkpoint from S3."""
    import pyarrow.fs as pafs
    import torch
    from transformers import AutoModelForCausalLM

    from infinitune.trainer.storage import fetch_checkpoint, remote_checkpoints

    local, uri = tmp_path / "local", "s3://bkt/runs/s3-run"
    config = tiny_job(
        setup,
        runs,
        "s3-run",
        checkpoint={"every_steps": 100},
        cluster={"storage_path": "s3://bkt/runs", "local_dir": str(local)},
    )
    run_dir = run_dir_of(config)
    cli = [sys.executable, "-m", "infinitune.launcher.cli"]
    env = {**os.environ, **s3_endpoint}
    driver = subprocess.Popen(
        [*cli, "train", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        wait_for_step(config, 3)
        driver.send_signal(signal.SIGINT)  # Ctrl-C, which Ray Train's own handler once turned into an abort
        out, _ = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 75, out[-3000:]
    assert "SIGINT: the workers save within three step boundaries" in out
    assert f"infinitune resume {run_dir}" in out and uri in out
    saved = [(s, c) for s, _, c in remote_checkpoints(uri)]
    assert len(saved) == 1 and saved[0][1] and 3 <= saved[0][0] < STEPS  # saved at once, not at the interval
    stopped = saved[0][0]
    fs, _ = pafs.FileSystem.from_uri(uri)
    names = {
        i.base_name for i in fs.get_file_info(pafs.FileSelector(f"bkt/runs/s3-run/checkpoints/step_{stopped:06d}"))
    }
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names  # every rank's shards
    assert {"files.rank0.json", "files.rank1.json", "COMPLETE.json"} <= names
    assert not (run_dir / "checkpoints").exists()  # nothing kept locally but config and logs
    assert fetch_checkpoint(uri, tmp_path / "fetched", step=stopped).name == f"step_{stopped:06d}"  # sha256 checked
    status = json.loads(
        subprocess.run([*cli, "status", str(run_dir)], capture_output=True, text=True, check=True).stdout
    )
    assert [c["step"] for c in status["checkpoints"]] == [stopped]

    copies = set(Path(tempfile.gettempdir()).glob("infinitune-restore-*"))
    resumed = subprocess.run(  # with an override: keep one checkpoint, so the stopped one is pruned in S3
        [*cli, "resume", str(run_dir), "checkpoint.keep_last=1"], capture_output=True, text=True, env=env, timeout=600
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:]
    # One copy of the checkpoint on the node, made by one rank and loaded by both, gone once they have.
    ranks = [(run_dir / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    assert sum(f"copied step_{stopped:06d} from storage" in text for text in ranks) == 1
    assert sum(f"using this node's copy of step_{stopped:06d}" in text for text in ranks) == 1
    assert set(Path(tempfile.gettempdir()).glob("infinitune-restore-*")) == copies
    assert f"step {stopped})" in (run_dir / "logs" / "rank0.log").read_text()  # resumed from S3's checkpoint
    want, got = step_losses(reference), step_losses(config)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in got) <= 1e-6
    assert_each_sample_once_per_epoch(config, setup)
    assert [s for s, _, _ in remote_checkpoints(uri)] == [STEPS]
    uploaded = [i.path for i in fs.get_file_info(pafs.FileSelector("bkt/runs/s3-run/tensorboard", recursive=True))]
    assert any("events.out.tfevents" in p for p in uploaded)
    with fs.open_input_stream("bkt/runs/s3-run/metrics.jsonl") as f:
        assert max(json.loads(line)["step"] for line in f.read().decode().splitlines()) == STEPS

    out_dir = tmp_path / "export"
    exported = subprocess.run(
        [*cli, "export", str(run_dir), "--out", str(out_dir)], capture_output=True, text=True, timeout=300
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (run_dir / "fetched" / f"step_{STEPS:06d}" / "COMPLETE.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
