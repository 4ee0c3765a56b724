"""SiT (Ma et al. 2024, arXiv:2401.08740) on 1-D latents, as SoftVQ-VAE's generators use it (official code
Hhhhhhao/continuous_tokenizer, ``modelling/sit.py`` with ``vae_1d=True``; written here from the architecture).

    x [B, L, d] (normalised latents) -> Linear d -> D  + fixed 1-D sin-cos table
    c = timestep embedding(t in [0, 1], cos first, 256 -> MLP) + label embedding (row num_classes = the null class)
    depth x adaLN-Zero block: x += g1 * Attn(LN(x) (1 + s1) + b1);  x += g2 * MLP(LN(x) (1 + s2) + b2)
    final layer: Linear(LN(x) (1 + s) + b) -> v [B, L, d]

LayerNorms have no affine parameters (eps 1e-6); the MLP is fc1 -> tanh-GELU -> fc2 (timm's ``Mlp``); attention is
timm's ``Attention`` with qkv bias, forced onto ``F.scaled_dot_product_attention``. Module names are the official
ones, so an official state dict loads as is. ``forward(x, t, y)`` returns the velocity (the official module returns
the tuple ``(v, [])``).

model_args (the official config.json names): ``input_size`` (L), ``in_channels`` (d), ``hidden_size`` (D),
``depth``, ``num_heads``, ``mlp_ratio`` (4), ``num_classes`` (1000), ``class_dropout_prob`` (0.1: the label table
gets the null row when > 0), ``qk_norm`` (false).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokcli.core.model_args import complete, integer, non_negative
from tokcli.errors import TokError
from tokcli.gen.base import Generator
from tokcli.nn.embed import LabelEmbedder

FAMILY = "sit"
REQUIRED = ("input_size", "in_channels", "hidden_size", "depth", "num_heads")
DEFAULTS: dict[str, Any] = {"mlp_ratio": 4.0, "num_classes": 1000, "class_dropout_prob": 0.1, "qk_norm": False}
SAMPLE_DEFAULTS: dict[str, Any] = {"sampler": "sde", "steps": 250, "cfg": 1.75, "guidance_interval": [0.0, 0.7],
                                   "path_type": "cosine", "seed": 0}


def normalize_model_args(args: dict[str, Any]) -> dict[str, Any]:
    a = complete("SiT", args, REQUIRED, DEFAULTS)
    for k in (*REQUIRED, "num_classes"):
        a[k] = integer("SiT", k, a[k])
    for k in ("mlp_ratio", "class_dropout_prob"):
        a[k] = non_negative("SiT", k, a[k])
    if a["hidden_size"] % a["num_heads"]:
        raise TokError(f"SiT hidden_size {a['hidden_size']} is not a multiple of num_heads {a['num_heads']}")
    if a["hidden_size"] % 2:
        raise TokError(f"SiT hidden_size {a['hidden_size']} must be even (the sin-cos position table)")
    a["qk_norm"] = bool(a["qk_norm"])
    return a


def sincos_table_1d(dim: int, length: int) -> torch.Tensor:
    """[length, dim]: entry (p, 2i) = sin(p w_i), (p, 2i + 1) = cos(p w_i), w_i = 10000^(-2i / dim), in float32."""
    w = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    a = torch.arange(length, dtype=torch.float32)[:, None] * w[None]
    return torch.stack([a.sin(), a.cos()], dim=-1).reshape(length, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (not scaled by 1000) -> [cos(t f), sin(t f)] with f_k = 10000^(-k / 128) -> Linear, SiLU, Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        a = t.float()[:, None] * freqs[None]
        emb = torch.cat([a.cos(), a.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class SiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        from timm.layers import Attention, Mlp

        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True, qk_norm=qk_norm)
        self.attn.fused_attn = True  # F.scaled_dot_product_attention, whatever TIMM_FUSED_ATTN says
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(Generator):
    family = FAMILY
    sampler_options = ("sampler", "steps", "cfg", "guidance_interval", "path_type")

    def __init__(self, **model_args):
        super().__init__()
        self.model_args = a = normalize_model_args(model_args)
        d, D, n = a["in_channels"], a["hidden_size"], a["input_size"]
        self.x_embedder = nn.Linear(d, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(a["num_classes"], D, a["class_dropout_prob"])
        self.register_buffer("pos_embed", sincos_table_1d(D, n)[None])  # fixed; stored in the folder as released
        self.blocks = nn.ModuleList(SiTBlock(D, a["num_heads"], a["mlp_ratio"], a["qk_norm"])
                                    for _ in range(a["depth"]))
        self.final_layer = FinalLayer(D, d)
        self.sample_defaults = dict(SAMPLE_DEFAULTS)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: Xavier-uniform Linears with zero bias, N(0, 0.02) label table and timestep
        MLP, zero adaLN modulations and final Linear (adaLN-Zero: every block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for i in (0, 2):
            nn.init.normal_(self.t_embedder.mlp[i].weight, std=0.02)
        for mod in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                     self.final_layer.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    # --- sizes -------------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.model_args["num_classes"]

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.model_args["input_size"], self.model_args["in_channels"]

    # --- the network ---------------------------------------------------------------------------------------------
    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t) + self.y_embedder(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity v(x_t, t, y): x [B, L, d], t [B] in [0, 1], y [B] class ids (``num_classes`` = null)."""
        if x.dim() != 3 or tuple(x.shape[1:]) != self.latent_shape:
            L, d = self.latent_shape
            raise TokError(f"SiT input must be [B, {L}, {d}], got {list(x.shape)}")
        h = self.x_embedder(x) + self.pos_embed
        c = self.condition(t, y)
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c)

    # --- sampling ----------------------------------------------------------------------------------------------
    def check_sampler(self, options) -> None:
        from tokcli.gen.sit.sampler import check_options

        check_options(self, **{**{k: SAMPLE_DEFAULTS[k] for k in self.sampler_options}, **options})

    def _sample(self, labels: torch.Tensor, *, seeds: list[int], noise: Any, **opts) -> torch.Tensor:
        from tokcli.gen.sit.sampler import sample_latents

        return sample_latents(self, labels, seeds=seeds, noise=noise, **opts)

    def check_tokenizer(self, tokenizer) -> None:
        super().check_tokenizer(tokenizer)
        shape = tuple(tokenizer.spec.shape)
        if shape != self.latent_shape:
            raise TokError(f"{tokenizer.name or tokenizer.family} makes latents of shape {list(shape)}; the SiT "
                           f"generator {self.name} samples {list(self.latent_shape)}")
        extra = tokenizer.spec.extra or {}
        if "vq_std" not in extra or "vq_mean" not in extra:
            raise TokError(f"{tokenizer.name or tokenizer.family} records no latent statistics (vq_mean / vq_std): "
                           "the SiT generator samples normalised latents")

    def tokens_for(self, samples: torch.Tensor, tokenizer) -> torch.Tensor:
        """Normalised samples x -> the tokenizer's tokens: z = x vq_std + vq_mean (the latents the official script
        decodes), or x itself for a tokenizer whose tokens are normalised (``tokens.extra.normalized``)."""
        self.check_tokenizer(tokenizer)
        extra = tokenizer.spec.extra
        x = samples.float()
        if extra.get("normalized"):
            return x
        return x * float(extra["vq_std"]) + float(extra["vq_mean"])
