"""Training a KL autoencoder: the shared reconstruction objective plus ``kl_weight`` x KL(q(z|x) || N(0, I))
(summed over the latent, averaged over the batch, the LDM convention). At export the latent scale is measured on
the exported weights: 1 / std of the posterior mean over the first training batches (at most 64 images)."""

from __future__ import annotations

from dataclasses import dataclass

from tokcli.losses.reconstruction import ReconstructionObjective
from tokcli.train.recipe import LossSection


@dataclass
class KLLoss(LossSection):
    kl_weight: float = 1e-6


class KLObjective(ReconstructionObjective):
    def family_terms(self, x, recon, aux):
        w = self.recipe.loss.kl_weight
        return {"kl": w * aux["kl"]} if w else {}

    def loss_terms(self) -> list[str]:
        return super().loss_terms() + [f"{self.recipe.loss.kl_weight} x KL"]

    def export_model(self, state, data):
        """A copy holding the exported weights whose ``latent_scale`` is calibrated (deterministic: the first
        training batches, whatever the step)."""
        probe = self.rebuilt_model(state)
        n = max(1, 64 // self.recipe.data.batch_size)
        batches = data.batches(start=0)
        probe.calibrate(next(batches) for _ in range(n))
        return probe
