"""Conditioning embeddings shared by the generators (SiT, WeTok's AR, MaskGIT)."""

from __future__ import annotations

import torch
from torch import nn


class LabelEmbedder(nn.Module):
    """A table of ``num_classes`` rows, plus the null class (row ``num_classes``) when labels are dropped in
    training (``dropout_prob > 0``: classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)
