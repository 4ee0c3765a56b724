"""Multi-axis rotary position embedding (Flux's "EmbedND"), as the MMDiT towers of FlowMo use it.

Every token has one integer position per axis (three axes here). Axis a owns ``axes_dim[a]`` consecutive channels
of each head; they rotate as **interleaved pairs** (2j, 2j+1) at frequency ``theta ** (-2j / axes_dim[a])``, and the
axis blocks are concatenated in axis order, so ``sum(axes_dim) == head_dim``. A pair (x0, x1) becomes
(cos x0 - sin x1, sin x0 + cos x1). The angles are computed in float64 and the tables kept in float32; the rotation
itself runs in float32 whatever the activations' dtype (what the official code does, so bf16 runs rotate exactly).
"""

from __future__ import annotations

from typing import Sequence

import torch


def rope_tables(pos: torch.Tensor, axes_dim: Sequence[int], theta: float = 10000.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [..., L, n_axes] -> (cos, sin), each [..., L, head_dim / 2] float32."""
    if pos.shape[-1] != len(axes_dim):
        raise ValueError(f"{pos.shape[-1]} position axes but {len(axes_dim)} axis dims")
    angles = []
    for a, dim in enumerate(axes_dim):
        if dim % 2:
            raise ValueError(f"RoPE axis dims must be even, got {list(axes_dim)}")
        scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
        omega = 1.0 / (theta ** scale)
        angles.append(pos[..., a].to(torch.float64).unsqueeze(-1) * omega)
    ang = torch.cat(angles, dim=-1)
    # cos/sin in float64 then rounded once: the official tables are built the same way
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] rotated by tables [L, D/2] (or [B, 1, L, D/2]); returned in x's dtype."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1)
    return out.reshape(x.shape).to(x.dtype)


def image_latent_positions(grid_h: int, grid_w: int, code_length: int, device=None) -> torch.Tensor:
    """FlowMo's positions for one joint sequence, latent tokens first: latent token i -> (i, i, i), image patch
    (r, c) (row-major) -> (0, r, c). Returns [code_length + grid_h * grid_w, 3] float32."""
    i = torch.arange(code_length, device=device, dtype=torch.float32)
    txt = i[:, None].expand(code_length, 3)
    r, c = torch.meshgrid(torch.arange(grid_h, device=device, dtype=torch.float32),
                          torch.arange(grid_w, device=device, dtype=torch.float32), indexing="ij")
    img = torch.stack((torch.zeros_like(r), r, c), dim=-1).reshape(-1, 3)
    return torch.cat((txt, img), dim=0)


def axes_for_head_dim(head_dim: int) -> list[int]:
    """FlowMo's per-axis split of a head: [hd/8, 7 hd/16, 7 hd/16] (the official [8, 28, 28] scaled by width)."""
    if head_dim % 16 or (head_dim // 8) % 2 or (7 * head_dim // 16) % 2:
        raise ValueError(f"head_dim {head_dim} has no even [hd/8, 7hd/16, 7hd/16] RoPE split; give axes_dim")
    return [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16]
