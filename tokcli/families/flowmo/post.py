"""Training FlowMo, stage 1B (paper Sec. 3.3; official ``model.posttrain_sample``): mode-seeking post-training.

Starts from a stage-1A model (``model.init_from``: a registry name or a model folder of the flowmo family; resume
reads the checkpoint's weights instead). The encoder (and so the quantizer) is frozen for the whole stage, as in the
paper; only the decoder trains. Per micro-batch, everything random drawn from the global torch RNG (saved with every
checkpoint and restored on resume, so resume is exact):

    the stage-1A flow loss, unchanged (t, noise and latent dropout as ``objective.py``; no entropy / commitment,
    the encoder being frozen; the shared l1 / l2 / perceptual keys still act on the one-step prediction)
    + post_weight x d(x, sample)              (official lambda_sample 0.01)

``sample`` is a ``post_steps``-step Euler sample (official k = 8) from z ~ N(0, I) at t = 1 to t = 0, conditioned
on the un-dropped code ``[sign(encoder(x)), 1]``, on a random time grid per image: k + 1 draws of U(0, 1),
cumulated, shifted to start at 0, divided by the last and reversed (1 = t_0 > t_1 > ... > t_k = 0). No CFG
(``post_cfg = true``: each step drops the whole condition of an image with probability ``cfg_dropout``, as the
official ``posttrain_sample_enable_cfg``). Every decoder call goes through ``torch.utils.checkpoint``
(``use_reentrant=False``), so backpropagation through all k steps keeps one call's activations at a time.

``post_perceptual`` chooses d, explicitly (never a silent substitute):

- ``"resnet50"`` (official, the default): MSE between the 1000 ImageNet logits of torchvision's ResNet-50
  (IMAGENET1K_V1, ``resnet50-0676ba61.pth``) on both images, mapped to [0, 1], resized to 224 (bilinear,
  antialiased) and normalised with the ImageNet mean and std; frozen, eval mode. The file is found by tok's one rule
  (tokcli/core/pretrained.py: ``$TORCH_HOME/hub/checkpoints``; downloaded only with ``TOK_DOWNLOAD=1``); a missing
  file stops the run at start-up with one line naming it.
- ``"lpips-vgg"``: LPIPS-VGG on the sample (needs ``vgg16-397923af.pth``, as stage 1A's LPIPS); a stand-in.
- ``"pixel-l2"``: MSE(sample, x) in pixels; a stand-in needing no file (CPU demos, tests). It is not the
  paper's loss: the choice is written into the card and ``config.json`` ``training``.

Differences from the official code: the code is computed by a second, gradient-free encoder pass (the official
forward reuses the flow pass's code: the same values); the stage starts from the stage-1A folder's weights (the
EMA, when the run exported one; the official resumes the raw weights and re-seeds the EMA from them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokcli.errors import MissingWeightsError, TokUsageError
from tokcli.families.flowmo.objective import FlowMoLoss, FlowMoObjective

POST_PERCEPTUAL = ("resnet50", "lpips-vgg", "pixel-l2")
POST_TEXT = {
    "resnet50": "MSE of torchvision ResNet-50 (IMAGENET1K_V1) logits, as in the paper",
    "lpips-vgg": "LPIPS-VGG (a STAND-IN for the paper's ResNet-50 logit loss, chosen in the recipe)",
    "pixel-l2": "pixel MSE (a STAND-IN for the paper's ResNet-50 logit loss, chosen in the recipe: no file needed)",
}
RESNET50_FILE = ("resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth")
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class FlowMoPostLoss(FlowMoLoss):
    """FlowMo's [loss] section: stage 1A's keys plus the ``post_*`` keys, read by the ``post`` objective only."""

    post_steps: int = 8                  # posttrain_sample_k
    post_weight: float = 0.01            # lambda_sample (the official opt.lpips_weight in stage 1B)
    post_perceptual: str = "resnet50"    # opt.lpips_mode = resnet
    post_cfg: bool = False               # posttrain_sample_enable_cfg

    def problems(self) -> list[str]:
        out = super().problems()
        if self.post_steps < 1:
            out.append(f"'loss.post_steps' must be >= 1, got {self.post_steps}")
        if self.post_perceptual not in POST_PERCEPTUAL:
            out.append(f"'loss.post_perceptual' must be one of {', '.join(POST_PERCEPTUAL)}, got "
                       f"{self.post_perceptual!r}")
        return out


# --- the perceptual distance on the sample ---------------------------------------------------------------------
def resnet50_spec():
    from tokcli.core import pretrained

    name, url = RESNET50_FILE
    return pretrained.PretrainedFile(
        what="the ResNet-50 weights (torchvision IMAGENET1K_V1) for FlowMo post-training", name=name,
        folder=Path(torch.hub.get_dir()) / "checkpoints", url=url, sha256_prefix="0676ba61", fetch_flag=None)


class ResNetLogitLoss(nn.Module):
    """MSE between ResNet-50 logits of two batches in [-1, 1] (MaskBit's loss, as the official code uses it)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        from torchvision.models import resnet50

        self.net = resnet50(weights=None)
        self.net.load_state_dict(state, strict=True)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x / 2 + 0.5, size=224, mode="bilinear", antialias=True, align_corners=False)
        return self.net((x - self.mean) / self.std).float()

    def forward(self, sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.logits(target)
        return F.mse_loss(self.logits(sample), ref)


def load_resnet50(device) -> ResNetLogitLoss:
    from tokcli.core import pretrained

    hint = ' (or choose loss.post_perceptual = "lpips-vgg" or "pixel-l2" in the recipe)'
    path = pretrained.ensure(resnet50_spec(), None, download=None, hint=hint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return ResNetLogitLoss(state).to(device)
    except Exception as e:  # damaged file, wrong tensors
        raise MissingWeightsError(f"cannot read the ResNet-50 weights {path} ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); delete it "
                                  f"and put the original file there") from None


# --- the k-step sample -------------------------------------------------------------------------------------------
def random_grids(n: int, steps: int, device) -> torch.Tensor:
    """[n, steps + 1] decreasing time grids from 1 to 0 with random gaps, one per image (official)."""
    ts = torch.rand((n, steps + 1)).to(device).cumsum(dim=1)
    ts = ts - ts[:, :1]
    return (ts / ts[:, -1:]).flip(dims=(1,))


def checkpointed_sample(model: nn.Module, z: torch.Tensor, cond: torch.Tensor, ts: torch.Tensor,
                        drop: float | None = None) -> torch.Tensor:
    """Euler from z at ts[:, 0] = 1 to ts[:, -1] = 0, every decoder call checkpointed; differentiable in the
    decoder's weights. ``drop``: drop each image's condition with this probability at every step (official CFG
    option of the post-training sample)."""
    from torch.utils.checkpoint import checkpoint

    for i in range(ts.shape[1] - 1):
        t, dt = ts[:, i], ts[:, i] - ts[:, i + 1]
        c = cond
        if drop is not None:
            c = cond * (torch.rand(cond.shape[0], device=cond.device) > drop).to(cond.dtype)[:, None, None]
        v = checkpoint(model.velocity, z, t.to(z.dtype), c, use_reentrant=False)
        z = z - dt.to(z.dtype)[:, None, None, None] * v.float()
    return z


class FlowMoPostObjective(FlowMoObjective):
    def __init__(self, recipe, *, device="cpu", world_size: int = 1):
        super().__init__(recipe, device=device, world_size=world_size)
        if not isinstance(recipe.loss, FlowMoPostLoss):  # pragma: no cover - the family's recipe section
            raise TokUsageError(f"{recipe.source}: the post objective needs FlowMo's [loss] section")
        self.post_distance: nn.Module | None = None

    # --- set-up ---------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        r, lo = self.recipe, self.recipe.loss
        if not r.model.init_from:
            raise TokUsageError(f"{r.source}: model.objective = \"post\" (stage 1B) starts from a stage-1A model: "
                                f"set model.init_from to its folder or registry name")
        if lo.post_weight > 0 and lo.post_perceptual == "resnet50":
            self.post_distance = load_resnet50(self.device)  # first: a missing file stops the run at once
        super().prepare()
        if lo.post_weight > 0 and lo.post_perceptual == "lpips-vgg":
            from tokcli.losses.perceptual import load_lpips

            self.post_distance = load_lpips("vgg", backbone="pretrained", device=self.device)

    def model_from_init(self, folder) -> nn.Module:
        r = self.recipe
        if folder.family != "flowmo":
            raise TokUsageError(f"{r.source}: model.init_from is a {folder.family} model; FlowMo post-training "
                                f"starts from a flowmo one")
        given, have = dict(r.model.model_args), dict(folder.config.get("model_args") or {})
        clash = sorted(k for k, v in given.items() if k in have and have[k] != v)
        if clash:
            raise TokUsageError(f"{r.source}: model.model_args.{clash[0]} ({given[clash[0]]!r}) contradicts "
                                f"model.init_from {folder.path} ({have[clash[0]]!r}); leave model_args out")
        from tokcli.core.model import TokModel

        return TokModel.from_folder(folder, inference=False)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = super().prepare_model(model)
        model.encoder.requires_grad_(False)  # the paper's stage 1B: frozen encoder (fresh run and resume)
        model.quantizer.requires_grad_(False)
        return model

    def encoder_frozen(self, step: int) -> bool:
        return True

    # --- one step ---------------------------------------------------------------------------------------------
    def generator_loss(self, net: nn.Module, x: torch.Tensor, micro: int, step: int):
        lo = self.recipe.loss
        loss, logs = super().generator_loss(net, x, micro, step)  # the flow loss (+ shared terms), frozen encoder
        if lo.post_weight <= 0:
            return loss, logs
        model = getattr(net, "module", net)  # DDP: the same parameters, one backward
        with torch.no_grad():
            cond = model.condition(self._code(model, x))
        z = torch.randn_like(x)
        ts = random_grids(x.shape[0], lo.post_steps, x.device)
        sample = checkpointed_sample(model, z, cond, ts, lo.cfg_dropout if lo.post_cfg else None)
        term = lo.post_weight * self._distance(x, sample.float())
        self._last = (x, sample.detach().clamp(-1, 1))
        logs["sample"] = float(term.detach())
        return loss + term, logs

    @staticmethod
    def _code(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The quantized code the flow pass conditions on (the quantizer in eval mode: no entropy terms)."""
        was = model.quantizer.training
        model.quantizer.train(False)
        try:
            return model.quantizer(model.encode_latent(x)).quantized
        finally:
            model.quantizer.train(was)

    def _distance(self, x: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        kind = self.recipe.loss.post_perceptual
        if kind == "pixel-l2":
            return F.mse_loss(sample, x)
        if kind == "lpips-vgg":
            from tokcli.losses.perceptual import lpips_distance

            return lpips_distance(self.post_distance, x, sample).mean()
        return self.post_distance(sample, x)

    # --- the card ---------------------------------------------------------------------------------------------
    def describe(self) -> str:
        return "stage 1B (mode-seeking post-training)"

    def loss_terms(self) -> list[str]:
        lo = self.recipe.loss
        terms = [t for t in super().loss_terms() if "entropy" not in t and "frozen" not in t]
        if lo.post_weight > 0:
            terms.append(f"{lo.post_weight} x {POST_TEXT[lo.post_perceptual]} on the {lo.post_steps}-step Euler "
                         f"sample (random per-image time grids, {'latent dropout' if lo.post_cfg else 'no CFG'}; "
                         f"backpropagated through every checkpointed decoder call)")
        terms.append(f"encoder and quantizer frozen; starts from {self.recipe.model.init_from}")
        return terms

    def card_lines(self) -> list[str]:
        lo = self.recipe.loss
        return super().card_lines() + [f"post-training perceptual loss: {POST_TEXT[lo.post_perceptual]}"]

    def training_record(self) -> dict[str, Any]:
        lo = self.recipe.loss
        return {**super().training_record(), "stage": "1B", "freeze_encoder_after": 0, "encoder": "frozen",
                "post_steps": lo.post_steps, "post_weight": lo.post_weight, "post_perceptual": lo.post_perceptual,
                "post_cfg": lo.post_cfg, "init_from": self.recipe.model.init_from}
