"""The reconstruction objective every tokenizer family shares; a family subclasses it to add its own terms.

Networks: ``model`` (the tokenizer; ``forward(x) -> (recon, aux)``) and, when ``loss.gan_weight > 0``, ``disc``
(a PatchGAN). Each step:

1. phase ``model``, for each micro-batch::

       loss = l1 |x - x̂| + l2 (x - x̂)^2 + perceptual LPIPS-VGG(x, x̂) + gan G_adv(D(x̂)) + family_terms(aux)

   (the GAN term from step ``disc_start`` on); the scalar statistics in ``aux`` are logged too;
2. phase ``disc`` (GAN on and step >= ``disc_start``), on the same micro-batches and the generator phase's
   reconstructions: hinge(D(x), D(x̂)) + lecam LeCAM(D(x), D(x̂)). LeCAM's EMAs (the objective's state) move with
   the batch-mean logits averaged over ranks, so every rank keeps the same values.

Subclasses override ``family_terms`` (their quantizer or KL terms), ``loss_terms`` (the card text), and, to start
from another model, ``model_from_init`` / ``prepare_model`` / ``recipe_model_args``.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokcli.core.checkpoint import ModelFolder
from tokcli.errors import TokUsageError
from tokcli.losses.gan import LeCAM, NLayerDiscriminator, generator_loss, hinge_d_loss
from tokcli.losses.perceptual import load_lpips, lpips_distance
from tokcli.train.objective import Objective

PERCEPTUAL_TEXT = {
    "lpips-vgg": "LPIPS-VGG (ImageNet VGG16 backbone + the lpips v0.1 linear heads), as in the paper",
    "lpips-vgg-random": "LPIPS-VGG with a RANDOMLY INITIALISED VGG16 backbone (no ImageNet weights were available "
                        "offline); it is a feature-matching loss, not LPIPS",
    "none": "none: no perceptual term (the recipe's explicit choice, e.g. where the ImageNet VGG16 weights that "
            "LPIPS-VGG needs are not available)",
}


class ReconstructionObjective(Objective):
    data = "images"

    def __init__(self, recipe, *, device="cpu", world_size: int = 1):
        super().__init__(recipe, device=device, world_size=world_size)
        self.use_gan = recipe.loss.gan_weight > 0
        self.lecam = LeCAM(recipe.loss.lecam_decay)
        self.perceptual: nn.Module | None = None
        self._fakes: dict[int, torch.Tensor] = {}  # this step's reconstructions, by micro-batch (for the D phase)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- set-up ---------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        lo = self.recipe.loss
        if lo.perceptual != "none" and lo.perceptual_weight > 0:
            backbone = "random" if lo.perceptual == "lpips-vgg-random" else "pretrained"
            self.perceptual = load_lpips("vgg", backbone=backbone, device=self.device)

    def build_networks(self, model_args: dict | None) -> dict[str, nn.Module]:
        nets = {"model": self.build_model(model_args)}
        if self.use_gan:
            lo = self.recipe.loss
            nets["disc"] = NLayerDiscriminator(3, lo.disc_ndf, lo.disc_layers)
        return nets

    def build_model(self, model_args: dict | None) -> nn.Module:
        """Resume: the checkpoint's ``model_args`` (weights follow). Fresh: around ``model.init_from`` (a registry
        name or a folder) when the recipe names one, else ``model.model_args``. Then ``prepare_model``."""
        r = self.recipe
        if model_args is not None:
            model = self.family.build(model_args)
        elif r.model.init_from:
            from tokcli.core.registry import resolve

            model = self.model_from_init(resolve(r.model.init_from))
        else:
            model = self.family.build(self.recipe_model_args())
        return self.prepare_model(model)

    def recipe_model_args(self) -> dict[str, Any]:
        return dict(self.recipe.model.model_args)

    def model_from_init(self, folder: ModelFolder) -> nn.Module:
        r = self.recipe
        raise TokUsageError(f"{r.source}: the {r.model.family} family cannot start from model.init_from "
                            f"(only generative_decoder_stage2 or families that adapt a base model can)")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Called on every freshly built model, fresh run or resume (e.g. freeze what does not train)."""
        return model

    # --- one step ---------------------------------------------------------------------------------------------
    def gan_on(self, step: int) -> bool:
        return self.use_gan and step >= self.recipe.loss.disc_start

    def phases(self, step: int) -> list[str]:
        return ["model", "disc"] if self.gan_on(step) else ["model"]

    def begin_phase(self, phase: str, step: int) -> None:
        if self.use_gan:
            self.networks["disc"].requires_grad_(phase == "disc")

    def loss(self, phase: str, nets: Mapping[str, nn.Module], batch, micro: int, step: int):
        if phase == "disc":
            return self.discriminator_loss(nets["disc"], batch, self._fakes[micro])
        return self.generator_loss(nets["model"], batch, micro, step)

    def generator_loss(self, net: nn.Module, x: torch.Tensor, micro: int, step: int):
        recon, aux = net(x)
        terms = self.pixel_terms(x, recon)
        if self.gan_on(step):  # the bare discriminator: its gradients are off in this phase
            terms["gan_g"] = self.recipe.loss.gan_weight * generator_loss(self.networks["disc"](recon))
        terms.update(self.family_terms(x, recon, aux))
        loss = sum(terms.values())
        self._fakes[micro] = recon.detach()
        self._last = (x, self._fakes[micro])
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs.update(self.statistics(aux, terms))
        return loss, logs

    def pixel_terms(self, x: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        lo = self.recipe.loss
        recon = recon.float()
        terms = {}
        if lo.l1_weight:
            terms["l1"] = lo.l1_weight * (x - recon).abs().mean()
        if lo.l2_weight:
            terms["l2"] = lo.l2_weight * F.mse_loss(recon, x)
        if self.perceptual is not None:
            terms["perceptual"] = lo.perceptual_weight * lpips_distance(self.perceptual, x, recon).mean()
        return terms

    def family_terms(self, x: torch.Tensor, recon: torch.Tensor, aux: dict) -> dict[str, torch.Tensor]:
        """The family's weighted loss terms from the model's ``aux`` (name -> scalar tensor)."""
        return {}

    def statistics(self, aux: dict, terms: dict) -> dict[str, float]:
        """Scalar entries of ``aux`` that are not loss terms (quantizer statistics), logged as they are."""
        return {k: float(v.detach()) for k, v in aux.items()
                if isinstance(v, torch.Tensor) and v.dim() == 0 and k not in terms}

    def discriminator_loss(self, d_net: nn.Module, x: torch.Tensor, fake: torch.Tensor):
        lo = self.recipe.loss
        real_logits, fake_logits = d_net(x).float(), d_net(fake).float()
        self.lecam.update(*self._mean_over_ranks(real_logits.mean(), fake_logits.mean()))
        hinge = hinge_d_loss(real_logits, fake_logits)
        reg = self.lecam.penalty(real_logits, fake_logits)
        return hinge + lo.lecam_weight * reg, {"d_hinge": hinge.item(), "lecam": reg.item()}

    def _mean_over_ranks(self, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        """Batch-mean logits averaged over ranks, so every rank's LeCAM EMAs stay identical."""
        t = torch.stack([a.detach(), b.detach()]).float()
        if self.world_size > 1:
            dist.all_reduce(t)
            t /= self.world_size
        return float(t[0]), float(t[1])

    def end_step(self, step: int) -> None:
        self._fakes = {}

    def sample_grid(self, n: int = 8) -> np.ndarray | None:
        """Top row: inputs; bottom row: reconstructions (the last micro-batch of the last step)."""
        if self._last is None:
            return None
        from tokcli.core.images import to_uint8

        a, b = (to_uint8(t[:n].float()) for t in self._last)
        return np.concatenate([np.concatenate(list(a), axis=1), np.concatenate(list(b), axis=1)], axis=0)

    # --- exact resume -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"lecam": self.lecam.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lecam.load_state_dict(state["lecam"])

    # --- the card ---------------------------------------------------------------------------------------------
    def loss_terms(self) -> list[str]:
        lo = self.recipe.loss
        terms = [f"{lo.l1_weight} x L1"]
        if lo.l2_weight:
            terms.append(f"{lo.l2_weight} x L2")
        if lo.perceptual != "none" and lo.perceptual_weight:
            terms.append(f"{lo.perceptual_weight} x perceptual")
        if lo.gan_weight:
            terms.append(f"{lo.gan_weight} x GAN (PatchGAN ndf {lo.disc_ndf}, {lo.disc_layers} layers, hinge + "
                         f"{lo.lecam_weight} x LeCAM, from step {lo.disc_start})")
        return terms

    def card_lines(self) -> list[str]:
        return [f"perceptual loss: {PERCEPTUAL_TEXT[self.recipe.loss.perceptual]}"]

    def card_sections(self, model: nn.Module) -> dict[str, str]:
        spec = getattr(model, "spec", None)
        return {"Tokens": f"`{json.dumps(spec.to_dict())}`"} if spec is not None else {}

    def training_record(self) -> dict[str, Any]:
        return {"crop_size": self.recipe.data.crop_size, "perceptual": self.recipe.loss.perceptual}
