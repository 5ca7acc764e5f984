"""Sequential reference for the short-term (diagonal) memory, one token at a time.

    h_t = exp(log_a_t) * h_{t-1} + x_t        x, log_a: [B, T, D], h0: [B, D]

This is the definition every fast path is tested against; it is slow on purpose.
"""
from __future__ import annotations

import torch


def short_term_naive(x: torch.Tensor, log_a: torch.Tensor, h0: torch.Tensor | None = None):
    """Returns (h [B, T, D] in x's dtype, h_T [B, D] in the compute dtype)."""
    B, T, D = x.shape
    ct = torch.promote_types(x.dtype, torch.float32)
    h = x.new_zeros(B, D, dtype=ct) if h0 is None else h0.to(ct)
    a = log_a.to(ct).exp()
    xs = x.to(ct)
    out = []
    for t in range(T):
        h = a[:, t] * h + xs[:, t]
        out.append(h)
    hs = torch.stack(out, dim=1) if T else x.new_zeros(B, 0, D, dtype=ct)
    return hs.to(x.dtype), h
