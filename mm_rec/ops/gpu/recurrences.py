"""The two recurrences on CUDA through our Triton kernels, as opaque torch.library ops.

    short_term_gpu:  h_t = exp(log_a_t) h_{t-1} + x_t          (diag_scan.py)
    long_term_gpu:   M_t = diag(exp(log_alpha_t)) M_{t-1} + k_t^T v_t,  o_t = scale q_t M_t
                     (chunked GLA: the states at chunk boundaries and their gradients from a
                      chunk-parallel scan, chunk_states.py; the work inside each chunk in one
                      kernel forward and one backward, gla_chunk.py)

Why custom ops: torch.compile sees each op as one opaque node, so the whole training step compiles
and can be CUDA-graphed (fla-core's entry points, which the comparisons below call, are
`torch.compiler.disable`d and would split a compiled step into a graph per layer). The ops also
give the gradients of the initial and final states.

Precision: log-decays, their cumulative sums and every carried state are fp32; q, k, v stay in
their own dtype (bf16 under autocast), as do the operands of the tensor-core products inside a
chunk (fp32 accumulation). Outputs: h in x's dtype, o in q's dtype, h_T / M_T fp32.

fla-core's GLA kernels remain selectable for comparison (INTRA_KERNELS, STATE_PASS; fla-core is
imported only then). These are module settings read when an op runs and when torch.compile traces
it: set them before compiling, and give a process that changes them between runs its own
TORCHINDUCTOR_CACHE_DIR (a cached compiled graph keeps the intermediates' shapes of the setting it
was compiled with).
"""
from typing import Optional

import torch
import triton

from . import gla_chunk
from .chunk_states import chunk_states_bwd, chunk_states_fwd
from .diag_scan import diag_scan_bwd, diag_scan_fwd

Tensor = torch.Tensor


# How the GLA's chunk-boundary states are computed: "parallel" (chunk_states.py: parallel over the
# chunks) or "fla" (fla's chunk_fwd_h / chunk_bwd_dh, sequential over the chunks). The same states;
# bench_ops.py and the GPU tests compare the two.
STATE_PASS = "parallel"


def _chunk_states_fwd(k, v, g_cumsum, M0, BT):
    if STATE_PASS == "fla":
        from fla.ops.common.chunk_h import chunk_fwd_h
        return chunk_fwd_h(k=k, v=v, g=None, gk=g_cumsum, gv=None, h0=M0, output_final_state=True,
                           chunk_size=BT, states_in_fp32=True)
    return chunk_states_fwd(k, v, g_cumsum, M0, BT)


def _chunk_states_bwd(q, k, v, g_cumsum, M0, do, dM_T, scale, BT):
    if STATE_PASS == "fla":
        from fla.ops.common.chunk_h import chunk_bwd_dh
        return chunk_bwd_dh(q=q, k=k, v=v, g=None, gk=g_cumsum, gv=None, do=do, h0=M0, dht=dM_T, scale=scale,
                            chunk_size=BT, states_in_fp32=True)
    return chunk_states_bwd(q, do, g_cumsum, dM_T, scale, BT, need_dM0=M0 is not None)


# The GLA's chunk length when fla's kernels work inside the chunks (fla's default is 64; ours are
# always 32). At our head size (32) fla's kernels in 32-token chunks took 5-9%
# less GPU time forward + backward on an H100 (bench_ops.py: 1.155 -> 1.057 ms a layer at
# 4x8192, 0.180 -> 0.164 ms at 8x512): the intra-chunk kernels shrink more than the state pass grows.
GLA_CHUNK = 32


# The work inside each chunk: "own" (gla_chunk.py: one kernel forward, one backward, for chunks of
# 32) or "fla" (fla-core's chunk_gla kernels, 3 forward and 4 backward plus the cumulative decays).
# With the same state passes, the whole op's GPU time forward + backward on an H100 was 0.379 ms
# against 0.577 at 2x8192, 0.065 against 0.104 at 4x512 (bench_ops.py).
INTRA_KERNELS = "own"


def _gla_chunk(T: int) -> int:
    if INTRA_KERNELS == "own":
        return gla_chunk.BT
    return min(GLA_CHUNK, max(16, triton.next_power_of_2(T)))  # as fla's chunk_gla picks it


def _none_if_empty(t: Tensor):
    return None if t.numel() == 0 else t


# -- short-term memory: diagonal recurrence (our Triton scan, diag_scan.py) ----------------------
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


def short_term_gpu(x: Tensor, log_a: Tensor, h0: Optional[Tensor] = None):
    """Drop-in for short_term_memory on CUDA: returns (h [B, T, D] in x's dtype, h_T [B, D] fp32)."""
    if x.shape[1] == 0:
        return x, (x.new_zeros(x.shape[0], x.shape[2], dtype=torch.float32) if h0 is None else h0.float())
    h0 = None if h0 is None else h0.float().contiguous()
    h, hT = scan_fwd(x.float().contiguous(), log_a.float().contiguous(), h0)
    return h.to(x.dtype), hT


# -- long-term memory: gated linear attention -------------------------------------------------
@torch.library.custom_op("mmrec::gla_fwd", mutates_args=())
def gla_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, M0: Optional[Tensor]
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunked GLA forward, keeping the per-chunk states for backward.

    Returns (o in v's dtype, M_T fp32, and fp32 intermediates kept for backward: g_cumsum, the
    state at every chunk start [B, T/BT, H, K, V] and, with fla's kernels, A [B, T, H, BT]).
    fla's own backward recomputes those states: keeping them costs 1 KB a token at BT = 32 (a
    layer, d=256) and saves that pass."""
    BT = _gla_chunk(q.shape[1])
    if INTRA_KERNELS == "own":
        g_cumsum = gla_chunk.chunk_cumsum(g, BT)
        h, M_T = _chunk_states_fwd(k, v, g_cumsum, M0, BT)
        o = gla_chunk.gla_chunk_fwd(q, k, v, g_cumsum, h, scale)
        return o, M_T, g_cumsum, h, q.new_empty(0, dtype=torch.float32)
    from fla.ops.gla.chunk import chunk_gla_fwd_intra_gk, chunk_gla_fwd_o_gk
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.cumsum import chunk_local_cumsum
    g_cumsum = chunk_local_cumsum(g, BT, scale=RCP_LN2)  # fla's kernels work in base 2
    h, M_T = _chunk_states_fwd(k, v, g_cumsum, M0, BT)
    A = chunk_gla_fwd_intra_gk(q=q, k=k, g=g_cumsum, scale=scale, chunk_size=BT)
    o = chunk_gla_fwd_o_gk(q=q, v=v, g=g_cumsum, A=A, h=h, scale=scale, chunk_size=BT)
    return o, M_T, g_cumsum, h, A


@gla_fwd.register_fake
def _(q, k, v, g, scale, M0):
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = _gla_chunk(T)
    f32 = torch.float32
    A = q.new_empty(0, dtype=f32) if INTRA_KERNELS == "own" else q.new_empty(B, T, H, BT, dtype=f32)
    return (torch.empty_like(v), q.new_empty(B, H, K, V, dtype=f32), torch.empty_like(g, dtype=f32),
            q.new_empty(B, triton.cdiv(T, BT), H, K, V, dtype=f32), A)


@torch.library.custom_op("mmrec::gla_bwd", mutates_args=())
def gla_bwd(q: Tensor, k: Tensor, v: Tensor, g_cumsum: Tensor, A: Tensor, h: Tensor, scale: float,
            M0: Optional[Tensor], do: Tensor, dM_T: Optional[Tensor]
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunked GLA backward, from the forward's states and our state-gradient pass."""
    BT = _gla_chunk(q.shape[1])
    do = do.contiguous()
    dh, dM0 = _chunk_states_bwd(q, k, v, g_cumsum, M0, do, dM_T, scale, BT)
    dM0 = q.new_empty(0) if dM0 is None else dM0
    if INTRA_KERNELS == "own":
        dq, dk, dv, dg = gla_chunk.gla_chunk_bwd(q, k, v, g_cumsum, h, dh, do, scale)
        return dq, dk, dv, dg, dM0
    from fla.ops.gla.chunk import chunk_gla_bwd_dA, chunk_gla_bwd_dqk_intra, chunk_gla_bwd_dqkg, chunk_gla_bwd_dv
    dv = chunk_gla_bwd_dv(k=k, g=g_cumsum, A=A, do=do, dh=dh, chunk_size=BT)
    dA = chunk_gla_bwd_dA(v=v, do=do, scale=scale, chunk_size=BT)
    dq, dk = chunk_gla_bwd_dqk_intra(q=q, k=k, g=g_cumsum, dA=dA, chunk_size=BT)
    dq, dk, dg = chunk_gla_bwd_dqkg(q=q, k=k, v=v, h=h, g=g_cumsum, do=do, dh=dh, dq=dq, dk=dk, scale=scale,
                                    chunk_size=BT)
    # dq, dk are cast here, not left fp32 for the compiled graph to cast: fused there into in_proj's
    # gradient kernel, they made it 5x slower on an H100.
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.float(), dM0


@gla_bwd.register_fake
def _(q, k, v, g_cumsum, A, h, scale, M0, do, dM_T):
    dM0 = q.new_empty(0) if M0 is None else torch.empty_like(M0)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(g_cumsum), dM0)


def _gla_setup(ctx, inputs, output):
    q, k, v, _, scale, M0 = inputs
    _, _, g_cumsum, h, A = output
    ctx.save_for_backward(q, k, v, g_cumsum, A, h, M0)
    ctx.scale, ctx.has_M0 = scale, M0 is not None


def _gla_backward(ctx, do, dM_T, _dgc, _dh, _dA):
    q, k, v, g_cumsum, A, h, M0 = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dM0 = gla_bwd(q, k, v, g_cumsum, A, h, ctx.scale, M0 if ctx.has_M0 else None,
                                  do, dM_T)
    return dq, dk, dv, dg, None, (dM0 if ctx.has_M0 else None)


gla_fwd.register_autograd(_gla_backward, setup_context=_gla_setup)


def long_term_gpu(q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, M0: Optional[Tensor] = None,
                  scale: float | None = None):
    """Drop-in for long_term_memory on CUDA: (o [B, T, H, Dv] in q's dtype, M_T [B, H, Dk, Dv] fp32)."""
    B, T, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else float(scale)
    if T == 0:
        M = q.new_zeros(B, H, Dk, v.shape[-1], dtype=torch.float32) if M0 is None else M0.float()
        return v, M
    dt = q.dtype
    M0 = None if M0 is None else M0.float().contiguous()
    o, M_T, _, _, _ = gla_fwd(q.contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous(),
                           log_alpha.float().contiguous(), scale, M0)
    return o, M_T
