"""Toy tokenizer: a strided conv to D channels, nearest-neighbour VQ (a shared block), a transposed conv back."""

from __future__ import annotations

import torch
from torch import nn

from tokcli.families.base import TokenSpec, Tokenizer
from tokcli.quant.vq import VectorQuantizer


class Toy(Tokenizer):
    family = "toyfam"

    def __init__(self, *, dim: int = 8, codebook_size: int = 16, patch: int = 4, image_size: int = 16):
        super().__init__()
        self.model_args = {"dim": dim, "codebook_size": codebook_size, "patch": patch, "image_size": image_size}
        self.enc = nn.Conv2d(3, dim, patch, stride=patch)
        self.quantize = VectorQuantizer(dim, codebook_size)
        self.dec = nn.ConvTranspose2d(dim, 3, patch, stride=patch)

    @property
    def spec(self) -> TokenSpec:
        a = self.model_args
        s = a["image_size"] // a["patch"]
        return TokenSpec(kind="indices", shape=(s, s), codebook_size=a["codebook_size"], downsample=a["patch"],
                         layout="(y, x)")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize.forward(self.enc(x.to(self.device))).ids

    def _decode(self, tokens, *, seed=None, noise=None, **sampler):
        return self.dec(self.quantize.decode_ids(tokens.to(self.device).long()))

    def forward(self, x):
        out = self.quantize(self.enc(x))
        return self.dec(out.quantized), {"vq_loss": sum(out.losses.values()), "indices": out.ids}
