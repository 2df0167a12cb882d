"""Resumable checkpoints: complete or ignored, never half.

Everything that must survive a restart is registered once, by name: the DeepSpeed engine (which writes its own
shards), parts that every rank holds alike (the loop's state, the data position: saved by rank 0 into
`trainer_state.json`), and parts that differ by rank (`per_rank = True`: the random state, AdaLoRA's budget:
one file per rank). The loop then calls `load()`, `save(step, background=...)`, `wait()` and `close()`.

A save is complete once every rank has listed its files (size, sha256) and rank 0 has written the marker over
the listings; `latest` then names it, and only then are older checkpoints beyond `keep_last` deleted. With
`background=True` the loop is blocked only while the state is copied into host memory (`background.py`);
`wait()` completes the save once every rank's writer is done. The files and their checks are in
`checkpoint_format.py`.

Loading takes the newest checkpoint whose marker is present and whose files match it; a damaged or partial one
is reported and the previous one used. A checkpoint written by another number of workers is loaded through
DeepSpeed's universal format (`reshard.py`).
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from infinitune.trainer import distributed, faults, reshard
from infinitune.trainer.background import BackgroundWrite, SnapshotEngine
from infinitune.trainer.checkpoint_errors import CheckpointError
from infinitune.trainer.checkpoint_format import (
    COMPLETE,
    checkpoint_problem,
    listing_hash,
    point_latest,
    rank_state_path,
    read_marker,
    read_rank_state,
    read_trainer_state,
    step_dir,
    step_dirs,
    write_listing,
    write_marker,
    write_trainer_state,
)
from infinitune.trainer.config import CheckpointConfig
from infinitune.typed_config import ConfigError

log = logging.getLogger(__name__)


class Stateful(Protocol):
    """A part of the run that survives a restart. One whose state differs by rank sets `per_rank = True`; it
    may define `fresh(step)` for a rank the writing run did not have (else that rank loads rank 0's state)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class Completed:
    """A background save that `wait()` completed: its step, directory, and seconds from start to marker."""

    step: int
    directory: Path
    seconds: float


@dataclass
class Restored:
    """What `load()` restored: the step, the checkpoint, and how many workers wrote it."""

    step: int
    directory: Path
    world_size: int


class Checkpointer:
    """The run's checkpoints, for all ranks together: `load`, `save` and `wait` are collective calls."""

    def __init__(
        self,
        root: str | Path,
        rank: int,
        world_size: int,
        config: CheckpointConfig | None = None,
        *,
        shared: bool = True,
        trainable_only: bool = False,
        verify: str = "sha256",
        files: dict[str, bytes] | None = None,
        about: dict[str, Any] | None = None,
    ):
        """`root` is where checkpoints are written: one directory all ranks share (a local or shared file
        system), or, with shared=False, a directory of this rank's own from which the launcher persists each
        checkpoint (Ray merges every rank's files into one directory in its storage). With `trainable_only`
        frozen weights (an adapter's base) are not saved: they come from the model's source. `files` are
        written under `hf/` of every checkpoint (the model's config and tokenizer), `about` into its
        `trainer_state.json` (the ZeRO stage, the resolved config)."""
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.config = config or CheckpointConfig()
        self.shared, self.trainable_only, self.verify = shared, trainable_only, verify
        self.files, self.about = files or {}, about or {}
        self.engine = None
        self.parts: dict[str, Stateful] = {}
        self.restored: Restored | None = None
        self._pending: BackgroundWrite | None = None

    def register(self, engine=None, **parts: Stateful | None) -> None:
        """The DeepSpeed engine, and the other parts by the names their states are saved under (None: absent
        in this run)."""
        if engine is not None:
            self.engine = engine
        self.parts.update({name: part for name, part in parts.items() if part is not None})

    # -- saving ---------------------------------------------------------------------------------------------

    def save(self, step: int, background: bool = False) -> Path | None:
        """Write checkpoint `step`; returns its directory once it is complete, or, with `background`, None once
        the state is copied: a thread writes the files and `wait()` completes the checkpoint. A save still in
        the background must be completed (and reported) with `wait()` first."""
        if self._pending is not None:
            raise RuntimeError(f"checkpoint {self._pending.directory.name} is still being written: wait() first")
        started = time.perf_counter()
        directory = step_dir(self.root, step)
        if self.rank == 0 or not self.shared:
            if directory.exists():  # debris of an attempt that died before completing: never loaded
                shutil.rmtree(directory)
            self.root.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        states = self._save_engine(directory, step, background, started)
        failure: OSError | None = None
        try:
            for name, part in self.parts.items():
                if getattr(part, "per_rank", False):  # tensors and containers of them: loaded with weights_only
                    torch.save(part.state_dict(), rank_state_path(directory, name, self.rank))
            if self.rank == 0:
                shared = {n: p.state_dict() for n, p in self.parts.items() if not getattr(p, "per_rank", False)}
                write_trainer_state(directory, step, shared, {"world_size": self.world_size, **self.about})
                for name, data in self.files.items():
                    (directory / "hf" / name).parent.mkdir(parents=True, exist_ok=True)
                    (directory / "hf" / name).write_bytes(data)
            if not background:
                faults.maybe_fail("during_save", step, self.rank)
        except OSError as e:  # a full disk, a quota, a lost mount: every rank must learn of it, not wait
            failure = e
        if distributed.all_reduce(0 if failure is None else 1, op="max").item():
            self._give_up(directory, failure)
        if background:
            self._pending = BackgroundWrite(
                step, self.rank, directory, states, started, then=lambda: write_listing(directory, self.rank)
            )
            return None
        write_listing(directory, self.rank)
        self._complete(step, directory)
        return directory

    def _save_engine(self, directory: Path, step: int, background: bool, started: float) -> list:
        """DeepSpeed's shards: written now, or (`background`) copied into host memory and returned for the
        writer thread."""
        real = self.engine.checkpoint_engine
        snapshots = SnapshotEngine(real, step, self.rank) if background else None
        if snapshots is not None:
            self.engine.checkpoint_engine = snapshots
        try:
            self.engine.save_checkpoint(
                str(self.root), tag=directory.name, save_latest=False, exclude_frozen_parameters=self.trainable_only
            )
        finally:
            self.engine.checkpoint_engine = real
        if snapshots is None:
            return []
        if snapshots.written_now:
            log.warning(
                "checkpoint %s: not enough free host memory to copy %d of this rank's %d state files "
                "(%.2f GB) for the background save; wrote them before the loop went on, as a synchronous save "
                "does (blocked %.1f s so far)",
                directory.name,
                len(snapshots.written_now),
                len(snapshots.written_now) + len(snapshots.pending),
                sum(snapshots.written_now) / 1e9,
                time.perf_counter() - started,
            )
        return snapshots.pending

    def pending(self) -> bool:
        """Whether a background save awaits `wait()` (the same on every rank: saves are collective)."""
        return self._pending is not None

    def writing(self) -> bool:
        """Whether this rank's writer of a background save is still busy (not a collective)."""
        return self._pending is not None and not self._pending.done

    def wait(self, block: bool = True) -> Completed | None:
        """Complete the background save once every rank has written its files (at a step boundary): the
        marker, `latest`, pruning. Returns what completed now, else None; with `block` False it returns at
        once while some rank is still writing."""
        job = self._pending
        if job is None:  # the same on every rank: saves are collective
            return None
        if block:
            job.join()
        if not distributed.all_reduce(1 if job.done else 0, op="min").item():
            return None
        self._pending = None
        if distributed.all_reduce(0 if job.error is None else 1, op="max").item():
            if job.error is not None and not isinstance(job.error, OSError):
                raise CheckpointError(f"checkpoint {job.directory.name} could not be written: {job.error!r}") from (
                    job.error
                )
            self._give_up(job.directory, job.error)
        self._complete(job.step, job.directory)
        done = Completed(job.step, job.directory, job.seconds())
        log.info("checkpoint %s complete, %.1f s after it began", done.directory.name, done.seconds)
        return done

    def close(self) -> None:
        """Abandon a background save not completed by `wait()` (a run ending on an error): it stays without
        its marker and is never loaded; its writer thread ends with the process. Not a collective call."""
        if self._pending is not None:
            log.warning("checkpoint %s left incomplete (it will not be loaded)", self._pending.directory.name)
            self._pending = None

    def _complete(self, step: int, directory: Path) -> None:
        """Every rank's listing, by its hash, goes into the marker (rank 0 writes it): gathered, since the
        ranks' files may lie in different places until the launcher persists them together."""
        hashes = distributed.all_gather_object(listing_hash(directory, self.rank))
        if self.rank == 0:
            write_marker(directory, step, hashes)
            if self.shared:
                point_latest(self.root, directory)
                self._prune(keep=directory)
        distributed.barrier()

    def _give_up(self, directory: Path, failure: OSError | None) -> None:
        """A save that cannot complete: its directory stays without a marker (never loaded, removed by the next
        save), older checkpoints are untouched; say so, and how to go on."""
        complete = [d.name for _, d in step_dirs(self.root) if (d / COMPLETE).exists() and d != directory]
        previous = f"the previous complete checkpoint {complete[-1]} is intact" if complete else "no checkpoint yet"
        cause = f"{failure}" if failure is not None else "another rank could not write its files (its log says why)"
        full = failure is not None and failure.errno in (errno.ENOSPC, errno.EDQUOT)
        advice = f"free space under {self.root}" if full else "fix the storage"
        raise CheckpointError(
            f"checkpoint {directory.name} could not be written: {cause}; {previous}. {advice.capitalize()}, then "
            "continue with `infinitune resume RUN_DIR`.",
            transient=not full,  # a full disk stays full; an I/O error may pass (the failing rank's own decides)
        )

    def _prune(self, keep: Path) -> None:
        """Delete complete checkpoints beyond the newest keep_last, and debris older than the newest complete."""
        found = step_dirs(self.root)
        complete = [(s, d) for s, d in found if (d / COMPLETE).exists()]
        keep_set = {d for _, d in complete[-self.config.keep_last :]} | {keep}
        newest = complete[-1][0] if complete else None
        for step, d in found:
            if d in keep_set:
                continue
            if (d / COMPLETE).exists() or (newest is not None and step < newest):
                log.info("removing checkpoint %s", d)
                shutil.rmtree(d, ignore_errors=True)

    # -- loading --------------------------------------------------------------------------------------------

    def load(self, step: int | None = None, directory: Path | None = None) -> bool:
        """Restore every registered part from checkpoint `directory` (the launcher's), or from step `step` of
        this run, or, given neither, from what `checkpoint.resume` says (auto: the newest complete checkpoint;
        none: nothing; a path). Returns whether a checkpoint was restored (then `restored` says which), on this
        run's number of workers whatever the writer's. Checkpoints newer than the one restored are set aside,
        so that a later `resume: auto` does not go back to an abandoned branch."""
        if directory is None:
            directory = self._target(step)
        if directory is None:
            return False
        directory = Path(directory)
        complete, _ = read_marker(directory)
        state = read_trainer_state(directory)
        written_by = complete["world_size"]
        self._load_engine(directory, written_by)
        for name, part in self.parts.items():
            if getattr(part, "per_rank", False):
                self._load_rank_part(directory, name, part, state)
            elif name not in state["parts"]:
                raise CheckpointError(f"{directory} holds no state of {name!r}: it was written by a run without it")
            else:
                part.load_state_dict(state["parts"][name])
        self.restored = Restored(state["step"], directory, written_by)
        if self.rank == 0:
            self._set_aside_after(state["step"])
        distributed.barrier()
        log.info("resumed from %s (step %d)", directory, state["step"])
        return True

    def _target(self, step: int | None) -> Path | None:
        """The checkpoint to continue from (every rank agrees)."""
        if step is None and self.config.resume == "none":
            return None
        if step is None and self.config.resume == "auto":
            return self._newest_complete()
        path = step_dir(self.root, step) if step is not None else Path(self.config.resume)
        problem = self._problem_anywhere(path)
        if problem is None:
            return path
        if step is not None:
            raise CheckpointError(f"{path} is not a complete checkpoint: {problem}")
        raise ConfigError("checkpoint.resume", f"{path} is not a complete checkpoint: {problem}")

    def _load_engine(self, directory: Path, written_by: int) -> None:
        """The engine's weights, optimizer and schedule; without `checkpoint.resume_optimizer` the optimizer's
        state is dropped and its settings (learning rate, betas, weight decay) stay the configured ones."""
        engine = self.engine
        root, tag = directory.parent, directory.name
        universal = written_by != self.world_size and reshard.partitioned(directory)
        if universal:  # ZeRO's slices were cut for `written_by` workers: cut again from one file per parameter
            root, tag = directory, reshard.ensure_universal(directory, self.rank).name
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # torch's, inside DeepSpeed's ZeRO wrapper
        configured = [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups]
        base_lrs = list(getattr(engine.lr_scheduler, "base_lrs", []))
        ds_config = engine._config  # DeepSpeed reads this switch inside load_checkpoint only
        ds_config.load_universal_checkpoint = universal
        try:
            loaded, _ = engine.load_checkpoint(
                str(root),
                tag=tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                load_module_strict=not self.trainable_only,
            )
        finally:
            ds_config.load_universal_checkpoint = False
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {directory}")
        if not self.config.resume_optimizer:
            # Loaded whole, then forgotten: DeepSpeed's own weights-only path under ZeRO-3 reads the weights of
            # whichever checkpoint `latest` names, not of `tag`. torch's Adam starts its state afresh when empty;
            # the settings DeepSpeed copied from the checkpoint give way to the configured ones.
            base.state.clear()
            scheduler = engine.lr_scheduler  # the loop's LambdaLR: the rate is base x factor(position)
            lrs = [group["lr"] for group in configured]
            if base_lrs and getattr(scheduler, "lr_lambdas", None):
                scheduler.base_lrs = base_lrs
                lrs = [b * f(scheduler.last_epoch) for f, b in zip(scheduler.lr_lambdas, base_lrs)]
            for group, settings, lr in zip(base.param_groups, configured, lrs):
                group.update(settings, lr=lr)

    def _load_rank_part(self, directory: Path, name: str, part: Stateful, state: dict[str, Any]) -> None:
        version = state.get("format_version", 1)
        path = rank_state_path(directory, name, self.rank, version)
        if not path.is_file() and hasattr(part, "fresh"):
            part.fresh(state["step"])
            return
        if not path.is_file():  # a rank the writing run did not have
            path = rank_state_path(directory, name, 0, version)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint was written by a run without {name!r}")
        part.load_state_dict(read_rank_state(path))

    def _problem(self, directory: Path) -> str | None:
        """Why this rank cannot use the checkpoint, or None. Each rank checks the files of the writers it
        stands for: with another world size, every world_size-th."""
        return checkpoint_problem(directory, self.verify, self.rank, self.world_size)

    def _problem_anywhere(self, directory: Path) -> str | None:
        """Why some rank cannot use `directory` (each rank checks its share), or None."""
        mine = self._problem(directory)
        if mine:
            log.warning("rank %d: checkpoint %s is not usable: %s", self.rank, directory, mine)
        if distributed.all_reduce(0 if mine is None else 1, op="max").item():
            return mine or "another rank found its share damaged (its log says how)"
        return None

    def _newest_complete(self) -> Path | None:
        """The newest checkpoint every rank finds whole; damaged ones are reported and passed over."""
        for _, directory in reversed(step_dirs(self.root)):
            if self._problem_anywhere(directory) is None:
                return directory
        return None

    def _set_aside_after(self, step: int) -> None:
        """Rename checkpoints newer than `step` (rank 0; nothing is deleted)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for s, d in step_dirs(self.root):
            if s > step:
                target = d.with_name(f"{d.name}.set-aside-{stamp}")
                log.warning("resuming from step %d: setting %s aside as %s", step, d, target.name)
                d.rename(target)
