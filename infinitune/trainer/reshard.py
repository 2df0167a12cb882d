"""Continuing a checkpoint on another number of workers.

What a checkpoint holds per worker depends on how ZeRO partitioned it: at stage 0 the model and optimizer are
whole in `mp_rank_00_model_states.pt` and any number of workers loads them as they are; at stages 1-3 each
rank's file holds its slice of the flat fp32 weights and
the optimizer's moments, cut for the world size that wrote it. DeepSpeed's universal checkpoint turns those
slices into one file per parameter and state (`zero/<name>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`, the
optimizer's step), which ZeRO then cuts again for any world size.

The conversion (`deepspeed.checkpoint.ds_to_universal`) runs once per file system where the run resumes, into
`step_NNNNNN/universal/`. Like the checkpoint itself it is complete or absent: written under a staging name,
marked, then renamed; a staging directory left by a worker that died converting is removed and done again (one
converter per directory at a time: see `ensure_universal`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from infinitune.trainer import distributed
from infinitune.trainer.checkpoint_errors import CheckpointError

log = logging.getLogger(__name__)

UNIVERSAL = "universal"
MARKER = "UNIVERSAL_COMPLETE.json"


def partitioned(directory: Path) -> bool:
    """Whether the checkpoint's optimizer state is cut per rank (ZeRO 1-3; told by the files, whatever wrote
    them)."""
    return any(directory.glob("*zero_pp_rank_*optim_states.pt"))


def universal_dir(directory: Path) -> Path:
    return directory / UNIVERSAL


def is_converted(directory: Path) -> bool:
    return (universal_dir(directory) / MARKER).is_file()


def convert(directory: Path) -> Path:
    """The universal form of checkpoint `directory`, converted now unless it already is (one process)."""
    target = universal_dir(directory)
    if is_converted(directory):
        return target
    from deepspeed.checkpoint import ds_to_universal

    started = time.perf_counter()
    staging = directory / f"{UNIVERSAL}.staging-{socket.gethostname()}-{os.getpid()}"
    for leftover in [*directory.glob(f"{UNIVERSAL}.staging-*"), target]:
        shutil.rmtree(leftover, ignore_errors=True)  # a conversion that died part way: never used
    args = argparse.Namespace(
        input_folder=str(directory),
        output_folder=str(staging),
        # In-process: a worker holds the process group's threads, which a forked pool would copy half-alive.
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our checkpoints carry no Megatron-style universal info, nor need it
    )
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            ds_to_universal.main(args)
    except Exception as e:  # the same at every restart: the job ends with it (see cluster.ray_job)
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(
            f"{directory}: DeepSpeed could not convert the checkpoint to its universal form ({e!r}); resume on "
            "the number of workers that wrote it. DeepSpeed's output:\n" + printed.getvalue()[-4000:]
        ) from e
    finally:
        # ds_to_universal names its output in a `latest_universal` file beside it; nothing here reads that.
        (directory / "latest_universal").unlink(missing_ok=True)
    log.debug("ds_to_universal output:\n%s", printed.getvalue())
    (staging / MARKER).write_text(json.dumps({"seconds": round(time.perf_counter() - started, 3)}))
    os.replace(staging, target)
    log.info("converted %s to DeepSpeed's universal form in %.1f s", directory.name, time.perf_counter() - started)
    return target


def ensure_universal(directory: Path, rank: int) -> Path:
    """The universal form of `directory` as this rank sees it, converted by as few ranks as can (a collective
    call). First the lowest rank reading each path converts, the others wait: one conversion per directory on a
    file system every node shares. Then ranks that still do not see it (a node-local copy at the same path on
    another host) convert theirs, one per host and path. Ranks that downloaded their own copy (object storage)
    convert their own."""
    here = (_machine(), str(directory.resolve()))
    ranks = distributed.all_gather_object(here)
    first = next(r for r, (_, path) in enumerate(ranks) if path == here[1]) == rank
    _converted_by(first, directory)
    missing = not is_converted(directory)
    _converted_by(missing and ranks.index(here) == rank, directory)
    return universal_dir(directory)


def _machine() -> str:
    """This machine: its host name and boot id (two machines may share a name; network-namespace hosts on one
    machine share the boot id but not the name)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _converted_by(converter: bool, directory: Path) -> None:
    """`directory` converted where `converter`; every rank waits, and learns of a failure anywhere."""
    failure = None
    if converter:
        try:
            convert(directory)
        except Exception as e:  # every rank must learn of it, not wait
            failure = e
    if distributed.all_reduce(0 if failure is None else 1, op="max").item():
        if failure is not None:
            raise failure
        raise CheckpointError(f"{directory}: another worker could not convert the checkpoint (its log says why)")
