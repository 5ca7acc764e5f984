"""FusionLayer: mixes the concatenated expert outputs [t ; c] (2d channels).

Both methods are the identity at initialisation, so switching fusion on at Stage 3 starts from
exactly the Stage 2 function and the loss carries on where it was.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class FusionLayer(nn.Module):
    def __init__(self, dim: int, method: str = "concatenate"):
        super().__init__()
        if method not in ("concatenate", "weighted"):
            raise ValueError(f"fusion method must be 'concatenate' or 'weighted', got {method!r}")
        self.method = method
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim) if method == "weighted" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        if self.gate is not None:  # 2 * sigmoid(0) = 1: every channel passes unchanged
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            f = f * (2 * torch.sigmoid(self.gate(f)))
        return self.proj(f)
