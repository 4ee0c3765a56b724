"""Nearest-neighbour 2x upsampling followed by a 3x3 convolution, computed at the low resolution.

After a nearest 2x upsample, the 3x3 window of output pixel (2y + i, 2x + j) sees only 2 x 2 distinct input pixels,
so the same linear map is four 2x2 convolutions of the input, one per output phase (i, j), whose taps are sums of
the 3x3 taps (rows: phase 0 takes (k0, k1 + k2) at input rows (y - 1, y), phase 1 takes (k0 + k1, k2) at rows
(y, y + 1); columns alike). One 2x2 convolution with padding 1 gives all four phases at once ([4 O, R + 1, R + 1]),
and slicing at offsets (i, j) interleaves them: 16 instead of 36 multiply-adds per output pixel and channel pair, and
no upsampled copy of the input. Only the order of the sums changes (float rounding).

diffusers' ``Upsample2D`` (the up-sampling of ``AutoencoderKL`` decoders: SD / MAR / FLUX VAEs, so KL and CODA)
is exactly this pattern; :func:`phase_upsamplers` swaps such modules for :class:`PhaseUpsample` at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ROWS = (((0,), (1, 2)), ((0, 1), (2,)))  # phase -> the 3x3 taps summed into each of its two taps


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """[O, C, 3, 3] -> [4 O, C, 2, 2], phase p = 2 i + j first."""
    phases = []
    for i in (0, 1):
        for j in (0, 1):
            k = torch.zeros(*weight.shape[:2], 2, 2, dtype=weight.dtype, device=weight.device)
            for a, rows in enumerate(_ROWS[i]):
                for b, cols in enumerate(_ROWS[j]):
                    k[:, :, a, b] = weight[:, :, list(rows)][:, :, :, list(cols)].sum(dim=(2, 3))
            phases.append(k)
    return torch.cat(phases)


class PhaseUpsample(nn.Module):
    """``conv3x3(upsample_nearest_2x(x))`` of a given ``nn.Conv2d`` (3x3, stride 1, padding 1), at low resolution."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1 \
                or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError("PhaseUpsample takes a 3x3, stride-1, padding-1 convolution")
        self.out_channels = conv.out_channels
        with torch.no_grad():
            self.weight = nn.Parameter(phase_weights(conv.weight), requires_grad=False)
            self.bias = None if conv.bias is None else nn.Parameter(conv.bias.repeat(4), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        o = self.out_channels
        y = F.conv2d(x, self.weight, self.bias, padding=1)  # [B, 4 O, h + 1, w + 1], the input's layout
        phases = [y[:, p * o:(p + 1) * o, i:i + h, j:j + w] for p, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1)))]
        # [B, O, h, w] x 4 -> out[b, c, 2y + i, 2x + j], written channels-last (the layout the next convs prefer on CPU)
        out = torch.stack([p.permute(0, 2, 3, 1) for p in phases], dim=3)  # [B, h, w, 4, O]
        out = out.view(b, h, w, 2, 2, o).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, o)
        out = out.permute(0, 3, 1, 2)
        return out if not x.is_contiguous() else out.contiguous()


class _PhaseUpsample2D(nn.Module):
    """Stands in for a diffusers ``Upsample2D`` (nearest interpolation + conv, no norm) at inference."""

    def __init__(self, up: nn.Module):
        super().__init__()
        self.channels = up.channels
        self.up = PhaseUpsample(up.conv)

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        if output_size is not None and tuple(output_size) != (2 * hidden_states.shape[-2], 2 * hidden_states.shape[-1]):
            raise ValueError("PhaseUpsample upsamples by exactly 2")
        return self.up(hidden_states)


def phase_upsamplers(module: nn.Module) -> int:
    """Replace, in place, every diffusers ``Upsample2D`` of ``module`` that is a nearest 2x upsample + 3x3 conv
    (no norm, no transposed conv) with its low-resolution form; returns how many were replaced."""
    from diffusers.models.upsampling import Upsample2D

    swaps = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, Upsample2D) and child.use_conv and child.interpolate and child.norm is None \
                    and not child.use_conv_transpose and isinstance(getattr(child, "conv", None), nn.Conv2d) \
                    and child.conv.kernel_size == (3, 3) and child.conv.padding == (1, 1):
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, _PhaseUpsample2D(child))
    return len(swaps)
