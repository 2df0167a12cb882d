"""The process group: set up once per worker process, whoever launched it (torchrun, Ray Train, Slurm)."""

from __future__ import annotations

import importlib
import os

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
    # Also when the launcher (Ray Train) already made the process group: DeepSpeed's own communication
    # layer wraps it, and without it DeepSpeed sees a world of one.
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu() else torch.device("cpu")


def all_reduce(value: float | int | torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A float64 tensor holding `value` reduced over all ranks (sum, max or min)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device()).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


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


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
