"""The long-term memory's chunk-boundary states, computed in parallel over the chunks.

The chunked GLA (kernel_intra.py inside the chunks) needs the state M at every chunk boundary, and
in backward its gradient. fla's chunk_fwd_h / chunk_bwd_dh carry the state through the chunks in
one program per (sequence, head): at T = 8192 that is 128
dependent steps (64-token chunks), each a load of the chunk's k and v, a 64-deep matmul and a
store, on 16 programs at batch 2 -- latency-bound, ~110 us each on an H100 while the GPU idles.
Here the same states come in two kernels:

  1. each chunk's own contribution, one program per (sequence, head, chunk), all in parallel:
         forward   U_c = (k_c * 2^(g_last_c - g_c))^T v_c                       [K, V]
         backward  Q_c = (q_c * scale * 2^(g_c))^T do_c
  2. the states from those by the linear recurrence over chunks, elementwise in small [BK, BV]
     tiles (many programs) and G chunks at a time with an associative scan (few dependent steps):
         forward   S_c = 2^(g_last_c) * S_{c-1} + U_c,   S_{-1} = M0,  h[c] = S_{c-1},  M_T = S_last
         backward  X_c = 2^(g_last_c) * X_{c+1} + Q_c,  X_NT = dM_T,  dh[c] = X_{c+1}, dM0 = X_0

g is fla's base-2 cumulative log-decay within each chunk (chunk_local_cumsum(..., scale=1/ln 2)),
[B, T, H, K] fp32. Outputs use fla's layout (h, dh: [B, NT, H, K, V] fp32) and meaning, so fla's
other GLA kernels take them unchanged, as do ours; tests/ops/test_gpu_ops.py holds both to fla's
sequential pass (fla-core is imported only there and in benchmarks/fla_compare).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class StatePassConfig:
    """A launch configuration: the scan's tile (scan_chunks chunks x [block_k, block_v] elements per
    step of its loop) and the warps of the contribution kernel."""
    scan_chunks: int = 16
    block_k: int = 4
    block_v: int = 8
    contribution_warps: int = 4


# At K = V = 32, 32 programs per (sequence, head); 256 chunks (T = 8192 at 32-token chunks) take 16
# steps. The fastest of seven tiles at 4x8192 on an H100 (benchmarks/sweep_gla_chunk.py
# --state-pass): 76 + 73 us forward + backward against 88 + 81 for the earlier 32 x 8 x 16.
STATE_PASS_CONFIG = StatePassConfig()


@triton.jit
def _chunk_contribution_kernel(a, b, g, out, scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FORWARD: tl.constexpr):
    """out[b, c, h] = (a_c * w)^T b_c over the chunk's tokens, w = 2^(g_last - g) (forward: a = k,
    b = v) or scale * 2^g (backward: a = q, b = do). One program per (chunk, sequence * head)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    bos = i_b.to(tl.int64) * T
    o_t = i_c * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_tk = (o_t[None, :] < T) & (o_k[:, None] < K)
    # [BK, BT]: a and g read transposed
    p_a = a + (bos * H + i_h) * K + o_k[:, None] + o_t[None, :] * (H * K)
    p_g = g + (bos * H + i_h) * K + o_k[:, None] + o_t[None, :] * (H * K)
    b_a = tl.load(p_a, mask=m_tk, other=0.0)
    b_g = tl.load(p_g, mask=m_tk, other=0.0)
    if FORWARD:
        last = tl.minimum(i_c * BT + BT, T) - 1
        b_g_last = tl.load(g + (bos + last) * H * K + i_h * K + o_k, mask=o_k < K, other=0.0)
        b_a = (b_a * tl.exp2(b_g_last[:, None] - b_g)).to(b_a.dtype)
    else:
        b_a = (b_a * scale * tl.exp2(b_g)).to(b_a.dtype)
    # [BT, BV]
    p_b = b + (bos * H + i_h) * V + o_t[:, None] * (H * V) + o_v[None, :]
    b_b = tl.load(p_b, mask=(o_t[:, None] < T) & (o_v[None, :] < V), other=0.0)
    b_out = tl.dot(b_a, b_b.to(b_a.dtype))
    p_out = out + ((i_b.to(tl.int64) * NT + i_c) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_out, b_out, mask=(o_k[:, None] < K) & (o_v[None, :] < V))


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # (x -> a1 x + b1) then (x -> a2 x + b2)
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _state_scan_kernel(u, g, states, s0, s_final, T, NT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BT: tl.constexpr, G: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       REVERSE: tl.constexpr, HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr):
    """S_c = 2^(g_last_c) S_prev + u_c over the chunks (REVERSE: from the last chunk back), one
    [BK, BV] tile of one (sequence, head) per program. Forward stores S_prev at chunk c (the state
    a chunk starts from) and the last S in s_final; reverse stores S_c at chunk c - 1 and S_0 in
    s_final. s0: the carry before the first step (M0, or dM_T in reverse); zeros if absent."""
    i_kv, i_bh = tl.program_id(0), tl.program_id(1)
    NV = tl.cdiv(V, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    i_b, i_h = i_bh // H, i_bh % H
    bos = i_b.to(tl.int64) * T
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, G)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    tile = o_k[:, None] * V + o_v[None, :]                        # [BK, BV]
    p_s0 = s0 + i_bh.to(tl.int64) * K * V + tile
    carry = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        carry = tl.load(p_s0, mask=m_kv, other=0.0).to(tl.float32)
    init = carry
    for start in range(0, NT, G):
        o_c = (NT - 1 - start - o_i) if REVERSE else (start + o_i)  # [G] chunk of each scan step
        m_c = (start + o_i) < NT
        base = ((i_b.to(tl.int64) * NT + o_c) * H + i_h) * K * V   # [G]
        m3 = m_c[:, None, None] & m_kv[None, :, :]
        b_u = tl.load(u + base[:, None, None] + tile[None, :, :], mask=m3, other=0.0)
        last = tl.minimum(o_c * BT + BT, T) - 1
        p_gl = g + (bos + last)[:, None] * H * K + i_h * K + o_k[None, :]
        b_gl = tl.load(p_gl, mask=m_c[:, None] & (o_k[None, :] < K), other=0.0)   # [G, BK]; 2^0 past the end
        b_d = tl.broadcast_to(tl.exp2(b_gl)[:, :, None], [G, BK, BV])
        b_a, b_s = tl.associative_scan((b_d, b_u), 0, _affine_combine)
        b_s = b_a * carry[None, :, :] + b_s                      # S after each step
        if REVERSE:  # S_c is the gradient of the state chunk c - 1 ends with
            m_out = m3 & (o_c > 0)[:, None, None]
            tl.store(states + (base - H * K * V)[:, None, None] + tile[None, :, :], b_s, mask=m_out)
        else:        # S_c is the state chunk c + 1 starts from; chunk `start` starts from the carry
            m_out = m3 & ((o_c + 1) < NT)[:, None, None] & (o_i < G - 1)[:, None, None]
            tl.store(states + (base + H * K * V)[:, None, None] + tile[None, :, :], b_s, mask=m_out)
            first = ((i_b.to(tl.int64) * NT + start) * H + i_h) * K * V
            tl.store(states + first + tile, carry, mask=m_kv)
        carry = tl.sum(tl.where((o_i == G - 1)[:, None, None], b_s, 0.0), axis=0)  # masked steps keep S
    if REVERSE:  # the last chunk ends with the final state: its gradient is dM_T
        tl.store(states + ((i_b.to(tl.int64) * NT + NT - 1) * H + i_h) * K * V + tile, init, mask=m_kv)
    if STORE_FINAL:
        tl.store(s_final + i_bh.to(tl.int64) * K * V + tile, carry, mask=m_kv)


def _contributions(a, b, g, scale, chunk_size, forward, num_warps):
    B, T, H, K = a.shape
    V = b.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    out = a.new_empty(B, NT, H, K, V, dtype=torch.float32)
    _chunk_contribution_kernel[(NT, B * H)](
        a, b, g, out, scale, T, H=H, K=K, V=V, BT=chunk_size, BK=max(16, triton.next_power_of_2(K)),
        BV=max(16, triton.next_power_of_2(V)), FORWARD=forward, num_warps=num_warps)
    return out


def _scan(u, g, s0, T, chunk_size, reverse, store_final, config: StatePassConfig):
    B, NT, H, K, V = u.shape
    states = torch.empty_like(u)
    final = u.new_empty(B, H, K, V) if store_final else None
    BK, BV = config.block_k, config.block_v
    grid = (triton.cdiv(K, BK) * triton.cdiv(V, BV), B * H)
    _state_scan_kernel[grid](
        u, g, states, s0 if s0 is not None else u, final if final is not None else u, T, NT, H=H, K=K, V=V,
        BT=chunk_size, G=config.scan_chunks, BK=BK, BV=BV, REVERSE=reverse, HAS_S0=s0 is not None,
        STORE_FINAL=store_final, num_warps=4)
    return states, final


def chunk_states_fwd(k, v, g_cumsum, M0, chunk_size: int = 64, config: StatePassConfig = STATE_PASS_CONFIG):
    """(h [B, NT, H, K, V] fp32: the state each chunk starts from, M_T [B, H, K, V] fp32) -- what
    fla's chunk_fwd_h(k, v, gk=g_cumsum, h0=M0, output_final_state=True, states_in_fp32=True) gives."""
    T = k.shape[1]
    u = _contributions(k, v, g_cumsum, 1.0, chunk_size, True, config.contribution_warps)
    return _scan(u, g_cumsum, None if M0 is None else M0.float().contiguous(), T, chunk_size,
                 reverse=False, store_final=True, config=config)


def chunk_states_bwd(q, do, g_cumsum, dM_T, scale: float, chunk_size: int = 64, need_dM0: bool = True,
                     config: StatePassConfig = STATE_PASS_CONFIG):
    """(dh [B, NT, H, K, V] fp32: the gradient of the state each chunk ends with, dM0 or None) --
    what fla's chunk_bwd_dh(q, k, v, gk=g_cumsum, do, h0, dht=dM_T, scale, states_in_fp32=True) gives."""
    T = q.shape[1]
    dq_part = _contributions(q, do, g_cumsum, scale, chunk_size, False, config.contribution_warps)
    return _scan(dq_part, g_cumsum, None if dM_T is None else dM_T.float().contiguous(), T, chunk_size,
                 reverse=True, store_final=need_dM0, config=config)
