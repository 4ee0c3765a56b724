"""Family-specific loss terms for the shared trainer.

The trainer computes what every tokenizer shares (L1/L2, perceptual, GAN) and asks the family for the rest
through one hook:

    family_losses(model, x, recon, aux, recipe) -> {name: weighted scalar tensor}

A family module may define its own ``training_losses`` with that signature; otherwise the table below is used.
"""

from __future__ import annotations

from typing import Callable

import torch

LossHook = Callable[..., dict[str, torch.Tensor]]


def wetok_losses(model, x, recon, aux, recipe) -> dict[str, torch.Tensor]:
    """WeTok / Open-MAGVIT2: entropy_weight * (per-sample - codebook entropy) + commitment_weight * commitment.

    Stage 2 (generative decoder, frozen encoder and quantizer) adds nothing: its loss is L1 + LPIPS + GAN only.
    """
    if recipe.stage2:
        return {}
    lo = recipe.loss
    out = {}
    if lo.entropy_weight:
        out["entropy"] = lo.entropy_weight * aux["entropy_aux"]
    if lo.commitment_weight:
        out["commitment"] = lo.commitment_weight * aux["commitment"]
    return out


def kl_losses(model, x, recon, aux, recipe) -> dict[str, torch.Tensor]:
    """KL autoencoder: kl_weight * KL(q(z|x) || N(0, I)) (summed over the latent, averaged over the batch)."""
    w = recipe.loss.kl_weight
    return {"kl": w * aux["kl"]} if w else {}


def coda_losses(model, x, recon, aux, recipe) -> dict[str, torch.Tensor]:
    """CODA (official train_*.py): vq_weight * the quantizer's vq loss (its soft/hard terms with the commitment beta
    inside) + entropy_weight * the per-level entropy penalty. The other quantizers of the CODA family (nearest-
    neighbour VQ and multi-scale residual VQ, the Table 1 baselines) return their codebook + commitment loss as
    ``vq_loss`` and no entropy term."""
    lo = recipe.loss
    out = {}
    if lo.vq_weight:
        out["vq"] = lo.vq_weight * aux["vq_loss"]
    if lo.entropy_weight and "entropy_loss" in aux:
        out["entropy"] = lo.entropy_weight * aux["entropy_loss"]
    return out


FAMILY_LOSSES: dict[str, LossHook] = {"wetok": wetok_losses, "kl": kl_losses, "coda": coda_losses}


def family_losses(family: str) -> LossHook:
    """The loss hook for ``family`` (the family module's ``training_losses`` if it has one)."""
    from tokcli.errors import TokError
    from tokcli.families import get_family

    hook = getattr(get_family(family), "training_losses", None) or FAMILY_LOSSES.get(family)
    if hook is None:
        raise TokError(f"the trainer has no loss terms for the {family!r} family yet")
    return hook
