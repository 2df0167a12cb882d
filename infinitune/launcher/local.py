"""Running the workers as plain processes on this machine (what torchrun does, minus its restarts): each
gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT and runs `python -m infinitune.launcher.worker`."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from infinitune.trainer.preemption import EXIT_PREEMPTED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(
    config_path: str | Path, nproc: int, env: dict[str, str] | None = None, log_dir: str | Path | None = None
) -> list[subprocess.Popen]:
    """Start `nproc` worker processes for the resolved config; their output goes to log_dir/rank{r}.log."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        worker_env = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
            "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning"),
        }
        out = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(log_dir) / f"rank{rank}.log", "ab")  # noqa: SIM115 - handed to the child
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "infinitune.launcher.worker", str(config_path)],
                env=worker_env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                # Their own session: a Ctrl-C in the terminal reaches the launcher, which asks every worker to
                # save and stop, instead of interrupting each mid-collective.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        )
        if out is not None:
            out.close()
    return procs


def _die_with_parent() -> None:
    """In the child: be sent SIGTERM (save and stop) if the launcher dies, rather than run on orphaned."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the workers outlive a killed launcher
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_workers(procs: list[subprocess.Popen], grace_s: float = 120.0) -> int:
    """Wait for every worker. When one fails, the others are stopped (they would wait on it forever).
    SIGINT/SIGTERM to the launcher are passed on as SIGTERM, so every worker saves and stops at its next step
    boundary; a second one, or `grace_s` without an end, kills them.
    Returns 0, EXIT_PREEMPTED if the run stopped on request with a checkpoint, or the first failure's code."""
    stopping_since: list[float] = []

    def stop_all(signum=None, frame=None) -> None:
        if stopping_since and signum is not None:  # asked twice: stop now
            for p in procs:
                if p.poll() is None:
                    p.kill()
        stopping_since.append(time.monotonic())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(p.poll() is None for p in procs):
            codes = [p.returncode for p in procs if p.returncode is not None]
            if not stopping_since and any(c not in (0, EXIT_PREEMPTED) for c in codes):
                stop_all()
            if stopping_since and time.monotonic() - stopping_since[0] > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    codes = [p.returncode for p in procs]
    bad = [c for c in codes if c not in (0, EXIT_PREEMPTED)]
    if bad:
        return bad[0] if bad[0] > 0 else 128 - bad[0]  # a signal death (-9) reads as 137
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0
