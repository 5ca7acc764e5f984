"""An expert: a stack of MM-Rec blocks and a final RMSNorm (the Text and the Code expert)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .block import MMRecBlock
from .config import MMRecConfig
from .norms import RMSNorm


class ExpertModule(nn.Module):
    def __init__(self, config: MMRecConfig):
        super().__init__()
        self.blocks = nn.ModuleList(MMRecBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.expert_dim, config.norm_eps)

    def forward(self, x: torch.Tensor, states: list | None = None, gradient_checkpointing: bool = False):
        """x: [B, T, d]; states: one {"h", "M"} per block or None. Returns (y, new_states)."""
        new_states = []
        for i, block in enumerate(self.blocks):
            state = None if states is None else states[i]
            if gradient_checkpointing and torch.is_grad_enabled():
                x, state = checkpoint(block, x, state, use_reentrant=False,
                                      preserve_rng_state=block.dropout.p > 0)
            else:
                x, state = block(x, state)
            new_states.append(state)
        return self.norm(x), new_states

    def step(self, x: torch.Tensor, states: list | None = None):
        """x: [B, d], one token. Returns (y [B, d], new_states)."""
        new_states = []
        for i, block in enumerate(self.blocks):
            x, state = block.step(x, None if states is None else states[i])
            new_states.append(state)
        return self.norm(x), new_states
