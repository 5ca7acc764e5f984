"""Hybrid-precision cumulative product of decays (guide section 7.2).

A plain float32 `cumprod` over tens of thousands of factors accumulates one rounding error per
factor; summing their logarithms in float64 instead keeps the product accurate at T = 32768 and
never underflows early. Inputs and outputs keep their dtype (bf16/fp32); only the prefix sum is
float64.
"""
from __future__ import annotations

import torch


def associative_scan_exponential_hybrid(gamma: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """prod_{s<=t} gamma_s along `dim` (the sequence dim of a [B, H, T, D] tensor).

    gamma must lie in (0, 1]; a zero makes the product 0 from there on.
    """
    if gamma.dim() < 1:
        raise ValueError("gamma must have a sequence dimension")
    log_gamma = torch.log(gamma.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny))
    return torch.exp(torch.cumsum(log_gamma, dim=dim)).to(gamma.dtype)
