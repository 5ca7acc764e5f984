"""AdamW and the learning-rate schedule of every stage (ARCHITECTURE.md, "The three stages").

AdamW(β 0.9/0.95), weight decay on matrices only (not on norms, biases or the embedding), a
linear warmup to the peak learning rate, then a cosine decay to 0.1 × peak at the stage's last step.
A parameter whose gradient is None is skipped by AdamW entirely (no moment update, no weight
decay): this is how Stage 2 leaves the idle expert untouched.
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
    # A closure, not a callable object: LambdaLR then saves no function state, so the scheduler's
    # state_dict stays plain numbers (loadable with weights_only=True).
    def schedule(step: int) -> float:
        return lr_factor(step, warmup_steps, max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
