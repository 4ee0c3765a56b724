"""Training SoftVQ-VAE (official ``train/train_tokenizer.py``, ``configs/softvq-l-64.yaml``) on the shared
reconstruction objective:

    loss = l2 MSE + perceptual LPIPS x min(1, step / perceptual_warmup) + gan hinge-G (from disc_start)
           + entropy_weight x (H(q) - H(E q)) + repa_weight x (-mean cos(teacher patch features, MLP(z) repeated))

Representation alignment (``repa_align = repeat``): the soft latent z [B, L, d] goes through a training-only MLP
(Linear -> SiLU -> Linear -> SiLU -> Linear, d -> repa_proj_dim -> D_t); each projected token is repeated N / L
times consecutively and compared by cosine with the frozen teacher's N patch features in raster order. The teacher
(``loss.repa_teacher``) is a timm DINOv2 name (``vit_large_patch14_dinov2``: weights read from the local HF cache by
:func:`tokcli.nn.vit.load_dinov2`, patch kernel resampled to 16, input mapped to ImageNet normalisation; features
after the final norm without the cls token) or a tok model (registry name or folder: its ``encode`` output, a grid
[C, h, w] flattened to h*w tokens or a token sequence [N, C]). ``repa_weight = 0`` needs no teacher.

The projector is a submodule ``repa_projector`` of the trained model (so the loop's optimizer, EMA, checkpoints
and exact resume cover it) and is dropped at export: the exported folder holds the plain SoftVQ weights.

The official DINO discriminator needs DINO ViT-S/16 weights that are not available here: the project's PatchGAN
(hinge + LeCAM) is the fallback, and the card says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokcli.errors import TokUsageError
from tokcli.losses.reconstruction import ReconstructionObjective
from tokcli.train.recipe import LossSection

PROJECTOR = "repa_projector"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SoftVQLoss(LossSection):
    entropy_weight: float = 0.01
    repa_weight: float = 0.1
    repa_teacher: str = "vit_large_patch14_dinov2"  # a timm DINOv2 name, or a tok model (registry name / folder)
    repa_proj_dim: int = 1024
    perceptual_warmup: int = 0  # steps of linear warm-up of the perceptual weight (official: 10,000)

    def problems(self) -> list[str]:
        out = super().problems()
        if self.repa_proj_dim < 1 or self.perceptual_warmup < 0:
            out.append("'loss.repa_proj_dim' must be positive and 'loss.perceptual_warmup' >= 0")
        return out


class DinoTeacher(nn.Module):
    """A frozen timm DINOv2 at the training resolution with patch 16; [-1, 1] images -> patch features [B, N, D]."""

    def __init__(self, name: str, image_size: int):
        super().__init__()
        from tokcli.nn.vit import build_vit, load_dinov2

        self.vit = build_vit(name, depth=None, image_size=image_size, patch_size=16)
        self.source = load_dinov2(self.vit, name)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.width = self.vit.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]


class TokTeacher(nn.Module):
    """A frozen tok model: its ``encode`` output as a token sequence [B, N, C]."""

    def __init__(self, name: str, image_size: int, device):
        super().__init__()
        from tokcli.core.model import TokModel
        from tokcli.core.registry import resolve

        folder = resolve(name)
        self.source = str(folder.path)
        self.model = TokModel.from_folder(folder, device=str(device))
        with torch.no_grad():
            self.width = int(self(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.model.encode(x).float()
        if t.dim() == 4:  # a latent grid [B, C, h, w] -> h*w tokens in raster order
            return t.flatten(2).transpose(1, 2)
        if t.dim() != 3:
            raise TokUsageError(f"REPA teacher {self.source} gives tokens of shape {tuple(t.shape)}, not features")
        return t


def build_teacher(name: str, image_size: int, device) -> nn.Module:
    from tokcli.nn.vit import DINOV2_ARCHS

    if name.split(".", 1)[0] in DINOV2_ARCHS:
        teacher = DinoTeacher(name, image_size)
    else:
        teacher = TokTeacher(name, image_size, device)
    return teacher.to(device).eval().requires_grad_(False)


def projector(dim: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out))


def repa_repeat_loss(proj: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-mean cos between each projected token repeated N / L times consecutively and the N teacher tokens."""
    n, l_tokens = target.shape[1], proj.shape[1]
    if n % l_tokens:
        raise TokUsageError(f"REPA 'repeat' alignment needs the teacher's token count ({n}) to be a multiple of "
                            f"num_latent_tokens ({l_tokens})")
    proj = proj.repeat_interleave(n // l_tokens, dim=1)
    return -F.cosine_similarity(proj.float(), target.float(), dim=-1).mean()


class SoftVQObjective(ReconstructionObjective):
    def __init__(self, recipe, *, device="cpu", world_size: int = 1):
        super().__init__(recipe, device=device, world_size=world_size)
        self.teacher: nn.Module | None = None
        self._step = 0

    def prepare(self) -> None:
        super().prepare()
        lo = self.recipe.loss
        if lo.repa_weight > 0:
            self.teacher = build_teacher(lo.repa_teacher, self.recipe.data.crop_size, self.device)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Attach the training-only projector (d -> teacher width) as ``model.repa_projector``."""
        if self.teacher is not None:
            lo = self.recipe.loss
            model.add_module(PROJECTOR, projector(model.latent_dim, lo.repa_proj_dim, self.teacher.width))
        return model

    def begin_phase(self, phase: str, step: int) -> None:
        super().begin_phase(phase, step)
        self._step = step

    def pixel_terms(self, x, recon):
        terms = super().pixel_terms(x, recon)
        warm = self.recipe.loss.perceptual_warmup
        if "perceptual" in terms and warm:
            terms["perceptual"] = terms["perceptual"] * min(1.0, self._step / warm)
        return terms

    def family_terms(self, x, recon, aux):
        lo = self.recipe.loss
        out = {}
        if lo.entropy_weight and "entropy" in aux:
            out["entropy"] = lo.entropy_weight * aux["entropy"]
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(x)
            proj = getattr(self.model, PROJECTOR)(aux["z"])
            out["repa"] = lo.repa_weight * repa_repeat_loss(proj, target)
        return out

    def statistics(self, aux, terms):
        return super().statistics({k: v for k, v in aux.items() if k not in ("ids", "z")}, terms)

    # --- export -----------------------------------------------------------------------------------------------
    def export_model(self, state, data):
        """The plain SoftVQ model: the projector's entries are removed from ``state`` (in place: it is what the
        loop writes) so the exported folder holds no training-only network."""
        for k in [k for k in state if k.startswith(PROJECTOR + ".")]:
            del state[k]
        return self.rebuilt_model(state)

    def loss_terms(self) -> list[str]:
        lo = self.recipe.loss
        terms = super().loss_terms()
        if lo.perceptual_warmup and lo.perceptual != "none" and lo.perceptual_weight:
            terms.append(f"(perceptual weight warmed up linearly over {lo.perceptual_warmup} steps)")
        if lo.gan_weight:
            terms.append("(discriminator: the project's PatchGAN, the documented fallback for the official DINO "
                         "ViT-S/16 discriminator, whose weights are not available here)")
        terms.append(f"{lo.entropy_weight} x entropy H(q) - H(E q)")
        if self.teacher is not None:
            terms.append(f"{lo.repa_weight} x REPA (repeat alignment, cosine, teacher {lo.repa_teacher}, "
                         f"MLP projector width {lo.repa_proj_dim}, not exported)")
        else:
            terms.append("no representation alignment (repa_weight = 0)")
        return terms

    def training_record(self):
        lo = self.recipe.loss
        return {**super().training_record(), "repa_teacher": lo.repa_teacher if self.teacher is not None else None,
                "discriminator": "patchgan" if lo.gan_weight else None}
