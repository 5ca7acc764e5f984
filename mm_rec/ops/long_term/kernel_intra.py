"""The long-term memory's work inside each chunk, one Triton program per (chunk, sequence, head).

With the states at chunk boundaries from kernel_states.py (S: the state a chunk starts from, dS':
the gradient of the state it ends with), every chunk is independent:

    forward   o_i  = scale (q_i 2^(g_i)) S + scale sum_{j<=i} A_ij v_j,
              A_ij = sum_k q_ik k_jk 2^(g_ik - g_jk)
    backward  dA_ij = scale do_i . v_j                                     (j <= i)
              dv_j  = scale sum_{i>=j} A_ij do_i + (k_j 2^(g_L - g_j)) dS'
              dq_i  = sum_{j<=i} dA_ij k_j 2^(g_i - g_j) + scale 2^(g_i) (do_i S^T)
              dk_j  = sum_{i>=j} dA_ij q_i 2^(g_i - g_j) + 2^(g_L - g_j) (v_j dS'^T)
              dg    = reverse cumsum in the chunk of  q dq - k dk  (+ at the last token L:
                      sum_j k_j 2^(g_L - g_j)(v_j dS'^T) + 2^(g_L) rowsum(S * dS'))

g is the base-2 cumulative log-decay inside the chunk (chunk_cumsum below). The pairwise decays
2^(g_i - g_j) (j <= i) never exceed 1, but the tensor cores need them factorised: with r the decay
at the chunk's middle token, A = (q 2^(g - r)) (k 2^(r - g))^T, masked causal. That is used when
every |g - r| in the chunk is under 60 (factors between 2^-60 and 2^60): decays above 2^-3.75 = 0.074
a token, which the model's log(alpha) = logsigmoid(.) / 16 gives for any pre-activation above -41.
A chunk with stronger decays is computed exactly instead, a column of A at a time, every exponent
<= 0: slower, never wrong, however strong the decay. The other exponents (2^(g_i) against the state
S, 2^(g_L - g_j) into the final state) are <= 0 already.

fla-core does the same maths in 3 kernels forward and 4 backward (plus the cumulative sums), with
the scores A written to memory in between. Here a chunk takes one kernel forward and one backward
after the state passes: 3 and 8 matmuls of 32 x 32 x 32 on the tensor cores in the inputs' dtype
(bf16, or tf32 for fp32), fp32 accumulation. On an H100 the op's GPU time forward + backward is a
third less than with fla's kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BT = 32  # tokens a chunk


@triton.jit
def _cumsum_kernel(g, out, T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_c * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    off = ((i_b.to(tl.int64) * T + o_t[:, None]) * H + i_h) * K + o_k[None, :]
    m = (o_t[:, None] < T) & (o_k[None, :] < K)
    b_g = tl.load(g + off, mask=m, other=0.0).to(tl.float32)
    # times 1 / ln 2: base-2 log-decays, so the kernels can use exp2
    tl.store(out + off, tl.cumsum(b_g, axis=0) * 1.4426950408889634, mask=m)


def chunk_cumsum(g: torch.Tensor, chunk_size: int = BT) -> torch.Tensor:
    """[B, T, H, K] natural log-decays -> their cumulative sums inside each chunk, base 2, fp32."""
    B, T, H, K = g.shape
    out = torch.empty_like(g, dtype=torch.float32)
    _cumsum_kernel[(triton.cdiv(T, chunk_size), B * H)](g, out, T, H=H, K=K, BT=chunk_size,
                                                        BK=triton.next_power_of_2(K), num_warps=4)
    return out


@triton.jit
def _rows_as_is(ptr, o_t, T, i_h, bos, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """[len(o_t), BD] rows o_t of head i_h of a [B, T, H, D] tensor, in its own dtype (bf16 tiles
    take half the registers of fp32 ones); zeros past T or D."""
    o_d = tl.arange(0, BD)
    p = ptr + ((bos + o_t[:, None]) * H + i_h) * D + o_d[None, :]
    return tl.load(p, mask=(o_t[:, None] < T) & (o_d[None, :] < D), other=0.0)


@triton.jit
def _rows(ptr, o_t, T, i_h, bos, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """_rows_as_is as fp32."""
    return _rows_as_is(ptr, o_t, T, i_h, bos, H, D, BD).to(tl.float32)


@triton.jit
def _row(ptr, t, T, i_h, bos, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """[BD] row t of head i_h, as fp32; zeros past T or D."""
    o_d = tl.arange(0, BD)
    return tl.load(ptr + ((bos + t) * H + i_h) * D + o_d, mask=(o_d < D) & (t < T), other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, x, o_t, T, i_h, bos, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    o_d = tl.arange(0, BD)
    p = ptr + ((bos + o_t[:, None]) * H + i_h) * D + o_d[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=(o_t[:, None] < T) & (o_d[None, :] < D))


@triton.jit
def _state_of(ptr, i_b, i_c, i_h, NT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr):
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    p = ptr + ((i_b.to(tl.int64) * NT + i_c) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    return tl.load(p, mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.0)


@triton.jit
def _dot(a, b, dt: tl.constexpr):
    """a @ b on the tensor cores in the inputs' dtype (bf16, or tf32 for fp32), accumulated in fp32."""
    return tl.dot(a.to(dt), b.to(dt))


@triton.jit
def _centred(g, g_ptr, o_t, T, i_h, bos, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
    """(g - r on the chunk's valid rows, zeros elsewhere; True if every |g - r| < 60), r the decay at
    the chunk's middle token: then 2^(g_i - g_j) = 2^(g_i - r) 2^(r - g_j) with both factors finite."""
    o_k = tl.arange(0, BK)
    mid = tl.min(o_t, axis=0) + BT // 2
    r = tl.load(g_ptr + ((bos + mid) * H + i_h) * K + o_k, mask=(o_k < K) & (mid < T), other=0.0)
    d = tl.where((o_t < T)[:, None], g - r[None, :], 0.0)
    return d, tl.max(tl.max(tl.abs(d), axis=1), axis=0) < 60.0


@triton.jit
def _pair_decay(g, g_j, j, o_t, T, BT: tl.constexpr):
    """[BT, BK]: 2^(g_i - g_j) for the chunk's rows i >= j (i < T), else 0; exponents <= 0."""
    o_i = tl.arange(0, BT)
    m = (o_i >= j) & (o_t < T)
    return tl.exp2(tl.where(m[:, None], g - g_j[None, :], float("-inf")))


@triton.jit
def _program_chunk(T, H: tl.constexpr, BT: tl.constexpr):
    """This program's chunk i_c, sequence i_b and head i_h, the number of chunks NT, the first row
    of its sequence and its chunk's token indices."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    return i_c, i_b, i_h, tl.cdiv(T, BT), i_b.to(tl.int64) * T, i_c * BT + tl.arange(0, BT)


@triton.jit
def _gla_chunk_fwd_kernel(q, k, v, g, h, o, scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_c, i_b, i_h, NT, bos, o_t = _program_chunk(T, H, BT)
    dt: tl.constexpr = q.dtype.element_ty
    o_i = tl.arange(0, BT)
    b_g = _rows(g, o_t, T, i_h, bos, H, K, BK)
    d, small = _centred(b_g, g, o_t, T, i_h, bos, H, K, BK, BT)
    S = _state_of(h, i_b, i_c, i_h, NT, H, K, V, BK, BV)
    b_q, b_k, b_v = _rows(q, o_t, T, i_h, bos, H, K, BK), _rows(k, o_t, T, i_h, bos, H, K, BK), _rows(v, o_t, T, i_h, bos, H, V, BV)
    if small:
        A = tl.where(o_i[:, None] >= o_i[None, :], _dot(b_q * tl.exp2(d), tl.trans(b_k * tl.exp2(-d)), dt), 0.0)
    else:  # exact, a column of A at a time, every exponent <= 0
        A = tl.zeros([BT, BT], dtype=tl.float32)
        for j in range(0, BT):
            k_j = _row(k, i_c * BT + j, T, i_h, bos, H, K, BK)
            g_j = _row(g, i_c * BT + j, T, i_h, bos, H, K, BK)
            col = tl.sum(b_q * k_j[None, :] * _pair_decay(b_g, g_j, j, o_t, T, BT), axis=1)
            A = tl.where(o_i[None, :] == j, col[:, None], A)
    b_o = _dot(b_q * tl.exp2(b_g), S, dt) + _dot(A, b_v, dt)
    _store_rows(o, b_o * scale, o_t, T, i_h, bos, H, V, BV)


@triton.jit
def _gla_chunk_bwd_kernel(q, k, v, g, h, dh, do, dq, dk, dv, dg, scale, T,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    # Ordered so that few [BT, BK] tiles are alive at once: q, k, v and do stay in their own dtype
    # (bf16: half the registers), each input is loaded where it is first needed, dv is stored as
    # soon as it is known, S is read last. Loaded all at the top and held in fp32, the tiles needed
    # more than the 255 registers a thread has and spilled (ptxas: 416 bytes a thread at 2 warps,
    # 176 at 4; now 160 and none).
    i_c, i_b, i_h, NT, bos, o_t = _program_chunk(T, H, BT)
    dt: tl.constexpr = q.dtype.element_ty
    o_i = tl.arange(0, BT)
    ok = (o_t < T)[:, None]
    o_k = tl.arange(0, BK)
    last = tl.minimum(i_c * BT + BT, T) - 1
    g_L = tl.load(g + ((bos + last) * H + i_h) * K + o_k, mask=o_k < K, other=0.0)
    b_g = _rows(g, o_t, T, i_h, bos, H, K, BK)
    # the gradient of the state the chunk ends with (dS') reaches v and k through the decay to the end
    decay_to_end = tl.where(ok, tl.exp2(g_L[None, :] - b_g), 0.0)
    dS = _state_of(dh, i_b, i_c, i_h, NT, H, K, V, BK, BV)
    b_v = _rows_as_is(v, o_t, T, i_h, bos, H, V, BV)
    dk_state = decay_to_end * _dot(b_v, tl.trans(dS), dt)
    b_do = _rows_as_is(do, o_t, T, i_h, bos, H, V, BV)
    dA = tl.where((o_i[:, None] >= o_i[None, :]) & ok, _dot(b_do, tl.trans(b_v), dt) * scale, 0.0)
    b_k = _rows_as_is(k, o_t, T, i_h, bos, H, K, BK)
    b_q = _rows_as_is(q, o_t, T, i_h, bos, H, K, BK)
    d, small = _centred(b_g, g, o_t, T, i_h, bos, H, K, BK, BT)
    if small:
        qf, kf = b_q * tl.exp2(d), b_k * tl.exp2(-d)
        A = tl.where(o_i[:, None] >= o_i[None, :], _dot(qf, tl.trans(kf), dt), 0.0)
        b_dq = _dot(dA, kf, dt) * tl.exp2(d)
        b_dk = _dot(tl.trans(dA), qf, dt) * tl.exp2(-d)
    else:  # exact, a column of A (a row of dk) at a time, every exponent <= 0
        A = tl.zeros([BT, BT], dtype=tl.float32)
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        for j in range(0, BT):
            k_j = _row(k, i_c * BT + j, T, i_h, bos, H, K, BK)
            g_j = _row(g, i_c * BT + j, T, i_h, bos, H, K, BK)
            E = _pair_decay(b_g, g_j, j, o_t, T, BT)
            A = tl.where(o_i[None, :] == j, tl.sum(b_q * k_j[None, :] * E, axis=1)[:, None], A)
            dA_j = tl.sum(tl.where(o_i[None, :] == j, dA, 0.0), axis=1)
            b_dq += dA_j[:, None] * k_j[None, :] * E
            b_dk = tl.where(o_i[:, None] == j, tl.sum(dA_j[:, None] * b_q * E, axis=0)[None, :], b_dk)
    b_dv = _dot(tl.trans(A), b_do, dt) * scale + _dot(b_k * decay_to_end, dS, dt)
    _store_rows(dv, b_dv, o_t, T, i_h, bos, H, V, BV)
    b_dk += dk_state
    # the state the chunk starts from (S)
    S = _state_of(h, i_b, i_c, i_h, NT, H, K, V, BK, BV)
    b_dq += _dot(b_do, tl.trans(S), dt) * (tl.exp2(b_g) * scale)
    # dg: reverse cumulative sum over the chunk of q dq - k dk, the last token's extra term added
    dg_L = tl.sum(b_k * dk_state, axis=0) + tl.exp2(g_L) * tl.sum(S * dS, axis=1)
    _store_rows(dq, b_dq, o_t, T, i_h, bos, H, K, BK)
    _store_rows(dk, b_dk, o_t, T, i_h, bos, H, K, BK)
    dgc = b_q * b_dq - b_k * b_dk + tl.where((o_t == last)[:, None], dg_L[None, :], 0.0)
    _store_rows(dg, tl.cumsum(dgc, axis=0, reverse=True), o_t, T, i_h, bos, H, K, BK)


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# warps per program: of 1, 2, 4 and 8, at 4x8192 on an H100 1 was fastest forward (59 us against
# 64 for 2) and 2 backward (185 us against 257 for 4 and 282 for 1; 224 before the backward
# kernel was reordered); at 8x512 2 was fastest both ways (benchmarks/sweep_gla_chunk.py)
NUM_WARPS_FWD, NUM_WARPS_BWD = 1, 2


def gla_chunk_fwd(q, k, v, g_cumsum, h, scale: float, num_warps: int = NUM_WARPS_FWD):
    """o [B, T, H, V] in v's dtype. q, k, v [B, T, H, K|V]; g_cumsum from chunk_cumsum; h: the
    state each chunk starts from [B, NT, H, K, V] fp32 (chunk_states_fwd)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty_like(v)
    _gla_chunk_fwd_kernel[(triton.cdiv(T, BT), B * H)](
        q, k, v, g_cumsum, h, o, scale, T, H=H, K=K, V=V, BT=BT, BK=_block(K), BV=_block(V),
        num_warps=num_warps)
    return o


def gla_chunk_bwd(q, k, v, g_cumsum, h, dh, do, scale: float, num_warps: int = NUM_WARPS_BWD,
                  maxnreg: int | None = None):
    """(dq, dk, dv in their inputs' dtypes, dg fp32: the gradient of the natural log-decay).

    maxnreg caps the kernel's registers a thread (ptxas .maxnreg; None: ptxas chooses, 255 here).
    Fewer registers let more programs share an SM but spill more: caps of 96, 128 and 168 took it
    from 182 us to 499, 335 and 263 at 4x8192, 2 warps (sweep_gla_chunk.py --maxnreg)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dg = torch.empty_like(g_cumsum)
    _gla_chunk_bwd_kernel[(triton.cdiv(T, BT), B * H)](
        q, k, v, g_cumsum, h, dh, do, dq, dk, dv, dg, scale, T, H=H, K=K, V=V, BT=BT,
        BK=_block(K), BV=_block(V), num_warps=num_warps, **({} if maxnreg is None else {"maxnreg": maxnreg}))
    return dq, dk, dv, dg
