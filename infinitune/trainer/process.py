"""What every worker process does around the loop, whoever started it (torchrun, Slurm, Ray Train): logging
by rank, leaving the process group together, and exiting without the interpreter's teardown."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist


def configure_logging(rank: int, log_file: str | os.PathLike | None = None) -> None:
    """Rank 0 logs progress, the others warnings; with `log_file`, everything also goes there."""
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger("infinitune")  # ours only: Ray and DeepSpeed keep their own settings
    root.setLevel(logging.INFO)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        root.addHandler(handler)


def leave_together() -> None:
    """Every rank leaves together: a rank that tears its process group down while another still sends its last
    collective makes that one fail at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown once everything is written: C++ threads of the collective
    libraries, joined in static destructors, have been seen to abort a finished worker there (exit 134,
    "terminate called without an active exception"), turning a complete run into a failed one."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
