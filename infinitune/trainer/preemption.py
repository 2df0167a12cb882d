"""Preemption: SIGTERM or SIGUSR1 on any rank stops every rank at the same step boundary, after a save."""

from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a complete checkpoint; restart to continue
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# (when, signal name) of the first request this process received, whichever thread trains.
_SIGNALLED: list[tuple[float, str]] = []
# The handlers ours replaced, by signal, while `install_process_handlers` holds them.
_PREVIOUS: dict = {}


def _handle(signum, frame=None) -> None:
    """Record the first request; a second one goes to the process's own handler (Ray's: exit) when ours
    replaced one through `install_process_handlers`, else it is ignored (the save is under way)."""
    if _SIGNALLED:
        if callable(_PREVIOUS.get(signum)):
            _PREVIOUS[signum](signum, frame)
        return
    _SIGNALLED.append((time.monotonic(), signal.Signals(signum).name))
    log.warning("%s received: saving at a step boundary (the next but one at most)", signal.Signals(signum).name)


def install_process_handlers() -> None:
    """From a process's main thread, for a loop that trains in another thread of it (Ray Train runs the training
    function in a thread of its worker actor): record SIGTERM/SIGUSR1 for that loop's Preemption."""
    for sig in SIGNALS:
        _PREVIOUS[sig] = signal.signal(sig, _handle)


def restore_process_handlers() -> None:
    """From the main thread, once training is over: the process's own handling of the signals again."""
    while _PREVIOUS:
        sig, handler = _PREVIOUS.popitem()
        signal.signal(sig, handler)


class Preemption:
    """Whether a preemption was requested: `known()` says whether this rank knows of one, `agree()` takes whether
    any rank did. On the main thread it installs the signal handler itself."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.received_at: float | None = None
        self.signal_name = ""
        if threading.current_thread() is threading.main_thread():
            _SIGNALLED.clear()  # a request recorded before belongs to an earlier run in this process
            for sig in SIGNALS:
                signal.signal(sig, _handle)
        else:  # signals reach the main thread only: its owner calls install_process_handlers
            log.info("training off the main thread: preemption signals come through install_process_handlers")

    def known(self, elsewhere: bool = False) -> bool:
        """Whether this rank knows of a request: a signal, or its launcher's notice (`elsewhere`). Not a
        collective: the loop sums it over ranks with the step's other numbers and passes the sum to `agree`."""
        if self.received_at is None and _SIGNALLED:
            self.received_at, self.signal_name = _SIGNALLED[0]
        if self.received_at is None and elsewhere:
            self.received_at, self.signal_name = time.monotonic(), "preemption notice"
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
