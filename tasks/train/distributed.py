"""The training processes' group and every collective the loop runs, in one place.

On a GPU the group is NCCL, which reduces only tensors on the device: a CPU tensor handed to it fails at the
first logging step (../shared/PITFALLS.md 18). So every collective here takes its tensors on the training
device, and the group also gets a gloo backend for CPU tensors ("cpu:gloo,cuda:nccl"), so that a CPU-side
collective added later still works instead of failing on the first GPU that runs it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def backend(device: torch.device) -> str:
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def training_device() -> torch.device:
    """This process's device: its local rank's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init(device: torch.device) -> tuple[int, int]:
    """Join the group torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR) describes; (rank, world)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend(device), device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size()


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum every rank's gradients, in one flat buffer. A rank with no rows this step adds zeros."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        p.grad = g


def sum_over_ranks(values: list[torch.Tensor | float], device: torch.device) -> torch.Tensor:
    """Scalars (device tensors or host numbers) summed over every rank in one collective, as float64 on `device`."""
    summed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    dist.all_reduce(summed)
    return summed


def max_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value's largest over every rank, in one collective (a peak memory: the process that needed the most)."""
    found = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return dict(zip(values, found.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank: one all-reduce of a scalar (none in a group of one). The loop asks it once a
    step, so that a SIGTERM that reached some ranks stops all of them at the same step."""
    if dist.get_world_size() == 1:
        return flag
    found = torch.tensor([float(flag)], device=device)
    dist.all_reduce(found)
    return bool(found.item())
