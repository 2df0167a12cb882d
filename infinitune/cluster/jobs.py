"""Ray Jobs: submitting a run to a cluster's head and following it (status, logs, stop)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import infinitune

# Never uploaded with the working directory: environments, history, outputs and shards (which the cluster
# reads from shared storage or a URL).
EXCLUDES = [".venv", ".git", "runs", "*.tar", "__pycache__", ".pytest_cache", ".hypothesis"]


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


# The resolved job config travels with the job in this variable of the driver's environment (and so of its
# workers'): the config file may lie anywhere on the submitting machine.
SUBMITTED_CONFIG = "INFINITUNE_SUBMITTED_CONFIG"


def submit(address: str, config_yaml: str, working_dir: str = ".") -> str:
    """Submit `infinitune train` of the resolved config `config_yaml` as a Ray Job; returns its id. The
    package and the working directory travel with it, so the cluster needs only Ray and the dependencies;
    relative paths in the config are read from the working directory there."""
    # The plan was checked (or overridden) where the job was submitted.
    cli = ["python", "-m", "infinitune.launcher.cli", "train", "--ignore-plan", f"env:{SUBMITTED_CONFIG}"]
    entrypoint = shlex.join([*cli, "cluster.address=auto"])
    runtime_env: dict[str, Any] = {
        "working_dir": working_dir,
        "excludes": EXCLUDES,
        "py_modules": [str(Path(infinitune.__file__).parent)],
        # The driver passes its own variables to the workers (ray_job.ray_environment); Ray refuses a key set
        # both here and there, and this one is set only here.
        "env_vars": {SUBMITTED_CONFIG: config_yaml},
    }
    return client(address).submit_job(entrypoint=entrypoint, runtime_env=runtime_env)


def status(address: str, job_id: str) -> dict[str, Any]:
    info = client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status), "message": info.message, "entrypoint": info.entrypoint}


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Where a run directory stands: its last step and loss, its checkpoints."""
    run_dir = Path(run_dir)
    last: dict[str, Any] = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "train/loss" in row:
                last = row
    from infinitune.trainer.checkpoint_format import checkpoint_problem, step_dirs
    from infinitune.trainer.storage import remote_checkpoints, remote_run

    remote = remote_run(run_dir)
    if remote is not None:  # what the storage holds; completeness by marker (verified when fetched)
        checkpoints = [
            {"step": step, "path": path, "complete": complete} for step, path, complete in remote_checkpoints(remote)
        ]
    else:
        checkpoints = [
            {"step": step, "path": str(d), "complete": checkpoint_problem(d) is None}
            for step, d in step_dirs(run_dir / "checkpoints")
        ]
    return {
        "run_dir": str(run_dir),
        "step": last.get("step", 0),
        "loss": last.get("train/loss"),
        "checkpoints": checkpoints,
    }
