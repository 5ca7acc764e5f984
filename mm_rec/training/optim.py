"""AdamW and the learning-rate schedule of every stage (ARCHITECTURE.md, "The three stages").

AdamW(β 0.9/0.95), weight decay on matrices only (not on norms, biases or the embedding), a
linear warmup to the peak learning rate, then a cosine decay to 0.1 × peak at the stage's last step.
A parameter whose gradient is None is skipped by AdamW entirely (no moment update, no weight
decay): this is how Stage 2 leaves the idle expert untouched.

The run's learning-rate scale (--lr_scale, halved by each recovery) is part of the schedule: its
base learning rate (LambdaLR's base_lrs, each group's initial_lr) is peak x scale, and
`rescale_schedule` is the one place that moves it.
"""
from __future__ import annotations

import inspect
import math

import torch

BETAS = (0.9, 0.95)
MIN_LR_RATIO = 0.1


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    kwargs = {}
    device = next(model.parameters()).device.type
    if device in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        # One kernel for the whole update, and it can skip a non-finite step on the device
        # (found_inf), which lets the trainer read a step's loss back one step late.
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=BETAS, **kwargs)


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the peak LR for the optimizer step with 0-based index `step`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int):
    """Warmup + cosine over the optimizer's learning rates (peak x scale, as built)."""
    # A closure, not a callable object: LambdaLR then saves no function state, so the scheduler's
    # state_dict stays plain numbers (loadable with weights_only=True).
    def schedule(step: int) -> float:
        return lr_factor(step, warmup_steps, max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def rescale_schedule(optimizer: torch.optim.Optimizer, scheduler, factors: list[float],
                     bases: list[float] | None = None) -> None:
    """Multiply each param group's learning rate by its factor, now and at every later step of
    `scheduler` (any LR scheduler, or None): the group's lr, its base (initial_lr and the
    scheduler's base_lrs; set to `bases` where given, else multiplied too) and the scheduler's
    last lr. A checkpoint resumed with another --lr_scale and a recovery go through here."""
    for i, (group, factor) in enumerate(zip(optimizer.param_groups, factors)):
        rebased = (lambda _: bases[i]) if bases is not None else (lambda old: old * factor)
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] = rebased(group["initial_lr"])
        if scheduler is not None and i < len(getattr(scheduler, "base_lrs", ())):
            scheduler.base_lrs[i] = rebased(scheduler.base_lrs[i])
    if scheduler is not None and hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
