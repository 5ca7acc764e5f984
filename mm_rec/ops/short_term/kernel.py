"""The short-term memory h_t = exp(log_a_t) h_{t-1} + x_t on CUDA: a Triton scan (fp32 throughout)
wrapped as an opaque torch.library op with its autograd, `short_term_kernel`.

The sequence is cut into `NS` segments so that B x (D / BD) x NS programs fill the GPU. Inside a
program, tiles of BT tokens x BD channels are scanned with `tl.associative_scan` over the pairs
(a, x) -> (a1 a2, a2 x1 + x2) and the carried state is added back tile by tile.
  pass 1 (NS > 1 only): each segment, started from zero, reduces to (sum log a, its final state);
  pass 2: each program folds the summaries of the segments before it into its entering state
          (h0 first) and rescans its segment from there, writing h.
The backward pass is the same recurrence run backwards in time over the output gradients,
    g_t = dh_t + a_{t+1} g_{t+1},   dx_t = g_t,   dlog_a_t = g_t a_t h_{t-1},
which the same kernel does with REVERSE (rows read from the segment's end, the decay read one
token ahead); pass 2 also writes dlog_a.

Why a custom op: torch.compile sees it as one opaque node, so the whole training step compiles and
can be CUDA-graphed. Without CUDA the kernel runs only in Triton's interpreter (TRITON_INTERPRET=1),
as tests/ops/test_kernels_interpreted.py runs it on the CPU.
"""
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class ScanConfig:
    """A launch configuration: tile (block_t tokens x block_d channels), warps per program, and
    programs wanted per SM when the sequence is cut into segments."""
    block_t: int = 32
    block_d: int = 32
    num_warps: int = 2
    programs_per_sm: int = 8


# The fastest of 54 configurations at every shape swept on an H100 (benchmarks/sweep_diag_scan.py;
# GPU time forward + backward against 64x64 tiles, 4 warps, 4 programs per SM: 172 vs 194 us at
# 4x8192, 89 vs 99 at 2x8192, 22 vs 26 at 8x512).
SCAN_CONFIG = ScanConfig()


@triton.jit
def _combine(a1, x1, a2, x2):
    return a1 * a2, a2 * x1 + x2


@triton.jit
def diag_scan_kernel(X, G, H, HPREV, H0, SUM_A, SUM_X, DG, T, NS, SEG,
                     D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr,
                     APPLY: tl.constexpr, HAS_H0: tl.constexpr):
    i_d, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    cols = i_d * BD + tl.arange(0, BD)
    cmask = cols < D
    base = i_b * T * D
    rows = tl.arange(0, BT)
    carry = tl.zeros([BD], dtype=tl.float32)
    if APPLY:  # the state entering this segment, from the summaries of the segments before it
        if REVERSE:
            for jj in range(0, NS):  # segments after this one, last first
                j = NS - 1 - jj
                la = tl.load(SUM_A + (i_b * NS + j) * D + cols, mask=cmask & (j > i_s), other=0.0)
                sx = tl.load(SUM_X + (i_b * NS + j) * D + cols, mask=cmask & (j > i_s), other=0.0)
                carry = tl.exp(la) * carry + sx  # (0, 0) summaries leave it unchanged
        else:
            if HAS_H0:
                carry = tl.load(H0 + i_b * D + cols, mask=cmask, other=0.0).to(tl.float32)
            for j in range(0, NS):  # segments before this one, first first
                la = tl.load(SUM_A + (i_b * NS + j) * D + cols, mask=cmask & (j < i_s), other=0.0)
                sx = tl.load(SUM_X + (i_b * NS + j) * D + cols, mask=cmask & (j < i_s), other=0.0)
                carry = tl.exp(la) * carry + sx
    h0row = tl.zeros([BD], dtype=tl.float32)
    if HAS_H0:
        h0row = tl.load(H0 + i_b * D + cols, mask=cmask, other=0.0).to(tl.float32)
    sum_log = tl.zeros([BD], dtype=tl.float32)
    seg_start = i_s * SEG
    for i in range(0, SEG, BT):
        if REVERSE:
            t = seg_start + SEG - 1 - i - rows
        else:
            t = seg_start + i + rows
        m = (t < T)[:, None] & cmask[None, :]
        offs = base + t[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        if REVERSE:  # decay applied going backwards from t + 1 to t is a_{t+1}
            mn = (t + 1 < T)[:, None] & cmask[None, :]
            lg = tl.load(G + offs + D, mask=mn, other=0.0).to(tl.float32)
        else:
            lg = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        A, S = tl.associative_scan((tl.exp(lg), x), axis=0, combine_fn=_combine)
        h = S + A * carry[None, :]
        carry = tl.sum(tl.where((rows == BT - 1)[:, None], h, 0.0), axis=0)
        sum_log += tl.sum(lg, axis=0)
        if APPLY:
            tl.store(H + offs, h.to(H.dtype.element_ty), mask=m)
            if REVERSE:  # dlog_a_t = g_t * a_t * h_{t-1}
                lg_t = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
                mp = (t >= 1)[:, None] & m
                hp = tl.load(HPREV + offs - D, mask=mp, other=0.0).to(tl.float32)
                if HAS_H0:
                    hp = tl.where((t == 0)[:, None], h0row[None, :], hp)
                tl.store(DG + offs, (h * tl.exp(lg_t) * hp).to(DG.dtype.element_ty), mask=m)
    if not APPLY:
        tl.store(SUM_A + (i_b * NS + i_s) * D + cols, sum_log, mask=cmask)
        tl.store(SUM_X + (i_b * NS + i_s) * D + cols, carry, mask=cmask)


def _segments(B, T, D, num_sms=132, config: ScanConfig = SCAN_CONFIG):
    """(number of segments, segment length): lengths a multiple of block_t, about
    programs_per_sm programs per SM."""
    BT, BD = config.block_t, config.block_d
    want = max(1, (config.programs_per_sm * num_sms) // (B * triton.cdiv(D, BD)))
    ns = max(1, min(want, triton.cdiv(T, BT)))
    seg = triton.cdiv(triton.cdiv(T, ns), BT) * BT
    return triton.cdiv(T, seg), seg


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """The GPU's SM count (132 on an H100 or H200, where the configuration was swept); 132 off
    CUDA (Triton's interpreter on the CPU)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _run(x, g, h0, reverse, hprev=None, config: ScanConfig = SCAN_CONFIG):
    B, T, D = x.shape
    BT, BD = config.block_t, config.block_d
    ns, seg = _segments(B, T, D, _num_sms(x.device), config)
    out = torch.empty(B, T, D, device=x.device, dtype=torch.float32)
    dg = torch.empty_like(out) if reverse else out
    sum_a = sum_x = out  # unused when ns == 1
    if ns > 1:
        sum_a = torch.empty(B, ns, D, device=x.device, dtype=torch.float32)
        sum_x = torch.empty_like(sum_a)
        diag_scan_kernel[(triton.cdiv(D, BD), ns, B)](
            x, g, out, hprev if reverse else x, h0 if h0 is not None else x, sum_a, sum_x, dg,
            T, ns, seg, D=D, BT=BT, BD=BD, REVERSE=reverse, APPLY=False, HAS_H0=h0 is not None,
            num_warps=config.num_warps)
    diag_scan_kernel[(triton.cdiv(D, BD), ns, B)](
        x, g, out, hprev if reverse else x, h0 if h0 is not None else x, sum_a, sum_x, dg,
        T, ns, seg, D=D, BT=BT, BD=BD, REVERSE=reverse, APPLY=True, HAS_H0=h0 is not None,
        num_warps=config.num_warps)
    return out, dg


def diag_scan_fwd(x, log_a, h0=None, config: ScanConfig = SCAN_CONFIG):
    """x, log_a: [B, T, D] contiguous; h0: [B, D] fp32 or None. Returns h [B, T, D] fp32."""
    return _run(x, log_a, h0, reverse=False, config=config)[0]


def diag_scan_bwd(dh, log_a, h, h0=None, config: ScanConfig = SCAN_CONFIG):
    """dh: [B, T, D] gradient of h (the final state's gradient already added at T-1).
    Returns (dx, dlog_a), both fp32."""
    return _run(dh, log_a, h0, reverse=True, hprev=h, config=config)


# -- the op: forward, backward and autograd, opaque to torch.compile ------------------------------
Tensor = torch.Tensor


@torch.library.custom_op("mmrec::diag_scan_fwd", mutates_args=())
def scan_fwd(x: Tensor, g: Tensor, h0: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """x, g: [B, T, D] fp32 contiguous; h0: [B, D] fp32 or None. Returns (h fp32, h_T fp32)."""
    h = diag_scan_fwd(x, g, h0)
    return h, h[:, -1].clone()


@scan_fwd.register_fake
def _(x, g, h0):
    return torch.empty_like(x), x.new_empty(x.shape[0], x.shape[2])


@torch.library.custom_op("mmrec::diag_scan_bwd", mutates_args=())
def scan_bwd(g: Tensor, h: Tensor, h0: Optional[Tensor], dh: Tensor, dhT: Optional[Tensor]
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Reverse scan: dx_t = dh_t + a_{t+1} dx_{t+1}, dlog_a_t = dx_t a_t h_{t-1}, dh0 = a_0 dx_0."""
    dh = dh.float().contiguous()
    if dhT is not None:  # the final state is h[:, -1]: its gradient joins the last token's
        dh = dh.clone()
        dh[:, -1] += dhT
    dx, dg = diag_scan_bwd(dh, g, h, h0)
    dh0 = h.new_empty(0) if h0 is None else dx[:, 0] * g[:, 0].exp()
    return dx, dg, dh0


@scan_bwd.register_fake
def _(g, h, h0, dh, dhT):
    dh0 = h.new_empty(0) if h0 is None else torch.empty_like(h0)
    return torch.empty_like(h), torch.empty_like(g), dh0


def _scan_setup(ctx, inputs, output):
    _, g, h0 = inputs
    ctx.save_for_backward(g, output[0], h0)
    ctx.has_h0 = h0 is not None


def _scan_backward(ctx, dh, dhT):
    g, h, h0 = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros_like(h)
    dx, dg, dh0 = scan_bwd(g, h, h0 if ctx.has_h0 else None, dh, dhT)
    return dx, dg, (dh0 if ctx.has_h0 else None)


scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)


def short_term_kernel(x: Tensor, log_a: Tensor, h0: Optional[Tensor] = None):
    """short_term_memory on the Triton scan: returns (h [B, T, D] in x's dtype, h_T [B, D] fp32)."""
    if x.shape[1] == 0:
        return x, (x.new_zeros(x.shape[0], x.shape[2], dtype=torch.float32) if h0 is None else h0.float())
    h0 = None if h0 is None else h0.float().contiguous()
    h, hT = scan_fwd(x.float().contiguous(), log_a.float().contiguous(), h0)
    return h.to(x.dtype), hT
