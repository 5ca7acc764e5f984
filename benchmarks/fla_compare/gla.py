"""The long-term memory's chunked GLA with fla-core's kernels swapped in, for comparison with
mm_rec's op (mm_rec/ops/long_term/kernel.py), which runs ours for both parts:

    intra="fla"    fla's chunk_gla kernels inside the chunks (3 forward, 4 backward, plus the
                   cumulative decays, with the scores A written to memory in between) instead of
                   kernel_intra.py's one kernel each way
    states="fla"   fla's chunk_fwd_h / chunk_bwd_dh, sequential over the chunks, instead of
                   kernel_states.py's chunk-parallel passes

Both take and give the same tensors (fla's layout), so any mix runs. Eager only (an autograd
Function, not a torch.library op: fla's entry points are `torch.compiler.disable`d anyway).
"""
from __future__ import annotations

import torch
import triton

from mm_rec.ops.long_term import kernel_intra
from mm_rec.ops.long_term.kernel_states import chunk_states_bwd, chunk_states_fwd

# The GLA's chunk length when fla's kernels work inside the chunks (fla's default is 64; ours are
# always 32). At our head size (32) fla's kernels in 32-token chunks took 5-9% less GPU time
# forward + backward on an H100 (bench_ops.py: 1.155 -> 1.057 ms a layer at 4x8192, 0.180 -> 0.164
# ms at 8x512): the intra-chunk kernels shrink more than the state pass grows.
FLA_CHUNK = 32


def _states_fwd(states, k, v, g_cumsum, M0, BT):
    if states == "fla":
        from fla.ops.common.chunk_h import chunk_fwd_h
        return chunk_fwd_h(k=k, v=v, g=None, gk=g_cumsum, gv=None, h0=M0, output_final_state=True,
                           chunk_size=BT, states_in_fp32=True)
    return chunk_states_fwd(k, v, g_cumsum, M0, BT)


def _states_bwd(states, q, k, v, g_cumsum, M0, do, dM_T, scale, BT):
    if states == "fla":
        from fla.ops.common.chunk_h import chunk_bwd_dh
        return chunk_bwd_dh(q=q, k=k, v=v, g=None, gk=g_cumsum, gv=None, do=do, h0=M0, dht=dM_T, scale=scale,
                            chunk_size=BT, states_in_fp32=True)
    return chunk_states_bwd(q, do, g_cumsum, dM_T, scale, BT, need_dM0=M0 is not None)


class _GLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, M0, scale, intra, states, BT):
        if intra == "own":
            g_cumsum = kernel_intra.chunk_cumsum(g, BT)
            h, M_T = _states_fwd(states, k, v, g_cumsum, M0, BT)
            o = kernel_intra.gla_chunk_fwd(q, k, v, g_cumsum, h, scale)
            A = None
        else:
            from fla.ops.gla.chunk import chunk_gla_fwd_intra_gk, chunk_gla_fwd_o_gk
            from fla.ops.utils.constant import RCP_LN2
            from fla.ops.utils.cumsum import chunk_local_cumsum
            g_cumsum = chunk_local_cumsum(g, BT, scale=RCP_LN2)  # fla's kernels work in base 2
            h, M_T = _states_fwd(states, k, v, g_cumsum, M0, BT)
            A = chunk_gla_fwd_intra_gk(q=q, k=k, g=g_cumsum, scale=scale, chunk_size=BT)
            o = chunk_gla_fwd_o_gk(q=q, v=v, g=g_cumsum, A=A, h=h, scale=scale, chunk_size=BT)
        ctx.save_for_backward(q, k, v, g_cumsum, A, h, M0)
        ctx.scale, ctx.intra, ctx.states, ctx.BT = scale, intra, states, BT
        return o, M_T

    @staticmethod
    def backward(ctx, do, dM_T):
        q, k, v, g_cumsum, A, h, M0 = ctx.saved_tensors
        scale, BT = ctx.scale, ctx.BT
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dh, dM0 = _states_bwd(ctx.states, q, k, v, g_cumsum, M0, do, dM_T, scale, BT)
        if ctx.intra == "own":
            dq, dk, dv, dg = kernel_intra.gla_chunk_bwd(q, k, v, g_cumsum, h, dh, do, scale)
        else:
            from fla.ops.gla.chunk import (chunk_gla_bwd_dA, chunk_gla_bwd_dqk_intra, chunk_gla_bwd_dqkg,
                                           chunk_gla_bwd_dv)
            dv = chunk_gla_bwd_dv(k=k, g=g_cumsum, A=A, do=do, dh=dh, chunk_size=BT)
            dA = chunk_gla_bwd_dA(v=v, do=do, scale=scale, chunk_size=BT)
            dq, dk = chunk_gla_bwd_dqk_intra(q=q, k=k, g=g_cumsum, dA=dA, chunk_size=BT)
            dq, dk, dg = chunk_gla_bwd_dqkg(q=q, k=k, v=v, h=h, g=g_cumsum, do=do, dh=dh, dq=dq, dk=dk,
                                            scale=scale, chunk_size=BT)
            dq, dk, dv, dg = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.float()
        return dq, dk, dv, dg, (dM0 if M0 is not None else None), None, None, None, None


def long_term_fla(q, k, v, log_alpha, M0=None, scale: float | None = None, intra: str = "fla",
                  states: str = "parallel", chunk_size: int = FLA_CHUNK):
    """mm_rec.ops.long_term_memory on CUDA with fla's kernels inside the chunks (intra="fla", in
    chunks of chunk_size, capped as fla's chunk_gla caps it) or ours (intra="own", always
    kernel_intra.BT), and the chunk-boundary states by fla's sequential passes (states="fla") or
    ours (states="parallel"). Returns (o in q's dtype, M_T fp32)."""
    assert intra in ("own", "fla") and states in ("parallel", "fla"), (intra, states)
    T, Dk = q.shape[1], q.shape[-1]
    scale = Dk ** -0.5 if scale is None else float(scale)
    BT = kernel_intra.BT if intra == "own" else min(chunk_size, max(16, triton.next_power_of_2(T)))
    dt = q.dtype
    M0 = None if M0 is None else M0.float().contiguous()
    return _GLA.apply(q.contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous(),
                      log_alpha.float().contiguous(), M0, scale, intra, states, BT)
