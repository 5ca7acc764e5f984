"""One MM-Rec block (ARCHITECTURE.md, "One MM-Rec block"): MDI-gated short-term memory h, per-head
matrix long-term memory M, multi-memory read-out and an FFN, with pre-norm residuals.

The block works in two modes that compute the same function:
- `forward(x, state)`: a whole sequence [B, T, d] at once, both recurrences in parallel;
- `step(x, state)`: one token [B, d], the recurrences updated in place of a loop (generation).
A state is {"h": [B, d], "M": [B, H, d_h, d_h]}, float32 (float64 when the model is float64).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..ops import long_term_memory, short_term_memory
from .config import MMRecConfig
from .norms import GroupRMSNorm, RMSNorm


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Gates, log-decays and states are computed in fp32 under bf16 autocast (fp64 stays fp64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class MDIGate(nn.Module):
    """Memory Decay/Integration: log gamma = logsigmoid(a(z)) + logsigmoid(c(k)), two low-rank MLPs."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.base_in, self.base_out = nn.Linear(dim, inner), nn.Linear(inner, dim)        # W_gamma
        self.context_in, self.context_out = nn.Linear(dim, inner), nn.Linear(inner, dim)  # W_c

    def forward(self, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        a = self.base_out(F.gelu(self.base_in(z)))
        c = self.context_out(F.gelu(self.context_in(k)))
        return F.logsigmoid(at_least_fp32(a)) + F.logsigmoid(at_least_fp32(c))


class MMRecBlock(nn.Module):
    def __init__(self, config: MMRecConfig):
        super().__init__()
        d, H = config.expert_dim, config.num_heads
        self.config = config
        self.dim, self.num_heads, self.head_dim = d, H, d // H
        self.norm = RMSNorm(d, config.norm_eps)
        self.in_proj = nn.Linear(d, 5 * d, bias=False)             # W_in -> q, k, v, z, g
        self.mdi = MDIGate(d, config.mdi_dim)
        self.alpha_down = nn.Linear(d, config.alpha_rank, bias=False)  # W_alpha1
        self.alpha_up = nn.Linear(config.alpha_rank, d)                # W_alpha2
        self.h_norm = RMSNorm(d, config.norm_eps)
        self.o_norm = GroupRMSNorm(H, d, config.norm_eps)
        self.out_gate = nn.Linear(d, d, bias=False)                 # W_og
        self.out_proj = nn.Linear(2 * d, d, bias=False)             # W_o
        self.ffn_norm = RMSNorm(d, config.norm_eps)
        self.ffn_in = nn.Linear(d, config.ffn_dim)
        self.ffn_out = nn.Linear(config.ffn_dim, d)
        self.dropout = nn.Dropout(config.dropout)
        # Set by the model: fused projection / GPU kernels on (True) or plain PyTorch (False).
        self.use_kernel_fusion = True
        # Recompute the gates (MDI, input gate, long-term decay) in backward instead of keeping
        # their fp32 intermediates: less activation memory for a little elementwise work.
        self.recompute_gates = True

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
        d = self.dim
        one_minus = torch.logspace(math.log10(0.5), math.log10(1e-3), d)
        self.mdi.base_out.bias.copy_(torch.logit(1 - one_minus))
        self.mdi.context_out.bias.fill_(5.0)

    # -- pieces shared by forward and step -------------------------------------------------------
    def _project(self, u: torch.Tensor):
        if self.use_kernel_fusion:
            return self.in_proj(u).chunk(5, dim=-1)
        return tuple(F.linear(u, w) for w in self.in_proj.weight.chunk(5, dim=0))

    def _gates(self, u, k, z, g):
        log_gamma = self.mdi(z, k)                                       # fp32
        x_in = torch.sigmoid(at_least_fp32(g)) * at_least_fp32(z)
        log_alpha = F.logsigmoid(at_least_fp32(self.alpha_up(self.alpha_down(u)))) / self.config.alpha_temperature
        return log_gamma, x_in, log_alpha

    def _readout(self, x, u, h, o):
        mixed = torch.cat([self.h_norm(h.to(u.dtype)), self.o_norm(o.to(u.dtype)) * F.silu(self.out_gate(u))], -1)
        x = x + self.dropout(self.out_proj(mixed))
        return x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x)))))

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        H, Dh = self.num_heads, self.head_dim
        return {"h": torch.zeros(batch_size, self.dim, device=device, dtype=dtype),
                "M": torch.zeros(batch_size, H, Dh, Dh, device=device, dtype=dtype)}

    # -- whole sequence ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: dict | None = None):
        B, T, d = x.shape
        H, Dh = self.num_heads, self.head_dim
        u = self.norm(x)
        q, k, v, z, g = self._project(u)
        if torch.is_grad_enabled() and self.recompute_gates:
            log_gamma, x_in, log_alpha = checkpoint(self._gates, u, k, z, g, use_reentrant=False,
                                                    preserve_rng_state=False)  # no randomness in the gates
        else:
            log_gamma, x_in, log_alpha = self._gates(u, k, z, g)
        h0 = None if state is None else state["h"]
        M0 = None if state is None else state["M"]
        allow = self.use_kernel_fusion
        h, h_T = short_term_memory(x_in, log_gamma, h0, chunk_size=self.config.chunk_size, allow_kernels=allow)
        split = lambda t: t.reshape(B, T, H, Dh)
        o, M_T = long_term_memory(split(q), split(k), split(v), split(log_alpha), M0,
                                  scale=Dh ** -0.5, allow_kernels=allow)
        y = self._readout(x, u, h, o.reshape(B, T, d))
        return y, {"h": h_T, "M": M_T}

    # -- one token --------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, state: dict | None = None):
        """x: [B, d] -> (y [B, d], new state). Same maths as forward with T = 1, O(1) in context."""
        B, d = x.shape
        H, Dh = self.num_heads, self.head_dim
        if state is None:
            ct = torch.promote_types(x.dtype, torch.float32)
            state = self.init_state(B, x.device, ct)
        u = self.norm(x)
        q, k, v, z, g = self._project(u)
        log_gamma, x_in, log_alpha = self._gates(u, k, z, g)
        ct = state["h"].dtype
        h = log_gamma.to(ct).exp() * state["h"] + x_in.to(ct)
        kh, vh = k.reshape(B, H, Dh).to(ct), v.reshape(B, H, Dh).to(ct)
        M = log_alpha.reshape(B, H, Dh, 1).to(ct).exp() * state["M"] + kh.unsqueeze(-1) * vh.unsqueeze(-2)
        o = torch.einsum("bhk,bhkv->bhv", q.reshape(B, H, Dh).to(ct) * Dh ** -0.5, M)
        y = self._readout(x, u, h.to(x.dtype), o.reshape(B, d).to(x.dtype))
        return y, {"h": h, "M": M}
