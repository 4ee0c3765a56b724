"""Training MaskGIT with ``tok train`` (data kind ``"tokens"``: ``tokcli/train/token_data.py``).

Each sequence of T ids gets a mask ratio gamma(r) = cos(pi r / 2), r ~ U(0, 1) (the cosine schedule the sampler
decodes with); n = ceil(gamma(r) T) (at least 1) positions, uniformly at random, are replaced by the mask id, and
the loss is the cross-entropy of the true ids at the masked positions (BERT-style; the mean over every masked id
of the micro-batch; ``loss.label_smoothing``, default 0). Labels are dropped to the null class with
``model_args.class_dropout_prob`` (0.1) inside the class embedder, for classifier-free guidance. Every draw comes
from the global torch RNG, which checkpoints restore: resume is exact.

The token file fixes what the model samples: ``token_shape`` (the header's ``tokens.shape``), ``codebook_size``,
``levels`` (``tokens.extra.patch_size_list`` when the tokenizer has scales, CODA), ``num_classes`` (the classes of
the labels); ``[model] model_args`` give the architecture (``hidden_size``, ``depth``, ``num_heads``, ...) and may
repeat those keys only with the same values (``num_classes`` may be larger). A file without labels trains an
unconditional model (one class, 0) unless ``num_classes`` > 1 asks for a conditional one, which is refused.
The exported folder names the tokenizer of the token file (``tokenizer``: its registry name or local-dir path and
the sha256 of its weights), so ``tok generate`` decodes through exactly that model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tokcli.errors import TokError
from tokcli.gen.objective import GeneratorObjective
from tokcli.train.recipe import LossSection


@dataclass
class MaskGITLoss(LossSection):
    perceptual: str = "none"  # the shared image-loss keys do not apply to token data
    gan_weight: float = 0.0
    label_smoothing: float = 0.0

    def problems(self) -> list[str]:
        out = super().problems()
        if not 0 <= self.label_smoothing < 1:
            out.append(f"'loss.label_smoothing' must be in [0, 1), got {self.label_smoothing}")
        return out


def random_mask(batch: int, length: int, *, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """bool [batch, length]: ceil(cos(pi r / 2) length) (>= 1) positions of each row, r ~ U(0, 1)."""
    r = torch.rand(batch, generator=generator, device=device)
    n = torch.ceil(torch.cos(math.pi / 2 * r) * length).clamp(1, length)
    rank = torch.rand(batch, length, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
    return rank < n[:, None]


def masked_ce(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) of the ids at the masked positions given the others (``model``: a MaskGIT,
    possibly DDP-wrapped; ``mask_id`` = its codebook size)."""
    mask_id = getattr(model, "module", model).mask_id
    logits = model(torch.where(mask, torch.full_like(tokens, mask_id), tokens), labels)
    sel, target = logits[mask].float(), tokens[mask]
    ce = F.cross_entropy(sel, target, label_smoothing=label_smoothing)
    return ce, (sel.argmax(-1) == target).float().mean()


class MaskGITObjective(GeneratorObjective):
    def model_class(self):
        from tokcli.gen.maskgit.model import MaskGIT

        return MaskGIT

    def args_from_data(self) -> dict[str, Any]:
        d = self.tokens
        spec = d.header["tokens"]
        levels = (spec.get("extra") or {}).get("patch_size_list")
        found = {"token_shape": list(spec["shape"]), "codebook_size": spec.get("codebook_size"),
                 "levels": list(levels) if levels else None}
        if found["codebook_size"] is None:
            raise TokError(f"{d.path}: the header records no tokens.codebook_size")
        self.check_given(found)
        return {**self.recipe.model.model_args, **found, "num_classes": self.class_count()}

    def loss(self, phase: str, nets: Mapping[str, nn.Module], batch: Any, micro: int,
             step: int) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, labels = batch["tokens"], batch["labels"]
        mask = random_mask(*tokens.shape, device=tokens.device)
        ce, acc = masked_ce(nets["model"], tokens, labels, mask, self.recipe.loss.label_smoothing)
        return ce, {"ce": float(ce.detach()), "acc": float(acc), "mask_ratio": float(mask.float().mean())}

    def loss_terms(self) -> list[str]:
        ls = self.recipe.loss.label_smoothing
        return [f"masked cross-entropy (cosine mask ratio{f', label smoothing {ls}' if ls else ''}; label dropout "
                f"{self.model.model_args['class_dropout_prob']})"]

    def card_sections(self, model: nn.Module) -> dict[str, str]:
        a = model.model_args
        scales = f", scales {a['levels']}" if a["levels"] else ""
        return {"Tokenizer and sampling": (
            f"{self.tokenizer_line('ids')}: {math.prod(a['token_shape'])} ids of shape {a['token_shape']} from a "
            f"codebook of {a['codebook_size']}{scales}; {a['num_classes']} class(es){self.class_names()}.\n"
            f"`tok generate -m THIS_FOLDER --class all -n 4 -o out/` decodes through that tokenizer; sampler "
            f"defaults {model.sample_defaults} (MaskGIT decoding: cosine schedule, Gumbel confidence temperature "
            f"annealed to 0, CFG u + cfg (c - u)).")}
