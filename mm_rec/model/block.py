"""One MM-Rec block (ARCHITECTURE.md, "One MM-Rec block"): MDI-gated short-term memory h, per-head
matrix long-term memory M, multi-memory read-out and an FFN, with pre-norm residuals.

The maths is written once, over the layer-l blocks of E experts at once (model/batched.py; E = 1
for one expert), and it is what trains, evaluates and serves:
- `block_forward`: a whole sequence x [E, B, T, d], both recurrences in parallel (mm_rec.ops);
- `block_step`: one token x [E, B, d], each recurrence advanced by one update (generation).
They share every piece but the recurrences: `_block_inputs` (steps 1-3 and the long-term decay)
and `_block_outputs` (steps 6-7). `MMRecBlock` holds one expert's parameters and runs them with
E = 1. A state is {"h": [B, d], "M": [B, H, d_h, d_h]}, float32 (float64 when the model is).
The token-by-token float64 oracle the tests hold all of this to is model/block_ref.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import long_term_memory, short_term_memory
from .batched import block_weights, expert_linears, gelu_linear, linear, linear_bias_in_gemm, per_expert, rms_norm
from .config import MMRecConfig
from .norms import GroupRMSNorm, RMSNorm


@dataclass(frozen=True)
class BlockSettings:
    """Everything besides the weights that decides what a block computes: constants to torch.compile."""
    num_heads: int
    norm_eps: float
    alpha_temperature: float      # tau in log alpha = logsigmoid(.) / tau
    scan_chunk_size: int          # chunk length of the parallel short-term recurrence (its op's chunk_size)
    dropout: float = 0.0
    training: bool = False
    recompute_gates: bool = False  # _GateMath: the gates' fp32 intermediates recomputed in backward
    use_kernels: bool = True       # one fused input projection and the GPU recurrence kernels


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Gates, log-decays and states are computed in fp32 under bf16 autocast (fp64 stays fp64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


# -- the block, a whole sequence ------------------------------------------------------------------
def block_forward(linears: dict, norms: dict, x: torch.Tensor, h0, M0, s: BlockSettings):
    """Layer l of E experts on x [E, B, T, d] (block_weights gives linears and norms); h0 [E*B, d]
    and M0 [E*B, H, d_h, d_h] the experts' states along the batch, or None for zeros.
    Returns (y [E, B, T, d], h_T, M_T). A function of tensors, the parameters included: compiled,
    one graph serves every layer (MMRec100M.compile_blocks)."""
    E, B, T, d = x.shape
    H, Dh = s.num_heads, d // s.num_heads
    W = expert_linears(linears)
    x = x.reshape(E, B * T, d)
    u, q, k, v, log_gamma, x_in, log_alpha = _block_inputs(W, norms, x, s)
    h, h_T, o, M_T = _recurrences(x_in, log_gamma, q, k, v, log_alpha, h0, M0, (E, B, T, d), s)
    y = _block_outputs(W, norms, x, u, h.reshape(E, B * T, d), o.reshape(E, B * T, H, Dh), s)
    return y.reshape(E, B, T, d), h_T, M_T


def _recurrences(x_in, log_gamma, q, k, v, log_alpha, h0, M0, shape, s: BlockSettings):
    """4-5. Both recurrences, over E * B sequences of T tokens in one call each (inputs [E, B*T, d]).
    Returns (h [E*B, T, d], h_T, o [E*B, T, H, d_h], M_T)."""
    E, B, T, d = shape
    H, Dh = s.num_heads, d // s.num_heads
    seqs = lambda t: t.reshape(E * B, T, d)
    heads = lambda t: t.reshape(E * B, T, H, Dh)
    h, h_T = short_term_memory(seqs(x_in), seqs(log_gamma), h0, chunk_size=s.scan_chunk_size,
                               allow_kernels=s.use_kernels)
    o, M_T = long_term_memory(heads(q), heads(k), heads(v), heads(log_alpha), M0, scale=Dh ** -0.5,
                              allow_kernels=s.use_kernels)
    return h, h_T, o, M_T


# -- the block, one token -------------------------------------------------------------------------
def block_step(linears: dict, norms: dict, x: torch.Tensor, h: torch.Tensor, M: torch.Tensor, s: BlockSettings):
    """block_forward for one token, O(1) in the context: x [E, B, d] (or one expert's [B, d]); h
    [E*B, d] and M [E*B, H, d_h, d_h], whose dtype the recurrences are computed in. Returns (y, h, M)."""
    rows, d = h.shape
    H, Dh = s.num_heads, d // s.num_heads
    W = expert_linears(linears)
    u, q, k, v, log_gamma, x_in, log_alpha = _block_inputs(W, norms, x, s)
    ct = h.dtype
    # 4. h_t = i_t * z_t + gamma_t * h_{t-1}
    h = log_gamma.reshape(rows, d).to(ct).exp() * h + x_in.reshape(rows, d).to(ct)
    # 5. M_t = diag(alpha_t) M_{t-1} + k_t^T v_t;  o_t = (q_t / sqrt(d_h)) M_t
    heads = lambda t: t.reshape(rows, H, Dh).to(ct)
    M = heads(log_alpha).unsqueeze(-1).exp() * M + heads(k).unsqueeze(-1) * heads(v).unsqueeze(-2)
    o = torch.einsum("bhk,bhkv->bhv", heads(q) * Dh ** -0.5, M)
    y = _block_outputs(W, norms, x, u, h.reshape(x.shape), o.reshape(*x.shape[:-1], H, Dh), s)
    return y, h, M


# -- the pieces both share ------------------------------------------------------------------------
def _block_inputs(W: dict, norms: dict, x: torch.Tensor, s: BlockSettings):
    """Steps 1-3 and the long-term decay of step 5, on x [E, N, d]."""
    u = rms_norm(x, norms["norm"], s.norm_eps)                                # 1. u = RMSNorm(x)
    q, k, v, z, g = _input_projection(u, W["in_proj"], s.use_kernels)       # 2. split(u @ W_in)
    a = linear(F.gelu(linear(z, W["mdi.base_in"])), W["mdi.base_out"])      # 3. MDI base decay
    c = linear(F.gelu(linear(k, W["mdi.context_in"])), W["mdi.context_out"])  # context modulation
    la = linear(linear(u, W["alpha_down"]), W["alpha_up"])                  # 5. low-rank decay logits
    gates = _GateMath.apply if s.recompute_gates and torch.is_grad_enabled() else _gate_math
    log_gamma, x_in, log_alpha = gates(a, c, g, z, la, s.alpha_temperature)
    return u, q, k, v, log_gamma, x_in, log_alpha


def _input_projection(u: torch.Tensor, weight_bias: tuple, fused: bool):
    """q, k, v, z, g = split(u @ W_in): one matmul, or (fused off) five."""
    if fused:
        return linear(u, weight_bias).chunk(5, dim=-1)
    weight, _ = weight_bias  # W_in has no bias
    return tuple(linear(u, (w, None)) for w in weight.chunk(5, dim=0 if weight.dim() == 2 else -1))


def _gate_math(a, c, g, z, la, tau):
    """The gates, in fp32 at least: log gamma = logsigmoid(a) + logsigmoid(c) (MDI), the gated input
    i * z = sigmoid(g) * z, log alpha = logsigmoid(la) / tau."""
    log_gamma = F.logsigmoid(at_least_fp32(a)) + F.logsigmoid(at_least_fp32(c))
    x_in = torch.sigmoid(at_least_fp32(g)) * at_least_fp32(z)
    return log_gamma, x_in, F.logsigmoid(at_least_fp32(la)) / tau


class _GateMath(torch.autograd.Function):
    """_gate_math keeping only its inputs for backward (in their own dtype: bf16 under autocast) and
    recomputing the sigmoids there. Plain autograd would keep ~8.5 KB of fp32 intermediates per
    token, layer and expert; checkpointing the gates saves the same memory but costs more host time
    per step (the eager GPU step is bound by it). d logsigmoid(t)/dt = sigmoid(-t)."""

    @staticmethod
    def forward(ctx, a, c, g, z, la, tau):
        ctx.save_for_backward(a, c, g, z, la)
        ctx.tau = tau
        return _gate_math(a, c, g, z, la, tau)

    @staticmethod
    def backward(ctx, d_log_gamma, d_x_in, d_log_alpha):
        a, c, g, z, la = ctx.saved_tensors
        f = at_least_fp32
        da = dc = dg = dz = dla = None
        if d_log_gamma is not None:
            da = (d_log_gamma * torch.sigmoid(-f(a))).to(a.dtype)
            dc = (d_log_gamma * torch.sigmoid(-f(c))).to(c.dtype)
        if d_x_in is not None:
            sig = torch.sigmoid(f(g))
            dz = (d_x_in * sig).to(z.dtype)
            dg = (d_x_in * f(z) * sig * (1 - sig)).to(g.dtype)
        if d_log_alpha is not None:
            dla = (d_log_alpha * torch.sigmoid(-f(la)) / ctx.tau).to(la.dtype)
        return da, dc, dg, dz, dla, None


def _block_outputs(W: dict, norms: dict, x, u, h, o, s: BlockSettings) -> torch.Tensor:
    """Steps 6-7 on x, u [E, N, d], the short-term memory h [E, N, d] and the long-term read-out
    o [E, N, H, d_h]: x + dropout(W_o [RMSNorm(h) ; GroupRMSNorm(o) * silu(W_og u)]), then the FFN."""
    h, o = h.to(u.dtype), o.to(u.dtype)
    o = F.rms_norm(o, (o.shape[-1],), eps=s.norm_eps).reshape(x.shape) * per_expert(norms["o_norm"])
    mixed = torch.cat([rms_norm(h, norms["h_norm"], s.norm_eps), o * F.silu(linear(u, W["out_gate"]))], -1)
    x = x + F.dropout(linear(mixed, W["out_proj"]), s.dropout, s.training)
    ffn_hidden = linear_bias_in_gemm(rms_norm(x, norms["ffn_norm"], s.norm_eps), W["ffn_in"])
    return x + F.dropout(gelu_linear(ffn_hidden, W["ffn_out"]), s.dropout, s.training)


# -- one layer of E experts, states as the model carries them -------------------------------------
def layer_forward(blocks: list, x: torch.Tensor, states: list | None, block_fn=None):
    """Layer l of E experts at once. x: [E, B, T, d]; states: per expert {"h", "M"}, or None.
    Returns (y [E, B, T, d], per-expert new states). block_fn: block_forward or a torch.compile of it."""
    E = x.shape[0]
    h0 = None if states is None else torch.cat([st["h"] for st in states])
    M0 = None if states is None else torch.cat([st["M"] for st in states])
    y, h_T, M_T = (block_fn or block_forward)(*block_weights(blocks), x, h0, M0, blocks[0].settings())
    return y, [{"h": h, "M": M} for h, M in zip(h_T.chunk(E), M_T.chunk(E))]


# -- one expert's parameters ----------------------------------------------------------------------
class MDIGate(nn.Module):
    """The MDI's parameters: W_gamma (base_in, base_out: d -> r -> d) and W_c (context_in,
    context_out). Its maths is in _block_inputs."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.base_in, self.base_out = nn.Linear(dim, inner), nn.Linear(inner, dim)        # W_gamma
        self.context_in, self.context_out = nn.Linear(dim, inner), nn.Linear(inner, dim)  # W_c


class MMRecBlock(nn.Module):
    """One expert's block: its parameters, under the names checkpoints store, and the block for
    that expert alone (E = 1). The model runs the experts' blocks of one layer together through
    layer_forward."""

    def __init__(self, config: MMRecConfig):
        super().__init__()
        d, H = config.expert_dim, config.num_heads
        self.config = config
        self.dim, self.num_heads, self.head_dim = d, H, d // H
        self.norm = RMSNorm(d, config.norm_eps)
        self.in_proj = nn.Linear(d, 5 * d, bias=False)                 # W_in -> q, k, v, z, g
        self.mdi = MDIGate(d, config.mdi_dim)
        self.alpha_down = nn.Linear(d, config.alpha_rank, bias=False)  # W_alpha1
        self.alpha_up = nn.Linear(config.alpha_rank, d)                # W_alpha2
        self.h_norm = RMSNorm(d, config.norm_eps)
        self.o_norm = GroupRMSNorm(H, d, config.norm_eps)
        self.out_gate = nn.Linear(d, d, bias=False)                    # W_og
        self.out_proj = nn.Linear(2 * d, d, bias=False)                # W_o
        self.ffn_norm = RMSNorm(d, config.norm_eps)
        self.ffn_in = nn.Linear(d, config.ffn_dim)
        self.ffn_out = nn.Linear(config.ffn_dim, d)
        # Set by the model: fused projection / GPU kernels on (True) or plain PyTorch (False).
        self.use_kernel_fusion = True
        # Recompute the gates in backward instead of keeping their fp32 intermediates: less
        # activation memory for a little elementwise work.
        self.recompute_gates = True

    def settings(self) -> BlockSettings:
        cfg = self.config
        return BlockSettings(self.num_heads, cfg.norm_eps, cfg.alpha_temperature, cfg.scan_chunk_size,
                             cfg.dropout, self.training, self.recompute_gates, self.use_kernel_fusion)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in (self.out_proj, self.ffn_out):  # residual outputs, GPT-2 style
            m.weight.mul_(1 / math.sqrt(2 * self.config.num_layers))
        # Spread the base decay sigma(a) over time scales, 0.5 .. 0.999 (log-spaced 1 - gamma, as
        # Mamba spreads dt), and start the context modulation sigma(c) near 1 so it can only tighten.
        one_minus = torch.logspace(math.log10(0.5), math.log10(1e-3), self.dim)
        self.mdi.base_out.bias.copy_(torch.logit(1 - one_minus))
        self.mdi.context_out.bias.fill_(5.0)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        H, Dh = self.num_heads, self.head_dim
        return {"h": torch.zeros(batch_size, self.dim, device=device, dtype=dtype),
                "M": torch.zeros(batch_size, H, Dh, Dh, device=device, dtype=dtype)}

    def forward(self, x: torch.Tensor, state: dict | None = None):
        """x [B, T, d] -> (y [B, T, d], new state)."""
        y, states = layer_forward([self], x.unsqueeze(0), None if state is None else [state])
        return y[0], states[0]

    def step(self, x: torch.Tensor, state: dict | None = None):
        """x [B, d], one token -> (y [B, d], new state): forward with T = 1, O(1) in the context."""
        if state is None:
            state = self.init_state(x.shape[0], x.device, torch.promote_types(x.dtype, torch.float32))
        y, h, M = block_step(*block_weights([self]), x, state["h"], state["M"], self.settings())
        return y, {"h": h, "M": M}
