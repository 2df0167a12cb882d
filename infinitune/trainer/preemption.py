"""Preemption: SIGTERM or SIGUSR1 on any rank stops every rank at the same step boundary, after a save."""

from __future__ import annotations

import logging
import signal
import threading
import time

from infinitune.trainer import distributed

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a complete checkpoint; restart to continue


class Preemption:
    """Sets a flag on SIGTERM/SIGUSR1; `requested()` (a collective) tells every rank whether any got one."""

    def __init__(self, grace_s: float, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.grace_s = grace_s
        self.received_at: float | None = None
        self.signal_name = ""
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self.handle)
        else:  # Python delivers signals to the main thread only; whoever owns it must call handle()
            log.warning("not on the main thread: preemption signals reach this loop only through handle()")

    def handle(self, signum, frame=None) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name
            log.warning("%s received: saving at the next step boundary", self.signal_name)

    def requested(self) -> bool:
        """Whether any rank was signalled. Every rank calls it at every step boundary."""
        return bool(distributed.all_reduce(1 if self.received_at is not None else 0, op="max").item())

    def seconds_left(self) -> float:
        if self.received_at is None:
            return float("inf")
        return self.grace_s - (time.monotonic() - self.received_at)
