"""Checks made before the first step, so that a run that cannot work stops before writing anything.

Each raises a one-line UserError for what surely fails and returns warning lines for what may.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..utils.errors import UserError
from . import guards
from .memory_estimate import available_memory, estimate_step_memory, memory_verdict

GRAPH_DEVICES = ("cuda",)  # where --cuda_graph captures (tests add "cpu": the same step, uncaptured)


def check_graphable(device: torch.device, world_size: int, precision: str, dropout: float,
                    gradient_checkpointing: bool) -> None:
    """--cuda_graph's requirements."""
    if device.type not in GRAPH_DEVICES:
        raise UserError(f"--cuda_graph needs a CUDA device (training runs on {device}); drop the flag")
    if world_size > 1:
        raise UserError("--cuda_graph runs in one process; drop it under torchrun (or train on one GPU)")
    if precision == "fp16":
        raise UserError("--cuda_graph cannot capture fp16's loss scaling (it decides on the host); "
                        "use --precision bf16")
    if dropout > 0 and gradient_checkpointing:
        raise UserError("--cuda_graph with --gradient_checkpointing needs dropout 0 "
                        "(recomputing dropout would need the RNG state, which a graph cannot read)")


def check_writable(directory: Path) -> None:
    """Fail before training, not at the first checkpoint, when the directory cannot be written."""
    probe = directory / f".write_test_{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to checkpoint directory {directory} ({e.strerror or e}); "
                        f"pick another --checkpoint_dir") from None


def memory_warnings(device: torch.device, model_config, num_params: int, specs, gradient_checkpointing: bool,
                    half_precision: bool) -> dict[str, str]:
    """Each stage's memory estimate against the device's free memory: a UserError when one surely
    cannot fit, else {stage: warning line} for those that may not."""
    available, most = available_memory(device)
    if available is None:
        return {}
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    available //= local  # processes of one host share its RAM
    most = most // local if most is not None else None
    warnings = {}
    for spec in specs:
        estimate = lambda **kw: estimate_step_memory(
            model_config, num_params, experts=1 if spec.data == "alternate" else 2,
            half_precision=half_precision, **kw)
        refusal, warning = memory_verdict(estimate, available, most, spec.name, spec.batch_size, spec.seq_len,
                                          gradient_checkpointing)
        if refusal:
            raise UserError(refusal)
        if warning:
            warnings[spec.name] = warning
    return warnings


def disk_warning(directory: Path, num_params: int, specs, keep_last: int) -> str | None:
    """A line when the checkpoints this run keeps will not fit on its disk."""
    checkpoint_bytes = 12 * num_params  # fp32 weights and AdamW's two moments; the rest is small
    files = sum(guards.checkpoints_kept(spec.max_steps, spec.checkpoint_interval, keep_last) for spec in specs)
    return guards.disk_warning(directory, checkpoint_bytes, files)


def has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton as triton_available
        return triton_available()
    except ImportError:
        return False


__all__ = ["GRAPH_DEVICES", "check_graphable", "check_writable", "memory_warnings", "disk_warning", "has_triton"]
