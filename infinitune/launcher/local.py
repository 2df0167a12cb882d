"""Running the workers on this machine under torch.distributed.run's elastic agent (what `torchrun` runs): it
starts `python -m infinitune.launcher.worker RUN_DIR/config.yaml` once per rank, watches them, and restarts all
of them from the last checkpoint when one fails, `max_restarts` times.

A SIGTERM or Ctrl-C to the launcher reaches every worker as SIGTERM: each saves at its next step boundary and
stops, within `grace_s`. Each worker's own log is RUN_DIR/logs/rank{r}.log (as under Ray); everything the
processes print is also kept in torchrun's layout under RUN_DIR/logs/console/ and shown on this terminal."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from infinitune.trainer.preemption import EXIT_PREEMPTED

# The agent turns these into a shutdown that sends SIGTERM to the workers; SIGINT is left to Python, whose
# KeyboardInterrupt ends the agent the same way (passed on as SIGINT, it would interrupt a worker mid-step).
AGENT_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(
    config_path: str | Path,
    nproc: int,
    max_restarts: int = 0,
    grace_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> int:
    """Run `nproc` workers for the resolved config until they end. Returns 0, EXIT_PREEMPTED if the run
    stopped on request (its last checkpoint is complete), or the exit code of the first worker that failed
    once no restart was left (a death by signal as 128 + the signal)."""
    log_dir = Path(config_path).resolve().parent / "logs"
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"infinitune-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        local_addr="127.0.0.1",
        max_restarts=max_restarts,
        monitor_interval=0.2,
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir / "console"), redirects=Std.ALL, tee=Std.ALL),
        signals_to_handle=",".join(s.name for s in AGENT_SIGNALS),
        shutdown_timeout=int(grace_s),
    )
    worker_env = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
        "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning"),
        "INFINITUNE_LAUNCHER_PID": str(os.getpid()),
        # Workers sharing the agent's rendezvous store read the previous attempt's addresses after a restart
        # and cannot connect (pytorch/pytorch#135712): each attempt gets a store of its own.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        **(env or {}),
    }
    with _environment(worker_env), _own_signal_handlers():
        try:
            elastic_launch(config, sys.executable)("-m", "infinitune.launcher.worker", str(config_path))
        except ChildFailedError as e:
            code = e.get_first_failure()[1].exitcode
            return code if code > 0 else 128 - code
        except (SignalException, KeyboardInterrupt):
            return EXIT_PREEMPTED
    return 0


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """The workers inherit the launcher's environment; these values for this run only."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _own_signal_handlers():
    """Ctrl-C raises KeyboardInterrupt while the agent runs; the agent installs handlers it never removes, and
    a process that goes on afterwards (a test, a benchmark) gets its own back."""
    main = threading.current_thread() is threading.main_thread()  # elsewhere neither can install any
    saved = {sig: signal.getsignal(sig) for sig in (*AGENT_SIGNALS, signal.SIGINT)}
    if main:  # Ctrl-C stops the run also where it was ignored (a shell's background job starts so)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if main:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def exit_with_launcher() -> None:
    """In a worker: be sent SIGTERM (save and stop) when the launcher that started it dies, rather than run on
    orphaned. The agent starts each worker in a session of its own, so nothing else would tell it."""
    launcher = os.environ.get("INFINITUNE_LAUNCHER_PID")
    if not launcher:
        return
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the workers outlive a killed launcher
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):  # it died before the request above
        os.kill(os.getpid(), signal.SIGTERM)
