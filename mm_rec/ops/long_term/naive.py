"""Sequential reference for the long-term matrix memory (gated linear attention), per head:

    M_t = diag(exp(log_alpha_t)) M_{t-1} + k_t^T v_t,     o_t = (scale * q_t) M_t

q, k, log_alpha: [B, T, H, Dk]; v: [B, T, H, Dv]; M0: [B, H, Dk, Dv]. One token at a time.
"""
from __future__ import annotations

import torch


def long_term_naive(q, k, v, log_alpha, M0=None, scale: float | None = None):
    """Returns (o [B, T, H, Dv] in q's dtype, M_T [B, H, Dk, Dv] in the compute dtype)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    in_dtype = q.dtype
    ct = torch.promote_types(q.dtype, torch.float32)
    scale = Dk ** -0.5 if scale is None else scale
    M = q.new_zeros(B, H, Dk, Dv, dtype=ct) if M0 is None else M0.to(ct)
    q, k, v, alpha = q.to(ct) * scale, k.to(ct), v.to(ct), log_alpha.to(ct).exp()
    out = []
    for t in range(T):
        M = alpha[:, t, :, :, None] * M + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], M))
    o = torch.stack(out, dim=1) if T else q.new_zeros(B, 0, H, Dv)
    return o.to(in_dtype), M
