"""Training WeTok: the shared reconstruction objective plus the LFQ entropy and commitment terms (stage 1), or
stage 2, the generative decoder (GD): the stage-1 model from ``model.init_from`` gets zero-initialised noise inputs
on its decoder (``extend_to_generative``: step 0 decodes exactly like stage 1), its encoder and quantizer are frozen
(``freeze_encoder``), and the loss is L1 + LPIPS + GAN only, as the official stage-2 code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokcli.errors import TokUsageError
from tokcli.losses.reconstruction import ReconstructionObjective
from tokcli.quant.lfq import ENTROPY_MODES
from tokcli.train.recipe import LossSection


@dataclass
class WeTokLoss(LossSection):
    entropy_mode: str | None = None  # overrides model_args.entropy_mode when set
    entropy_weight: float = 0.1
    commitment_weight: float = 0.25

    def problems(self) -> list[str]:
        out = super().problems()
        if self.entropy_mode is not None and self.entropy_mode not in ENTROPY_MODES:
            out.append(f"'loss.entropy_mode' must be one of {', '.join(ENTROPY_MODES)}, got {self.entropy_mode!r}")
        return out


class WeTokObjective(ReconstructionObjective):
    def recipe_model_args(self) -> dict[str, Any]:
        r = self.recipe
        args, mode = dict(r.model.model_args), r.loss.entropy_mode
        if mode is not None:
            if args.get("entropy_mode", mode) != mode:
                raise TokUsageError(f"{r.source}: loss.entropy_mode ({mode}) contradicts "
                                    f"model.model_args.entropy_mode ({args['entropy_mode']})")
            args["entropy_mode"] = mode
        return args

    def model_from_init(self, folder):
        r = self.recipe
        if not r.stage2:
            return super().model_from_init(folder)
        if folder.family != r.model.family:
            raise TokUsageError(f"{r.source}: model.init_from is a {folder.family} model, the recipe trains "
                                f"{r.model.family}")
        from tokcli.core.model import TokModel

        return TokModel.from_folder(folder, inference=False).extend_to_generative()

    def prepare_model(self, model):
        if self.recipe.stage2:  # fresh or resumed: the encoder and the quantizer stay frozen
            model.freeze_encoder()
            model.decode_defaults.setdefault("seed", 0)
        return model

    def family_terms(self, x, recon, aux):
        """entropy_weight * (per-sample - codebook entropy) + commitment_weight * commitment; stage 2: none."""
        lo = self.recipe.loss
        if self.recipe.stage2:
            return {}
        out = {}
        if lo.entropy_weight:
            out["entropy"] = lo.entropy_weight * aux["entropy_aux"]
        if lo.commitment_weight:
            out["commitment"] = lo.commitment_weight * aux["commitment"]
        return out

    def statistics(self, aux, terms):
        return {} if self.recipe.stage2 else super().statistics(aux, terms)  # stage 2: a frozen quantizer

    def entropy_mode(self) -> str | None:
        return self.model_args().get("entropy_mode", self.recipe.loss.entropy_mode)

    def describe(self) -> str:
        return "stage 2, generative decoder" if self.recipe.stage2 else "stage 1"

    def loss_terms(self) -> list[str]:
        lo, terms = self.recipe.loss, super().loss_terms()
        if not self.recipe.stage2:
            terms += [f"{lo.entropy_weight} x entropy ({self.entropy_mode()})", f"{lo.commitment_weight} x commitment"]
        return terms

    def training_record(self) -> dict[str, Any]:
        return {**super().training_record(), "entropy_mode": self.entropy_mode(),
                "stage": 2 if self.recipe.stage2 else 1}
