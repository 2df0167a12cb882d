"""The on-disk format of a checkpoint, shared by the Checkpointer, export and storage.

`checkpoints/step_000120/` holds DeepSpeed's shards (each rank its own), one `{part}.rank{r}.pt` per rank for
each part whose state differs by rank (its random state, AdaLoRA's budget), `trainer_state.json` (the step,
the state of the parts that every rank shares, the writer's world size and ZeRO stage, the resolved config),
`hf/` (the model's config and tokenizer, so export needs nothing else), one `files.rank{r}.json` per rank
listing the files it wrote with size and sha256, and last `COMPLETE.json`, which holds each listing's sha256.
`latest` names the newest complete step. A directory without a marker whose listings match is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE.json"
STATE = "trainer_state.json"
LATEST = "latest"
# 2: the shared parts' states under "parts"; 1 had the loop's fields at the top, the data position under
# "data", and AdaLoRA's budget in extra.rank{r}.pt.
FORMAT_VERSION = 2
STEP_DIR_NAME = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rank_|\.rank)(\d+)[._]")
_V1_RANK_FILES = {"adapter": "extra"}
_V1_TOP_LEVEL = {"data", "world_size", "zero_stage", "config", "format_version"}


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every step directory under `root`, by step (complete or not)."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := STEP_DIR_NAME.match(d.name)))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def owner(relative: str) -> int:
    """The rank that wrote a file of a checkpoint: named in DeepSpeed's and our file names, else rank 0."""
    m = _RANK_FILE.search(os.path.basename(relative))
    return int(m.group(1)) if m else 0


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_listing(directory: Path, rank: int) -> None:
    """This rank's files, on disk (fsync) and listed with size and sha256."""
    # On disk before anything can be pruned in favour of it: a node dying with the shards still in its page
    # cache must not leave a marker over torn files and no older checkpoint.
    markers = {COMPLETE} | {p.name for p in directory.glob("files.rank*.json")}
    mine = [
        rel
        for p in sorted(directory.rglob("*"))
        if p.is_file() and (rel := p.relative_to(directory).as_posix()) not in markers and owner(rel) == rank
    ]
    for rel in mine:
        fd = os.open(directory / rel, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    listing = {rel: {"bytes": (directory / rel).stat().st_size, "sha256": sha256(directory / rel)} for rel in mine}
    write_json_atomic(directory / f"files.rank{rank}.json", listing)


def listing_hash(directory: Path, rank: int) -> str:
    return sha256(directory / f"files.rank{rank}.json")


def write_marker(directory: Path, step: int, listing_hashes: list[str]) -> None:
    """The completeness marker over every rank's listing (rank `r`'s hash at index `r`): written last."""
    ranks = {str(r): h for r, h in enumerate(listing_hashes)}
    write_json_atomic(directory / COMPLETE, {"step": step, "world_size": len(listing_hashes), "ranks": ranks})


def point_latest(root: Path, directory: Path) -> None:
    (root / f"{LATEST}.tmp").write_text(directory.name)
    os.replace(root / f"{LATEST}.tmp", root / LATEST)


def read_marker(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the marker, None), or (None, why there is no usable one)."""
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


def listing_problem(directory: Path, rank: int, expected_sha: str | None, verify: str) -> str | None:
    """Why the files rank `rank` wrote are not whole (by size, or by sha256 with verify="sha256"), or None."""
    listing_path = directory / f"files.rank{rank}.json"
    try:
        if expected_sha is not None and sha256(listing_path) != expected_sha:
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
        if verify == "sha256" and sha256(path) != want["sha256"]:
            return f"{rel} does not match its sha256 (corrupted)"
    return None


def checkpoint_problem(directory: Path, verify: str = "size", first: int = 0, stride: int = 1) -> str | None:
    """Why a checkpoint cannot be used, or None if whole: the files of writers first, first + stride, ... (a
    rank's share, when each of `stride` ranks checks its own; by default every writer's, in this process)."""
    if not directory.is_dir():
        return "no such checkpoint directory"
    complete, problem = read_marker(directory)
    if complete is None:
        return problem
    for rank in range(first, complete["world_size"], stride):
        problem = listing_problem(directory, rank, complete["ranks"].get(str(rank)), verify)
        if problem:
            return problem
    return None


def write_trainer_state(directory: Path, step: int, parts: dict[str, Any], about: dict[str, Any]) -> None:
    """Rank 0's shared file: the step, the shared parts' states by name, and what describes the run."""
    write_json_atomic(directory / STATE, {"format_version": FORMAT_VERSION, "step": step, **about, "parts": parts})


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """`trainer_state.json` in this version's shape, whichever version wrote it."""
    state = json.loads((directory / STATE).read_text())
    if state.get("format_version", 1) == 1:
        loop = {k: v for k, v in state.items() if k not in _V1_TOP_LEVEL}
        state["parts"] = {"train": loop, "data": state.get("data")}
    return state


def rank_state_path(directory: Path, part: str, rank: int, format_version: int = FORMAT_VERSION) -> Path:
    name = _V1_RANK_FILES.get(part, part) if format_version == 1 else part
    return directory / f"{name}.rank{rank}.pt"


def read_rank_state(path: Path) -> Any:
    """A part's per-rank state: tensors and containers of them only, never a pickle that could run code."""
    return torch.load(path, weights_only=True)
