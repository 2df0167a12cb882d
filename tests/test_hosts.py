"""Many hosts on one machine (infinitune/testing/hosts.py): network namespaces on a bridge, each with its own
address from 127.77.0.0/24, its own /tmp and a host name that resolves to loopback (Ubuntu's default), a Ray
head on host 0 (0 CPUs: it holds the job's driver and a local S3 server) and a 1-CPU Ray node on each of
hosts 1-3. Real TCP between the hosts: Ray's, gloo's and S3's. The cases share the cluster and run in order:
a lost host stays lost for the cases after it. Needs root; skipped, saying why, elsewhere."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest

from infinitune.testing.host_jobs import CLI, FAILURE_DETECTION, fault_job, finish, host_of_rank, start_driver
from infinitune.testing.hosts import Hosts, HostsUnavailable, check_available
from infinitune.testing.jobs import job_config, logs, make_tiny_setup, run, run_dir_of, step_losses, wait_for_step

pytestmark = [pytest.mark.slow, pytest.mark.hosts]

S3_PORT = 5555
BUCKET = "bkt"
STEPS = 40


@pytest.fixture(scope="module")
def hosts():
    try:
        check_available()
    except HostsUnavailable as e:
        pytest.skip(str(e))
    with Hosts(4) as made:
        made.start_s3(made[0], S3_PORT, BUCKET)
        made.start_ray_cluster({**made.s3_env, **FAILURE_DETECTION})
        yield made
    assert made.leftovers() == []  # namespaces (and their veths), /tmp directories, processes: all gone


@pytest.fixture(scope="module")
def setup(hosts, tiny_tokenizer_dir):
    """The tiny model and shards on the hosts' shared mount (as model weights on a shared file system)."""
    return make_tiny_setup(hosts.shared / "setup", tiny_tokenizer_dir)


def on_host0(hosts, *args, cwd=None, timeout=120):
    out = hosts[0].call([*CLI, *args], env={**hosts.ray_env(), **hosts.s3_env}, cwd=cwd, timeout=timeout)
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
    out = hosts[0].call([sys.executable, "-c", script], env=hosts.s3_env)
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
    # The config lies outside the working directory (which is what is uploaded), and an override changes it:
    # the resolved config travels with the job.
    elsewhere = job_config(
        setup, hosts.shared / "configs", "two-hosts", **{**sections, "train": {"max_steps": 5, "eval_every": 0}}
    )
    work.mkdir(parents=True, exist_ok=True)
    job_id = on_host0(
        hosts, "submit", str(elsewhere), "train.max_steps=8", "--address", hosts.dashboard, cwd=work
    ).strip()
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
    assert sorted(placed) == ["rank0.log", "rank1.log"], placed
    assert len(set(placed.values())) == 2 and 0 not in placed.values(), placed  # two hosts, not the head

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


@pytest.fixture(scope="module")
def reference(hosts, setup):
    """The fault cases' job, uninterrupted, on one host (two local worker processes)."""
    config = fault_job(hosts, setup, "reference-one-host", cluster={})
    assert "address" not in config.read_text()
    assert run(config) == 0, logs(config)
    return config


def samples(config) -> list[int]:
    rows = {}
    for line in (run_dir_of(config) / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row["ids"]  # a step run again after a restart keeps its last record
    return [i for s in sorted(rows) for i in rows[s]]


def assert_like_reference(config, reference, tolerance):
    got, want = step_losses(config), step_losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) for s in got)
    assert worst <= tolerance, worst
    assert samples(config) == samples(reference)  # every sample once, in the same order
    return worst


def spare_again(hosts) -> None:
    """Every worker host up again (the cases before left some down)."""
    for host in hosts:
        if host.index and not host.pids():
            hosts.start_ray_node(host, num_cpus=1, **hosts.node_env)
    hosts.wait_for_nodes(len(hosts))


def lose_the_host_of_rank1(hosts, setup, reference, name, lose) -> None:
    """A 2-worker job with a spare host waiting; after step 8 `lose(host)` takes the host of rank 1 away. The job
    continues on the two hosts left, the spare among them, with the uninterrupted run's losses."""
    spare_again(hosts)
    config = fault_job(hosts, setup, name)
    driver, log = start_driver(hosts, config)
    wait_for_step(config, 8, timeout=300)
    victim = host_of_rank(hosts, config, 1)
    assert victim is not None and victim.index != 0
    lost = time.time()
    lose(victim)
    try:
        finish(driver)
    finally:
        victim.kill()  # whatever `lose` left running on it
    assert driver.returncode == 0, log.read_text()[-5000:]
    placed = {host_of_rank(hosts, config, r, after=lost).index for r in (0, 1)}
    assert placed == {1, 2, 3} - {victim.index}, (placed, victim.index)  # on the two hosts left: the spare's in
    assert_like_reference(config, reference, 1e-6)
    metrics = [json.loads(line) for line in (run_dir_of(config) / "metrics.jsonl").read_text().splitlines()]
    back = min(r["step"] for r in metrics if r["time"] > lost and "train/loss" in r)
    first = min(r["time"] for r in metrics if r["time"] > lost and "train/loss" in r)
    print(f"{name}: host lost at step >= 8, first new step {back} after {first - lost:.1f} s")


def test_a_lost_host_is_replaced_by_the_spare_and_the_losses_do_not_change(hosts, setup, reference):
    # The host goes: its raylet, its worker, everything on it.
    lose_the_host_of_rank1(hosts, setup, reference, "spare", lambda host: host.kill())


def test_a_lost_host_without_spare_shrinks_the_job_which_grows_back_when_the_host_returns(hosts, setup, reference):
    # Two worker hosts (the case before lost one); with a range of workers the job runs on both, on one, and on
    # both again.
    for extra in [h for h in hosts if h.index and h.pids()][2:]:
        extra.kill()
    elastic = {"num_workers": [1, 2], "resize_check_s": 5, "worker_start_timeout_s": 15}
    config = fault_job(hosts, setup, "elastic", cluster=elastic)
    # Every step made 1 s longer, so that the job on one worker outlasts the host's return and a resize check.
    driver, log = start_driver(hosts, config, {"INFINITUNE_FAULT": "after_step:*:slow", "INFINITUNE_FAULT_SLOW_S": "1"})
    wait_for_step(config, 8, timeout=300)
    victim = host_of_rank(hosts, config, 1)
    assert victim is not None and victim.index != 0
    lost = time.time()
    victim.kill()
    deadline = time.monotonic() + 300
    while "continuing on 1 workers" not in (run_dir_of(config) / "logs" / "rank0.log").read_text():
        assert time.monotonic() < deadline and driver.poll() is None, log.read_text()[-5000:]
        time.sleep(1)
    hosts.start_ray_node(victim, num_cpus=1, **hosts.node_env)  # the host is back
    finish(driver)
    assert driver.returncode == 0, log.read_text()[-5000:]
    text = (run_dir_of(config) / "logs" / "rank0.log").read_text()
    assert "continuing on 1 workers" in text and "continuing on 2 workers" in text
    rows = [json.loads(line) for line in (run_dir_of(config) / "metrics.jsonl").read_text().splitlines()]
    changes = [(round(r["time"] - lost, 1), r["step"], r["cluster/workers"]) for r in rows if "cluster/workers" in r]
    print("(seconds after the loss, step, workers):", changes, "end", round(rows[-1]["time"] - lost, 1))
    sizes = [n for _, _, n in changes]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes  # TensorBoard's cluster/workers too
    assert_like_reference(config, reference, 1e-4)


def node_id_of(hosts, host) -> str:
    script = (
        f"import ray; ray.init(address={hosts.head_address!r}, logging_level='ERROR'); "
        f"print([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['NodeManagerAddress'] == {host.address!r}][0])"
    )
    out = hosts[0].call([sys.executable, "-c", script], env=hosts.ray_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_a_host_drained_for_preemption_gets_one_coordinated_checkpoint_before_it_goes(hosts, setup, reference):
    spare_again(hosts)
    config = fault_job(hosts, setup, "drained")
    driver, log = start_driver(
        hosts, config, {"INFINITUNE_FAULT": "after_step:*:slow", "INFINITUNE_FAULT_SLOW_S": "0.3"}
    )
    wait_for_step(config, 8, timeout=300)
    victim = host_of_rank(hosts, config, 1)
    drain = [
        str(hosts.ray_bin),
        "drain-node",
        f"--address={hosts.head_address}",
        f"--node-id={node_id_of(hosts, victim)}",
        "--reason=DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message=spot instance reclaimed",
        "--deadline-remaining-seconds=60",
    ]
    drained = time.time()
    out = hosts[0].call(drain, env=hosts.ray_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    finish(driver)
    victim.kill()  # the drain's deadline: the provider takes the host
    assert driver.returncode == 0, log.read_text()[-5000:]
    text = (run_dir_of(config) / "logs" / "rank0.log").read_text()
    stopped = re.search(r"stopped at step (\d+) on (preemption notice|another rank.s request)", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    # Saved at the stop (on a periodic step too: the stop message names the preemption), resumed there.
    assert f"step_{step:06d} (step {step})" in text, text[-3000:]
    placed = {host_of_rank(hosts, config, r, after=drained).index for r in (0, 1)}
    assert victim.index not in placed and len(placed) == 2, placed  # on the spare, not on the drained host
    assert_like_reference(config, reference, 1e-6)


def test_a_host_cut_off_the_network_is_replaced_by_the_spare_and_the_losses_do_not_change(hosts, setup, reference):
    # Its processes run on, unreachable: the other rank waits in a collective with it.
    lose_the_host_of_rank1(hosts, setup, reference, "cut-off", lambda host: host.cut_link())
