"""Training SiT with ``tok train`` (objective ``flow``): flow matching on a token file of continuous latents (SoftVQ's
``latents`` [N, L, C]; data kind ``"latents"``, :class:`LatentTokenData`).

The path is the one the samplers of ``sampler.py`` integrate: time 1 is noise, time 0 is data,

    x_t = t eps + (1 - t) x,   eps ~ N(0, I),   t ~ U(0, 1),   target velocity v = dx_t / dt = eps - x,

(SiT's ``linear`` path in the sampler's time direction: the Euler ODE from t = 1 to 0 turns noise into data, and
the SDE's score for ``path_type = "linear"`` is this path's). The loss is the mean squared error between the model's
v(x_t, t, y) and eps - x over every element of the micro-batch. Labels are dropped to the null class
(``num_classes``) with ``model_args.class_dropout_prob`` (0.1) inside the label embedder, for classifier-free
guidance. t, eps and the label drops all come from the global torch RNG, which checkpoints restore: resume is exact.

Normalisation: the model sees what the sampler returns before ``SiT.tokens_for`` maps it back, so a token file
whose header says ``tokens.extra.normalized`` is used as it is, any other is read as
x = (z - vq_mean) / vq_std with the header's ``tokens.extra`` scalars (SoftVQ records them in every header); a
header without them is refused, as ``SiT.check_tokenizer`` refuses such a tokenizer.

The token file fixes ``input_size`` (L), ``in_channels`` (C) and ``num_classes`` (the classes of the labels); the
recipe's ``model_args`` give the architecture and may repeat those keys only with the same values
(``num_classes`` may be larger). A file without labels trains an unconditional model (one class, 0) unless
``num_classes`` > 1 asks for a conditional one, which is refused. The exported folder names the tokenizer of the
token file and samples with the ODE on the linear path by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokcli.errors import TokError
from tokcli.gen.objective import GeneratorObjective
from tokcli.train.recipe import DataSection, LossSection
from tokcli.train.token_data import TokenData

#: what the exported folder samples with (``tok generate`` flags override): the ODE needs no score, and
#: ``path_type = "linear"`` keeps ``--sampler sde`` on the path trained here
SAMPLE_DEFAULTS: dict[str, Any] = {"sampler": "ode", "steps": 50, "guidance_interval": [0.0, 1.0],
                                   "path_type": "linear", "seed": 0}
GUIDED_CFG = 1.5


T_SCHEDULES = ("uniform", "lognormal")


@dataclass
class SiTFlowLoss(LossSection):
    perceptual: str = "none"  # the shared image-loss keys do not apply to latent data
    gan_weight: float = 0.0
    # t ~ U(0, 1), or the official train_sit.py's `weighting lognormal`: sigma = exp(N(0, 1)), t = sigma / (1 + sigma)
    t_schedule: str = "uniform"

    def problems(self) -> list[str]:
        out = super().problems()
        if self.t_schedule not in T_SCHEDULES:
            out.append(f"'loss.t_schedule' must be one of {', '.join(T_SCHEDULES)}, got {self.t_schedule!r}")
        return out


def sample_t(n: int, schedule: str, device) -> torch.Tensor:
    """Training times [n] (global RNG): uniform, or lognormal (sigmoid of N(0, 1), i.e. sigma / (1 + sigma))."""
    if schedule == "lognormal":
        return torch.sigmoid(torch.randn(n, device=device))
    return torch.rand(n, device=device)


def latent_scale(header: Mapping[str, Any], where: str) -> tuple[float, float]:
    """(mean, std) that map the file's latents to the model's space, x = (z - mean) / std; (0, 1) when the
    tokens are already normalised (see the module docstring)."""
    extra = (header.get("tokens") or {}).get("extra") or {}
    if extra.get("normalized"):
        return 0.0, 1.0
    try:
        mean, std = float(extra["vq_mean"]), float(extra["vq_std"])
    except (KeyError, TypeError, ValueError):
        raise TokError(f"{where}: the header records no latent statistics (tokens.extra vq_mean / vq_std); the SiT "
                       "generator trains on normalised latents") from None
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise TokError(f"{where}: tokens.extra vq_mean = {mean}, vq_std = {std}; vq_std must be a positive number")
    return mean, std


class LatentTokenData(TokenData):
    """:class:`~tokcli.train.token_data.TokenData` for a file of latents: batches ``{"tokens": float32 [B, L, C]
    (normalised, see the module docstring), "labels": int64 [B]}``, the same pure function of (seed, micro-batch,
    rank) (the permutation and batching are TokenData's)."""

    def check(self, data) -> None:
        if data.kind != "latents" or len(data.shape) != 2 or not len(data):
            raise TokError(f"{self.path} holds {len(data)} images of {data.kind} of shape {list(data.shape)}; "
                           "the SiT generator trains on latents [N, L, C] (tok encode with a SoftVQ tokenizer) of "
                           "at least one image")

    def setup(self) -> None:
        self.mean, self.std = latent_scale(self.header, str(self.path))

    def rows(self, index) -> torch.Tensor:
        z = torch.from_numpy(np.asarray(self.data.gather(index), dtype=np.float32))
        return (z - self.mean) / self.std if (self.mean, self.std) != (0.0, 1.0) else z


def flow_pair(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity) for data x [B, L, C], noise like x and times t [B] (see the module docstring)."""
    tb = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return tb * noise + (1 - tb) * x, noise - x


def flow_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``model`` (a SiT, possibly DDP-wrapped) against the target velocity at (x, noise, t)."""
    xt, target = flow_pair(x, noise, t)
    return F.mse_loss(model(xt, t, labels).float(), target.float())


class SiTFlowObjective(GeneratorObjective):
    data = "latents"
    token_data = LatentTokenData

    def model_class(self):
        from tokcli.gen.sit.model import SiT

        return SiT

    def args_from_data(self) -> dict[str, Any]:
        L, C = self.tokens.data.shape
        found = {"input_size": int(L), "in_channels": int(C)}
        self.check_given(found, f" (latents [N, {L}, {C}])")
        return {**self.recipe.model.model_args, **found, "num_classes": self.class_count()}

    def build_model(self, model_args: dict | None) -> nn.Module:
        model = super().build_model(model_args)
        guided = model.null_class is not None and model.num_classes > 1  # one class: nothing to guide towards
        model.sample_defaults = {**SAMPLE_DEFAULTS, "cfg": GUIDED_CFG if guided else 1.0}
        return model

    def loss(self, phase: str, nets: Mapping[str, nn.Module], batch: Any, micro: int,
             step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x, labels = batch["tokens"], batch["labels"]
        if not x.is_floating_point():
            raise TokError(f"the SiT flow objective takes float latents, got {x.dtype} tokens")
        t = sample_t(x.shape[0], self.recipe.loss.t_schedule, x.device)  # global RNG, before the noise: resume
        noise = torch.randn_like(x)
        mse = flow_loss(nets["model"], x, labels, t, noise)
        return mse, {"mse": float(mse.detach())}

    def loss_terms(self) -> list[str]:
        t = "U(0, 1)" if self.recipe.loss.t_schedule == "uniform" else "sigmoid(N(0, 1)) (lognormal)"
        return [f"flow matching: MSE of the velocity eps - x at x_t = t eps + (1 - t) x, t ~ {t} (linear path; "
                f"label dropout {self.model.model_args['class_dropout_prob']})"]

    def card_sections(self, model: nn.Module) -> dict[str, str]:
        a, d = model.model_args, self.tokens
        scale = "as stored (normalised)" if (d.mean, d.std) == (0.0, 1.0) else f"(z - {d.mean}) / {d.std}"
        return {"Tokenizer and sampling": (
            f"{self.tokenizer_line('latents')}: [{a['input_size']}, {a['in_channels']}] floats, trained on {scale}; "
            f"{a['num_classes']} class(es){self.class_names()}.\n`tok generate -m THIS_FOLDER --class all -n 4 "
            f"-o out/` decodes through that tokenizer; sampler defaults {model.sample_defaults} (time 1 = noise, "
            f"0 = data; CFG u + cfg (c - u)).")}

    def training_record(self) -> dict[str, Any]:
        return {**super().training_record(), "latent_scale": {"mean": self.tokens.mean, "std": self.tokens.std}}
