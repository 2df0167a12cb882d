"""Many hosts on one machine (infinitune/testing/hosts.py): network namespaces on a bridge, each with its own
address from 127.77.0.0/24, its own /tmp and a host name that resolves to loopback (Ubuntu's default), a Ray
head on host 0 (0 CPUs: it holds the job's driver and a local S3 server) and a 1-CPU Ray node on each other
host. Real TCP between the hosts: Ray's, gloo's and S3's. Needs root; skipped, saying why, elsewhere."""

from __future__ import annotations

import json
import sys
import time

import pytest

from infinitune.testing.hosts import Hosts, HostsUnavailable, check_available

from .train_helpers import job_config, logs, make_tiny_setup, run, step_losses

pytestmark = [pytest.mark.slow, pytest.mark.hosts]

S3_PORT = 5555
BUCKET = "bkt"
CLI = [sys.executable, "-m", "infinitune.launcher.cli"]


@pytest.fixture(scope="module")
def hosts():
    try:
        check_available()
    except HostsUnavailable as e:
        pytest.skip(str(e))
    with Hosts(3) as made:
        s3 = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_ENDPOINT_URL": f"http://{made[0].address}:{S3_PORT}",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }
        made.s3 = s3
        made[0].run([sys.executable, "-m", "moto.server", "-H", made[0].address, "-p", str(S3_PORT)])
        made.wait_for_port(made[0], S3_PORT)
        create = f"import boto3; boto3.client('s3').create_bucket(Bucket={BUCKET!r})"
        assert made[0].call([sys.executable, "-c", create], env=s3).returncode == 0
        env = {**s3, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        made.start_ray_head(made[0], num_cpus=0, **env)
        for host in made.hosts[1:]:
            made.start_ray_node(host, num_cpus=1, **env)
        made.wait_for_nodes(len(made))
        yield made
    assert made.leftovers() == []  # namespaces (and their veths), /tmp directories, processes: all gone


@pytest.fixture(scope="module")
def setup(hosts, tiny_tokenizer_dir):
    """The tiny model and shards on the hosts' shared mount (as model weights on a shared file system)."""
    return make_tiny_setup(hosts.shared / "setup", tiny_tokenizer_dir)


def on_host0(hosts, *args, cwd=None, timeout=120):
    out = hosts[0].call([*CLI, *args], env={**hosts.ray_env(), **hosts.s3}, cwd=cwd, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout


def wait_for_job(hosts, job_id, cwd, timeout=600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(on_host0(hosts, "status", job_id, "--address", hosts.dashboard, cwd=cwd))["status"]
        if state.endswith(("SUCCEEDED", "FAILED", "STOPPED")):
            return state
        time.sleep(3)
    raise TimeoutError(f"job {job_id} still running after {timeout} s")


def read_s3(hosts, key: str) -> str:
    script = f"import boto3, sys; sys.stdout.write(boto3.client('s3').get_object(Bucket={BUCKET!r}, Key={key!r})['Body'].read().decode())"
    out = hosts[0].call([sys.executable, "-c", script], env=hosts.s3)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def losses_of(metrics_jsonl: str) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics_jsonl.splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_a_job_submitted_to_host0_runs_one_worker_on_each_of_two_hosts_like_on_one(hosts, setup):
    work = hosts.shared / "work"
    sections = {
        "train": {"max_steps": 8, "eval_every": 0},
        "checkpoint": {"every_steps": 4},
        "cluster": {"storage_path": f"s3://{BUCKET}/runs", "local_dir": "runs"},
    }
    config = job_config(setup, work, "two-hosts", **sections)
    job_id = on_host0(hosts, "submit", config.name, "--address", hosts.dashboard, cwd=work).strip()
    state = wait_for_job(hosts, job_id, work)
    driver = on_host0(hosts, "logs", job_id, "--address", hosts.dashboard, cwd=work)
    assert state.endswith("SUCCEEDED"), driver[-5000:]
    # One worker on each of hosts 1 and 2, whose names resolve to loopback: gloo was bound to their addresses.
    # Each wrote its log into its own host's /tmp (the job's working directory there).
    pattern = "ray/session_*/runtime_resources/working_dir_files/*/runs/two-hosts/logs/rank*.log"
    placed = {}
    for host in hosts:
        for log in host.tmp.glob(pattern):
            text = log.read_text()
            assert f" on {host.namespace}" in text and "worker rank" in text
            placed[log.name] = host.index
    assert sorted(placed) == ["rank0.log", "rank1.log"] and sorted(placed.values()) == [1, 2], placed

    # The same run on one host (two local worker processes): the same losses.
    local = job_config(setup, hosts.shared / "local", "one-host", **{**sections, "cluster": {}})
    assert run(local) == 0, logs(local)
    got, want = losses_of(read_s3(hosts, "runs/two-hosts/metrics.jsonl")), step_losses(local)
    assert sorted(got) == list(range(1, 9))
    assert max(abs(got[s] - want[s]) for s in got) <= 1e-6

    # From host 0, where it was submitted: status and export read the checkpoints from S3.
    status = json.loads(on_host0(hosts, "status", "runs/two-hosts", cwd=work))
    assert [c["step"] for c in status["checkpoints"] if c["complete"]] == [4, 8]
    on_host0(hosts, "export", "runs/two-hosts", "--out", str(work / "export"), cwd=work, timeout=300)
    assert (work / "export" / "config.json").is_file() and list((work / "export").glob("*.safetensors"))


def test_storage_on_one_hosts_own_disk_is_refused_before_the_job_starts(hosts, setup):
    work = hosts.shared / "work"
    config = job_config(setup, work, "node-local", cluster={"address": hosts.head_address, "storage_path": "/tmp/runs"})
    out = hosts[0].call([*CLI, "train", config.name], env=hosts.ray_env(), cwd=work, timeout=300)
    assert out.returncode == 2, (out.stdout + out.stderr)[-4000:]
    assert "cluster.storage_path: /tmp/runs is not shared by the cluster's nodes" in out.stderr
    assert hosts[1].address in out.stderr and hosts[2].address in out.stderr and "s3://" in out.stderr
    assert not list((hosts[0].tmp / "runs" / "node-local").glob("checkpoints*"))  # nothing ran
