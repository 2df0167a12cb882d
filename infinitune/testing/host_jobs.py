"""Training jobs on the namespaced hosts of `hosts.py`: the job the fault cases run, its driver on host 0, and
where its workers ran. Used by tests/test_hosts.py and bench/recovery.py."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from infinitune.testing.hosts import Hosts
from infinitune.testing.jobs import job_config, run_dir_of

CLI = [sys.executable, "-m", "infinitune.launcher.cli"]

# Ray's failure detection, quickened for tests: the GCS declares a node dead after 3 missed health checks 1 s
# apart (production defaults: 5 missed, 3 s apart, 10 s timeout; see docs/operations.md).
FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def fault_job(
    hosts: Hosts, setup: dict, name: str, cluster: dict | None = None, steps: int = 40, bucket: str = "bkt"
) -> Path:
    """The fault cases' job: `steps` steps, checkpoints every 5 into S3, on the hosts' cluster (`cluster`: overrides
    of its section); with cluster={} a plain local job of the same training."""
    if cluster is None or cluster:
        cluster = {
            "address": hosts.head_address,
            "num_workers": 2,
            "storage_path": f"s3://{bucket}/runs",
            "local_dir": str(hosts.shared / "work" / "runs"),  # the driver's run directory: logs and metrics
            **(cluster or {}),
        }
    return job_config(
        setup,
        hosts.shared / "work",
        name,
        train={"max_steps": steps, "eval_every": 0},
        checkpoint={"every_steps": 5},
        cluster=cluster,
        logging={"log_samples": True},
    )


def start_driver(hosts, config, env=None):
    """`infinitune train CONFIG` on host 0, joining the cluster; its output in RUN_DIR.driver.log."""
    log = config.with_suffix(".driver.log")
    env = {**hosts.ray_env(), **hosts.s3_env, **(env or {})}
    return hosts[0].run([*CLI, "train", str(config)], env=env, log=log), log


def finish(driver, timeout: float = 600) -> None:
    """Wait for the driver; one still running then is ended (by its id), not left to disturb the next case."""
    try:
        driver.wait(timeout=timeout)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)


def host_of_rank(hosts, config, rank: int, after: float = 0.0):
    """The host whose worker was rank `rank` in the newest worker group started after `after` (time.time())."""
    text = (run_dir_of(config) / "logs" / f"rank{rank}.log").read_text()
    found = None
    for stamp, name in re.findall(
        rf"^(\S+ \S+) rank{rank} INFO \S+: worker rank {rank} of \d+: pid \d+ on (\S+)", text, re.M
    ):
        if time.mktime(time.strptime(stamp.split(",")[0], "%Y-%m-%d %H:%M:%S")) >= after - 1:
            found = name
    return next((h for h in hosts if h.namespace == found), None)
