"""Background checkpoint writing: the step loop waits only while the state is copied into host memory; a
thread writes the copies and this rank's listing, and the Checkpointer completes the checkpoint once every
rank's thread is done."""

from __future__ import annotations

import copy
import enum
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from infinitune.trainer import faults
from infinitune.trainer.host_memory import host_memory_available

# A background save's copy must leave this much host memory free (the rest of the process, the system).
SNAPSHOT_RESERVE_BYTES = 2 * 2**30

_IMMUTABLE = (int, float, complex, bool, str, bytes, type(None), torch.Size, torch.dtype, torch.device, enum.Enum)


def snapshot(state: Any) -> Any:
    """A copy of `state` in host memory that later training steps cannot change: every tensor copied (a view
    to just its elements), dicts, lists and tuples rebuilt with their types (and a state dict's `_metadata`),
    immutable values kept as they are (DeepSpeed's loaders rely on torch.Size), other objects deep-copied (fp16's
    dynamic loss scaler, which changes every step)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        copied = {k: snapshot(v) for k, v in state.items()}
        if isinstance(state, defaultdict):
            copied = type(state)(state.default_factory, copied)
        elif type(state) is not dict:
            copied = type(state)(copied)
        if hasattr(state, "_metadata"):  # module.state_dict()'s per-module versions
            copied._metadata = copy.deepcopy(state._metadata)
        return copied
    if type(state) in (list, tuple):
        return type(state)(snapshot(v) for v in state)
    if isinstance(state, _IMMUTABLE):
        return state
    return copy.deepcopy(state)


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what `snapshot` copies."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


class SnapshotEngine:
    """Stands in for DeepSpeed's checkpoint engine during one background save: each state dict DeepSpeed
    hands it is copied (`snapshot`) and kept for the writer thread; everything else goes to the real one.

    A state dict whose copy would not fit in host memory (with SNAPSHOT_RESERVE_BYTES to spare) is written
    at once by the real engine instead, as a synchronous save would: the loop waits longer, but the process
    is not killed for memory and the ranks stay in step through DeepSpeed's save."""

    def __init__(self, inner, step: int, rank: int):
        self.inner = inner
        self.step, self.rank = step, rank
        self.pending: list[tuple[Any, str]] = []
        self.written_now: list[int] = []  # bytes of each state dict written at once for want of memory

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def preserves_storage_sharing(self) -> bool:
        return False  # `snapshot` copies every tensor; DeepSpeed need not clone them first

    def save(self, state_dict, path: str) -> None:
        size = tensor_bytes(state_dict)
        if (
            faults.injected("snapshot", self.step, self.rank, "nomem")
            or size + SNAPSHOT_RESERVE_BYTES > host_memory_available()
        ):
            self.inner.save(state_dict, path)
            self.written_now.append(size)
            return
        self.pending.append((snapshot(state_dict), path))


class BackgroundWrite:
    """One background save on this rank: a thread writes the copied states, then runs `then` (this rank's
    listing); a failure is kept for the loop's thread to report."""

    def __init__(
        self, step: int, rank: int, directory: Path, states: list[tuple[Any, str]], started: float, then: Callable
    ):
        self.step, self.rank, self.directory, self.started = step, rank, directory, started
        self.error: BaseException | None = None
        self._states, self._then = states, then
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            faults.maybe_fail("before_write", self.step, self.rank)
            while self._states:
                state, path = self._states.pop(0)  # each copy freed once it is on disk
                # The zip format, unlike DeepSpeed's default, lets the step loop run while bytes are written.
                torch.save(state, path, _use_new_zipfile_serialization=True)
                del state
            faults.maybe_fail("during_save", self.step, self.rank)
            self._then()
        except BaseException as e:  # reported on the loop's thread
            self.error = e

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()

    def seconds(self) -> float:
        """From the start of the save (the copy included) until now."""
        return time.perf_counter() - self.started
