"""The toy family's training objective: the shared reconstruction objective plus its VQ term."""

from __future__ import annotations

from dataclasses import dataclass

from tokcli.losses.reconstruction import ReconstructionObjective
from tokcli.train.recipe import LossSection


@dataclass
class ToyLoss(LossSection):
    vq_weight: float = 1.0


class ToyObjective(ReconstructionObjective):
    def family_terms(self, x, recon, aux):
        return {"vq": self.recipe.loss.vq_weight * aux["vq_loss"]}

    def loss_terms(self) -> list[str]:
        return super().loss_terms() + [f"{self.recipe.loss.vq_weight} x VQ (codebook + commitment)"]
