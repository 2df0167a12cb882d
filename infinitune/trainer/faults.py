"""Fault injection for the fault-tolerance tests: kill this worker, or fail a write, at a named point.

Set INFINITUNE_FAULT to `POINT:STEP` or `rankR:POINT:STEP`, e.g. `after_step:7` (every rank, after step 7)
or `rank1:during_save:10` (rank 1, halfway through writing checkpoint 10): the process is killed (SIGKILL).
A trailing `:enospc` raises "No space left on device" there instead, as a full disk would. With
INFINITUNE_FAULT_ONCE set to a file path, the fault fires once (the file records it), so a restarted worker
runs on. Unset, nothing happens.
"""

from __future__ import annotations

import errno
import os
import signal


def maybe_fail(point: str, step: int, rank: int) -> None:
    spec = os.environ.get("INFINITUNE_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0].startswith("rank"):
        if int(parts[0][4:]) != rank:
            return
        parts = parts[1:]
    action = "kill"
    if parts and parts[-1] == "enospc":
        action, parts = "enospc", parts[:-1]
    if parts != [point, str(step)]:
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
