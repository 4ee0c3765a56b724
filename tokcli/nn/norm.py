"""Normalisation layers shared by the quantizers, the tokenizers' blocks and the generators."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Weight-only RMSNorm over the last axis; the mean square is computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = x.float().pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(ms + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return y * self.weight
