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


FAMILY_LOSSES: dict[str, LossHook] = {"wetok": wetok_losses}


def family_losses(family: str) -> LossHook:
    """The loss hook for ``family`` (the family module's ``training_losses`` if it has one)."""
    from tokcli.errors import TokError
    from tokcli.families import get_family

    hook = getattr(get_family(family), "training_losses", None) or FAMILY_LOSSES.get(family)
    if hook is None:
        raise TokError(f"the trainer has no loss terms for the {family!r} family yet")
    return hook
