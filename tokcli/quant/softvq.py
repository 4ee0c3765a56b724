"""Soft vector quantization (SoftVQ-VAE, Chen et al. 2024): every token becomes a softmax-weighted mix of codewords.

For ``z_hat`` [B, L, d] and ``G`` codebooks of K codewords each ([G, K, d], the ``embedding`` parameter), the L
tokens are cut into G **contiguous groups along the token axis**: token t uses codebook ``t // (L / G)``. Then

    c   = normalize(codebook)                      (rows L2-normalised; the stored rows need not be unit-norm)
    s   = <normalize(z_hat_t), sg(c_k)>            cosine to every codeword of the token's codebook   [B, L, K]
    q   = softmax(s / tau)                         tau = 0.07
    z   = q @ c                                    a convex mix of unit vectors, NOT renormalised (|z| <= 1)
    ids = argmax_k s                               per token, local to its group's codebook            [B, L]

The codebook is detached inside the similarities (as in the official code): it gets its gradient only through
the mix. There is no straight-through estimator and no sampling; the layer is deterministic.

Training term (``losses["entropy"]``, unweighted; the paper's lambda_4 = 0.01 weights it): with its own
temperature 0.01 (not tau), over the rows of all groups together, p = softmax(s / 0.01),

    entropy = mean_rows H(p) - H(mean_rows p)        (H(q) - H(E q); log(p_bar + 1e-6) as the official code)

which pulls each token towards one codeword and the batch towards using all of them. ``mean_rows p`` is taken over
the global batch under DDP (:func:`tokcli.quant.base.global_mean`); the official code uses each rank's batch.

Statistics (``stats``): ``usage`` (fraction of the G*K codewords that are some token's argmax in this batch),
``perplexity`` (exp of the entropy of each group's argmax histogram, averaged over groups), ``zq_cos`` (mean
cosine between z_hat and z, the official ``info[7]``) and ``max_prob`` (mean of max_k q). Counting ids directly
replaces the official ``codebook_used`` FIFO, which is written with the wrong length (G instead of the token count)
and so reports nothing meaningful. :meth:`code_counts` gives the [G, K] histogram to accumulate over many batches.

``decode_ids(ids)`` returns the argmax codewords c_id: the hard approximation of z (what a discrete model of the
ids would see). The tokenizer's decoder is trained on the soft z; decoding from the latents is exact, decoding
from the ids is not.

``l2_norm=False`` (not used by any release) takes raw dot products with the raw codebook, as the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokcli.quant.base import QuantOut, global_mean
from tokcli.quant.vq import first_argmax

ENTROPY_TEMPERATURE = 0.01  # the official compute_entropy_loss default, independent of tau


class SoftVectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, num_codebooks: int = 1, tau: float = 0.07,
                 l2_norm: bool = True, entropy_temperature: float = ENTROPY_TEMPERATURE):
        super().__init__()
        if codebook_size < 1 or dim < 1 or num_codebooks < 1:
            raise ValueError(f"bad SoftVQ sizes: codebook_size={codebook_size}, dim={dim}, "
                             f"num_codebooks={num_codebooks}")
        if tau <= 0 or entropy_temperature <= 0:
            raise ValueError(f"SoftVQ temperatures must be positive (tau={tau}, entropy={entropy_temperature})")
        self.codebook_size, self.dim, self.num_codebooks = int(codebook_size), int(dim), int(num_codebooks)
        self.tau, self.l2_norm, self.entropy_temperature = float(tau), bool(l2_norm), float(entropy_temperature)
        emb = torch.empty(self.num_codebooks, self.codebook_size, self.dim)
        emb.uniform_(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
        self.embedding = nn.Parameter(F.normalize(emb, dim=-1) if self.l2_norm else emb)

    def codebook(self) -> torch.Tensor:
        """The codewords the mix uses, [G, K, d] (L2-normalised rows when ``l2_norm``)."""
        return F.normalize(self.embedding, dim=-1) if self.l2_norm else self.embedding

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [B, G, L / G, ...] (contiguous groups of tokens)."""
        if t.dim() < 2 or t.shape[1] % self.num_codebooks:
            raise ValueError(f"{tuple(t.shape)}: the token axis cannot be split into {self.num_codebooks} equal "
                             f"codebook groups")
        return t.reshape(t.shape[0], self.num_codebooks, t.shape[1] // self.num_codebooks, *t.shape[2:])

    def _grouped(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 3 or z.shape[-1] != self.dim:
            raise ValueError(f"SoftVQ expects [B, L, {self.dim}], got {tuple(z.shape)}")
        return self._split(z)

    def similarity(self, z_hat: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine (``l2_norm``) or dot product of every token with every codeword of its group, [B, L, K]; the
        codebook is detached here."""
        zg = self._grouped(z_hat)
        if self.l2_norm:
            zg = F.normalize(zg, dim=-1)
        c = (self.codebook() if codebook is None else codebook).detach()
        return torch.einsum("bgsd,gkd->bgsk", zg, c).reshape(z_hat.shape[0], z_hat.shape[1], self.codebook_size)

    def forward(self, z_hat: torch.Tensor) -> QuantOut:
        from tokcli.core.device import float32_region

        with float32_region(z_hat):  # under bf16 autocast the soft assignment stays float32 (no-op otherwise)
            z_hat, codebook = z_hat.float(), self.codebook()
            logits = self.similarity(z_hat, codebook)
            probs = torch.softmax(logits / self.tau, dim=-1)
            z = torch.einsum("bgsk,gkd->bgsd", self._split(probs), codebook).reshape(z_hat.shape)
        ids = first_argmax(logits.detach().reshape(-1, self.codebook_size)).view(z_hat.shape[:2])
        losses = {"entropy": self.entropy_loss(logits)} if self.training else {}
        with torch.no_grad():
            stats = self.usage_stats(ids)
            stats["zq_cos"] = F.cosine_similarity(z_hat.detach(), z.detach(), dim=-1).mean()
            stats["max_prob"] = probs.detach().amax(-1).mean()
        return QuantOut(quantized=z, ids=ids, losses=losses, stats=stats)

    def entropy_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """H(q) - H(E q) over all rows (tokens of every group together) at temperature ``entropy_temperature``."""
        flat = logits.reshape(-1, self.codebook_size).float() / self.entropy_temperature
        p = torch.softmax(flat, dim=-1)
        sample_entropy = -(p * F.log_softmax(flat, dim=-1)).sum(-1).mean()
        p_bar = global_mean(p, 0)
        return sample_entropy - (-(p_bar * torch.log(p_bar + 1e-6)).sum())

    @torch.no_grad()
    def code_counts(self, ids: torch.Tensor) -> torch.Tensor:
        """Histogram of argmax ids per codebook group, int64 [G, K] (ids [B, L] as returned by ``forward``)."""
        flat = self._split(ids).permute(1, 0, 2).reshape(self.num_codebooks, -1)
        counts = torch.zeros(self.num_codebooks, self.codebook_size, dtype=torch.long, device=ids.device)
        return counts.scatter_add_(1, flat, torch.ones_like(flat))

    @torch.no_grad()
    def usage_stats(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        counts = self.code_counts(ids).double()
        p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # 0 log 0 = 0
        return {"usage": (counts > 0).double().mean().float(), "perplexity": entropy.exp().mean().float()}

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (local to each token's group codebook) -> the argmax codewords [B, L, d]: the HARD
        approximation of the soft latent (decoding the soft latents is exact; decoding these is not)."""
        ids = torch.as_tensor(ids, device=self.embedding.device).long()
        if ids.dim() != 2:
            raise ValueError(f"SoftVQ ids must be [B, L], got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"SoftVQ ids must lie in [0, {self.codebook_size})")
        g = self._split(ids)  # [B, G, L/G]
        c = self.codebook()
        rows = torch.arange(self.num_codebooks, device=ids.device).view(1, -1, 1)
        return c[rows, g].reshape(ids.shape[0], ids.shape[1], self.dim)

