"""Flux-style MMDiT blocks (double-stream only), the towers of FlowMo's encoder and decoder.

A tower sees two sequences: ``img`` (patchified image tokens) and ``txt`` (1-D latent tokens). Each
:class:`DoubleStreamBlock` gives both streams their own AdaLN modulation, qkv, QK RMSNorm, output projection and
GELU-tanh MLP, and runs one joint attention over the concatenation **txt first, then img** with 3-axis RoPE
(``tokcli/nn/rope.py``). Without a timestep (FlowMo's encoder) the modulation is the identity (shift 0, scale 0,
gate 1) and a block is a plain pre-LN transformer block.

Module names follow the official checkpoints (``double_blocks.N.img_attn.qkv``, ``time_in.in_layer``,
``final_layer_txt.adaLN_modulation.1``, ...), so an official state dict loads without renaming. Two details of the
official code matter for its weights: the attention scale is ``8 / head_dim`` (muP; 1/sqrt(head_dim) only when
head_dim is 64), and the final layer applies the same non-affine LayerNorm twice (after the AdaLN modulation and
again before the readout).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokcli.nn.rope import apply_rope, rope_tables

LN_EPS = 1e-6


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """The towers' LayerNorm: no affine parameters, eps 1e-6."""
    return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """t [B] in [0, 1] -> [B, dim] sinusoid of ``time_factor * t``, **cos first, then sin**, frequencies
    ``max_period ** (-k / (dim / 2))`` (Flux's convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = (time_factor * t)[:, None].float() * freqs[None]
    emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
    if dim % 2:
        emb = torch.cat((emb, torch.zeros_like(emb[:, :1])), dim=-1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (the timestep MLP)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # the statistic in fp32 even under bf16, as the official code
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class StreamAttention(nn.Module):
    """One stream's attention parameters: qkv (rows ordered K=3, heads, head_dim), per-head QK norm, proj."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, d] -> q, k, v [B, H, L, head_dim], q and k RMS-normalised."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.norm.query_norm(q).to(v.dtype), self.norm.key_norm(k).to(v.dtype), v


class Modulation(nn.Module):
    """silu(vec) -> Linear(d, 6d) -> (shift, scale, gate) for attention, then for the MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, 6 * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(6, dim=-1)


def _mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def _modulated(x: torch.Tensor, shift, scale) -> torch.Tensor:
    y = layer_norm(x)
    return y if shift is None else (1 + scale) * y + shift


def _gated(x: torch.Tensor, gate, y: torch.Tensor) -> torch.Tensor:
    return x + y if gate is None else x + gate * y


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_scale: float | None = None):
        super().__init__()
        self.attn_scale = attn_scale  # None: SDPA's 1/sqrt(head_dim)
        self.img_mod, self.txt_mod = Modulation(dim), Modulation(dim)
        self.img_attn = StreamAttention(dim, num_heads, qkv_bias)
        self.txt_attn = StreamAttention(dim, num_heads, qkv_bias)
        self.img_mlp, self.txt_mlp = _mlp(dim, mlp_ratio), _mlp(dim, mlp_ratio)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                vec: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        none = (None,) * 6
        im = self.img_mod(vec) if vec is not None else none
        tm = self.txt_mod(vec) if vec is not None else none
        iq, ik, iv = self.img_attn.heads(_modulated(img, im[0], im[1]))
        tq, tk, tv = self.txt_attn.heads(_modulated(txt, tm[0], tm[1]))
        cos, sin = rope
        q = apply_rope(torch.cat((tq, iq), dim=2), cos, sin)
        k = apply_rope(torch.cat((tk, ik), dim=2), cos, sin)
        v = torch.cat((tv, iv), dim=2)
        a = F.scaled_dot_product_attention(q, k, v, scale=self.attn_scale)
        a = a.transpose(1, 2).flatten(2)  # B H L D -> B L (H D)
        n_txt = txt.shape[1]
        img = _gated(img, im[2], self.img_attn.proj(a[:, n_txt:]))
        img = _gated(img, im[5], self.img_mlp(_modulated(img, im[3], im[4])))
        txt = _gated(txt, tm[2], self.txt_attn.proj(a[:, :n_txt]))
        txt = _gated(txt, tm[5], self.txt_mlp(_modulated(txt, tm[3], tm[4])))
        return img, txt


class LastLayer(nn.Module):
    """``(1 + scale) LN(x) + shift`` (with a timestep), then LN **again**, then the readout Linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor | None) -> torch.Tensor:
        if vec is not None:
            shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
            x = (1 + scale[:, None, :]) * layer_norm(x) + shift[:, None, :]
        return self.linear(layer_norm(x))


class MMDiT(nn.Module):
    """A tower: ``img_in`` / ``txt_in`` -> ``depth`` double-stream blocks -> ``final_layer_img`` / ``_txt``.

    in_channels: image-token features (3 p^2); context_dim: latent-token features in; txt_out: latent features out
    (default context_dim); axes_dim: RoPE split of a head (sums to hidden / num_heads); attn_scale: SDPA scale
    (None = 1/sqrt(head_dim); FlowMo uses 8 / head_dim)."""

    def __init__(self, *, in_channels: int, context_dim: int, hidden: int, num_heads: int, depth: int,
                 axes_dim: Sequence[int], txt_out: int | None = None, mlp_ratio: float = 4.0,
                 theta: float = 10000.0, attn_scale: float | None = None, qkv_bias: bool = True):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {num_heads} heads")
        if sum(axes_dim) != hidden // num_heads:
            raise ValueError(f"RoPE axes {list(axes_dim)} do not sum to head_dim {hidden // num_heads}")
        self.axes_dim, self.theta = [int(a) for a in axes_dim], float(theta)
        self.time_in = MLPEmbedder(256, hidden)
        self.img_in = nn.Linear(in_channels, hidden)
        self.txt_in = nn.Linear(context_dim, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden, num_heads, mlp_ratio, qkv_bias, attn_scale)
                                           for _ in range(depth))
        self.final_layer_img = LastLayer(hidden, in_channels)
        self.final_layer_txt = LastLayer(hidden, txt_out or context_dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor,
                timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, N, in_channels], txt [B, L, context_dim], pos [L + N, 3] (txt first), timesteps [B] or None
        -> (img [B, N, in_channels], txt [B, L, txt_out])."""
        if timesteps is not None and timesteps.numel() > 1 and bool((timesteps == timesteps[:1]).all()):
            # one t for the whole batch (every sampler step): its embedding and modulations are computed once and
            # broadcast, so an image's output does not depend on the batch size (a 1-row and a B-row matmul round
            # differently) and B equal rows are not recomputed
            timesteps = timesteps[:1]
        vec = None if timesteps is None else self.time_in(timestep_embedding(timesteps, 256))
        img, txt = self.img_in(img), self.txt_in(txt)
        rope = rope_tables(pos, self.axes_dim, self.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, rope, vec)
        return self.final_layer_img(img, vec), self.final_layer_txt(txt, vec)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p p C]: row-major patches, channel innermost inside a patch."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`patchify` for an image of h x w pixels."""
    b, _, d = x.shape
    c = d // (p * p)
    return x.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
