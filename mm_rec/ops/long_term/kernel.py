"""The long-term memory on CUDA through our Triton kernels, as an opaque torch.library op:

    long_term_kernel:  M_t = diag(exp(log_alpha_t)) M_{t-1} + k_t^T v_t,  o_t = scale q_t M_t

a chunked GLA in 32-token chunks: the states at chunk boundaries and their gradients from a
chunk-parallel scan (kernel_states.py), the work inside each chunk in one kernel forward and one
backward (kernel_intra.py).

Why a custom op: torch.compile sees it as one opaque node, so the whole training step compiles
and can be CUDA-graphed (fla-core's entry points are `torch.compiler.disable`d and would split a
compiled step into a graph per layer). The op also gives the gradients of the initial and final
states.

Precision: log-decays, their cumulative sums and every carried state are fp32; q, k, v stay in
their own dtype (bf16 under autocast), as do the operands of the tensor-core products inside a
chunk (fp32 accumulation). Outputs: o in q's dtype, M_T fp32.
"""
from typing import Optional

import torch
import triton

from .kernel_intra import BT, chunk_cumsum, gla_chunk_bwd, gla_chunk_fwd
from .kernel_states import chunk_states_bwd, chunk_states_fwd

Tensor = torch.Tensor


@torch.library.custom_op("mmrec::gla_fwd", mutates_args=())
def gla_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, M0: Optional[Tensor]
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The chunked GLA forward, keeping the per-chunk states for backward.

    Returns (o in v's dtype, M_T fp32, and the fp32 intermediates kept for backward: g_cumsum and
    the state at every chunk start [B, T/BT, H, K, V]). Keeping the states costs 1 KB a token at
    BT = 32 (a layer, d=256) and saves recomputing them in backward."""
    g_cumsum = chunk_cumsum(g, BT)
    h, M_T = chunk_states_fwd(k, v, g_cumsum, M0, BT)
    o = gla_chunk_fwd(q, k, v, g_cumsum, h, scale)
    return o, M_T, g_cumsum, h


@gla_fwd.register_fake
def _(q, k, v, g, scale, M0):
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = torch.float32
    return (torch.empty_like(v), q.new_empty(B, H, K, V, dtype=f32), torch.empty_like(g, dtype=f32),
            q.new_empty(B, triton.cdiv(T, BT), H, K, V, dtype=f32))


@torch.library.custom_op("mmrec::gla_bwd", mutates_args=())
def gla_bwd(q: Tensor, k: Tensor, v: Tensor, g_cumsum: Tensor, h: Tensor, scale: float,
            M0: Optional[Tensor], do: Tensor, dM_T: Optional[Tensor]
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunked GLA backward, from the forward's states and the state-gradient pass."""
    do = do.contiguous()
    dh, dM0 = chunk_states_bwd(q, do, g_cumsum, dM_T, scale, BT, need_dM0=M0 is not None)
    dM0 = q.new_empty(0) if dM0 is None else dM0
    dq, dk, dv, dg = gla_chunk_bwd(q, k, v, g_cumsum, h, dh, do, scale)
    return dq, dk, dv, dg, dM0


@gla_bwd.register_fake
def _(q, k, v, g_cumsum, h, scale, M0, do, dM_T):
    dM0 = q.new_empty(0) if M0 is None else torch.empty_like(M0)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(g_cumsum), dM0)


def _gla_setup(ctx, inputs, output):
    q, k, v, _, scale, M0 = inputs
    _, _, g_cumsum, h = output
    ctx.save_for_backward(q, k, v, g_cumsum, h, M0)
    ctx.scale, ctx.has_M0 = scale, M0 is not None


def _gla_backward(ctx, do, dM_T, _dgc, _dh):
    q, k, v, g_cumsum, h, M0 = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dM0 = gla_bwd(q, k, v, g_cumsum, h, ctx.scale, M0 if ctx.has_M0 else None, do, dM_T)
    return dq, dk, dv, dg, None, (dM0 if ctx.has_M0 else None)


gla_fwd.register_autograd(_gla_backward, setup_context=_gla_setup)


def long_term_kernel(q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, M0: Optional[Tensor] = None,
                     scale: float | None = None):
    """long_term_memory on the Triton kernels: (o [B, T, H, Dv] in q's dtype, M_T [B, H, Dk, Dv] fp32)."""
    B, T, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else float(scale)
    if T == 0:
        M = q.new_zeros(B, H, Dk, v.shape[-1], dtype=torch.float32) if M0 is None else M0.float()
        return v, M
    dt = q.dtype
    M0 = None if M0 is None else M0.float().contiguous()
    o, M_T, _, _ = gla_fwd(q.contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous(),
                           log_alpha.float().contiguous(), scale, M0)
    return o, M_T
