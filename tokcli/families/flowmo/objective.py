"""Training FlowMo, stage 1A (official ``models.rf_loss`` + ``train.py``): mode-matching pre-training.

Per micro-batch, with t, the noise and the dropout mask drawn from the global torch RNG (restored on resume):

    t ~ fat-lognormal: sigmoid(N(0, 1)), replaced by U(0, 1) for 10% of the samples (``t_schedule``)
    x_t = (1 - t) x + t eps;  v = decoder(x_t, t | [sign(encoder(x)), 1] x keep), keep = 0 for ``cfg_dropout``
    loss = flow_weight x mean (eps - x - v)^2
           + perceptual_weight x LPIPS-VGG(x, x_t - t v)      (the one-step prediction; official weight 0.1)
           + entropy_weight x (H(q) - H(E q)) + commit_weight x MSE(code, sign(code))   (0.0025, 0.000625)

The shared ``[loss]`` keys l1 / l2 / perceptual act on the one-step prediction; there is no GAN. ``fix_norms``
(official ``fix_initial_norms``, mode l2) puts every Linear weight inside the double-stream blocks back to its
Frobenius norm at step 0 after every optimizer step (before the EMA sees it, as official); the norms are the
objective's state, so resume is exact. ``freeze_encoder_after`` (official 200,000; 0 = never) stops the encoder's
gradients from that step on; unlike the official code the decoder's Adam moments are kept (the official code
rebuilds the optimizer). Stage 1B (post-training through the k-step sampler) is post.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from tokcli.errors import TokUsageError
from tokcli.losses.reconstruction import ReconstructionObjective
from tokcli.train.recipe import LossSection

T_SCHEDULES = ("fat_lognormal", "lognormal", "uniform")


@dataclass
class FlowMoLoss(LossSection):
    l1_weight: float = 0.0
    perceptual_weight: float = 0.1
    gan_weight: float = 0.0
    flow_weight: float = 1.0
    entropy_weight: float = 0.0025
    commit_weight: float = 0.000625
    cfg_dropout: float = 0.1
    t_schedule: str = "fat_lognormal"
    freeze_encoder_after: int = 0
    fix_norms: bool = True

    def problems(self) -> list[str]:
        out = super().problems()
        if self.gan_weight:
            out.append("'loss.gan_weight' must be 0 for FlowMo (its decoder is a flow model: no discriminator)")
        if not 0 <= self.cfg_dropout < 1:
            out.append(f"'loss.cfg_dropout' must be in [0, 1), got {self.cfg_dropout}")
        if self.t_schedule not in T_SCHEDULES:
            out.append(f"'loss.t_schedule' must be one of {', '.join(T_SCHEDULES)}, got {self.t_schedule!r}")
        if self.freeze_encoder_after < 0:
            out.append("'loss.freeze_encoder_after' must be >= 0 (0: never)")
        return out


def sample_t(n: int, schedule: str, device) -> torch.Tensor:
    """Training times t [n] in (0, 1) (official ``opt.schedule``)."""
    if schedule == "uniform":
        return torch.rand(n, device=device)
    t = torch.sigmoid(torch.randn(n, device=device))
    if schedule == "fat_lognormal":  # the official draws both uniforms; the 10% get the second one
        t = torch.where(torch.rand_like(t) <= 0.9, t, torch.rand_like(t))
    return t


def check_decoder_width(a: Mapping[str, Any]) -> None:
    """Refuse to train a decoder narrower than a patch: its output v = z - x must carry the noise z, and a linear
    readout of rank ``dec_hidden_size`` < 3 p^2 leaves the rest of z in every sample, whatever the training length
    (a 64 px / patch-8 / width-128 demo sampled at 9.6 dB for that reason)."""
    p, width = a["patch_size"], a["dec_hidden_size"]
    if width < 3 * p * p:
        raise TokUsageError(f"FlowMo dec_hidden_size {width} is below a patch's 3 x {p}^2 = {3 * p * p} values: the "
                            f"decoder's velocity could not carry the noise; use dec_hidden_size >= {3 * p * p} or a "
                            f"smaller patch_size")


def norm_fixed_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every Linear weight inside ``double_blocks`` (qkv, proj, MLPs and the AdaLN linears), by name."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if "double_blocks" in name and isinstance(m, nn.Linear)}


class FlowMoObjective(ReconstructionObjective):
    def __init__(self, recipe, *, device="cpu", world_size: int = 1):
        super().__init__(recipe, device=device, world_size=world_size)
        self.initial_norms: dict[str, torch.Tensor] = {}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Freeze what never gets a gradient (the encoder's timestep-only tensors and the image stream after its
        last attention, the decoder's txt readout): no change to the maths, and DDP sees no unused parameter."""
        check_decoder_width(model.model_args)
        last = model.encoder.double_blocks[-1]
        for m in (model.encoder.time_in, model.encoder.final_layer_txt.adaLN_modulation,
                  model.encoder.final_layer_img, model.decoder.final_layer_txt, last.img_attn.proj, last.img_mlp):
            m.requires_grad_(False)
        for block in model.encoder.double_blocks:
            block.img_mod.requires_grad_(False)
            block.txt_mod.requires_grad_(False)
        with torch.no_grad():
            self.initial_norms = {k: torch.linalg.norm(w).detach().clone()
                                  for k, w in norm_fixed_weights(model).items()}
        return model

    def make_optimizer(self, name: str, net: nn.Module) -> torch.optim.Optimizer:
        opt = super().make_optimizer(name, net)
        if name == "model" and self.recipe.loss.fix_norms:
            opt.register_step_post_hook(lambda *_: self.fix_norms())
        return opt

    @torch.no_grad()
    def fix_norms(self) -> None:
        for k, w in norm_fixed_weights(self.model).items():
            w.mul_(self.initial_norms[k].to(w.device) / torch.linalg.norm(w))

    def encoder_frozen(self, step: int) -> bool:
        after = self.recipe.loss.freeze_encoder_after
        return bool(after) and step >= after

    def begin_phase(self, phase: str, step: int) -> None:
        if self.encoder_frozen(step):
            self.model.encoder.requires_grad_(False)

    def generator_loss(self, net: nn.Module, x: torch.Tensor, micro: int, step: int):
        lo = self.recipe.loss
        b, frozen = x.shape[0], self.encoder_frozen(step)
        t = sample_t(b, lo.t_schedule, x.device)
        noise = torch.randn_like(x)
        keep = (torch.rand(b, device=x.device) > lo.cfg_dropout).float()
        v, aux = net(x, t, noise, keep, frozen)
        v = v.float()
        terms = {"flow": lo.flow_weight * (noise - v - x).pow(2).mean()}
        x_pred = aux["x_t"].float() - v * t[:, None, None, None]
        terms.update(self.pixel_terms(x, x_pred))
        if not frozen:
            terms["entropy"] = lo.entropy_weight * aux["entropy_aux"]
            terms["commitment"] = lo.commit_weight * aux["commitment"]
        self._last = (x, x_pred.detach().clamp(-1, 1))
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs.update(self.statistics({k: a for k, a in aux.items() if k != "x_t"}, terms))
        return sum(terms.values()), logs

    # --- exact resume -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"initial_norms": {k: v.cpu() for k, v in self.initial_norms.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.initial_norms = {k: v.to(self.device) for k, v in state["initial_norms"].items()}

    # --- the card ---------------------------------------------------------------------------------------------
    def describe(self) -> str:
        return "stage 1A (flow matching)"

    def loss_terms(self) -> list[str]:
        lo = self.recipe.loss
        terms = [f"{lo.flow_weight} x flow MSE(v, eps - x), t {lo.t_schedule}, condition dropped for "
                 f"{lo.cfg_dropout:.0%} of the samples"]
        terms += [f"{s} (on the one-step prediction x_t - t v)" for s in super().loss_terms()[1:]]
        if lo.l1_weight:
            terms.append(f"{lo.l1_weight} x L1 (on the one-step prediction)")
        terms.append(f"{lo.entropy_weight} x LFQ entropy (T 0.1) + {lo.commit_weight} x commitment")
        if lo.fix_norms:
            terms.append("block Linear weights renormalised to their initial Frobenius norm after every step")
        if lo.freeze_encoder_after:
            terms.append(f"encoder frozen from step {lo.freeze_encoder_after}")
        return terms

    def training_record(self) -> dict[str, Any]:
        lo = self.recipe.loss
        return {**super().training_record(), "stage": "1A", "t_schedule": lo.t_schedule,
                "cfg_dropout": lo.cfg_dropout, "freeze_encoder_after": lo.freeze_encoder_after}
