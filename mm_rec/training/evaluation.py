"""Validation loss: the number the trainer logs and the `evaluate` tool reproduces.

`evaluate_loss` is a pure function of its arguments (the model's weights, the data's validation
split and the batch shape), so any tool that calls it with the same arguments gets the same value.
Both functions score through `model.loss`, which runs the LM head and the cross-entropy
`head_chunk` tokens at a time: evaluation never holds the [B, T, vocab] logits (at Stage 2's
2 x 8192 tokens and vocab 32000, 2 GB in fp32).
"""
from __future__ import annotations

import contextlib

import torch


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(model, data, domain: str, expert_type: str | None, batch_size: int, seq_len: int,
                  max_batches: int | None = None, device=None, autocast_dtype: torch.dtype | None = None,
                  chunk_size: int | None = None, rank: int = 0, world_size: int = 1,
                  head_chunk: int = 4096) -> float:
    """Mean token cross-entropy (nats) of `model` on `data`'s validation split of `domain`.

    Sums the per-token losses (model.loss's fp32 mean times the batch's tokens, accumulated in
    fp64) over data.iter_eval_batches(domain, batch_size, seq_len, max_batches) and divides by the
    token count. The model runs in eval mode under no_grad (and autocast to `autocast_dtype` if
    given); its training mode is restored afterwards.

    With world_size > 1 (every rank calls it) rank r scores batches r, r + world_size, ... and the
    sums are all-reduced, so all ranks return the loss over the same consecutive windows one
    process would score: the number depends on batch_size * max_batches, not on the world size.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    try:
        for x, y in data.iter_eval_batches(domain, batch_size, seq_len, max_batches, rank=rank,
                                           world_size=world_size):
            x, y = x.to(device), y.to(device)
            with _autocast(device, autocast_dtype):
                loss = model.loss(x, y, expert_type=expert_type, chunk_size=chunk_size, head_chunk=head_chunk)
            total += loss.double() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    if world_size > 1:
        from .distributed import all_reduce_sum
        sums = all_reduce_sum(torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)]),
                              world_size)
        total, count = sums[0], int(sums[1].item())
    if count == 0:
        return float("nan")
    return float(total.item() / count)
