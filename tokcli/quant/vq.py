"""Plain vector quantization: nearest codebook row by squared L2, straight-through estimator.

For a latent ``z`` whose channels (D) are on axis 1, e.g. [B, D, H, W], every position is one D-vector ``x``:

    id = argmin_v ||x - c_v||^2          c_v = codebook row v, codebook [V, D]
    q  = c_id
    loss = mean ||sg(z) - q||^2 + beta * mean ||z - sg(q)||^2        (codebook term + commitment term)
    quantized = z + sg(q - z)                                          (value q, gradient identity to z)

(VQ-VAE, van den Oord et al. 2017; the layout of the losses follows the common lucidrains / taming code.)

Memory. The distances of M vectors to V codes are an [M, V] matrix: 2 GiB in fp32 for a batch of eight 32x32
latents against V = 65536. :func:`nearest_code` never holds more than ``chunk`` rows of it (by default about
4 Mi distances, 16 MiB), and computes ``argmin ||x - c||^2`` as ``argmax (2 x.c - ||c||^2)`` with one fused
matrix product per chunk (``||x||^2`` is the same for every code of a row, so it cannot change the winner).

:func:`first_argmax` is ``torch.argmax(x, -1)`` (the index of the *first* maximum of each row, ties included),
computed on CPU from block maxima, which PyTorch vectorises, instead of the scalar argmax loop (about 10x faster on
rows of 16k-64k logits). It is shared with the multi-scale quantizer (``tokcli.quant.msrq``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokcli.quant.base import QuantOut

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # distances held at once by nearest_code when chunk is None (16 MiB in fp32)
_BLOCKS = (256, 128, 64, 32)      # candidate block widths for first_argmax (the first that divides V is used)


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along the last axis of a 2-D tensor [M, V] -> int64 [M]; equal to
    ``x.argmax(-1)`` element for element (ties resolve to the lowest index, a NaN counts as the maximum).

    On CPU the row is cut into blocks of W values: block maxima (a vectorised ``amax``), the first block that holds
    the row maximum (maxima are exact, so ``==`` is exact), then ``argmax`` inside that one block. Elsewhere, or when
    no block width divides V, or when a row holds a NaN, it is ``x.argmax(-1)``.
    """
    if x.dim() != 2:
        raise ValueError(f"first_argmax expects [M, V], got shape {tuple(x.shape)}")
    m, v = x.shape
    width = next((w for w in _BLOCKS if v % w == 0 and v > w), None)
    if x.device.type != "cpu" or width is None or m == 0 or not x.is_contiguous():
        return x.argmax(-1)
    blocks = x.view(m, v // width, width)
    block_max = blocks.amax(-1)                                           # [M, V / W]
    row_max = block_max.amax(-1, keepdim=True)                            # [M, 1]
    if torch.isnan(row_max).any():                                        # amax propagates NaN; argmax picks it
        return x.argmax(-1)
    first_block = (block_max == row_max).view(torch.uint8).argmax(-1)     # first True
    inside = blocks[torch.arange(m, device=x.device), first_block]        # [M, W]
    return first_block * width + inside.argmax(-1)


def _rows_per_chunk(n_codes: int, chunk: int | None) -> int:
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(n_codes, 1)) if chunk is None else int(chunk)


@torch.no_grad()
def nearest_code(x: torch.Tensor, codebook: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Nearest codebook row by squared L2: x [M, D], codebook [V, D] -> int64 ids [M].

    chunk: rows of ``x`` scored at once (None: enough rows for about 4 Mi distances). The ids are those of
    ``argmin_v ||x - c_v||^2`` in exact arithmetic; in float, vectors almost equidistant from two codes (within
    rounding of ``2 x.c - ||c||^2``) may pick either. Ties pick the lowest id. No gradient.
    """
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code expects x [M, D] and codebook [V, D], got {tuple(x.shape)} and "
                         f"{tuple(codebook.shape)}")
    rows = _rows_per_chunk(codebook.shape[0], chunk)
    if rows <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    codebook = codebook.to(x.dtype)
    neg_sq = -codebook.pow(2).sum(-1)                                     # [V]: -||c||^2
    code_t = codebook.t()
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], rows):
        part = x[start:start + rows]
        scores = torch.addmm(neg_sq, part, code_t, beta=1, alpha=2)       # 2 x.c - ||c||^2 = ||x||^2 - dist
        out[start:start + part.shape[0]] = first_argmax(scores)
    return out


def vq_losses(z: torch.Tensor, q: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook loss mean||sg(z) - q||^2, commitment loss beta * mean||z - sg(q)||^2): the first trains the codes
    towards the inputs, the second keeps the encoder close to its codes."""
    return F.mse_loss(q, z.detach()), beta * F.mse_loss(z, q.detach())


def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """z + sg(q - z): the value of q (up to float rounding), the gradient of the identity to z."""
    return z + (q - z).detach()


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with a straight-through estimator.

    dim: D, the channels of the latent (axis 1 of the input, e.g. [B, D, H, W]); codebook_size: V; beta: weight of
    the commitment term; chunk: rows per distance chunk for :func:`nearest_code` (None: automatic).
    The codebook is ``codebook.weight`` [V, D] (an ``nn.Embedding``, N(0, 1) init), trained by the codebook loss.
    """

    def __init__(self, dim: int, codebook_size: int, *, beta: float = 0.25, chunk: int | None = None):
        super().__init__()
        if dim <= 0 or codebook_size <= 0:
            raise ValueError(f"dim and codebook_size must be positive, got {dim} and {codebook_size}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.beta = beta
        self.chunk = chunk
        self.codebook = nn.Embedding(codebook_size, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}"

    def _rows(self, z: torch.Tensor) -> torch.Tensor:
        """[B, D, *S] -> [B * prod(S), D] (channels last)."""
        if z.dim() < 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected [B, {self.dim}, ...], got {tuple(z.shape)}")
        return z.movedim(1, -1).reshape(-1, self.dim)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, *S] -> ids int64 [B, *S]."""
        ids = nearest_code(self._rows(z), self.codebook.weight, self.chunk)
        return ids.reshape(z.shape[0], *z.shape[2:])

    def decode_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """ids [B, *S] -> codes [B, D, *S]."""
        return self.codebook(indices.long()).movedim(-1, 1)

    def forward(self, z: torch.Tensor) -> QuantOut:
        """Quantize z [B, D, *S]: straight-through codes, ids [B, *S] and the losses ``codebook``
        (mean ||sg(z) - q||^2) and ``commitment`` (beta * mean ||z - sg(q)||^2)."""
        ids = self.encode(z)
        q = self.decode_ids(ids).to(z.dtype)
        codebook_loss, commitment_loss = vq_losses(z, q, self.beta)
        return QuantOut(straight_through(z, q), ids, losses={"codebook": codebook_loss,
                                                             "commitment": commitment_loss})
