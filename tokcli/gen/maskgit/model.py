"""MaskGIT (Chang et al. 2022, arXiv:2202.04200) over the ids of any ``indices`` tokenizer: our design (no MaskGIT
was released for CODA or FlowMo), written from the paper.

An image is its tokenizer's ids flattened to one sequence of T = prod(token_shape) ids in the token file's order
(``tokens.reshape(B, -1)``). One shared vocabulary of ``codebook_size`` ids plus the mask id ``codebook_size``:

    input   [class_emb(y), tok_emb(id_1) + pos_1, ..., tok_emb(id_T) + pos_T]    (id = codebook_size: masked)
    blocks  bidirectional pre-LN transformer blocks (timm ``vision_transformer.Block``: qkv bias, GELU MLP;
            no attention mask: every position sees every other and the class token)
    output  LayerNorm -> Linear(hidden, codebook_size) on positions 1..T: the logits of every id (never the mask)

Learned positions, by the tokenizer's layout (``pos_*`` parameters, N(0, 0.02) at init):

- ``levels`` given (CODA: the header's ``tokens.extra.patch_size_list``; ids scale by scale, coarse -> fine,
  row-major inside a scale, scale l starting at ``level_offsets[l]``): one table per scale, ``pos_levels.{l}``
  [pn_l^2, hidden], concatenated in the token order;
- a 2-D grid ``token_shape = [h, w, g]`` (WeTok: h x w positions of g group ids, flattened row, column, group with
  the group fastest): ``pos_grid`` [h w, hidden] for the grid position plus ``pos_group`` [g, hidden] for the group;
  ``[h, w]``: ``pos_grid`` alone;
- otherwise (FlowMo's LFQ sub-tokens, header ``tokens.shape`` = [T] with codebook 2^fg): one table ``pos`` [T, hidden].

The class table (``tokcli.nn.embed.LabelEmbedder``) has ``num_classes`` rows plus the null class (row
``num_classes``) when ``class_dropout_prob`` > 0: labels are dropped with that probability in training (CFG).

model_args: ``token_shape``, ``codebook_size``, ``num_classes``, ``hidden_size``, ``depth``, ``num_heads``;
``levels`` (null), ``mlp_ratio`` (4), ``class_dropout_prob`` (0.1), ``dropout`` (0: attention / projection dropout).

``sample(labels, seed=..., steps=8, cfg=..., temperature=4.5)`` (``sampler.py``) returns int64 ids
[B, *token_shape]: the tokenizer's own token shape, which ``tokens_for`` checks against the tokenizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokcli.core.model_args import complete, integer, non_negative
from tokcli.errors import TokError
from tokcli.gen.base import Generator
from tokcli.nn.embed import LabelEmbedder

FAMILY = "maskgit"
REQUIRED = ("token_shape", "codebook_size", "num_classes", "hidden_size", "depth", "num_heads")
DEFAULTS: dict[str, Any] = {"levels": None, "mlp_ratio": 4.0, "class_dropout_prob": 0.1, "dropout": 0.0}
#: MaskGIT's defaults: 8 steps, Gumbel confidence temperature 4.5 annealed to 0 (``choice_temperature``)
SAMPLE_DEFAULTS: dict[str, Any] = {"steps": 8, "cfg": 1.0, "temperature": 4.5, "seed": 0}


def _int(k: str, v: Any) -> int:
    return integer("maskgit", k, v)


def normalize_model_args(args: dict[str, Any]) -> dict[str, Any]:
    a = complete("maskgit", args, REQUIRED, DEFAULTS)
    shape = a["token_shape"]
    if not isinstance(shape, (list, tuple)) or not shape:
        raise TokError(f"maskgit token_shape must be a list of sizes, got {shape!r}")
    a["token_shape"] = [_int("token_shape", s) for s in shape]
    for k in ("codebook_size", "num_classes", "hidden_size", "depth", "num_heads"):
        a[k] = _int(k, a[k])
    if a["hidden_size"] % a["num_heads"]:
        raise TokError(f"maskgit hidden_size {a['hidden_size']} is not a multiple of num_heads {a['num_heads']}")
    for k in ("mlp_ratio", "class_dropout_prob", "dropout"):
        a[k] = non_negative("maskgit", k, a[k])
    if a["class_dropout_prob"] >= 1 or a["dropout"] >= 1:
        raise TokError("maskgit class_dropout_prob and dropout must be < 1")
    if a["levels"] is not None:
        a["levels"] = [_int("levels", p) for p in a["levels"]]
        if len(a["token_shape"]) != 1 or sum(p * p for p in a["levels"]) != a["token_shape"][0]:
            raise TokError(f"maskgit levels {a['levels']} (sum of squares {sum(p * p for p in a['levels'])}) do "
                           f"not tile token_shape {a['token_shape']}")
    return a


def _table(rows: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(rows, dim) * 0.02)


class MaskGIT(Generator):
    family = FAMILY
    sampler_options = ("steps", "cfg", "temperature")
    token_kind = "indices"

    def __init__(self, **model_args):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.model_args = a = normalize_model_args(model_args)
        D, shape = a["hidden_size"], a["token_shape"]
        self.tok_emb = nn.Embedding(a["codebook_size"] + 1, D)  # the last row is the mask id
        if a["levels"] is not None:
            self.pos_levels = nn.ParameterList(_table(p * p, D) for p in a["levels"])
        elif len(shape) in (2, 3):
            self.pos_grid = _table(shape[0] * shape[1], D)
            if len(shape) == 3:
                self.pos_group = _table(shape[2], D)
        else:
            self.pos = _table(self.seq_len, D)
        self.class_emb = LabelEmbedder(a["num_classes"], D, a["class_dropout_prob"])
        self.blocks = nn.ModuleList(Block(D, a["num_heads"], mlp_ratio=a["mlp_ratio"], qkv_bias=True,
                                          proj_drop=a["dropout"], attn_drop=a["dropout"])
                                    for _ in range(a["depth"]))
        for blk in self.blocks:
            blk.attn.fused_attn = True
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, a["codebook_size"])
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.class_emb.embedding_table.weight, std=0.02)
        guided = self.null_class is not None and a["num_classes"] > 1  # one class: nothing to guide towards
        self.sample_defaults = {**SAMPLE_DEFAULTS, "cfg": 2.0 if guided else 1.0}

    # --- sizes ---------------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return math.prod(self.model_args["token_shape"])

    @property
    def mask_id(self) -> int:
        return self.model_args["codebook_size"]

    @property
    def num_classes(self) -> int:
        return self.model_args["num_classes"]

    def positions(self) -> torch.Tensor:
        """[T, hidden]: the learned position of every id in the flattened order (see the module docstring)."""
        if self.model_args["levels"] is not None:
            return torch.cat(list(self.pos_levels))
        if hasattr(self, "pos_grid"):
            if not hasattr(self, "pos_group"):
                return self.pos_grid
            return (self.pos_grid[:, None] + self.pos_group[None]).reshape(self.seq_len, -1)
        return self.pos

    # --- the network -------------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ids [B, T] in 0..codebook_size (codebook_size = masked), labels [B] (num_classes = the null class)
        -> logits [B, T, codebook_size]."""
        if ids.dim() != 2 or ids.shape[1] != self.seq_len:
            raise TokError(f"the maskgit forward takes ids [B, {self.seq_len}], got {list(ids.shape)}")
        x = self.tok_emb(ids.long()) + self.positions()[None]
        h = torch.cat([self.class_emb(labels.reshape(-1).long())[:, None], x], dim=1)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h[:, 1:]))

    # --- tokenizer side ------------------------------------------------------------------------------------------
    def check_tokenizer(self, tokenizer) -> None:
        super().check_tokenizer(tokenizer)
        a, spec = self.model_args, tokenizer.spec
        who = tokenizer.name or tokenizer.family
        size = int(tokenizer.preprocess["image_size"])
        shape = list(spec.shape_for(size, size))
        if shape != a["token_shape"] or spec.codebook_size != a["codebook_size"]:
            raise TokError(f"{who} makes ids of shape {shape} from a codebook of {spec.codebook_size}; the maskgit "
                           f"generator {self.name} samples shape {a['token_shape']} of {a['codebook_size']}")
        levels = (spec.extra or {}).get("patch_size_list")
        if a["levels"] is not None and levels is not None and list(levels) != a["levels"]:
            raise TokError(f"{who} has scales {list(levels)}; the maskgit generator {self.name} was built for "
                           f"{a['levels']}")

    def tokens_for(self, samples: torch.Tensor, tokenizer) -> torch.Tensor:
        """Samples (already [B, *token_shape], or flat [B, T]) -> the tokenizer's tokens [B, *token_shape]."""
        self.check_tokenizer(tokenizer)
        return samples.reshape(samples.shape[0], *self.model_args["token_shape"])

    # --- sampling ----------------------------------------------------------------------------------------------
    def check_sampler(self, options) -> None:
        from tokcli.gen.maskgit.sampler import check_options

        check_options(self, **{**{k: SAMPLE_DEFAULTS[k] for k in self.sampler_options}, **options})

    def _sample(self, labels: torch.Tensor, *, seeds: list[int], noise: Any, **opts) -> torch.Tensor:
        from tokcli.gen.maskgit.sampler import sample_tokens

        ids = sample_tokens(self, labels, seeds=seeds, noise=noise, **opts)
        return ids.reshape(len(ids), *self.model_args["token_shape"])  # the tokenizer's shape
