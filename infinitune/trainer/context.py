"""What the loop needs from whoever launched it, without knowing who: `cluster` implements it for Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RunContext:
    """The default, for torchrun and Slurm: checkpoints live in the run directory and nobody listens."""

    def checkpoint_root(self, run_dir: Path, rank: int) -> tuple[Path, bool]:
        """(where this rank writes checkpoints, whether all ranks share that directory)."""
        return run_dir / "checkpoints", True

    def preemption_requested(self) -> bool:
        """Whether the launcher learned of a preemption (Ray: a node being drained)."""
        return False

    def restore_from(self) -> Path | None:
        """A checkpoint the launcher wants the run to continue from (Ray: the one it persisted), or None to
        let `checkpoint.resume` decide."""
        return None

    def restore_done(self) -> None:
        """Every rank has loaded the checkpoint `restore_from` gave: a copy made for it may go."""

    def report(self, step: int, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        """Step metrics, and each complete checkpoint, as they happen."""
