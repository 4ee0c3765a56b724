"""CODA quantizer: multi-scale residual quantization with attention-based code assignment.

Algorithm (what ``MultiScaleAttentionQuantizer`` computes for a latent ``f`` of shape [B, D, H, W]):

    residual = f ; f_hat = 0
    for pn in patch_size_list (coarse -> fine):
        r_l   = area-downsample(residual) to pn x pn               (identity when pn == H == W)
        q     = norm_q(to_q(r_l))   per grid cell, [B, pn*pn, A]
        k     = norm_k(to_k(C))     per code,      [V, A]          C = codebooks.weight [V, D]
        logit = (q @ k^T) / sqrt(A)                                A = attention width (attn_dim)
        id    = argmax over the V codes (argmax of softmax(logit): the same index)
        z_l   = to_v(C)[id]                                        the value-table row, NOT the raw codebook row
        up    = bicubic-upsample(z_l as [B, D, pn, pn]) to H x W   (align_corners=False; identity at pn == H)
        f_hat += up ; residual -= up

One codebook and one attention module (to_q, to_k, to_v, norm_q, norm_k) are shared by every level. The
quantized latent is ``f_hat``: the sum of the upsampled per-level code maps. ``norm`` is RMSNorm by default:
``y * rsqrt(mean(y**2, last dim) + 1e-5) * weight`` with the mean square taken in fp32 and no bias
(``"layer_norm"`` and ``None`` are also accepted, as in the official constructor).

Token layout. ``encode`` returns one int64 tensor per level, shape [B, pn, pn] (the official code keeps a
singleton axis, [B, 1, pn, pn]; it is dropped here). ``flatten_indices`` concatenates them into one [B, T]
tensor, T = sum(pn**2) (680 for [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]): level l occupies
``[offset_l, offset_l + pn_l**2)`` with ``offset_l = sum_{m<l} pn_m**2``, and inside a level the order is
row-major, position ``offset_l + i * pn_l + j`` for grid row i, column j. Ids index rows of ``codebooks.weight``
directly (no offset, no special tokens). ``decode_ids`` accepts either form.

Training terms (``forward``), per level, averaged over the levels:

    vq    = mean((z_soft - r_l)**2) + mean((sg(z_hard) - r_l)**2) + beta * mean((z_hard - sg(r_l))**2)
    entr  = mean_rows H(softmax(logit / T)) - H(mean_rows softmax(logit / T))      (T = 0.01, weights 1, 1)

where z_hard = to_v(C)[id] and z_soft has the forward value of z_hard but the gradient of the soft assignment
softmax(logit) @ to_v(C) (the "hard - sg(soft) + soft" one-hot trick). The per-row entropy uses
``log_softmax(logit / T + 1e-5)`` and the batch entropy ``log(p + 1e-5)``, exactly as the official code does;
the batch mean is over the global batch (all ranks under DDP, :func:`tokcli.quant.base.global_mean`).
The quantized latent returned by ``forward`` is the sum of the z_soft maps: its value equals ``f_hat`` exactly;
the gradient reaches the encoder only through the attention logits and the loss terms (there is no identity
straight-through ``f + sg(f_hat - f)``).

The paper and the official code differ in places; the code is followed (docs/design-notes.md, "Paper vs code").

Inference path (``encode``, ``decode_ids``). The training path needs the dense [rows, V] softmax twice (the
soft assignment and, at temperature 0.01, the entropy terms) plus a [rows, V] x [V, D] product; the ids need none
of it. ``encode`` computes, per level, only the logits and their argmax, in row blocks of about 1 Mi logits on CPU
(64 Mi elsewhere) that are reused, scaled in place and reduced with :func:`tokcli.quant.vq.first_argmax`; then a
gather from the value table. Keys and values are computed once per call and not cached across calls (caching made
no measurable difference to ``encode``, and without a cache a changed weight can never serve stale tables).

The ids are bit-identical to ``forward``'s by construction, not by luck: both paths compute the logits with the same
per-block ``mm(q_block, k^T) * scale`` calls (:meth:`CodeAttention.logits` concatenates the very blocks
:meth:`CodeAttention.assign` reduces; BLAS libraries do not promise that a row of a product is the same for every
number of rows -- MKL's small-row kernels round differently), and both take the first maximum (under autocast both
make the same autocast calls). They can differ only if the two paths run at different precisions (e.g. ``forward``
under autocast, ``encode`` without) or thread counts.

``assignment="nearest"``: multi-scale residual VQ without attention (VAR-style, the baseline rows of the paper's
Table 1). There is no attention module (no ``attn.*`` parameters or state-dict keys, so nothing unused under DDP).
Per level: r_l = area-downsample(residual); id = nearest codebook row by squared L2
(:func:`tokcli.quant.vq.nearest_code`); z_l = codebooks.weight[id] (the raw row, no value table); bicubic-upsample
and accumulate as above. The residual is updated with sg(up), so each level's loss trains only its own codes:

    vq    = mean over levels of [ mean((sg(r_l) - z_l)**2) + beta * mean((r_l - sg(z_l))**2) ]
    quantized = f + sg(f_hat - f)      (straight-through: value f_hat up to float rounding, gradient identity to f)
    entropy = 0

With a single level at the latent size (``patch_size_list=[H]``) this is plain VQ, :class:`tokcli.quant.vq.
VectorQuantizer`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokcli.nn.norm import RMSNorm
from tokcli.quant.base import QuantOut, global_mean
from tokcli.quant.vq import first_argmax, nearest_code, straight_through, vq_losses

NORM_TYPES = ("rms_norm", "layer_norm", None)
ASSIGNMENTS = ("attention", "nearest")
# Logits held at once per row block (see CodeAttention.row_block): ~4 MiB of fp32 on CPU, where a block that stays
# in cache makes the scale and the argmax cheap; 256 MiB elsewhere (a memory bound, not a speed trick).
LOGIT_BLOCK_ELEMENTS = {"cpu": 1 << 20}
LOGIT_BLOCK_ELEMENTS_DEFAULT = 1 << 26


def _make_norm(norm_type: str | None, dim: int) -> nn.Module | None:
    if norm_type == "rms_norm":
        return RMSNorm(dim, eps=1e-5)
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim)
    if norm_type is None:
        return None
    raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {norm_type!r}")


class CodeAttention(nn.Module):
    """Query/key/value projections of the attention assignment (state-dict names ``to_q``, ``to_k``, ``to_v``,
    ``norm_q``, ``norm_k`` as in the official ``Attention``)."""

    def __init__(self, dim: int, attn_dim: int | None = None, norm_type: str | None = "rms_norm"):
        super().__init__()
        attn_dim = dim if attn_dim is None else attn_dim
        self.attn_dim = attn_dim
        self.scale = 1.0 / math.sqrt(attn_dim)
        self.to_q = nn.Linear(dim, attn_dim)
        self.to_k = nn.Linear(dim, attn_dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = _make_norm(norm_type, attn_dim)
        self.norm_k = _make_norm(norm_type, attn_dim)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, M, D] -> normalised queries [B, M, A]."""
        q = self.to_q(x)
        return q if self.norm_q is None else self.norm_q(q)

    def keys(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [V, D] -> normalised keys [V, A]."""
        k = self.to_k(codes)
        return k if self.norm_k is None else self.norm_k(k)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [V, D] -> value table [V, D]."""
        return self.to_v(codes)

    @staticmethod
    def row_block(n_codes: int, device: torch.device) -> int:
        """Query rows per logit block: about LOGIT_BLOCK_ELEMENTS logits (a function of V and the device only, so
        that :meth:`logits` and :meth:`assign` cut the rows identically)."""
        budget = LOGIT_BLOCK_ELEMENTS.get(torch.device(device).type, LOGIT_BLOCK_ELEMENTS_DEFAULT)
        return max(1, budget // max(int(n_codes), 1))

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[..., M, A] x [V, A] -> [..., M, V], scaled by 1/sqrt(A); dense, differentiable (training path).

        Computed as ``mm(q_block, k^T) * scale`` per block of :meth:`row_block` rows, concatenated: the same calls
        :meth:`assign` makes, so that its ids are bit-identical to ``argmax`` of these logits."""
        flat = q.reshape(-1, q.shape[-1])
        kt = k.t()
        parts = [torch.mm(part, kt) * self.scale for part in flat.split(self.row_block(k.shape[0], q.device))]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(*q.shape[:-1], k.shape[0])

    def logit_buffer(self, n_rows: int, k: torch.Tensor) -> torch.Tensor:
        """Scratch space for :meth:`assign` on up to ``n_rows`` query rows: [min(n_rows, row_block), V]."""
        rows = min(self.row_block(k.shape[0], k.device), max(int(n_rows), 1))
        return torch.empty(rows, k.shape[0], dtype=k.dtype, device=k.device)

    @torch.no_grad()
    def assign(self, q: torch.Tensor, k: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Inference assignment: [..., M, A] x [V, A] -> int64 ids [..., M] = ``argmax`` of :meth:`logits`, without
        the dense logits: one [row_block, V] buffer (``buffer``, from :meth:`logit_buffer`, can be shared by the
        levels of one call: allocating megabytes per level costs page faults), scaled in place, reduced by
        ``first_argmax``."""
        flat = q.reshape(-1, q.shape[-1])
        kt = k.t()
        rows = self.row_block(k.shape[0], q.device)
        ids = torch.empty(flat.shape[0], dtype=torch.long, device=q.device)
        if buffer is None or buffer.shape[0] < min(rows, flat.shape[0]) or buffer.shape[1] != k.shape[0]:
            buffer = self.logit_buffer(flat.shape[0], k)
        autocast = torch.is_autocast_enabled(q.device.type)
        for start in range(0, flat.shape[0], rows):
            part = flat[start:start + rows]
            if autocast:  # autocast does not apply to out= calls: make exactly the calls logits() makes
                block = (torch.mm(part, kt) * self.scale).contiguous()
            else:
                block = buffer[:part.shape[0]]
                torch.mm(part, kt, out=block)
                block.mul_(self.scale)
            ids[start:start + part.shape[0]] = first_argmax(block)
        return ids.reshape(q.shape[:-1])


class QuantizerTrace(NamedTuple):
    """Per-token intermediates, flattened in the token layout (levels coarse->fine, row-major, channels last)."""

    f_hat: torch.Tensor              # [B, D, H, W]
    indices: torch.Tensor            # [B, T] int64
    level_inputs: torch.Tensor       # [B, T, D] area-downsampled residual fed to the assignment
    level_codes: torch.Tensor        # [B, T, D] selected code vectors (value-table rows, or codebook rows)
    logit_margin: torch.Tensor       # [B, T] top-1 minus top-2 logit ("nearest": second-best minus best squared
                                     # distance)


class MultiScaleAttentionQuantizer(nn.Module):
    """CODA's multi-scale residual quantizer (official ``CODAQuantizer``; state-dict compatible).

    dim: latent channels D (``vae_latent_channels``); codebook_size: V; patch_size_list: grid side of each
    level, coarse -> fine (the last one is normally the latent size); beta: commitment weight
    (``vq_commitment_beta``); norm_type: ``"rms_norm"`` (``vq_norm_type``), ``"layer_norm"`` or None;
    attn_dim: projection width A (``vq_attn_dim``; None = D); entropy_temperature and the two entropy weights
    are the official defaults. assignment: ``"attention"`` (CODA) or ``"nearest"`` (multi-scale residual VQ
    without attention; norm_type, attn_dim and the entropy settings are then unused and no attention module is
    built).

    ``forward`` returns a :class:`~tokcli.quant.base.QuantOut`: quantized [B, D, H, W] (value f_hat; attention:
    gradient through the soft assignment, nearest: straight-through), ids = per-level [B, pn, pn] int64 coarse ->
    fine, losses ``vq`` and ``entropy`` (means over the levels; entropy 0 for "nearest").
    """

    def __init__(self, dim: int, codebook_size: int, patch_size_list: Sequence[int], *, beta: float = 0.25,
                 norm_type: str | None = "rms_norm", attn_dim: int | None = None,
                 entropy_temperature: float = 0.01, sample_minimization_weight: float = 1.0,
                 batch_maximization_weight: float = 1.0, assignment: str = "attention"):
        super().__init__()
        if not patch_size_list or any(int(p) <= 0 for p in patch_size_list):
            raise ValueError(f"patch_size_list must be non-empty positive ints, got {patch_size_list!r}")
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {norm_type!r}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.patch_size_list = [int(p) for p in patch_size_list]
        self.beta = beta
        self.assignment = assignment
        self.entropy_temperature = entropy_temperature
        self.sample_minimization_weight = sample_minimization_weight
        self.batch_maximization_weight = batch_maximization_weight
        self.codebooks = nn.Embedding(codebook_size, dim)
        self.attn = CodeAttention(dim, attn_dim, norm_type) if assignment == "attention" else None

    @classmethod
    def from_config(cls, cfg: dict) -> "MultiScaleAttentionQuantizer":
        """Build from the official config keys (``vae_latent_channels``, ``codebook_size``, ...) and tok's
        ``vq_assignment`` (default ``"attention"``)."""
        return cls(cfg["vae_latent_channels"], cfg["codebook_size"], cfg["patch_size_list"],
                   beta=cfg.get("vq_commitment_beta", 0.25), norm_type=cfg.get("vq_norm_type", "rms_norm"),
                   attn_dim=cfg.get("vq_attn_dim"), assignment=cfg.get("vq_assignment", "attention"))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, patch_size_list={self.patch_size_list}, "
                f"assignment={self.assignment!r}")

    # ---- token layout helpers -------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_size_list)

    @property
    def level_offsets(self) -> list[int]:
        out, acc = [], 0
        for p in self.patch_size_list:
            out.append(acc)
            acc += p * p
        return out

    def flatten_indices(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-level [B, pn, pn] (or [B, 1, pn, pn]) -> [B, T], levels concatenated, row-major inside a level."""
        return torch.cat([idx.reshape(idx.shape[0], -1) for idx in indices], dim=1)

    def split_indices(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """[B, T] -> per-level [B, pn, pn]."""
        if flat.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens per image, got {flat.shape[-1]}")
        parts = torch.split(flat, [p * p for p in self.patch_size_list], dim=-1)
        return [t.reshape(flat.shape[0], p, p) for t, p in zip(parts, self.patch_size_list)]

    # ---- core -----------------------------------------------------------------------------------------------

    def code_table(self) -> torch.Tensor:
        """The vectors the ids select, [V, D]: the value table to_v(C) ("attention") or the codebook C ("nearest")."""
        codes = self.codebooks.weight
        return codes if self.attn is None else self.attn.values(codes)

    def _level_input(self, residual: torch.Tensor, pn: int) -> torch.Tensor:
        """Area-downsample [B, D, H, W] to pn x pn and flatten to [B, pn*pn, D] (row-major, channels last)."""
        r = F.interpolate(residual, size=(pn, pn), mode="area")
        return r.permute(0, 2, 3, 1).reshape(r.shape[0], pn * pn, r.shape[1])

    @staticmethod
    def _upsample(z: torch.Tensor, pn: int, size: tuple[int, int]) -> torch.Tensor:
        """[B, pn*pn, D] code rows -> [B, D, H, W] bicubic (align_corners=False)."""
        grid = z.reshape(z.shape[0], pn, pn, z.shape[-1]).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=size, mode="bicubic", align_corners=False).contiguous()

    def _entropy_loss(self, logits: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1]) / self.entropy_temperature
        probs = F.softmax(flat, dim=-1)
        log_probs = F.log_softmax(flat + eps, dim=-1)  # the official code adds eps to the logits here
        avg_probs = global_mean(probs, 0)  # the global batch under DDP
        batch_entropy = -torch.sum(avg_probs * torch.log(avg_probs + eps))
        sample_entropy = torch.mean(-torch.sum(probs * log_probs, dim=-1))
        return self.sample_minimization_weight * sample_entropy - self.batch_maximization_weight * batch_entropy

    @staticmethod
    def _margin(scores: torch.Tensor) -> torch.Tensor:
        """Top-1 minus top-2 along the last axis (0 when there is a single code)."""
        top2 = scores.topk(2, dim=-1).values if scores.shape[-1] > 1 else scores.expand(*scores.shape[:-1], 2)
        return top2[..., 0] - top2[..., 1]

    def _attention_level(self, r: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, losses: bool,
                         trace: bool, buffer: torch.Tensor | None = None):
        """One attention level: r [B, M, D] -> (ids [B, M], z_hard, z_soft, vq term, entropy term, margin)."""
        q = self.attn.queries(r)                                         # [B, M, A]
        if not (losses or trace):                                        # inference: argmax + gather only
            idx = self.attn.assign(q, keys, buffer)
            z_hard = values[idx]
            return idx, z_hard, z_hard, None, None, None
        logits = self.attn.logits(q, keys)                               # [B, M, V]
        # The official code takes the argmax of softmax(logits); softmax is monotone, so the index is the same.
        with torch.no_grad():
            idx = first_argmax(logits.detach().reshape(-1, logits.shape[-1])).reshape(logits.shape[:-1])
        z_hard = values[idx]                                             # [B, M, D]
        vq = ent = None
        z_soft = z_hard
        if losses:
            soft = F.softmax(logits, dim=-1)
            # Value of z_hard, gradient of (hard - sg(soft) + soft) @ values: (soft - sg(soft)) is exactly 0.
            z_soft = z_hard + torch.matmul(soft - soft.detach(), values)
            vq = (torch.mean((z_soft - r) ** 2) + torch.mean((z_hard.detach() - r) ** 2)
                  + self.beta * torch.mean((z_hard - r.detach()) ** 2))
            ent = self._entropy_loss(logits)
        margin = self._margin(logits.detach()) if trace else None
        return idx, z_hard, z_soft, vq, ent, margin

    def _nearest_level(self, r: torch.Tensor, *, losses: bool, trace: bool):
        """One nearest-neighbour level: r [B, M, D] -> (ids [B, M], z, z detached, vq term, None, margin)."""
        codes = self.codebooks.weight
        B, M, D = r.shape
        rows = r.reshape(B * M, D)
        idx = nearest_code(rows, codes).reshape(B, M)
        z = codes[idx]                                                   # [B, M, D], gradient to the codebook
        vq = None
        if losses:
            codebook_loss, commitment_loss = vq_losses(r, z, self.beta)
            vq = codebook_loss + commitment_loss
        margin = None
        if trace:  # second-best minus best squared distance (||x||^2 cancels)
            with torch.no_grad():
                scores = torch.addmm(-codes.pow(2).sum(-1), rows.detach(), codes.t(), alpha=2)
                margin = self._margin(scores).reshape(B, M)
        return idx, z, z.detach(), vq, None, margin

    def _run(self, latent: torch.Tensor, *, losses: bool, trace: bool):
        B, D, H, W = latent.shape
        if D != self.dim:
            raise ValueError(f"latent has {D} channels, the quantizer expects {self.dim}")
        if self.attn is not None:
            # Keys and values once per call, shared by every level (and by the training and inference paths).
            keys = self.attn.keys(self.codebooks.weight)
            values = self.attn.values(self.codebooks.weight)
            buffer = None
            if not (losses or trace):
                buffer = self.attn.logit_buffer(B * max(p * p for p in self.patch_size_list), keys)
        f_hat = torch.zeros_like(latent)
        residual = latent
        ids, vq_terms, ent_terms = [], [], []
        t_inputs, t_codes, t_margin = [], [], []
        for pn in self.patch_size_list:
            r = self._level_input(residual, pn)                          # [B, M, D]
            if self.attn is not None:
                idx, z_hard, z_up, vq, ent, margin = self._attention_level(r, keys, values, losses=losses,
                                                                           trace=trace, buffer=buffer)
            else:
                idx, z_hard, z_up, vq, ent, margin = self._nearest_level(r, losses=losses, trace=trace)
            up = self._upsample(z_up, pn, (H, W))
            f_hat = f_hat + up
            residual = residual - up
            ids.append(idx.reshape(B, pn, pn))
            if vq is not None:
                vq_terms.append(vq)
            if ent is not None:
                ent_terms.append(ent)
            if trace:
                t_inputs.append(r)
                t_codes.append(z_hard)
                t_margin.append(margin)
        return f_hat, ids, vq_terms, ent_terms, (t_inputs, t_codes, t_margin)

    # ---- public API -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """Scaled latent [B, D, H, W] -> per-level int64 ids [B, pn, pn], coarse -> fine.

        The inference path: argmax + gather per level, no softmax, one-hot or entropy; the ids equal ``forward``'s
        bit for bit (module docstring)."""
        return self._run(latent, losses=False, trace=False)[1]

    @torch.no_grad()
    def decode_ids(self, indices: Sequence[torch.Tensor] | torch.Tensor,
                       size: tuple[int, int] | None = None) -> torch.Tensor:
        """Ids (per-level list or flat [B, T]) -> quantized latent f_hat [B, D, H, W].

        size: latent (H, W); default (pn, pn) of the last level.
        """
        if isinstance(indices, torch.Tensor):
            indices = self.split_indices(indices)
        if len(indices) != len(self.patch_size_list):
            raise ValueError(f"expected {len(self.patch_size_list)} levels, got {len(indices)}")
        last = self.patch_size_list[-1]
        size = (last, last) if size is None else tuple(size)
        table = self.code_table()
        f_hat = None
        for idx, pn in zip(indices, self.patch_size_list):
            idx = idx.reshape(idx.shape[0], pn * pn).long()
            up = self._upsample(table[idx], pn, size)
            f_hat = up if f_hat is None else f_hat + up
        return f_hat

    def forward(self, latent: torch.Tensor) -> QuantOut:
        """Training/official forward: quantized latent (value = f_hat), per-level ids, losses vq and entropy."""
        f_hat, ids, vq_terms, ent_terms, _ = self._run(latent, losses=True, trace=False)
        vq_loss = torch.stack(vq_terms).mean()
        if self.attn is None:
            return QuantOut(straight_through(latent, f_hat), ids, {"vq": vq_loss, "entropy": vq_loss.new_zeros(())})
        return QuantOut(f_hat, ids, {"vq": vq_loss, "entropy": torch.stack(ent_terms).mean()})

    @torch.no_grad()
    def trace(self, latent: torch.Tensor) -> QuantizerTrace:
        """Inference pass that also returns per-token intermediates (for parity checks and debugging)."""
        f_hat, ids, _, _, (inp, cod, mar) = self._run(latent, losses=False, trace=True)
        return QuantizerTrace(f_hat, self.flatten_indices(ids), torch.cat(inp, 1), torch.cat(cod, 1),
                              torch.cat(mar, 1))

    # ---- statistics -----------------------------------------------------------------------------------------

    def usage_stats(self, indices: Sequence[torch.Tensor] | torch.Tensor | np.ndarray) -> dict[str, Any]:
        """Codebook utilisation of a set of ids (per-level list, or flat [N, T] tensor / array, e.g. the ids of a
        whole evaluation set concatenated): ``{"codebook_size", "overall": {...}, "levels": [{"scale": pn, ...}]}``
        where each entry is :func:`tokcli.metrics.usage.codebook_usage` (tokens, used, usage = fraction of the V
        codes used, entropy_bits, perplexity). All levels share one codebook, so "overall" pools every token."""
        from tokcli.metrics.usage import codebook_usage

        if isinstance(indices, (list, tuple)):
            indices = self.flatten_indices([torch.as_tensor(t) for t in indices])
        flat = torch.as_tensor(indices).detach().cpu().numpy()
        if flat.ndim != 2 or flat.shape[1] != self.num_tokens:
            raise ValueError(f"expected ids [N, {self.num_tokens}], got shape {tuple(flat.shape)}")
        levels = [{"scale": pn, **codebook_usage(flat[:, off:off + pn * pn], self.codebook_size)}
                  for off, pn in zip(self.level_offsets, self.patch_size_list)]
        return {"codebook_size": self.codebook_size, "overall": codebook_usage(flat, self.codebook_size),
                "levels": levels}

