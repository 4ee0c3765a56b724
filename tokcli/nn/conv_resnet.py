"""MAGVIT-2 style convolutional encoder / decoder (Open-MAGVIT2, IBQ, WeTok).

Pure CNN, no attention: GroupNorm(32, eps 1e-6) + swish ResBlocks, stride-2 conv downsampling, conv + depth-to-space
upsampling, and adaptive GroupNorm in the decoder (styled by the quantized latent). Module names match the official
``improved_model.py`` so official weights load strictly:

    encoder: conv_in, down.{i}.block.{j}, down.{i}.downsample, mid_block.{j}, norm_out, conv_out
    decoder: conv_in, mid_block.{j}, adaptive.{i}, up.{i}.block.{j}, up.{i}.upsample.conv1, norm_out, conv_out

Level i = 0 is the highest resolution. Tensors keep the layout of the input (contiguous NCHW, or channels-last,
where oneDNN's convolutions are faster on CPU; GroupNorm is then the accurate :func:`tokcli.nn.norm.group_norm`); at
inference (grad disabled) the activations run in place to save memory traffic.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokcli.nn.norm import GroupNorm, group_norm

GN_GROUPS = 32
GN_EPS = 1e-6
STYLE_EPS = 1e-6


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x); in place when autograd is off (the input is then a temporary we own)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def Normalize(channels: int, affine: bool = True) -> nn.GroupNorm:
    return GroupNorm(GN_GROUPS, channels, eps=GN_EPS, affine=affine)  # accurate in channels-last too


class ResBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus the (1x1 conv when in != out) shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        # h is a fresh conv output that autograd does not need: adding in place is safe
        return h.add_(x)


class Upsample(nn.Module):
    """3x3 conv C -> 4C, then depth-to-space with DCR ordering (not pixel_shuffle's CRD ordering):
    output channel c at sub-pixel (i, j) comes from conv channel (2 i + j) * C + c."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space_dcr(self.conv1(x), 2)


def depth_to_space_dcr(x: torch.Tensor, r: int) -> torch.Tensor:
    """[B, r*r*C, H, W] -> [B, C, H*r, W*r], input channel (i*r + j)*C + c -> output (c, y*r + i, x*r + j)."""
    b, c4, h, w = x.shape
    c = c4 // (r * r)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # keep channels-last layout: memory (b, h, w, i, j, c) -> (b, h, i, w, j, c)
        y = x.permute(0, 2, 3, 1).reshape(b, h, w, r, r, c).permute(0, 1, 3, 2, 4, 5)
        return y.reshape(b, h * r, w * r, c).permute(0, 3, 1, 2)
    x = x.view(b, r, r, c, h, w).permute(0, 3, 4, 1, 5, 2)  # b, c, h, i, w, j
    return x.reshape(b, c, h * r, w * r)


class AdaptiveGroupNorm(nn.Module):
    """Affine-free GroupNorm on x, then per-sample scale / shift from the style latent's spatial statistics:
    scale = gamma(sqrt(unbiased var + 1e-6)), shift = beta(mean)."""

    def __init__(self, style_channels: int, channels: int):
        super().__init__()
        self.channels = channels
        self.gamma = nn.Linear(style_channels, channels)
        self.beta = nn.Linear(style_channels, channels)

    @staticmethod
    def style_stats(style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """style [B, z, h, w] -> (std [B, z], mean [B, z]) over the spatial axes (unbiased variance)."""
        flat = style.flatten(2)
        var, mean = torch.var_mean(flat, dim=-1, correction=1)
        return torch.sqrt(var + STYLE_EPS), mean

    def modulate(self, x: torch.Tensor, std: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        scale = self.gamma(std).view(b, self.channels, 1, 1)
        shift = self.beta(mean).view(b, self.channels, 1, 1)
        x = group_norm(x, GN_GROUPS, eps=GN_EPS)
        if torch.is_grad_enabled():
            return x * scale + shift
        return x.mul_(scale).add_(shift)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.modulate(x, *self.style_stats(style))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResBlocks) plus an optional ``downsample`` / ``upsample``."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 in_channels: int = 3):
        super().__init__()
        self.ch_mult = tuple(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        in_mult = (1,) + self.ch_mult
        self.down = nn.ModuleList()
        block_out = ch
        for i, mult in enumerate(self.ch_mult):
            level = _Level()
            block_in, block_out = ch * in_mult[i], ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResBlock(block_in, block_out))
                block_in = block_out
            if i < len(self.ch_mult) - 1:
                level.downsample = nn.Conv2d(block_out, block_out, 3, stride=2, padding=1)
            self.down.append(level)
        self.mid_block = nn.ModuleList([ResBlock(block_out, block_out) for _ in range(num_res_blocks)])
        self.norm_out = Normalize(block_out)
        self.conv_out = nn.Conv2d(block_out, z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for blk in level.block:
                h = blk(h)
            if i < len(self.down) - 1:
                h = level.downsample(h)
        for blk in self.mid_block:
            h = blk(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Decoder styled by the quantized latent. With ``noise_channels > 0`` it is WeTok's generative decoder:
    conv_in sees cat([codes, noise], dim=1) (latent first); the AdaGN style is always the clean codes."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 out_channels: int = 3, noise_channels: int = 0):
        super().__init__()
        self.ch_mult = tuple(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.z_channels = z_channels
        self.noise_channels = noise_channels
        block_in = ch * self.ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels + noise_channels, block_in, 3, padding=1)
        self.mid_block = nn.ModuleList([ResBlock(block_in, block_in) for _ in range(num_res_blocks)])
        adaptive, up = [], []
        for i in reversed(range(len(self.ch_mult))):
            adaptive.insert(0, AdaptiveGroupNorm(z_channels, block_in))
            level = _Level()
            block_out = ch * self.ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(ResBlock(block_in, block_out))
                block_in = block_out
            if i > 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.adaptive = nn.ModuleList(adaptive)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, codes: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if self.noise_channels:
            if noise is None:
                raise ValueError("this decoder is generative: pass noise of shape "
                                 f"[B, {self.noise_channels}, h, w]")
            if noise.shape[1] != self.noise_channels or noise.shape[0] != codes.shape[0] or \
                    noise.shape[2:] != codes.shape[2:]:
                raise ValueError(f"noise must have shape {(codes.shape[0], self.noise_channels, *codes.shape[2:])}, "
                                 f"got {tuple(noise.shape)}")
            h = self.conv_in(torch.cat([codes, noise.to(codes.dtype)], dim=1))
        else:
            if noise is not None:
                raise ValueError("this decoder is not generative: it takes no noise")
            h = self.conv_in(codes)
        std, mean = AdaptiveGroupNorm.style_stats(codes)
        for blk in self.mid_block:
            h = blk(h)
        for i in reversed(range(len(self.up))):
            h = self.adaptive[i].modulate(h, std, mean)
            level = self.up[i]
            for blk in level.block:
                h = blk(h)
            if i > 0:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))

    @torch.no_grad()
    def add_noise_input(self, noise_channels: int) -> None:
        """Widen conv_in to take ``noise_channels`` extra (noise) inputs with zero weights, so the output does not
        change (WeTok stage-2 initialisation). Only valid on a non-generative decoder."""
        if self.noise_channels:
            raise ValueError("the decoder already takes noise")
        old = self.conv_in
        new = nn.Conv2d(old.in_channels + noise_channels, old.out_channels, 3, padding=1).to(old.weight)
        new.weight.copy_(torch.cat([old.weight, torch.zeros_like(old.weight[:, :1]).expand(
            -1, noise_channels, -1, -1)], dim=1))
        new.bias.copy_(old.bias)
        self.conv_in = new
        self.noise_channels = noise_channels
