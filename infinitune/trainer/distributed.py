"""The process group: set up once per worker process, whoever launched it (torchrun, Ray Train, Slurm)."""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Sequence

import psutil
import torch
import torch.distributed as dist


def use_gpu() -> bool:
    return torch.cuda.is_available()


def prepare_environment() -> None:
    """What must hold before deepspeed is first imported."""
    if not use_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for one and warns


def init_distributed() -> tuple[int, int]:
    """(rank, world size), joining the process group the launcher described in the environment."""
    prepare_environment()
    import deepspeed

    if not use_gpu():
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory op (about a minute, 1.5 GB, the first time
        # on a machine) that serves only inference_all_reduce, which training never calls.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if use_gpu() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.environ.get("MASTER_ADDR"):
        # gloo (the CPU backend, and the host group beside NCCL) otherwise binds to the address the host name
        # resolves to, loopback on many images (127.0.1.1), which the other hosts cannot reach.
        name = interface_toward(os.environ["MASTER_ADDR"])
        if name is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = name
    # Also when the launcher (Ray Train) already made the process group: DeepSpeed's own communication
    # layer wraps it, and without it DeepSpeed sees a world of one.
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu() else "gloo")
    global _HOST_GROUP
    if dist.get_backend() == "gloo" or dist.get_world_size() == 1:
        _HOST_GROUP = None
    elif _HOST_GROUP is None or _HOST_GROUP[0] is not dist.group.WORLD:
        _HOST_GROUP = (dist.group.WORLD, dist.new_group(backend="gloo"))  # collective: every rank, here
    return dist.get_rank(), dist.get_world_size()


# (the default group, a gloo group beside it) when the default is not gloo (NCCL): numbers that live on the
# host are reduced over gloo, never through the device.
_HOST_GROUP = None


def interface_of(address: str) -> str | None:
    """The name of this machine's network interface that holds `address`, or None."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == address for a in addresses):
            return name
    return None


def interface_toward(host: str) -> str | None:
    """The interface this machine would send from to reach `host` (a UDP socket's route: nothing is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return interface_of(s.getsockname()[0])
    except OSError:
        return None


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu() else torch.device("cpu")


def all_reduce(value: float | int | torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A float64 tensor holding `value` reduced over all ranks (sum, max or min)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device()).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


class HostSum:
    """Numbers this rank knows on the host, summed over all ranks over gloo without touching the device: the
    collective starts at construction and `result()` waits for it, so work issued in between (a forward)
    overlaps it and the device's queue is never drained for it."""

    def __init__(self, values: Sequence[float]):
        self._tensor = torch.tensor(values, dtype=torch.float64)
        self._work = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            group = _HOST_GROUP[1] if _HOST_GROUP is not None else None
            self._work = dist.all_reduce(self._tensor, group=group, async_op=True)

    def result(self) -> list[float]:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._tensor.numpy().tolist()  # numpy refuses a device tensor: this cannot hide a device sync


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    """`obj` from every rank, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
