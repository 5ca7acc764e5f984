"""One optimizer step: the code that trains, used by the trainer, its CUDA-graph capture and bench_train.

    loss, grad_norm, states = train_step(model, optimizer, xs, ys, model.loss, clip_norm=1.0,
                                         autocast_dtype=torch.bfloat16, expert_type="text")

    for each micro-batch i of xs, ys ([accum, B, T]):
        loss_i = loss_fn(xs[i], ys[i], **loss_kwargs) / accum      under autocast
        backward(scale(loss_i))                                      (fp16: GradScaler's scale)
    average gradients and loss over ranks -> unscale -> clip the global norm to clip_norm
    -> finite check -> AdamW step

The finite check never lets a non-finite step change the weights, and decides on the device where
it can: fused AdamW skips its whole update when `found_inf` is 1 (the protocol GradScaler uses),
so the step needs no host synchronisation and can be captured as a CUDA graph; fp16's GradScaler
skips an overflowing step itself; only a non-fused optimizer is checked on the host. The caller
reads the returned loss and gradient norm (device tensors) when it likes and rolls back when they
are not finite. The gradients are left in place (the caller zeroes them).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import distributed as D


def autocast(device_type: str, dtype: torch.dtype | None, cache: bool = True):
    """Autocast to `dtype` (None: full precision). cache=False for a step captured as a CUDA graph,
    which would keep the weight casts of its capture."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=cache)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, xs: torch.Tensor, ys: torch.Tensor,
               loss_fn, *, clip_norm: float, autocast_dtype: torch.dtype | None = None,
               autocast_cache: bool = True, scaler: "torch.amp.GradScaler | None" = None, world_size: int = 1,
               mark_step_begin: bool = False, **loss_kwargs):
    """Forward, loss, backward, gradient clipping, finite check and optimizer update of one step.

    `xs`, `ys`: [accum, B, T] micro-batches of inputs and targets. `loss_fn(x, y, **loss_kwargs)`
    returns the mean loss, or (loss, memory states) when loss_kwargs has return_memory=True (the
    first micro-batch's states are returned). `mark_step_begin`: tell torch.compile's CUDA graphs
    (reduce-overhead) that a new step begins, so it may reuse the last one's outputs.

    Returns (loss averaged over ranks and micro-batches, gradient norm before clipping, memory
    states or None), as device tensors.
    """
    accum = xs.shape[0]
    wants_memory = loss_kwargs.pop("return_memory", None)
    scaling = scaler is not None and scaler.is_enabled()
    total, states = torch.zeros((), device=xs.device), None
    for micro in range(accum):
        if mark_step_begin:
            torch.compiler.cudagraph_mark_step_begin()
        kwargs = loss_kwargs if wants_memory is None else {**loss_kwargs, "return_memory": wants_memory and micro == 0}
        with autocast(xs.device.type, autocast_dtype, autocast_cache):
            out = loss_fn(xs[micro], ys[micro], **kwargs)
        loss, micro_states = out if kwargs.get("return_memory") else (out, None)
        loss = loss / accum
        (scaler.scale(loss) if scaling else loss).backward()
        total += loss.detach()
        states = micro_states if micro_states is not None else states
    D.all_reduce_gradients(model, world_size)
    loss = D.all_reduce_mean(total, world_size)
    if scaling:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if scaling:
        # fp16: an overflowing gradient is routine: GradScaler skips that step and lowers the scale
        # (update); a non-finite loss is not, and is never stepped on.
        if torch.isfinite(loss):
            grad_norm = torch.nan_to_num(grad_norm, nan=0.0, posinf=0.0)
            scaler.step(optimizer)
        scaler.update()
    elif skips_on_device(optimizer):
        # Fused AdamW leaves parameters, moments and step counts untouched where found_inf is 1:
        # a non-finite step changes nothing, with no host sync.
        optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        optimizer.step()
    elif torch.isfinite(loss) and torch.isfinite(grad_norm):  # a host sync: no skipping on the device
        optimizer.step()
    return loss, grad_norm, states


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` can skip a non-finite update on the device (fused AdamW's found_inf)."""
    return bool(optimizer.defaults.get("fused"))


@dataclass
class StepRecord:
    """One optimizer step's loss and gradient norm, on their way to the host."""
    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    memory: dict | None
    t0: float                    # when the step began (host clock)
    seconds: float | None = None
    _host: torch.Tensor | None = None
    _ready: "torch.cuda.Event | None" = None

    def __post_init__(self):
        # Copied to (pinned) host memory as soon as the step is queued, behind an event: reading
        # them waits for this step only, not for the work queued after it (as .item() would).
        values = torch.stack([self.loss.detach().float(), self.grad_norm.detach().float()])
        if values.is_cuda:
            self._host = values.to("cpu", non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = values

    def values(self) -> tuple[float, float]:
        """(loss, grad_norm) as floats."""
        if self._ready is not None:
            self._ready.synchronize()
        loss, grad_norm = self._host.tolist()
        return loss, grad_norm


__all__ = ["train_step", "skips_on_device", "autocast", "StepRecord"]
