"""Training CODA (official train_*.py): a frozen KL VAE from ``model.init_from`` (a registry name such as
``kl-tiny`` or a folder) with conv LoRA and the multi-scale attention quantizer trained through the decoder. The
loss is the shared reconstruction objective plus ``vq_weight`` x the quantizer's vq loss (its soft/hard terms with
the commitment beta inside) + ``entropy_weight`` x the per-level entropy penalty. The family's other quantizers
(nearest-neighbour VQ and multi-scale residual VQ, the Table 1 baselines) return their codebook + commitment loss
as ``vq_loss`` and no entropy term."""

from __future__ import annotations

from dataclasses import dataclass

from tokcli.losses.reconstruction import ReconstructionObjective
from tokcli.train.recipe import LossSection


@dataclass
class CodaLoss(LossSection):
    vq_weight: float = 1.0
    entropy_weight: float = 0.1


class CodaObjective(ReconstructionObjective):
    def model_from_init(self, folder):
        if self.recipe.stage2:
            return super().model_from_init(folder)
        from tokcli.families.coda.model import init_model

        return init_model(dict(self.recipe.model.model_args), folder)

    def family_terms(self, x, recon, aux):
        lo = self.recipe.loss
        out = {}
        if lo.vq_weight:
            out["vq"] = lo.vq_weight * aux["vq_loss"]
        if lo.entropy_weight and "entropy_loss" in aux:
            out["entropy"] = lo.entropy_weight * aux["entropy_loss"]
        return out

    def loss_terms(self) -> list[str]:
        lo = self.recipe.loss
        return super().loss_terms() + [f"{lo.vq_weight} x quantizer loss + {lo.entropy_weight} x entropy"]
