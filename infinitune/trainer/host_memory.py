"""How much host memory this process can still take: the system's, or a nearer cgroup limit (a container's,
a Slurm job's). A background checkpoint copies the state into host memory only where it fits."""

from __future__ import annotations

from pathlib import Path

import psutil


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
