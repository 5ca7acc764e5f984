"""Parallel chunked form of the long-term matrix memory (chunked gated linear attention).

Split the sequence into chunks of C tokens and let b_t be the within-chunk cumulative log decay.
- intra-chunk:  o_t += sum_{s<=t} (q_t * exp(b_t - b_s) . k_s) v_s   (exact pairwise C x C x Dk form;
  every exponent is <= 0, so nothing overflows however strong the decay)
- chunk summary: dM_c = sum_s (k_s * exp(b_C - b_s))^T v_s
- carried state: M_c = diag(exp(b_C)) M_{c-1} + dM_c, which is a diagonal linear recurrence over
  chunks, so it reuses the short-term scan (its decay broadcasts over the value dimension)
- inter-chunk:  o_t += (q_t * exp(b_t)) M_{c-1}
All of it is plain differentiable PyTorch; the C x C x Dk pairwise tensor is why C is small (16).
"""
from __future__ import annotations

import torch

from ..short_term.chunk import short_term_chunked


def long_term_chunked(q, k, v, log_alpha, M0=None, scale: float | None = None, chunk_size: int = 16):
    """q, k, log_alpha: [B, T, H, Dk]; v: [B, T, H, Dv]; M0: [B, H, Dk, Dv] or None.

    Returns (o [B, T, H, Dv] in q's dtype, M_T [B, H, Dk, Dv] in the compute dtype, float32 or
    float64).
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    in_dtype = q.dtype
    ct = torch.promote_types(q.dtype, torch.float32)
    scale = Dk ** -0.5 if scale is None else scale
    M0 = q.new_zeros(B, H, Dk, Dv, dtype=ct) if M0 is None else M0.to(ct)
    if T == 0:
        return v, M0
    C = max(1, min(chunk_size, T))
    n = -(-T // C)
    pad = n * C - T

    def chunks(t):  # [B, T, H, D] -> [B, H, n, C, D], zero-padded (log_alpha = 0 keeps M as is)
        t = t.to(ct)
        if pad:
            t = torch.cat([t, t.new_zeros(B, pad, H, t.shape[-1])], 1)
        return t.view(B, n, C, H, t.shape[-1]).permute(0, 3, 1, 2, 4)

    q, k, v, g = chunks(q) * scale, chunks(k), chunks(v), chunks(log_alpha)
    b = g.cumsum(3)                                           # [B, H, n, C, Dk]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = (b.unsqueeze(4) - b.unsqueeze(3)).masked_fill(~causal[:, :, None], float("-inf"))
    scores = (q.unsqueeze(4) * k.unsqueeze(3) * diff.exp()).sum(-1)   # [B, H, n, C, C]
    o = scores @ v

    b_last = b[:, :, :, -1:]                                  # [B, H, n, 1, Dk]
    dM = (k * (b_last - b).exp()).transpose(-1, -2) @ v      # [B, H, n, Dk, Dv]
    flat = lambda t: t.permute(0, 2, 1, 3, 4).reshape(B, n, H * Dk * Dv)
    log_decay = b_last.transpose(-1, -2).expand(B, H, n, Dk, Dv)
    M_ends, M_T = short_term_chunked(flat(dM), flat(log_decay), M0.reshape(B, -1))
    M_ends = M_ends.view(B, n, H, Dk, Dv).permute(0, 2, 1, 3, 4)
    M_starts = torch.cat([M0[:, :, None], M_ends[:, :, :-1]], 2)
    o = o + (q * b.exp()) @ M_starts

    o = o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, Dv)[:, :T]
    return o.to(in_dtype), M_T.view(B, H, Dk, Dv)
