"""LFQ over strided channel groups: FlowMo's id convention on top of :class:`tokcli.quant.lfq.GroupLFQ`.

A 1-D latent ``code`` [B, L, C] with C = fg * fh is split, per latent position t, into fh sub-tokens of fg bits.
Sub-token (t, h) sits at position ``t * fh + h`` of the id sequence and its bit j is the sign bit of channel
``j * fh + h``: the groups are **strided** over the channels (the official ``b t (fg fh) -> b fg (t fh)``
rearrange), not contiguous as in WeTok. Within a sub-token the id is ``sum_j bit_j 2**j`` (LSB first) and a
channel is +1 when > 0, else -1 (an exact 0 gives -1). The bit maths, the codebook and the entropy terms are
GroupLFQ's with one group of fg bits; only the layout and the entropy temperature (0.1, the official FlowMo LFQ's)
differ, so WeTok's quantizer is untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from tokcli.quant.base import QuantOut
from tokcli.quant.lfq import GroupLFQ

FLOWMO_TEMPERATURE = 0.1
LAYOUT = ("ids[t * fh + h] = sum_j bit_j * 2^j (LSB first), bit j = sign bit (> 0) of channel j * fh + h of latent "
          "position t (strided groups, the official FlowMo LFQ order)")


class StridedLFQ(nn.Module):
    """context_dim C = fg * fh channels per latent position -> fh ids of fg bits each (see the module docstring)."""

    def __init__(self, context_dim: int, fg: int, *, temperature: float = FLOWMO_TEMPERATURE):
        super().__init__()
        if fg <= 0 or context_dim % fg:
            raise ValueError(f"context_dim {context_dim} is not a multiple of the group size {fg}")
        self.context_dim, self.fg, self.fh = context_dim, fg, context_dim // fg
        self.lfq = GroupLFQ(fg, 1, entropy_mode="official", temperature=temperature)
        self.codebook_size = self.lfq.codebook_size

    # [B, L, C] <-> GroupLFQ's [B, fg, L * fh, 1] (channels first, one group)
    def to_groups(self, code: torch.Tensor) -> torch.Tensor:
        b, n, _ = code.shape
        return code.reshape(b, n, self.fg, self.fh).permute(0, 2, 1, 3).reshape(b, self.fg, n * self.fh, 1)

    def from_groups(self, g: torch.Tensor) -> torch.Tensor:
        b = g.shape[0]
        return g.reshape(b, self.fg, -1, self.fh).permute(0, 2, 1, 3).reshape(b, -1, self.context_dim)

    def ids(self, code: torch.Tensor) -> torch.Tensor:
        """code [B, L, C] (any latent; its signs count) -> ids [B, L * fh] int64 in [0, 2**fg)."""
        if code.dim() != 3 or code.shape[-1] != self.context_dim:
            raise ValueError(f"expected a latent [B, L, {self.context_dim}], got {tuple(code.shape)}")
        return self.lfq.codes_to_indices(self.to_groups(code)).reshape(code.shape[0], -1)

    def decode_ids(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ids [B, L * fh] -> exact +-1 codes [B, L, C]; ValueError on ids outside [0, 2**fg) or a bad length."""
        if ids.dim() != 2 or ids.shape[1] % self.fh:
            raise ValueError(f"ids must be [B, L * {self.fh}], got {tuple(ids.shape)}")
        return self.from_groups(self.lfq.decode_ids(ids.reshape(ids.shape[0], -1, 1, 1), dtype=dtype))

    def forward(self, code: torch.Tensor) -> QuantOut:
        """code [B, L, C] -> QuantOut: the +-1 code (straight-through) [B, L, C], ids [B, L * fh], the entropy and
        commitment terms in training mode (unweighted; the official weights are 0.0025 and 0.000625)."""
        out = self.lfq(self.to_groups(code))
        return QuantOut(self.from_groups(out.quantized), out.ids.reshape(code.shape[0], -1), out.losses, out.stats)
