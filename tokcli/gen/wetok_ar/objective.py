"""Training WeTok's factorised AR generator with ``tok train`` (data kind ``"tokens"``: ``tokcli/train/token_data.py``).

The loss is the official one (``Net2NetTransformer.shared_step``), which the model already computes
(:meth:`WeTokAR.loss`): teacher-forced next-token cross-entropy of every sub-token head, the sum over the k
sub-tokens of each head's mean over the micro-batch's positions. The inputs are the token file's ids regrouped into
the model's sub-tokens (:meth:`WeTokAR.subtokens_from_tokens`, raster order). Labels are dropped to the null class
with ``model_args.class_dropout_prob`` (0.1) inside the class embedder, for classifier-free guidance; ``token_drop``
and the dropouts of the blocks apply as in the official model. Every draw comes from the global torch RNG, which
checkpoints restore: resume is exact.

The token file fixes what the model samples. It must hold a WeTok-style grid of group indices: ``tokens.shape`` =
``[h, h, g]`` (a square grid), ``tokens.extra`` with ``groups`` = g and ``bits_per_group`` = b, ``codebook_size`` =
2^b. Then ``block_size`` = h^2 and, by default, ``factorized_bits`` = [b] * g (sub-token i = group i, the official
factorisation); the recipe may ask for another split of the same g b bits (``factorized_bits = [4, 4, 4, 4]`` for
two 8-bit groups), and may repeat ``block_size`` only with the same value. ``class_num`` is the number of classes of
the labels (the recipe may ask for more). A file without labels trains an unconditional model (``class_num`` 1,
class 0) unless ``class_num`` > 1 asks for a conditional one, which is refused. Anything else is refused with one
line. The exported folder names the tokenizer of the token file (``tokenizer``: its registry name or local-dir path
and the sha256 of its weights), so ``tok generate`` decodes through exactly that model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from tokcli.errors import TokUsageError
from tokcli.gen.objective import GeneratorObjective
from tokcli.train.recipe import LossSection


@dataclass
class WeTokARLoss(LossSection):
    perceptual: str = "none"  # the shared image-loss keys do not apply to token data
    gan_weight: float = 0.0


def token_layout(header: Mapping[str, Any], path) -> tuple[int, int, int]:
    """(grid h, groups g, bits per group b) of a token file's header, or one TokUsageError saying why the file is
    not a grid of group indices the generator can factor."""
    spec = header.get("tokens") or {}
    shape, extra = list(spec.get("shape") or []), spec.get("extra") or {}
    if "groups" not in extra or "bits_per_group" not in extra:
        raise TokUsageError(f"{path}: tokens of {header.get('family')!r} record no tokens.extra groups / "
                            "bits_per_group; the wetok_ar generator trains on the group indices of a WeTok tokenizer")
    g, b = int(extra["groups"]), int(extra["bits_per_group"])
    if len(shape) != 3 or shape[0] != shape[1] or shape[2] != g:
        raise TokUsageError(f"{path}: token shape {shape} is not a square grid of {g} groups [h, h, {g}], which the "
                            "wetok_ar generator samples")
    if spec.get("codebook_size") != 2 ** b:
        raise TokUsageError(f"{path}: codebook_size {spec.get('codebook_size')} is not 2^bits_per_group = {2 ** b}")
    return int(shape[0]), g, b


class WeTokARObjective(GeneratorObjective):
    classes_key = "class_num"

    def prepare(self) -> None:
        super().prepare()
        # the reader has checked every id against codebook_size, which token_layout ties to the sub-token tables
        self.layout = token_layout(self.tokens.header, self.tokens.path)

    @property
    def group_bits(self) -> list[int]:
        _, g, b = self.layout
        return [b] * g

    def model_class(self):
        from tokcli.gen.wetok_ar.model import WeTokAR

        return WeTokAR

    def args_from_data(self) -> dict[str, Any]:
        given, path = self.recipe.model.model_args, self.tokens.path
        h, g, b = self.layout
        self.check_given({"block_size": h * h}, f" ({h}x{h} grid)")
        bits = given.get("factorized_bits", self.group_bits)
        if not isinstance(bits, (list, tuple)) or sum(int(x) for x in bits) != g * b:
            raise TokUsageError(f"{self.recipe.source}: model_args.factorized_bits = {bits!r} must split the "
                                f"{g * b} bits of a position of {path} ({g} groups of {b} bits)")
        return {**given, "block_size": h * h, "factorized_bits": list(bits), "class_num": self.class_count()}

    def subtokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """A batch's flat ids [B, h h g] (the file's (y, x, group) order) -> the model's k sub-tokens [B, N]."""
        from tokcli.gen.wetok_ar.model import regroup

        _, g, _ = self.layout
        ids = regroup(tokens.reshape(tokens.shape[0], -1, g), self.group_bits, self.model.model_args["factorized_bits"])
        return [ids[..., i] for i in range(ids.shape[-1])]

    def loss(self, phase: str, nets: Mapping[str, nn.Module], batch: Any, micro: int,
             step: int) -> tuple[torch.Tensor, dict[str, float]]:
        net = nets["model"]
        toks = self.subtokens(batch["tokens"])
        logits = net(tuple(toks) + (batch["labels"],))
        total, parts = getattr(net, "module", net).loss(logits, toks)
        logs = {f"ce_{i}": float(p.detach()) for i, p in enumerate(parts)}
        hits = [(lg.detach().argmax(-1) == t).float().mean() for lg, t in zip(logits, toks)]
        logs["acc"] = float(sum(hits) / len(hits))
        return total, logs

    def loss_terms(self) -> list[str]:
        a = self.model.model_args
        return [f"sum over {len(a['factorized_bits'])} sub-token heads of the next-token cross-entropy (official; "
                f"label dropout {a['class_dropout_prob']}, token drop {a['token_drop']})"]

    def card_sections(self, model: nn.Module) -> dict[str, str]:
        a = model.model_args
        grid = math.isqrt(a["block_size"])
        return {"Tokenizer and sampling": (
            f"{self.tokenizer_line('ids')}: a {grid}x{grid} grid (raster order) of {sum(a['factorized_bits'])} bits a "
            f"position, factorised into sub-tokens of {a['factorized_bits']} bits; {a['class_num']} "
            f"class(es){self.class_names()}.\n"
            f"`tok generate -m THIS_FOLDER --class all -n 4 -o out/` decodes through that tokenizer; sampler "
            f"defaults {model.sample_defaults} (KV-cache sampling, per-sub-token CFG u + cfg (c - u), temperature, "
            f"top-k, top-p).")}
