"""The MM-Rec block as ARCHITECTURE.md writes it, one token at a time: the tests' oracle.

Plain and slow on purpose: every formula of "One MM-Rec block" in its own words (gamma as
sigmoid(a) * sigmoid(c), the RMSNorms spelt out, both memories updated token by token), from an
`MMRecBlock`'s parameters, differentiable. Run in float64, it is what tests hold `block_forward`
(one expert and both batched), its gradients and `block_step` to. Nothing else imports it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def block_ref(block, x: torch.Tensor, state: dict | None = None):
    """x [B, T, d] through `block` (an MMRecBlock; dropout off) -> (y [B, T, d], {"h", "M"})."""
    B, T, d = x.shape
    H, Dh, eps = block.num_heads, block.head_dim, block.config.norm_eps
    tau = block.config.alpha_temperature
    lin = lambda layer, t: F.linear(t, layer.weight, layer.bias)
    h = x.new_zeros(B, d) if state is None else state["h"].to(x.dtype)
    M = x.new_zeros(B, H, Dh, Dh) if state is None else state["M"].to(x.dtype)
    ys = []
    for t in range(T):
        x_t = x[:, t]
        u = _rms(x_t, block.norm.weight, eps)                                       # 1
        q, k, v, z, g = lin(block.in_proj, u).chunk(5, dim=-1)                      # 2
        a = lin(block.mdi.base_out, F.gelu(lin(block.mdi.base_in, z)))             # 3
        c = lin(block.mdi.context_out, F.gelu(lin(block.mdi.context_in, k)))
        gamma, i = torch.sigmoid(a) * torch.sigmoid(c), torch.sigmoid(g)
        h = i * z + gamma * h                                                       # 4
        alpha = torch.exp(F.logsigmoid(lin(block.alpha_up, lin(block.alpha_down, u))) / tau)  # 5
        k_h, v_h, q_h = (t_.reshape(B, H, Dh) for t_ in (k, v, q))
        M = alpha.reshape(B, H, Dh, 1) * M + k_h.unsqueeze(-1) * v_h.unsqueeze(-2)
        o = (q_h / math.sqrt(Dh)).unsqueeze(-2).matmul(M).reshape(B, H, Dh)
        o = _rms(o, 1.0, eps).reshape(B, d) * block.o_norm.weight                    # GroupRMSNorm_H
        y = lin(block.out_proj, torch.cat([_rms(h, block.h_norm.weight, eps),       # 6
                                           o * F.silu(lin(block.out_gate, u))], -1))
        x_t = x_t + y                                                               # 7
        x_t = x_t + lin(block.ffn_out, F.gelu(lin(block.ffn_in, _rms(x_t, block.ffn_norm.weight, eps))))
        ys.append(x_t)
    return torch.stack(ys, 1), {"h": h, "M": M}
