"""Lookup-free quantization (LFQ), group-wise (GQ, WeTok) and bit-wise (BSQ-style) in one module.

A latent ``z`` of shape [B, d, h, w] is split along channels into ``groups`` contiguous chunks of
``bits_per_group`` (d') channels, d = g * d'. Every channel is quantized to +1 (z > 0) or -1 (otherwise, so an
exact 0 gives -1); there is no scaling. Each group is one token with index sum_j [bit_j > 0] * 2**j, where channel
j of the group is bit j (LSB first). Group k owns channels [k*d', (k+1)*d').

    groups = 1          plain LFQ (MAGVIT-2 / Open-MAGVIT2): one 2**d codebook
    groups = d // 8     WeTok's GQ: g codebooks of 2**8 codes
    groups = d          BSQ-like factorisation: d binary codebooks (without BSQ's 1/sqrt(d) scaling)

The entropy regulariser (training only) scores every code c of a group with logits 2 <z_group, c> / temperature.
Its memory is O(B * n * g * 2**d'), never O(2**d): that is the point of grouping. Two reductions are offered:

- ``"official"`` (what the released WeTok / Open-MAGVIT2 code computes): per-sample entropy = mean over
  (batch, token, group) of H(p); codebook entropy = H(mean of p over batch, tokens *and groups*), a single
  2**d'-way distribution pooled over groups; the codebook entropy uses log(p + 1e-5) like the official code.
- ``"paper"`` (WeTok Eq. 7 and Eq. 9): per-sample entropy = mean over tokens of sum_k H(p_k); codebook entropy =
  sum_k H(mean of p_k over batch and tokens), one distribution per group.

The module has no parameters and only non-persistent buffers, so its state_dict is empty (official checkpoints
have no ``quantize.*`` keys).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokcli.quant.base import QuantOut, global_mean

ENTROPY_MODES = ("official", "paper")
OFFICIAL_TEMPERATURE = 0.01
OFFICIAL_EPS = 1e-5


def _entropy(p: torch.Tensor, eps: float) -> torch.Tensor:
    """-sum p log(p + eps) over the last axis (eps = 0: exact, with 0 log 0 = 0)."""
    if eps:
        return -(p * torch.log(p + eps)).sum(-1)
    return -torch.special.xlogy(p, p).sum(-1)


class GroupLFQ(nn.Module):
    """Group-wise lookup-free quantizer.

    dim: latent channels d; groups: g (d must be a multiple of g); bits_per_group = d // g.
    entropy_mode / sample_weight / codebook_weight / temperature: defaults for the training losses.
    """

    def __init__(self, dim: int, groups: int = 1, *, entropy_mode: str = "official", sample_weight: float = 1.0,
                 codebook_weight: float = 1.0, temperature: float = OFFICIAL_TEMPERATURE):
        super().__init__()
        if dim <= 0 or groups <= 0 or dim % groups:
            raise ValueError(f"dim ({dim}) must be a positive multiple of groups ({groups})")
        if entropy_mode not in ENTROPY_MODES:
            raise ValueError(f"entropy_mode must be one of {ENTROPY_MODES}, got {entropy_mode!r}")
        self.dim = dim
        self.groups = groups
        self.bits_per_group = dim // groups
        if self.bits_per_group > 62:
            raise ValueError(f"{self.bits_per_group} bits per group do not fit in an int64 index")
        self.codebook_size = 2 ** self.bits_per_group  # per group
        self.entropy_mode = entropy_mode
        self.sample_weight = sample_weight
        self.codebook_weight = codebook_weight
        self.temperature = temperature
        # 2**j for bit j (LSB first); non-persistent so the state_dict stays empty
        self.register_buffer("bit_values", 2 ** torch.arange(self.bits_per_group, dtype=torch.long),
                             persistent=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, groups={self.groups}, bits_per_group={self.bits_per_group}, "
                f"entropy_mode={self.entropy_mode!r}")

    # --- quantization ---------------------------------------------------------------------------------
    @staticmethod
    def quantize(z: torch.Tensor) -> torch.Tensor:
        """z [B, d, ...] -> codes +1 / -1 (0 -> -1), with the straight-through estimator (also in eval, as the
        official code does; the values are then +-1 up to float rounding of z + (q - z))."""
        q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        return z + (q - z).detach()

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (or any latent) [B, d, h, w] -> LongTensor [B, h, w, g]; sign > 0 is bit 1."""
        b, d, h, w = codes.shape
        if d != self.dim:
            raise ValueError(f"expected {self.dim} channels, got {d}")
        bits = (codes > 0).view(b, self.groups, self.bits_per_group, h, w).long()
        idx = (bits * self.bit_values.view(1, 1, -1, 1, 1)).sum(2)  # [B, g, h, w]
        return idx.permute(0, 2, 3, 1).contiguous()

    def decode_ids(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """indices [B, h, w, g] (integers in [0, 2**d')) -> exact +-1 codes [B, d, h, w]."""
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.dim() != 4 or indices.shape[-1] != self.groups:
            raise ValueError(f"indices must have shape [B, h, w, {self.groups}], got {tuple(indices.shape)}")
        indices = indices.long()
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"indices must lie in [0, {self.codebook_size - 1}], got values in [{lo}, {hi}]")
        b, h, w, g = indices.shape
        bits = (indices.unsqueeze(-1) & self.bit_values.to(indices.device)) != 0  # [B, h, w, g, d']
        codes = bits.to(dtype) * 2 - 1
        return codes.view(b, h, w, self.dim).permute(0, 3, 1, 2).contiguous()

    def codebook(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """All 2**d' codes of one group as +-1 rows [2**d', d'], row k = decode_ids(k)."""
        k = torch.arange(self.codebook_size, device=device)
        bits = (k.unsqueeze(-1) & self.bit_values.to(k.device)) != 0
        return bits.to(dtype) * 2 - 1

    # --- entropy regulariser ---------------------------------------------------------------------------
    def group_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, d, h, w] -> logits 2 <z_group, c> for every code c: [B, n, g, 2**d'] (float32)."""
        b, d = z.shape[:2]
        zg = z.float().reshape(b, self.groups, self.bits_per_group, -1).permute(0, 3, 1, 2)  # [B, n, g, d']
        return 2 * zg @ self.codebook(z.device).t()

    def entropy_loss(self, z: torch.Tensor, mode: str | None = None, sample_weight: float | None = None,
                     codebook_weight: float | None = None, eps: float = OFFICIAL_EPS) -> dict[str, torch.Tensor]:
        """Entropy terms for a pre-quantization latent z [B, d, h, w].

        Returns per_sample_entropy, codebook_entropy, entropy_aux = sample_weight * per_sample -
        codebook_weight * codebook (minimise it), and commitment = MSE(z, q.detach()) with q the +-1 codes.
        ``eps`` is added inside the log of the codebook entropy (1e-5 as official; 0 gives the exact entropy).
        The codebook entropy is that of the probabilities averaged over the global batch (all ranks under DDP,
        :func:`tokcli.quant.base.global_mean`); the per-sample entropy is a per-sample mean, local like any loss.
        """
        mode = mode or self.entropy_mode
        if mode not in ENTROPY_MODES:
            raise ValueError(f"entropy mode must be one of {ENTROPY_MODES}, got {mode!r}")
        sw = self.sample_weight if sample_weight is None else sample_weight
        cw = self.codebook_weight if codebook_weight is None else codebook_weight

        with torch.autocast(device_type=z.device.type, enabled=False):  # T = 0.01 needs float32 logits
            logits = self.group_logits(z) / self.temperature  # [B, n, g, K]
            log_p = F.log_softmax(logits, dim=-1)
            p = log_p.exp()
            token_h = -(p * log_p).sum(-1)  # [B, n, g]
            if mode == "official":
                per_sample = token_h.mean()
                codebook = _entropy(global_mean(p, (0, 1, 2)), eps)
            else:
                per_sample = token_h.sum(-1).mean()
                codebook = _entropy(global_mean(p, (0, 1)), eps).sum()

        q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        commitment = F.mse_loss(z.float(), q.float().detach())
        return {
            "per_sample_entropy": per_sample,
            "codebook_entropy": codebook,
            "entropy_aux": sw * per_sample - cw * codebook,
            "commitment": commitment,
        }

    # --- module API ------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantOut:
        """z [B, d, h, w] -> QuantOut: quantized = the +-1 codes (straight-through), ids [B, h, w, g], losses
        ``entropy_aux`` and ``commitment``, stats ``per_sample_entropy`` and ``codebook_entropy`` (the terms of
        :meth:`entropy_loss` in training mode; zeros in eval mode, like the official code)."""
        codes = self.quantize(z)
        ids = self.codes_to_indices(z)
        if self.training:
            t = self.entropy_loss(z)
        else:
            zero = z.new_zeros((), dtype=torch.float32)
            t = dict.fromkeys(("per_sample_entropy", "codebook_entropy", "entropy_aux", "commitment"), zero)
        return QuantOut(codes, ids, losses={k: t[k] for k in ("entropy_aux", "commitment")},
                        stats={k: t[k] for k in ("per_sample_entropy", "codebook_entropy")})

    def max_entropy(self, mode: str | None = None) -> float:
        """Upper bound of the codebook entropy (nats) for a mode: d' ln 2 (official) or d ln 2 (paper)."""
        mode = mode or self.entropy_mode
        return (self.bits_per_group if mode == "official" else self.dim) * math.log(2)
