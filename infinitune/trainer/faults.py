"""Fault injection for the fault-tolerance tests: kill this worker, or fail a write, at a named point.

Set INFINITUNE_FAULT to `POINT:STEP` or `rankR:POINT:STEP`, e.g. `after_step:7` (every rank, after step 7)
or `rank1:during_save:10` (rank 1, halfway through writing checkpoint 10): the process is killed (SIGKILL).
A trailing `:enospc` raises "No space left on device" there instead, as a full disk would; `:slow` waits 3 s
there (INFINITUNE_FAULT_SLOW_S seconds, if set), as a slow file system would; `:nomem` makes a background save find no host memory to copy the state
into there (point `snapshot`). A step of `*` is every step. Several faults are separated by commas. With INFINITUNE_FAULT_ONCE set
to a file path, a kill or a full disk happens once (the file records it), so a restarted worker runs on. Unset, nothing happens.
"""

from __future__ import annotations

import errno
import os
import signal
import time


def maybe_fail(point: str, step: int, rank: int) -> None:
    for spec in filter(None, os.environ.get("INFINITUNE_FAULT", "").split(",")):
        _maybe_fail(spec, point, step, rank)


def injected(point: str, step: int, rank: int, action: str) -> bool:
    """Whether a fault with this action (one that is not a kill or an error, e.g. `nomem`) is set here."""
    return any(
        _matches(spec, point, step, rank) == action for spec in os.environ.get("INFINITUNE_FAULT", "").split(",")
    )


def _matches(spec: str, point: str, step: int, rank: int) -> str | None:
    """The action of `spec` if it names this point, step and rank, else None."""
    parts = spec.split(":")
    if parts[0].startswith("rank"):
        if int(parts[0][4:]) != rank:
            return None
        parts = parts[1:]
    action = "kill"
    if parts and parts[-1] in ("enospc", "slow", "nomem"):
        action, parts = parts[-1], parts[:-1]
    return action if len(parts) == 2 and parts[0] == point and parts[1] in ("*", str(step)) else None


def _maybe_fail(spec: str, point: str, step: int, rank: int) -> None:
    action = _matches(spec, point, step, rank)
    if action is None or action == "nomem":
        return
    if action == "slow":
        time.sleep(float(os.environ.get("INFINITUNE_FAULT_SLOW_S", "3")))
        return
    once = os.environ.get("INFINITUNE_FAULT_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # the first to get here fires
        except FileExistsError:
            return
        os.close(fd)
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point} {step})")
    os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: like the OOM killer or a lost node
