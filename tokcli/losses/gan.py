"""Adversarial pieces of the WeTok / Open-MAGVIT2 recipe: a pix2pix PatchGAN discriminator, the hinge loss for D,
LeCAM regularisation (Tseng et al. 2021) and the non-saturating generator loss on per-image mean logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): 4x4 convs, BatchNorm, LeakyReLU(0.2); one logit per overlapping patch.

    Layout: conv(3->ndf, s2) + LReLU, then n_layers-1 stride-2 blocks and one stride-1 block (conv without bias +
    BN + LReLU, widths ndf*min(2^n, 8)), then conv(->1, s1). Conv weights ~ N(0, 0.02), BN weight ~ N(1, 0.02),
    BN bias 0.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss: BCE-with-logits of each image's mean logit against 'real' (1)."""
    per_image = logits_fake.float().reshape(logits_fake.shape[0], -1).mean(1)
    return F.binary_cross_entropy_with_logits(per_image, torch.ones_like(per_image))


class LeCAM:
    """LeCAM regulariser: EMAs of the mean real and fake logits (start at 0) anchor D's outputs.

    ``update(real, fake)`` moves the EMAs (call it once per D step, before ``penalty``);
    ``penalty(real, fake) = mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)``.
    The EMAs are Python floats so a checkpoint stores and restores them exactly.
    """

    def __init__(self, decay: float = 0.999):
        self.decay = float(decay)
        self.ema_real = 0.0
        self.ema_fake = 0.0

    def update(self, mean_real: float, mean_fake: float) -> None:
        d = self.decay
        self.ema_real = d * self.ema_real + (1.0 - d) * float(mean_real)
        self.ema_fake = d * self.ema_fake + (1.0 - d) * float(mean_fake)

    def penalty(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return (F.relu(logits_real - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake).pow(2).mean())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "ema_real": self.ema_real, "ema_fake": self.ema_fake}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.ema_real = float(state["ema_real"])
        self.ema_fake = float(state["ema_fake"])
