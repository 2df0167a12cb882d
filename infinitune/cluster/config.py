"""The `cluster:` section: where the job runs (an embedded Ray, or an existing cluster) and its shape."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from infinitune.trainer.plan import GPUS
from infinitune.typed_config import Section, require


class ClusterConfig(Section):
    """Ray: the cluster to use and the workers to start on it."""

    address: str | None = None
    """null: start an embedded Ray on this machine; `auto`, `ray://HEAD:10001` or `HEAD:6379` to join one."""

    num_workers: int | list[int] = 2
    """Training workers (one process per GPU, or per CPU slot); or a range `[min, max]` for an elastic job: it
    starts on what the cluster has (at least min), continues on the workers that remain when a node is lost
    with no replacement (down to min, from the newest complete checkpoint), and grows again at the next resize
    check once nodes return. The global batch, learning-rate schedule and sample order are the same at every
    size (gradient accumulation makes up the difference)."""

    resize_check_s: float = Field(60.0, gt=0)
    """With a range of workers: how often, while the job runs, Ray looks for room to grow it (each resize
    restarts the workers from the newest complete checkpoint)."""

    worker_start_timeout_s: float = Field(60.0, gt=0)
    """How long Ray Train waits for a worker group to start before it decides again. An elastic job that lost a
    node may first try its old size while the node's resources are still counted, and shrinks only after this
    timeout; lower it to shrink sooner, but above the time workers take to start (image pulls, imports)."""

    use_gpu: bool = False
    """Give each worker a GPU."""

    gpu: str | None = None
    """The GPU the workers run on (H100, H200, B200, A100-80GB, A100-40GB, L40S, L4, A10G, MI300X): `train` and
    `submit` plan the job for it first (`infinitune plan`) and refuse one predicted not to fit in its memory,
    saying what would fit. null: not checked (a CPU run, or a GPU not in the list)."""

    interconnect_gbps: float = Field(400.0, gt=0)
    """Each GPU's network bandwidth between nodes, in Gb/s, for the plan's estimate of the time ZeRO's
    collectives take per step (400 for one 400G NIC per GPU; NVLink within a node is faster)."""

    cpus_per_worker: int = Field(1, gt=0)
    """CPUs reserved for each worker (its DataLoader workers run within them)."""

    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement: PACK (fill nodes), SPREAD, STRICT_PACK or STRICT_SPREAD."""

    max_failures: int = Field(3, ge=-1)
    """Times the workers are restarted after a failure before the job fails (-1: without limit): by Ray, or
    with `--local` by torchrun's agent (its --max-restarts)."""

    storage_path: str = "runs"
    """Where run directories live: a local or shared directory, or a URI such as s3://bucket/prefix (through
    pyarrow.fs; credentials and endpoint from the environment: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, an instance
    role). On a URI, Ray persists the checkpoints there and rank 0 copies the TensorBoard logs and metrics beside
    them after every checkpoint."""

    local_dir: str = "runs"
    """With a URI storage_path: where the driver keeps the run's local directory (config, logs)."""

    object_store_memory_mb: int = 512
    """Object store size for an embedded Ray."""

    def check(self) -> None:
        if isinstance(self.num_workers, list):
            require(
                len(self.num_workers) == 2 and 0 < self.num_workers[0] <= self.num_workers[1],
                "num_workers",
                f"a count, or a range [min, max] with 0 < min <= max; got {self.num_workers}",
            )
        else:
            require(self.num_workers > 0, "num_workers", f"must be positive; got {self.num_workers}")
        require(bool(self.storage_path.strip()), "storage_path", "must name a directory or URI")
        require(
            "@" not in self.storage_path.split("://", 1)[-1].split("/", 1)[0],
            "storage_path",
            "must not hold credentials; give them through the environment (AWS_ACCESS_KEY_ID, ...)",
        )
        require(self.object_store_memory_mb >= 78, "object_store_memory_mb", "Ray needs at least 78 MB")
        require(self.gpu is None or self.gpu in GPUS, "gpu", f"one of {', '.join(GPUS)}, or null; got {self.gpu!r}")

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers: the same number twice unless the job is elastic."""
        if isinstance(self.num_workers, list):
            return self.num_workers[0], self.num_workers[1]
        return self.num_workers, self.num_workers

    @property
    def elastic(self) -> bool:
        low, high = self.worker_range
        return low != high
