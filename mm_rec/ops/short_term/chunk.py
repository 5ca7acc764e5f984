"""Parallel chunked form of the short-term (diagonal) memory, h_t = a_t * h_{t-1} + x_t.

Inside each chunk of C tokens a Hillis-Steele scan of the pairs (a, x) runs in log2(C) parallel
steps; the chunk summaries are then scanned the same way across chunks and the carried state is
added back. Products of decays only shrink, so nothing overflows (no exp(-cumsum) tricks).

The backward pass is the same recurrence run in reverse,
    g_t = dh_t + a_{t+1} g_{t+1},   dx_t = g_t,   dlog_a_t = g_t * a_t * h_{t-1},   dh0 = a_0 g_0,
so autograd stores only the inputs and the output, not log2(C) intermediate scans.
"""
from __future__ import annotations

import torch


def _scan(a: torch.Tensor, b: torch.Tensor, dim: int):
    """Inclusive scan of h_t = a_t h_{t-1} + b_t (h_{-1} = 0) along `dim`.

    Returns (cumulative product of a, h). Hillis-Steele: ceil(log2 n) vectorised steps.
    """
    n = a.shape[dim]
    offset = 1
    while offset < n:
        a_hi, b_hi = a.narrow(dim, offset, n - offset), b.narrow(dim, offset, n - offset)
        a_lo, b_lo = a.narrow(dim, 0, n - offset), b.narrow(dim, 0, n - offset)
        b = torch.cat([b.narrow(dim, 0, offset), torch.addcmul(b_hi, a_hi, b_lo)], dim)
        a = torch.cat([a.narrow(dim, 0, offset), a_hi * a_lo], dim)
        offset *= 2
    return a, b


def _chunked_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor, chunk_size: int):
    """h_t = a_t h_{t-1} + x_t for a, x: [B, T, D], h0: [B, D]. Returns (h, h_T). No autograd."""
    B, T, D = x.shape
    C = max(1, min(chunk_size, T))
    n = -(-T // C)
    pad = n * C - T
    if pad:  # a = 1, x = 0 past the end: the state passes through unchanged
        a = torch.cat([a, a.new_ones(B, pad, D)], 1)
        x = torch.cat([x, x.new_zeros(B, pad, D)], 1)
    a = a.view(B, n, C, D)
    x = x.view(B, n, C, D)
    a_cum, h_local = _scan(a, x, dim=2)                      # within each chunk, zero start
    # State at the end of every chunk: S_c = A_c S_{c-1} + H_c, started from h0.
    first = h_local[:, :1, -1] + a_cum[:, :1, -1] * h0[:, None]
    carry_b = torch.cat([first, h_local[:, 1:, -1]], 1)
    _, ends = _scan(a_cum[:, :, -1], carry_b, dim=1)          # [B, n, D]
    starts = torch.cat([h0[:, None], ends[:, :-1]], 1)       # state entering each chunk
    h = torch.addcmul(h_local, a_cum, starts[:, :, None])
    return h.reshape(B, n * C, D)[:, :T], ends[:, -1]


class _ShortTermScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log_a, h0, chunk_size):
        a = log_a.exp()
        h, hT = _chunked_scan(a, x, h0, chunk_size)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk_size = chunk_size
        return h, hT

    @staticmethod
    def backward(ctx, dh, dhT):
        a, h, h0 = ctx.saved_tensors
        dh = torch.zeros_like(h) if dh is None else dh.to(h.dtype)
        if dhT is not None:
            dh = dh.clone()
            dh[:, -1] += dhT.to(h.dtype)
        # Reverse-time recurrence g_t = a_{t+1} g_{t+1} + dh_t.
        a_next = torch.cat([a[:, 1:], a.new_zeros(a.shape[0], 1, a.shape[2])], 1)
        g_rev, _ = _chunked_scan(a_next.flip(1), dh.flip(1), torch.zeros_like(h0), ctx.chunk_size)
        g = g_rev.flip(1)
        h_prev = torch.cat([h0[:, None], h[:, :-1]], 1)
        d_log_a = g * a * h_prev
        dh0 = a[:, 0] * g[:, 0]
        return g, d_log_a, dh0, None


def short_term_chunked(x: torch.Tensor, log_a: torch.Tensor, h0: torch.Tensor | None = None,
                       chunk_size: int = 64):
    """Parallel h_t = exp(log_a_t) h_{t-1} + x_t. x, log_a: [B, T, D]; h0: [B, D] or None.

    Computes in float32 (float64 if the inputs are float64) whatever the input dtype.
    Returns (h [B, T, D] in x's dtype, h_T [B, D] in the compute dtype).
    """
    B, T, D = x.shape
    ct = torch.promote_types(x.dtype, torch.float32)
    h0c = x.new_zeros(B, D, dtype=ct) if h0 is None else h0.to(ct)
    if T == 0:
        return x, h0c
    h, hT = _ShortTermScan.apply(x.to(ct), log_a.to(ct), h0c, int(chunk_size))
    return h.to(x.dtype), hT
