"""Preemption: SIGTERM or SIGUSR1 on any rank stops every rank at the same step boundary, after a save."""

from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a complete checkpoint; restart to continue

# Set by `install_process_handlers`, for loops that run off the main thread (Ray Train runs the training
# function in a thread of its worker actor, whose main thread must install the handlers).
_SIGNALLED: list[tuple[float, str]] = []
_PREVIOUS: dict = {}


def install_process_handlers(signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
    """From a process's main thread: record SIGTERM/SIGUSR1 for a Preemption in any thread of it."""

    previous = {}

    def handle(signum, frame=None) -> None:
        if _SIGNALLED and callable(previous.get(signum)):  # asked twice: the process's own handling (exit)
            previous[signum](signum, frame)
            return
        if not _SIGNALLED:
            _SIGNALLED.append((time.monotonic(), signal.Signals(signum).name))
            log.warning("%s received: saving at the next step boundary", signal.Signals(signum).name)

    for sig in signals:
        previous[sig] = signal.signal(sig, handle)
    _PREVIOUS.update(previous)


def restore_process_handlers() -> None:
    """From the main thread, once training is over: the process's own handling of the signals again."""
    while _PREVIOUS:
        sig, handler = _PREVIOUS.popitem()
        signal.signal(sig, handler)


class Preemption:
    """Sets a flag on SIGTERM/SIGUSR1; `known()` says whether this rank got one, `agree()` takes whether any did."""

    def __init__(self, grace_s: float, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.grace_s = grace_s
        self.received_at: float | None = None
        self.signal_name = ""
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self.handle)
        else:  # signals reach the main thread only: its owner installs install_process_handlers
            log.info("training off the main thread: preemption signals come through install_process_handlers")

    def handle(self, signum, frame=None) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name
            log.warning("%s received: saving at the next step boundary", self.signal_name)

    def known(self, elsewhere: bool = False) -> bool:
        """Whether this rank knows of a request: a signal, or its launcher's notice (`elsewhere`). Not a
        collective: the loop sums it over ranks with the step's other numbers and passes the sum to `agree`."""
        if elsewhere and self.received_at is None:
            self.received_at, self.signal_name = time.monotonic(), "preemption notice"
        if _SIGNALLED and self.received_at is None:
            self.received_at, self.signal_name = _SIGNALLED[0]
        return self.received_at is not None

    def agree(self, anywhere: bool) -> bool:
        """`anywhere`: whether any rank knew of a request, the same on every rank. Returns it."""
        if anywhere and self.received_at is None:
            self.received_at, self.signal_name = time.monotonic(), "another rank's request"
        return anywhere

    def seconds_left(self) -> float:
        if self.received_at is None:
            return float("inf")
        return self.grace_s - (time.monotonic() - self.received_at)
