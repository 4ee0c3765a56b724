"""WeTok's factorised AR generator (``src/WeTok/modules/transformer/gpt.py::GPT`` of zhuangshaobin/WeTok, Open-MAGVIT2's
LlamaGen-style GPT generalised to k sub-tokens; written here from the architecture). Module names are the official
ones, so an official ``transformer.*`` state dict loads after stripping that prefix.

An image is a grid of N = block_size positions (raster order); position p carries k sub-tokens, sub-token i being
the LSB-first integer of ``factorized_bits[i]`` latent bits (for WeTok: group i's index).

    spatial input  [class_emb(y), e(0), ..., e(N-2)],  e(p) = sum_i {i}_emb(tok_i[p])   (``pre_emb`` / ``post_emb``
                                                                                          when k = 2)
    spatial_blocks (causal Llama blocks, 2-D RoPE: row 0 = the class token, all zeros; row 1 + p = grid position p)
        -> h_p, the context of grid position p
    intra sequence [h_p, emb_0(tok_0[p]), ..., emb_{k-2}(tok_{k-2}[p])]  (B N, k, D), RoPE rows 0..k-1 of the
                   same table (slot 0 gets the zero row)
    factorized_blocks (causal) -> norm -> head.{i} on slot i = the logits of sub-token i of position p

The label table has ``class_num`` + 1 rows; row ``class_num`` is the null class of classifier-free guidance (labels
are dropped with ``class_dropout_prob`` in training). ``forward(idx)`` keeps the official signature, idx =
(tok_0, ..., tok_{k-1}, labels), and returns the k logits (the official module returns ``(logits, None)``).

model_args (the official GPT argument names): ``block_size`` (N, a square), ``spatial_n_layer``,
``factorized_n_layer``, ``factorized_bits`` (one int per sub-token), ``n_head``, ``dim``, ``class_num``; defaults
as the official constructor: ``n_kv_head`` (= n_head), ``rope_base`` 10000, ``norm_eps`` 1e-5, ``multiple_of`` 256,
``ffn_dim_multiplier`` null, ``token_drop`` 0.1, ``resid_dropout_p`` 0, ``attn_dropout_p`` 0, ``ffn_dropout_p`` 0.1;
plus ``class_dropout_prob`` 0.1 (the official LabelEmbedder's fixed default).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokcli.core.model_args import complete, integer, non_negative
from tokcli.errors import TokError
from tokcli.gen.base import Generator
from tokcli.nn.embed import LabelEmbedder
from tokcli.nn.llama import Block, ffn_hidden, rope_2d
from tokcli.nn.norm import RMSNorm

FAMILY = "wetok_ar"
REQUIRED = ("block_size", "spatial_n_layer", "factorized_n_layer", "factorized_bits", "n_head", "dim", "class_num")
DEFAULTS: dict[str, Any] = {"n_kv_head": None, "rope_base": 10000.0, "norm_eps": 1e-5, "multiple_of": 256,
                            "ffn_dim_multiplier": None, "class_dropout_prob": 0.1, "token_drop": 0.1,
                            "resid_dropout_p": 0.0, "attn_dropout_p": 0.0, "ffn_dropout_p": 0.1}
SAMPLE_DEFAULTS: dict[str, Any] = {"cfg": [1.75, 1.8, 2.0, 2.0], "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                   "seed": 0}
_INTS = ("block_size", "spatial_n_layer", "factorized_n_layer", "n_head", "dim", "class_num", "multiple_of")
_RATES = ("class_dropout_prob", "token_drop", "resid_dropout_p", "attn_dropout_p", "ffn_dropout_p")


def _positive_int(k: str, v: Any, minimum: int = 1) -> int:
    return integer("wetok_ar", k, v, minimum)


def normalize_model_args(args: dict[str, Any]) -> dict[str, Any]:
    a = complete("wetok_ar", args, REQUIRED, DEFAULTS)
    for k in _INTS:
        a[k] = _positive_int(k, a[k], 0 if k.endswith("n_layer") else 1)
    bits = a["factorized_bits"]
    if not isinstance(bits, (list, tuple)) or not bits:
        raise TokError(f"wetok_ar factorized_bits must be a list of bit counts, got {bits!r}")
    a["factorized_bits"] = [_positive_int("factorized_bits", b) for b in bits]
    if max(a["factorized_bits"]) > 24:
        raise TokError(f"wetok_ar factorized_bits {a['factorized_bits']}: at most 24 bits per sub-token")
    if a["n_kv_head"] is not None:
        a["n_kv_head"] = _positive_int("n_kv_head", a["n_kv_head"])
    for k in ("rope_base", "norm_eps", *_RATES, "ffn_dim_multiplier"):
        v = a[k]
        if v is None and k == "ffn_dim_multiplier":
            continue
        a[k] = non_negative("wetok_ar", k, v)
    grid = math.isqrt(a["block_size"])
    if grid * grid != a["block_size"]:
        raise TokError(f"wetok_ar block_size {a['block_size']} is not a square (a grid x grid image)")
    if a["dim"] % a["n_head"] or (a["dim"] // a["n_head"]) % 4:
        raise TokError(f"wetok_ar dim {a['dim']} / n_head {a['n_head']} must be a head size divisible by 4 "
                       "(the 2-D RoPE)")
    if a["n_kv_head"] is not None and a["n_head"] % a["n_kv_head"]:
        raise TokError(f"wetok_ar n_head {a['n_head']} is not a multiple of n_kv_head {a['n_kv_head']}")
    return a


def regroup(ids: torch.Tensor, from_bits: Sequence[int], to_bits: Sequence[int]) -> torch.Tensor:
    """Integers [..., len(from_bits)] -> [..., len(to_bits)] over the same LSB-first bit string: integer i of a
    partition holds bits [sum(bits[:i]), sum(bits[:i+1])), bit j of it at 2^j. Same total number of bits."""
    if sum(from_bits) != sum(to_bits):
        raise ValueError(f"bit partitions {list(from_bits)} and {list(to_bits)} differ in length")
    if list(from_bits) == list(to_bits):
        return ids.long()
    parts = [(ids[..., i, None].long() >> torch.arange(b, device=ids.device)) & 1 for i, b in enumerate(from_bits)]
    flat, out, o = torch.cat(parts, dim=-1), [], 0
    for b in to_bits:
        out.append((flat[..., o:o + b] << torch.arange(b, device=ids.device)).sum(-1))
        o += b
    return torch.stack(out, dim=-1)


class WeTokAR(Generator):
    family = FAMILY
    sampler_options = ("cfg", "temperature", "top_k", "top_p")
    token_kind = "indices"

    def __init__(self, **model_args):
        super().__init__()
        self.model_args = a = normalize_model_args(model_args)
        D, bits = a["dim"], a["factorized_bits"]
        for i, name in enumerate(self.embedding_names):
            setattr(self, name, nn.Embedding(2 ** bits[i], D))
        self.class_emb = LabelEmbedder(a["class_num"], D, a["class_dropout_prob"])
        self.token_drop = nn.Dropout(a["token_drop"])
        hidden = ffn_hidden(D, a["multiple_of"], a["ffn_dim_multiplier"])
        kw = dict(n_kv_head=a["n_kv_head"], norm_eps=a["norm_eps"], attn_dropout_p=a["attn_dropout_p"],
                  resid_dropout_p=a["resid_dropout_p"], ffn_dropout_p=a["ffn_dropout_p"])
        self.spatial_blocks = nn.ModuleList(Block(D, a["n_head"], hidden, **kw) for _ in range(a["spatial_n_layer"]))
        self.factorized_blocks = nn.ModuleList(Block(D, a["n_head"], hidden, **kw)
                                               for _ in range(a["factorized_n_layer"]))
        self.norm = RMSNorm(D, eps=a["norm_eps"])
        self.head = nn.ModuleList(nn.Linear(D, 2 ** b, bias=False) for b in bits)
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sample_defaults = {**SAMPLE_DEFAULTS, "cfg": list(SAMPLE_DEFAULTS["cfg"]) if self.k == 4 else 1.75}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: N(0, 0.02) for every Linear and embedding table, zero heads."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for h in self.head:
            nn.init.zeros_(h.weight)

    # --- sizes -------------------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return len(self.model_args["factorized_bits"])

    @property
    def embedding_names(self) -> list[str]:
        """The official attribute of each sub-token's input table: ``pre_emb`` / ``post_emb`` for k = 2."""
        return ["pre_emb", "post_emb"] if self.k == 2 else [f"{i}_emb" for i in range(self.k)]

    def emb(self, i: int) -> nn.Embedding:
        return getattr(self, self.embedding_names[i])

    @property
    def num_classes(self) -> int:
        return self.model_args["class_num"]

    @property
    def grid(self) -> int:
        return math.isqrt(self.model_args["block_size"])

    @property
    def vocab_sizes(self) -> list[int]:
        return [2 ** b for b in self.model_args["factorized_bits"]]

    def rope(self, rows: slice | torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) rows of the 2-D table (class row 0 zeros, grid from row 1), built once per device."""
        key = str(device)
        if key not in self._rope:
            a = self.model_args
            self._rope[key] = rope_2d(self.grid, a["dim"] // a["n_head"], a["rope_base"], 1, device=device)
        cos, sin = self._rope[key]
        return cos[rows], sin[rows]

    # --- the network ---------------------------------------------------------------------------------------------
    def embed(self, toks: Sequence[torch.Tensor]) -> torch.Tensor:
        """The spatial input of a position: the sum of its k sub-token embeddings."""
        out = self.emb(0)(toks[0])
        for i in range(1, self.k):
            out = out + self.emb(i)(toks[i])
        return out

    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels [B] or [B, 1] -> [B, 1, D] (label dropout in training)."""
        return self.class_emb(labels.reshape(-1)).unsqueeze(1)

    def spatial(self, toks: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: [B, N, D] contexts, output p for grid position p."""
        x = torch.cat([self.class_embedding(labels), self.embed(toks)[:, :-1]], dim=1)
        h = self.token_drop(x)
        cos, sin = self.rope(slice(0, h.shape[1]), h.device)
        for block in self.spatial_blocks:
            h = block(h, cos, sin)
        return h

    def intra(self, h: torch.Tensor, toks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Contexts [B, N, D] + sub-tokens -> the k logits [B, N, V_i] through the intra transformer."""
        B, N, D = h.shape
        ctx = torch.stack([h] + [self.emb(i)(toks[i]) for i in range(self.k - 1)], dim=-2).reshape(B * N, self.k, D)
        cos, sin = self.rope(slice(0, self.k), h.device)
        for block in self.factorized_blocks:
            ctx = block(ctx, cos, sin)
        out = self.norm(ctx.reshape(B, N, self.k, D))
        return [self.head[i](out[:, :, i]) for i in range(self.k)]

    def forward(self, idx: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """idx = (tok_0, ..., tok_{k-1} each [B, N], labels [B] or [B, 1]) -> k logits [B, N, V_i]."""
        if len(idx) != self.k + 1:
            raise TokError(f"the wetok_ar forward takes {self.k} sub-token tensors and the labels, got {len(idx)}")
        toks, labels = [t.long() for t in idx[:self.k]], idx[self.k].long()
        return self.intra(self.spatial(toks, labels), toks)

    def loss(self, logits: Sequence[torch.Tensor], toks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list]:
        """The official training loss: the sum over sub-tokens of the mean cross-entropies (and each of them)."""
        parts = [F.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1)) for lg, t in zip(logits, toks)]
        return sum(parts), parts

    # --- tokenizer side ------------------------------------------------------------------------------------------
    def _tokenizer_bits(self, tokenizer) -> list[int]:
        extra = tokenizer.spec.extra or {}
        if "groups" not in extra or "bits_per_group" not in extra:
            raise TokError(f"{tokenizer.name or tokenizer.family} records no groups / bits_per_group: the wetok_ar "
                           "generator samples the bits of a group-wise LFQ tokenizer (WeTok)")
        return [int(extra["bits_per_group"])] * int(extra["groups"])

    def check_tokenizer(self, tokenizer) -> None:
        super().check_tokenizer(tokenizer)
        bits = self._tokenizer_bits(tokenizer)
        shape = tuple(tokenizer.spec.shape)
        want = (self.grid, self.grid, len(bits))
        if sum(bits) != sum(self.model_args["factorized_bits"]) or shape != want:
            raise TokError(f"{tokenizer.name or tokenizer.family} makes tokens of shape {list(shape)} with "
                           f"{sum(bits)} bits a position; the wetok_ar generator {self.name} samples a "
                           f"{self.grid}x{self.grid} grid of {sum(self.model_args['factorized_bits'])} bits")

    def subtokens_from_tokens(self, tokens: torch.Tensor, tokenizer) -> list[torch.Tensor]:
        """A tokenizer's tokens [B, h, w, g] -> the k sub-token sequences [B, N] (raster order): the training
        targets of the image forward."""
        ids = regroup(tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]), self._tokenizer_bits(tokenizer),
                      self.model_args["factorized_bits"])
        return [ids[..., i] for i in range(self.k)]

    def tokens_for(self, samples: torch.Tensor, tokenizer) -> torch.Tensor:
        """Sampled sub-tokens [B, N, k] -> the tokenizer's tokens [B, h, w, g]."""
        self.check_tokenizer(tokenizer)
        ids = regroup(samples, self.model_args["factorized_bits"], self._tokenizer_bits(tokenizer))
        return ids.reshape(samples.shape[0], self.grid, self.grid, ids.shape[-1])

    def image_forward(self, images: torch.Tensor, labels: torch.Tensor, tokenizer):
        """The official ``Net2NetTransformer.forward``: encode images [B, 3, H, W] in [-1, 1] with the tokenizer,
        teacher-force its sub-tokens. Returns (logits, targets)."""
        with torch.no_grad():
            toks = self.subtokens_from_tokens(tokenizer.encode(images), tokenizer)
        return self(tuple(toks) + (labels,)), toks

    # --- sampling ----------------------------------------------------------------------------------------------
    def check_sampler(self, options) -> None:
        from tokcli.gen.wetok_ar.sampler import check_options

        check_options(self, **{**{k: SAMPLE_DEFAULTS[k] for k in self.sampler_options}, **options})

    def _sample(self, labels: torch.Tensor, *, seeds: list[int], noise: Any, **opts) -> torch.Tensor:
        from tokcli.gen.wetok_ar.sampler import sample_tokens

        return sample_tokens(self, labels, seeds=seeds, noise=noise, **opts)

