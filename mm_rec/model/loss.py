"""Next-token cross-entropy without the [B, T, vocab] logits.

The LM head and the loss run `chunk` tokens at a time, each chunk under activation checkpointing,
so a training step holds one chunk's logits (and their fp32 copy and gradient) instead of every
token's: at 4 x 4096 tokens and vocab 32000 that is gigabytes. Backward recomputes each chunk's
head matmul once: about a third more LM-head FLOPs, a few percent of the step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _head_loss_sum(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    logits = logits if logits.dtype == torch.float64 else logits.float()  # bf16 logits: the loss in fp32
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                          chunk: int = 4096, head_loss=None) -> torch.Tensor:
    """mean over tokens of cross_entropy(head(hidden), targets); hidden [..., D], targets [...].
    The same value and gradients as F.cross_entropy(head(hidden).float().flatten(0, -2), targets.flatten()).
    head_loss: a torch.compile of _head_loss_sum (MMRec100M.compile_blocks), which fuses the fp32
    cast, log-softmax and gather instead of writing the chunk's fp32 logits out."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    # One chunk: recomputing it would not lower the peak (its logits are rebuilt while the whole
    # step's activations are still alive), so it runs plainly.
    grad = torch.is_grad_enabled() and h.shape[0] > chunk
    head_loss = head_loss or _head_loss_sum
    # No randomness in the head: no RNG state to save (which a captured CUDA graph could not read).
    total = sum(checkpoint(head_loss, head, h[i:i + chunk], y[i:i + chunk], use_reentrant=False,
                           preserve_rng_state=False) if grad
                else head_loss(head, h[i:i + chunk], y[i:i + chunk])
                for i in range(0, h.shape[0], chunk))
    return total / y.numel()
