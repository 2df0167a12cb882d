"""Runs whose storage is a URI (`cluster.storage_path: s3://bucket/prefix`, or any scheme pyarrow.fs knows).

Ray persists the checkpoints there (`URI/NAME/checkpoints/step_NNNNNN`); rank 0 copies the TensorBoard logs
and metrics.jsonl beside them after every checkpoint; the driver keeps a local run directory (config, logs).
Export, eval and status fetch a checkpoint back into `RUN_DIR/fetched/` and verify it like a local one.
Credentials and endpoints come from the environment (AWS_* variables, an instance role), never from the config.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import yaml

from infinitune.trainer.checkpoint_format import COMPLETE, STEP_DIR_NAME, checkpoint_problem, step_dir

log = logging.getLogger(__name__)

UPLOADED = ("tensorboard", "metrics.jsonl")  # what rank 0 copies beside the checkpoints


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def remote_run(run_dir: str | Path) -> str | None:
    """The run's storage URI (`STORAGE/NAME`) when its config puts it on one, else None."""
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return None
    cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    storage = str((cfg.get("cluster") or {}).get("storage_path", ""))
    return f"{storage.rstrip('/')}/{cfg['name']}" if is_uri(storage) else None


def upload(run_dir: Path, uri: str) -> None:
    """Copy the run's TensorBoard logs and metrics beside its checkpoints (best effort: a failed copy costs
    a later one nothing, and training goes on)."""
    import pyarrow.fs as pafs

    for name in UPLOADED:
        source = run_dir / name
        if not source.exists():
            continue
        try:
            pafs.copy_files(str(source), f"{uri}/{name}")
        except Exception as e:  # the storage being briefly unreachable must not stop training
            log.warning("could not copy %s to %s: %s", source, uri, e)


def remote_checkpoints(uri: str) -> list[tuple[int, str, bool]]:
    """(step, path within the file system, has its completeness marker) of `URI/checkpoints/step_*`, oldest
    first."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(f"{uri}/checkpoints")
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as e:
        raise FileNotFoundError(f"cannot list {uri}/checkpoints: {e}") from None
    found = []
    for entry in entries:
        match = STEP_DIR_NAME.match(entry.base_name)
        if entry.type == pafs.FileType.Directory and match:
            marker = fs.get_file_info(f"{entry.path}/{COMPLETE}")
            found.append((int(match.group(1)), entry.path, marker.type == pafs.FileType.File))
    return sorted(found)


def fetch_checkpoint(uri: str, cache: Path, step: int | None = None) -> Path:
    """The checkpoint of `step`, or the newest complete one, copied from `uri` into `cache` and verified
    (sizes and sha256); a damaged one is skipped with a warning, as locally."""
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(uri)
    listed = remote_checkpoints(uri)
    candidates = [c for c in listed if step is None or c[0] == step]
    if step is not None and not candidates:
        raise FileNotFoundError(f"{uri}/checkpoints has no step {step}; it has {[s for s, _, _ in listed]}")
    for found_step, path, complete in reversed(candidates):
        if not complete:
            log.warning("skipping %s: no %s (an unfinished save)", path, COMPLETE)
            continue
        target = step_dir(cache, found_step)
        if not target.exists() or checkpoint_problem(target, "sha256") is not None:
            cache.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
            log.info("fetching %s/checkpoints/%s", uri, target.name)
            pafs.copy_files(path, str(staging), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        problem = checkpoint_problem(target, "sha256")
        if problem is None:
            return target
        log.warning("skipping %s: %s", path, problem)
    raise FileNotFoundError(f"no complete checkpoint under {uri}/checkpoints")
