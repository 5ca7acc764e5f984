"""Data-parallel training across processes started by torchrun.

    torchrun --nproc_per_node=4 -m mm_rec.scripts.train_modular --stage all --batch_size 8

Each process trains on its own slice of the global batch (`--batch_size` per process); after the
backward pass the gradients are averaged with one all-reduce per bucket, so every rank applies the
same update. We average explicitly instead of wrapping the model in DistributedDataParallel because
Stage 2 trains one expert at a time: the idle expert's gradients must stay None (so AdamW neither
steps nor decays it), and averaging exactly the gradients that exist keeps that true on every rank.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_BUCKET_ELEMENTS = 32 * 1024 * 1024  # gradients flattened per all-reduce (128 MB in fp32)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(rank=int(os.environ["RANK"]), world_size=world_size,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return info


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` (picklable) on every rank; `obj` itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_parameters(model: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def all_reduce_gradients(model: torch.nn.Module, world_size: int) -> None:
    """Average the existing gradients over ranks (parameters whose grad is None are left alone)."""
    if world_size <= 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None and (not bucket or (size + g.numel() <= _BUCKET_ELEMENTS and g.dtype == bucket[0].dtype)):
            bucket.append(g)
            size += g.numel()
            continue
        if bucket:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= world_size
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        bucket, size = ([g], g.numel()) if g is not None else ([], 0)


def all_reduce_sum(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum of a tensor over ranks (the tensor itself when there is one process)."""
    if world_size <= 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean of a tensor over ranks (a NaN on any rank makes it NaN everywhere)."""
    return value if world_size <= 1 else all_reduce_sum(value, world_size) / world_size
