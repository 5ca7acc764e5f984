"""An expert: a stack of MM-Rec blocks and a final RMSNorm (the Text and the Code expert).

`experts_forward` runs several experts on the same input as one batched computation, layer by
layer (model/batched.py): layer l of every expert is one `layer_forward` call.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .block import MMRecBlock, layer_forward
from .config import MMRecConfig
from .norms import RMSNorm


class ExpertModule(nn.Module):
    def __init__(self, config: MMRecConfig):
        super().__init__()
        self.blocks = nn.ModuleList(MMRecBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.expert_dim, config.norm_eps)

    def forward(self, x: torch.Tensor, states: list | None = None, gradient_checkpointing: bool = False):
        """x: [B, T, d]; states: one {"h", "M"} per block or None. Returns (y, new_states)."""
        outputs, new_states = experts_forward([self], x, None if states is None else [states],
                                              gradient_checkpointing)
        return outputs[0], new_states[0]

    def step(self, x: torch.Tensor, states: list | None = None):
        """x: [B, d], one token. Returns (y [B, d], new_states)."""
        new_states = []
        for i, block in enumerate(self.blocks):
            x, state = block.step(x, None if states is None else states[i])
            new_states.append(state)
        return self.norm(x), new_states


def experts_forward(experts: list, x: torch.Tensor, states: list | None, gradient_checkpointing: bool = False,
                    block_fn=None):
    """Every expert on the same input x [B, T, d]. states: per expert a list of per-layer states
    (or None). Returns (per-expert outputs after the expert's final norm, per-expert new states).
    block_fn: what runs each layer's maths, block_forward or a torch.compile of it."""
    E = len(experts)
    # A real copy per expert, not a stride-0 view: every layer then sees the same strides (a
    # compiled block is traced once, not again for the first layer).
    xs = x.unsqueeze(0).expand(E, *x.shape).contiguous() if E > 1 else x.unsqueeze(0)
    new_states = [[] for _ in range(E)]
    for layer in range(len(experts[0].blocks)):
        blocks = [e.blocks[layer] for e in experts]
        layer_states = None if states is None else [s[layer] for s in states]
        if gradient_checkpointing and torch.is_grad_enabled():
            # The RNG state is saved for dropout only (a captured CUDA graph cannot read it).
            xs, layer_states = checkpoint(layer_forward, blocks, xs, layer_states, block_fn, use_reentrant=False,
                                          preserve_rng_state=blocks[0].config.dropout > 0)
        else:
            xs, layer_states = layer_forward(blocks, xs, layer_states, block_fn)
        for i, s in enumerate(layer_states):
            new_states[i].append(s)
    outputs = [expert.norm(xs[i]) for i, expert in enumerate(experts)]
    return outputs, new_states
