"""One driver per run directory: a second `train`/`resume` on a directory in use is refused, before it writes
anything there, naming who holds it. An advisory `flock` on RUN_DIR/.lock, released by the kernel when the
holder exits however it exits (no stale lock to clean up after a crash). On network file systems flock may
not reach other machines; the lock guards against the common case, two launches on one machine or a shared
POSIX file system that supports it."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from infinitune.typed_config import ConfigError


class RunLock:
    """`with RunLock(run_dir): ...` holds the run directory for this process."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(
                "name",
                f"the run directory {self.path.parent} is in use by {holder}; wait for that run to end or stop it, "
                "or give this one another name (name=...)",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']} (since {since})"
    except (ValueError, KeyError, OSError):
        return "another process"
