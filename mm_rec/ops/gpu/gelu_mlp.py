"""The FFN, y = gelu(x W_in + b_in) W_out, with GELU inside the matmul that produces its input.

Plain, the FFN's GELU is a pass of its own over the widest activation of the step ([N, ffn_dim],
201 MB in bf16 per layer at 2x8192 with both experts), forward and backward:

    forward   h = x W_in + b_in          (GEMM writes h)
              a = gelu(h)                (reads h, writes a)
              y = a W_out
    backward  da = dy W_out^T            (GEMM writes da)
              a = gelu(h); dh = gelu'(h) da   (reads h and da, writes a and dh)
              dW_out = a^T dy,  dW_in = x^T dh,  db_in = sum dh,  dx = dh W_in^T

Here the two GEMMs that feed GELU (x W_in forward, dy W_out^T backward) are one Triton kernel
each, GELU in their epilogue: forward it writes h (kept for backward) and a; backward it reads h
and writes a and dh, with db_in's partial sums per row block. The intermediate h (forward) and
da (backward) never reach memory: per layer that saves a read of h forward and a write and a read
of da backward. The other three GEMMs stay on cuBLAS. Both inner GEMMs have the model width as
their depth (K = 256): a few K steps a tile, so the kernel's time is its stores.

The maths is the plain form's to rounding: h rounded to the inputs' dtype before gelu (as the plain
form's GEMM output is), da kept fp32 (the plain form rounds it to bf16 first). tests/test_gpu_ops.py
holds both against the PyTorch form; tests/test_kernels_interpreted.py runs them in Triton's
interpreter on the CPU.

Weights come as [E, in, out] (E stacked experts, or 1): x [E, N, in] -> y [E, N, out].
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Tile of the epilogue kernels: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
CONFIG = (128, 128, 64, 8, 3)


@triton.jit
def _gelu_parts(h):
    """gelu(h) and gelu'(h) for fp32 h: h Phi(h) and Phi(h) + h phi(h)."""
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
    return h * cdf, cdf + h * pdf


@triton.jit
def _matmul_gelu_kernel(a_ptr, b_ptr, bias_ptr, h_ptr, act_ptr, dh_ptr, dbias_ptr,
                        M, N, K,
                        s_ae, s_am, s_ak, s_be, s_bk, s_bn,
                        BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc = A[e] @ B[e] for one [BLOCK_M, BLOCK_N] tile, then
    forward  (BACKWARD=0): h = acc (+ bias) rounded, act = gelu(h); stores h and act;
    backward (BACKWARD=1): h loaded, act = gelu(h), dh = gelu'(h) acc; stores act and dh and
             (HAS_BIAS) the tile's column sums of dh into dbias[e, row block, :].
    h, act, dh: contiguous [E, M, N]."""
    pid, e = tl.program_id(0), tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    # N fastest: neighbouring programs share A's rows (read once from memory, then L2); B is small
    pid_m, pid_n = pid // num_n, pid % num_n
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    a_rows = a_ptr + e64 * s_ae + o_m[:, None].to(tl.int64) * s_am
    b_cols = b_ptr + e64 * s_be + o_n[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + o_k
        a = tl.load(a_rows + kk[None, :] * s_ak, mask=(o_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_cols + kk[:, None] * s_bk, mask=(kk[:, None] < K) & (o_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    mask = (o_m[:, None] < M) & (o_n[None, :] < N)
    off = e64 * M * N + o_m[:, None].to(tl.int64) * N + o_n[None, :]
    if BACKWARD:
        h = tl.load(h_ptr + off, mask=mask, other=0.0)
        act, slope = _gelu_parts(h.to(tl.float32))
        dh = (acc * slope).to(h.dtype)
        tl.store(act_ptr + off, act.to(h.dtype), mask=mask)
        tl.store(dh_ptr + off, dh, mask=mask)
        if HAS_BIAS:  # rows past M hold zeros (h = 0 there)
            num_m = tl.cdiv(M, BLOCK_M)
            tl.store(dbias_ptr + (e64 * num_m + pid_m) * N + o_n, tl.sum(dh.to(tl.float32), axis=0),
                     mask=o_n < N)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + e64 * N + o_n, mask=o_n < N, other=0.0).to(tl.float32)[None, :]
        h = acc.to(h_ptr.dtype.element_ty)
        act, _ = _gelu_parts(h.to(tl.float32))
        tl.store(h_ptr + off, h, mask=mask)
        tl.store(act_ptr + off, act.to(h_ptr.dtype.element_ty), mask=mask)


def _launch(a: Tensor, b: Tensor, bias: Optional[Tensor], h: Optional[Tensor], has_bias: bool,
            config=None):
    """a [E, M, K] @ b [E, K, N] with the GELU epilogue. Forward (h None): returns (h, gelu(h)).
    Backward (h given): returns (gelu(h), dh, dbias [E, N] fp32 or None)."""
    E, M, K = a.shape
    N = b.shape[2]
    BM, BN, BK, warps, stages = config or CONFIG
    num_m, num_n = triton.cdiv(M, BM), triton.cdiv(N, BN)
    backward = h is not None
    act = a.new_empty(E, M, N)
    if backward:
        dh = a.new_empty(E, M, N)
        dbias = a.new_empty(E, num_m, N, dtype=torch.float32) if has_bias else act
    else:
        h, dh, dbias = a.new_empty(E, M, N), act, act  # dh, dbias: unused
    bias = bias.contiguous() if bias is not None else act
    _matmul_gelu_kernel[(num_m * num_n, E)](
        a, b, bias, h, act, dh, dbias, M, N, K,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        BACKWARD=backward, HAS_BIAS=has_bias, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        num_warps=warps, num_stages=stages)
    if backward:
        return act, dh, (dbias.sum(1) if has_bias else None)
    return h, act


def hidden_fwd(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], config=None):
    """x [E, N, d] @ w_in [E, d, F] (+ b_in [E, F]) -> (h, gelu(h)), both [E, N, F] in x's dtype."""
    return _launch(x, w_in, b_in, None, b_in is not None, config)


def hidden_bwd(dy: Tensor, w_out: Tensor, h: Tensor, has_bias: bool, config=None):
    """dy [E, N, d], w_out [E, F, d], h [E, N, F] -> (gelu(h), dh = gelu'(h) (dy w_out^T),
    db_in [E, F] fp32, or None without a bias)."""
    return _launch(dy, w_out.transpose(1, 2), None, h, has_bias, config)


# -- the whole FFN as opaque ops (one node each for torch.compile, like the recurrences) ---------
@torch.library.custom_op("mmrec::gelu_mlp_fwd", mutates_args=())
def gelu_mlp_fwd(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor) -> tuple[Tensor, Tensor]:
    """x [E, N, d], w_in [E, d, F], b_in [E, F] or None, w_out [E, F, d], one dtype.
    Returns (gelu(x w_in + b_in) w_out [E, N, d], h [E, N, F] kept for backward)."""
    h, act = hidden_fwd(x, w_in, b_in)
    return torch.bmm(act, w_out), h


@gelu_mlp_fwd.register_fake
def _(x, w_in, b_in, w_out):
    E, N, _ = x.shape
    return x.new_empty(E, N, w_out.shape[2]), x.new_empty(E, N, w_in.shape[2])


@torch.library.custom_op("mmrec::gelu_mlp_bwd", mutates_args=())
def gelu_mlp_bwd(dy: Tensor, x: Tensor, h: Tensor, w_in: Tensor, w_out: Tensor, has_bias: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dw_in, db_in (empty without a bias), dw_out), in the layouts of the inputs."""
    dy = dy.to(h.dtype).contiguous()
    act, dh, db_in = hidden_bwd(dy, w_out, h, has_bias)
    dw_out = torch.bmm(act.transpose(1, 2), dy)
    dw_in = torch.bmm(x.transpose(1, 2), dh)
    dx = torch.bmm(dh, w_in.transpose(1, 2))
    return dx, dw_in, (db_in.to(h.dtype) if has_bias else h.new_empty(0)), dw_out


@gelu_mlp_bwd.register_fake
def _(dy, x, h, w_in, w_out, has_bias):
    E, _, F = h.shape
    db = h.new_empty(E, F) if has_bias else h.new_empty(0)
    return torch.empty_like(x), h.new_empty(w_in.shape), db, h.new_empty(w_out.shape)


def _mlp_setup(ctx, inputs, output):
    x, w_in, b_in, w_out = inputs
    ctx.save_for_backward(x, output[1], w_in, w_out)
    ctx.has_bias = b_in is not None


def _mlp_backward(ctx, dy, _dh):
    x, h, w_in, w_out = ctx.saved_tensors
    dx, dw_in, db_in, dw_out = gelu_mlp_bwd(dy, x, h, w_in, w_out, ctx.has_bias)
    return dx, dw_in, (db_in if ctx.has_bias else None), dw_out


gelu_mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def gelu_mlp_gpu(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor) -> Tensor:
    """gelu(x w_in + b_in) w_out for x [E, N, d], w_in [E, d, F], b_in [E, F] or None, w_out
    [E, F, d] (views welcome), all in x's dtype. The output's own bias is the caller's to add."""
    x = x.contiguous()
    y, _ = gelu_mlp_fwd(x, w_in, b_in, w_out)
    return y
