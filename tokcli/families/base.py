"""The Tokenizer contract every family implements (see DESIGN.md).

A Tokenizer is an ``nn.Module`` with:

- ``spec``: a :class:`TokenSpec` describing what ``encode`` returns;
- ``preprocess``: dict with ``image_size`` (int), ``crop`` ("adm_center"), ``value_range`` ([-1, 1]),
  ``multiple_of`` (the spatial size the model needs images to be a multiple of);
- ``encode(x)``: ``x`` float [B, 3, H, W] in [-1, 1] -> tokens (a torch tensor, layout given by ``spec``);
- ``decode(tokens, *, seed=None, noise=None, clamp=True)`` -> images [B, 3, H, W] in [-1, 1]
  (``clamp=False`` returns the raw decoder output, as the official code does);
- ``forward(x) -> (recon, aux)`` for training, ``aux`` holding quantizer losses and statistics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

TOKEN_KINDS = ("indices", "bits", "latents")


@dataclass
class TokenSpec:
    """What one image's tokens look like.

    kind: "indices" (integer codes), "bits" (0/1 per bit) or "latents" (floats).
    shape: per-image token shape at the model's default image size, e.g. (h, w, g).
    codebook_size: number of codes per index (indices), None otherwise.
    bits: bits per token vector (bits), None otherwise.
    latent_dim: channels per latent (latents), None otherwise.
    downsample: spatial reduction factor for 2-D tokenizers (the shape scales with the image); None for 1-D.
    layout: a short human description of the axis order and index convention.
    """

    kind: str
    shape: tuple[int, ...]
    codebook_size: int | None = None
    bits: int | None = None
    latent_dim: int | None = None
    downsample: int | None = None
    layout: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in TOKEN_KINDS:
            raise ValueError(f"token kind must be one of {TOKEN_KINDS}, got {self.kind!r}")
        self.shape = tuple(int(s) for s in self.shape)

    def shape_for(self, height: int, width: int) -> tuple[int, ...]:
        """Per-image token shape for an input of height x width (2-D tokenizers scale with the image)."""
        if self.downsample is None:
            return self.shape
        f = self.downsample
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not a multiple of the downsample factor {f}")
        return (height // f, width // f, *self.shape[2:])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenSpec":
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        return cls(**d)


class Tokenizer(nn.Module):
    """Base class: families subclass this and fill in encode/decode/forward."""

    family: str = ""

    def __init__(self):
        super().__init__()
        # Filled by tokcli.load() from the model folder; empty for a freshly built model.
        self.name: str = ""
        self.sha256: str = ""
        self.source: str = ""

    # --- the contract -------------------------------------------------------------------------------
    @property
    def spec(self) -> TokenSpec:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def preprocess(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, *, seed: int | None = None, noise: torch.Tensor | None = None,
               clamp: bool = True) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- helpers shared by all families --------------------------------------------------------------
    @property
    def stochastic_decoder(self) -> bool:
        """True when decode() draws noise (results then depend on the seed)."""
        return False

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def reconstruct(self, x: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
        """encode then decode, clamped to [-1, 1]."""
        return self.decode(self.encode(x), seed=seed)
