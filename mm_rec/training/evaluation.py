"""Validation loss: the number the trainer logs and the `evaluate` tool reproduces.

`evaluate_loss` is a pure function of its arguments (the model's weights, the data's validation
split and the batch shape), so any tool that calls it with the same arguments gets the same value.
It scores through the one evaluation path, `mm_rec.inference.evaluation.summed_loss` (model.loss
with the LM head in chunks: never the [B, T, vocab] logits), as the held-out files and
`evaluate --text/--code` do.
"""
from __future__ import annotations

import torch

from ..inference.evaluation import summed_loss


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
    batches = data.iter_eval_batches(domain, batch_size, seq_len, max_batches, rank=rank, world_size=world_size)
    total, count = summed_loss(model, batches, expert_type, device, autocast_dtype, chunk_size, head_chunk)
    if world_size > 1:
        from .distributed import all_reduce_sum
        sums = all_reduce_sum(torch.stack([total, torch.tensor(float(count), dtype=torch.float64,
                                                               device=total.device)]), world_size)
        total, count = sums[0], int(sums[1].item())
    if count == 0:
        return float("nan")
    return float(total.item() / count)
