"""RMSNorm and its per-head variant."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weight in x's dtype (bf16 under autocast after a bf16 matmul): the fused kernel needs one dtype
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class GroupRMSNorm(nn.Module):
    """RMSNorm over each head's channels separately (x: [..., H * Dh])."""

    def __init__(self, num_heads: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(*shape[:-1], self.num_heads, shape[-1] // self.num_heads)
        x = F.rms_norm(x, (x.shape[-1],), eps=self.eps).reshape(shape)
        return x * self.weight
