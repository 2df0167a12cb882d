"""The error of checkpoints, apart so that both the Checkpointer and the resharding beneath it raise it."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used. `transient`: the storage failed (an I/O error, a lost mount), which
    trying again may fix, as opposed to a full disk or a checkpoint that is wrong."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):  # crosses process boundaries
        return CheckpointError, (str(self), self.transient)
