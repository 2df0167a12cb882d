"""Resumable checkpoints: complete or ignored, never half.

Layout of `checkpoints/step_000120/`: DeepSpeed's shards (each rank its own), `rng.rank{r}.pt` (each rank's
random state), `trainer_state.json` (step, data position, ..., the resolved config), `hf/` (the model's config
and tokenizer, so export needs nothing else), one `files.rank{r}.json` per rank listing the files it wrote with
size and sha256, and last, written by rank 0 once every rank's list exists, `COMPLETE.json`. Then `latest`
names the new step, and only then are older checkpoints beyond `keep_last` deleted.

With `background=True` the step loop is blocked only while DeepSpeed's state is copied into host memory; a
thread writes and hashes this rank's files, and `finish()`, called by every rank at each step boundary,
writes the marker once every rank's thread is done. Until then the checkpoint is partial like any other and
is never loaded.

Loading takes the newest checkpoint whose marker is present and whose files match it; a damaged or partial
one is reported and the previous one used. Our own files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import copy
import enum
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infinitune.trainer import distributed, faults, reshard
from infinitune.trainer.checkpoint_errors import CheckpointError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE.json"
STATE = "trainer_state.json"
LATEST = "latest"
FORMAT_VERSION = 1
STEP_DIR_NAME = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rank_|\.rank)(\d+)[._]")


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


# A background save's copy must leave this much host memory free (the rest of the process, the system).
SNAPSHOT_RESERVE_BYTES = 2 * 2**30


def _cgroup_memory_dirs(root: Path, proc_cgroup: Path) -> list[tuple[Path, str]]:
    """This process's memory cgroup directories, own first, then its parents up to the root: (directory,
    cgroup version "2" or "1"). Without a cgroup namespace (Slurm, systemd slices) a process's own cgroup is
    not the root, and a limit may be set on any ancestor."""
    try:
        entries = [line.split(":", 2) for line in proc_cgroup.read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        entries = []
    # A v1 memory controller wins over the v2 line that hybrid systems also list (its v2 tree has no limits).
    v1 = [path for _, controllers, path in entries if "memory" in controllers.split(",")]
    v2 = [path for hierarchy, controllers, path in entries if hierarchy == "0" and controllers == ""]
    if v1:
        base, version, path = root / "memory", "1", v1[0]
    elif v2:
        base, version, path = root, "2", v2[0]
    else:
        return [(root, "2"), (root / "memory", "1")]
    own = base / path.lstrip("/")
    # The own directory may not exist where the container shows its cgroup as the root: the root is kept last.
    return [(d, version) for d in (own, *own.parents) if d == base or base in d.parents]


def host_memory_available(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """Bytes of host memory this process can still take: the system's available memory, or less where a
    memory limit of its cgroup or of a parent cgroup (a container's, a job's) is nearer; inactive page cache
    counts as free, as the kernel reclaims it before the limit kills anything."""
    import psutil

    available = psutil.virtual_memory().available
    for directory, version in _cgroup_memory_dirs(root, proc_cgroup):
        limit_file, usage_file, reclaimable = (
            ("memory.max", "memory.current", "inactive_file")
            if version == "2"
            else ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        )
        try:
            limit = (directory / limit_file).read_text().strip()
            usage = int((directory / usage_file).read_text())
            stat = (directory / "memory.stat").read_text().splitlines()
        except (OSError, ValueError):
            continue
        if not limit.isdigit():  # "max": no limit here
            continue
        free_cache = next((int(line.split()[1]) for line in stat if line.startswith(reclaimable + " ")), 0)
        available = min(available, int(limit) - usage + free_cache)
    return max(available, 0)


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what `snapshot` copies."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


class _SnapshotEngine:
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


@dataclass
class Completed:
    """A background save that `finish()` completed: its step, directory, and seconds from start to marker."""

    step: int
    directory: Path
    seconds: float


@dataclass
class _Pending:
    """A background save: its thread writes `states` and this rank's listing, or records why it could not."""

    step: int
    directory: Path
    states: list[tuple[Any, str]]
    started: float  # when the save began (perf_counter), the copy included
    thread: threading.Thread | None = None
    error: BaseException | None = None


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner(relative: str) -> int:
    """The rank that wrote a file of a checkpoint: named in DeepSpeed's and our file names, else rank 0."""
    m = _RANK_FILE.search(os.path.basename(relative))
    return int(m.group(1)) if m else 0


def _files_of(directory: Path, rank: int) -> list[str]:
    markers = {COMPLETE} | {p.name for p in directory.glob("files.rank*.json")}
    out = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel not in markers and _owner(rel) == rank:
            out.append(rel)
    return out


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This process's random state, in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _listing_problem(directory: Path, rank: int, expected_sha: str | None, verify: str) -> str | None:
    listing_path = directory / f"files.rank{rank}.json"
    try:
        if expected_sha is not None and _sha256(listing_path) != expected_sha:
            return f"{listing_path.name} does not match the marker"
        listing = json.loads(listing_path.read_text())
    except (OSError, ValueError) as e:
        return f"{listing_path.name} unreadable ({e})"
    for rel, want in listing.items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, the marker says {want['bytes']} (truncated)"
        if verify == "sha256" and _sha256(path) != want["sha256"]:
            return f"{rel} does not match its sha256 (corrupted)"
    return None


def _read_marker(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    marker = directory / COMPLETE
    if not marker.exists():
        return None, "no completeness marker (the save did not finish)"
    try:
        complete = json.loads(marker.read_text())
        if not isinstance(complete.get("world_size"), int) or not isinstance(complete.get("ranks"), dict):
            return None, "marker lacks world_size or ranks"
        return complete, None
    except (OSError, ValueError, KeyError) as e:
        return None, f"unreadable marker ({e})"


def checkpoint_problem(directory: Path, verify: str = "size") -> str | None:
    """Why a checkpoint cannot be used, checking every rank's files in this one process; None if whole."""
    if not directory.is_dir():
        return "no such checkpoint directory"
    complete, problem = _read_marker(directory)
    if complete is None:
        return problem
    for rank in range(complete["world_size"]):
        problem = _listing_problem(directory, rank, complete["ranks"].get(str(rank)), verify)
        if problem:
            return problem
    return None


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every step directory under `root`, by step (complete or not)."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := STEP_DIR_NAME.match(d.name)))


class Checkpointer:
    """save(step, ...) and load(...) -> trainer state or None, for all ranks together (collective calls)."""

    def __init__(
        self,
        root: str | Path,
        rank: int,
        world_size: int,
        keep_last: int = 2,
        verify: str = "sha256",
        shared: bool = True,
        trainable_only: bool = False,
    ):
        """`root` is where checkpoints are written: one directory all ranks share (a local or shared file
        system), or, with shared=False, a directory of this rank's own from which the launcher persists
        each checkpoint (Ray merges every rank's files into one directory in its storage)."""
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.keep_last, self.verify, self.shared = keep_last, verify, shared
        self.trainable_only = trainable_only  # frozen weights (an adapter's base) come from the model's source
        self._pending: _Pending | None = None  # a background save not yet completed

    # -- saving ---------------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        engine,
        trainer_state: dict[str, Any],
        hf_files: dict[str, bytes],
        extra: dict[str, Any] | None = None,
        background: bool = False,
    ) -> Path | None:
        """Write checkpoint `step` with every rank; returns its directory once it is complete, or, with
        `background`, None once the state is copied: the files are written by a thread and `finish()`
        completes the checkpoint. A save still in the background is finished first."""
        self.finish(block=True)
        started = time.perf_counter()
        directory = step_dir(self.root, step)
        if self.rank == 0 or not self.shared:
            if directory.exists():  # debris of an attempt that died before completing: never loaded
                shutil.rmtree(directory)
            self.root.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        real = engine.checkpoint_engine
        snapshots = _SnapshotEngine(real, step, self.rank) if background else None
        if snapshots is not None:
            engine.checkpoint_engine = snapshots
        try:
            engine.save_checkpoint(
                str(self.root), tag=directory.name, save_latest=False, exclude_frozen_parameters=self.trainable_only
            )
        finally:
            engine.checkpoint_engine = real
        states = snapshots.pending if snapshots is not None else []
        if snapshots is not None and snapshots.written_now:
            log.warning(
                "checkpoint %s: not enough free host memory to copy %d of this rank's %d state files "
                "(%.2f GB) for the background save; wrote them before the loop went on, as a synchronous save "
                "does (blocked %.1f s so far)",
                directory.name,
                len(snapshots.written_now),
                len(snapshots.written_now) + len(states),
                sum(snapshots.written_now) / 1e9,
                time.perf_counter() - started,
            )
        failure: OSError | None = None
        try:
            torch.save(rng_state(), directory / f"rng.rank{self.rank}.pt")
            if extra is not None:  # tensors and containers of them only: loaded back with weights_only
                torch.save(extra, directory / f"extra.rank{self.rank}.pt")
            if self.rank == 0:
                _write_json_atomic(directory / STATE, {**trainer_state, "format_version": FORMAT_VERSION})
                for name, data in hf_files.items():
                    (directory / "hf" / name).parent.mkdir(parents=True, exist_ok=True)
                    (directory / "hf" / name).write_bytes(data)
            if not background:
                faults.maybe_fail("during_save", step, self.rank)
        except OSError as e:  # a full disk, a quota, a lost mount: every rank must learn of it, not wait
            failure = e
        if distributed.all_reduce(0 if failure is None else 1, op="max").item():
            self._give_up(directory, failure)
        if background:
            self._pending = _Pending(step, directory, states, started)
            self._pending.thread = threading.Thread(
                target=self._write_in_background, args=(self._pending,), name=f"checkpoint-{step}", daemon=True
            )
            self._pending.thread.start()
            return None
        self._write_listing(directory)
        self._complete(step, directory)
        return directory

    @property
    def pending(self) -> bool:
        """Whether a background save has yet to be completed by `finish()`."""
        return self._pending is not None

    def _write_in_background(self, job: _Pending) -> None:
        try:
            faults.maybe_fail("before_write", job.step, self.rank)
            while job.states:
                state, path = job.states.pop(0)  # each copy freed once it is on disk
                # The zip format, unlike DeepSpeed's default, lets the step loop run while bytes are written.
                torch.save(state, path, _use_new_zipfile_serialization=True)
                del state
            faults.maybe_fail("during_save", job.step, self.rank)
            self._write_listing(job.directory)
        except BaseException as e:  # reported by finish(), on the loop's thread
            job.error = e

    def finish(self, block: bool = False) -> Completed | None:
        """Complete the background save once every rank has written its files (a collective call, at a step
        boundary): the marker, `latest`, pruning. Returns what completed now, else None; `block` waits for
        the writes."""
        job = self._pending
        if job is None:  # the same on every rank: saves are collective
            return None
        if block:
            job.thread.join()
        if not distributed.all_reduce(0 if job.thread.is_alive() else 1, op="min").item():
            return None
        self._pending = None
        if distributed.all_reduce(0 if job.error is None else 1, op="max").item():
            if job.error is not None and not isinstance(job.error, OSError):
                raise CheckpointError(f"checkpoint {job.directory.name} could not be written: {job.error!r}") from (
                    job.error
                )
            self._give_up(job.directory, job.error)
        self._complete(job.step, job.directory)
        done = Completed(job.step, job.directory, time.perf_counter() - job.started)
        log.info("checkpoint %s complete, %.1f s after it began", done.directory.name, done.seconds)
        return done

    def _write_listing(self, directory: Path) -> None:
        """This rank's files, on disk (fsync) and listed with size and sha256."""
        # On disk before anything can be pruned in favour of it: a node dying with the shards still in its
        # page cache must not leave a marker over torn files and no older checkpoint.
        mine = _files_of(directory, self.rank)
        for rel in mine:
            _fsync(directory / rel)
        listing = {rel: {"bytes": (directory / rel).stat().st_size, "sha256": _sha256(directory / rel)} for rel in mine}
        _write_json_atomic(directory / f"files.rank{self.rank}.json", listing)

    def _complete(self, step: int, directory: Path) -> None:
        """Every rank's listing, by its hash, goes into the marker (rank 0 writes it): gathered, since the
        ranks' files may lie in different places until the launcher persists them together."""
        hashes = distributed.all_gather_object(_sha256(directory / f"files.rank{self.rank}.json"))
        if self.rank == 0:
            ranks = {str(r): h for r, h in enumerate(hashes)}
            _write_json_atomic(directory / COMPLETE, {"step": step, "world_size": self.world_size, "ranks": ranks})
            if self.shared:
                (self.root / f"{LATEST}.tmp").write_text(directory.name)
                os.replace(self.root / f"{LATEST}.tmp", self.root / LATEST)
                self._prune(keep=directory)
        distributed.barrier()

    def _give_up(self, directory: Path, failure: OSError | None) -> None:
        """A save that cannot complete: its directory stays without a marker (never loaded, removed by the next
        save), older checkpoints are untouched; say so, and how to go on."""
        complete = [d.name for _, d in self.checkpoints() if (d / COMPLETE).exists() and d != directory]
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
        found = self.checkpoints()
        complete = [(s, d) for s, d in found if (d / COMPLETE).exists()]
        keep_set = {d for _, d in complete[-self.keep_last :]} | {keep}
        newest = complete[-1][0] if complete else None
        for step, d in found:
            if d in keep_set:
                continue
            if (d / COMPLETE).exists() or (newest is not None and step < newest):
                log.info("removing checkpoint %s", d)
                shutil.rmtree(d, ignore_errors=True)

    def set_aside_after(self, step: int) -> None:
        """Rename checkpoints newer than `step` (an abandoned branch when a run goes back to an older one), so
        that a later `resume: auto` cannot return to them. Rank 0 only; nothing is deleted."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for s, d in self.checkpoints():
            if s > step:
                target = d.with_name(f"{d.name}.set-aside-{stamp}")
                log.warning("resuming from step %d: setting %s aside as %s", step, d, target.name)
                d.rename(target)

    # -- loading --------------------------------------------------------------------------------------------

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, directory) of every step directory, oldest first (complete or not)."""
        return step_dirs(self.root)

    def problem(self, directory: Path) -> str | None:
        """Why this rank cannot use the checkpoint (its own share of the files), or None."""
        complete, problem = _read_marker(directory)
        if complete is None:
            return problem
        # Each rank checks the files of the writers it stands for: with another world size, every world_size-th.
        for writer in range(self.rank, complete["world_size"], self.world_size):
            problem = _listing_problem(directory, writer, complete["ranks"].get(str(writer)), self.verify)
            if problem:
                return problem
        return None

    def usable(self, directory: Path) -> str | None:
        """Why some rank cannot use `directory` (a collective call; each rank checks its share), or None."""
        mine = self.problem(directory)
        if mine:
            log.warning("rank %d: checkpoint %s is not usable: %s", self.rank, directory, mine)
        if distributed.all_reduce(0 if mine is None else 1, op="max").item():
            return mine or "another rank found its share damaged (its log says how)"
        return None

    def newest_complete(self, before: int | None = None) -> Path | None:
        """The newest checkpoint every rank finds whole (a collective call); damaged ones are reported."""
        for step, directory in reversed(self.checkpoints()):
            if before is not None and step >= before:
                continue
            if self.usable(directory) is None:
                return directory
        return None

    def load_extra(self, directory: Path) -> dict[str, Any]:
        """This rank's extra state saved beside the engine's (AdaLoRA's rank budget); rank 0's on a rank the
        writing run did not have."""
        path = directory / f"extra.rank{self.rank}.pt"
        if not path.is_file():
            path = directory / "extra.rank0.pt"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint was written by a run without this state")
        return torch.load(path, weights_only=True)

    def load(self, engine, directory: Path, optimizer: bool = True, seed: int = 0) -> dict[str, Any]:
        """Restore the engine and this rank's random state from `directory`, on this run's number of workers
        whatever the writer's; returns the trainer state. With `optimizer` False the optimizer's state is not
        restored and its settings (learning rate, betas, weight decay) stay the configured ones; the schedule's
        position is restored. A collective call."""
        complete = json.loads((directory / COMPLETE).read_text())
        state = json.loads((directory / STATE).read_text())
        written_by = complete["world_size"]
        root, tag = directory.parent, directory.name
        universal = written_by != self.world_size and reshard.partitioned(directory)
        if universal:  # ZeRO's slices were cut for `written_by` workers: cut again from one file per parameter
            root, tag = directory, reshard.ensure_universal(directory, self.rank).name
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # torch's, inside DeepSpeed's ZeRO wrapper
        configured = [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups]
        base_lrs = list(getattr(engine.lr_scheduler, "base_lrs", []))
        config = engine._config  # DeepSpeed reads this switch inside load_checkpoint only
        config.load_universal_checkpoint = universal
        try:
            loaded, _ = engine.load_checkpoint(
                str(root),
                tag=tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                load_module_strict=not self.trainable_only,
            )
        finally:
            config.load_universal_checkpoint = False
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {directory}")
        if not optimizer:
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
        rng = directory / f"rng.rank{self.rank}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True))
        else:  # a rank the writing run did not have: seeded apart from every other rank and step
            seed_everything(seed + self.rank + 1_000_003 * state["step"])
        log.info("resumed from %s (step %d)", directory, state["step"])
        return state
