"""MM-Rec with a short causal convolution on q, k and v: the candidate block change that
ARCHITECTURE.md's notes ("Associative recall") measure, as a benchmark variant.

In MM-Rec's block, q_t, k_t and v_t all come from token t alone. To recall "the value that came
after key K", the long-term memory M must store k = (the previous token) against v = (this
token); a 2-layer MM-Rec has to build that shift out of its decaying h memory first, and on MQAR
it did not (bench_quality.py --parts mqar). GLA, DeltaNet, Mamba and Based all put a depthwise
causal convolution of width 4 (then SiLU) on their mixer's inputs; this variant does the same:

    q, k, v <- silu(causal_depthwise_conv_4(q, k, v))      between steps 2 and 5 of the block

Everything else is `mm_rec.model.block.block_forward`, unchanged. The variant trains and scores
whole sequences from a zero state only: the convolution's last 3 inputs would be part of the
recurrent state, and the model's states, generation, windows and sessions do not carry them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mm_rec.model.batched import expert_linears
from mm_rec.model.block import _block_inputs, _block_outputs, _recurrences
from mm_rec.model.config import MMRecConfig
from mm_rec.model.mmrec import MMRec100M

KERNEL = 4


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """x [N = B*T, d] -> silu(conv) [N, d]: each channel over the past KERNEL tokens of its sequence."""
    d = x.shape[-1]
    seq = F.pad(x.reshape(B, T, d).transpose(1, 2), (weight.shape[-1] - 1, 0))
    return F.silu(F.conv1d(seq, weight.to(x.dtype), groups=d)).transpose(1, 2).reshape(B * T, d)


def build(config: MMRecConfig) -> MMRec100M:
    """MM-Rec of `config` with a (q, k, v) convolution in every block, run through the model's
    block-function hook (the one torch.compile uses)."""
    model = MMRec100M(config=config)
    convs = {}
    for expert in model.experts.values():
        for block in expert.blocks:
            block.short_conv = nn.ParameterList(
                nn.Parameter(torch.empty(config.expert_dim, 1, KERNEL).uniform_(-KERNEL ** -0.5, KERNEL ** -0.5))
                for _ in range(3))  # nn.Conv1d's default initialisation
            convs[block.in_proj.weight] = block.short_conv  # the block function sees weights, not modules

    def block_forward(linears, norms, x, h0, M0, s):
        if h0 is not None or M0 is not None:
            raise NotImplementedError("the short-convolution variant runs from a zero state only")
        E, B, T, d = x.shape
        H, Dh = s.num_heads, d // s.num_heads
        W = expert_linears(linears)
        x = x.reshape(E, B * T, d)
        u, q, k, v, log_gamma, x_in, log_alpha = _block_inputs(W, norms, x, s)
        per_expert = [convs[w] for w in linears["in_proj"][0]]
        q, k, v = (torch.stack([causal_depthwise_conv(t[e], per_expert[e][i], B, T) for e in range(E)])
                   for i, t in enumerate((q, k, v)))
        h, h_T, o, M_T = _recurrences(x_in, log_gamma, q, k, v, log_alpha, None, None, (E, B, T, d), s)
        y = _block_outputs(W, norms, x, u, h.reshape(E, B * T, d), o.reshape(E, B * T, H, Dh), s)
        return y.reshape(E, B, T, d), h_T, M_T

    model._block_fn = block_forward
    return model
