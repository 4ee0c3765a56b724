"""WeTok: MAGVIT-2 style CNN encoder/decoder + group-wise lookup-free quantization (GQ), optionally with the
generative decoder (GD) that takes a noise input next to the latent.

Tokens: LongTensor [B, h, w, g]; each entry is a group index in [0, 2**d') with group index = sum_j bit_j 2**j,
where channel j of the group is bit j (LSB first) and group k owns latent channels [k d', (k+1) d').
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch

from tokcli.errors import TokError
from tokcli.families.base import TokenSpec, Tokenizer
from tokcli.nn.conv_resnet import Decoder, Encoder
from tokcli.quant.lfq import ENTROPY_MODES, GroupLFQ

FAMILY = "wetok"

DEFAULT_ARGS: dict[str, Any] = {
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 4,
    "z_channels": 32,
    "groups": 4,
    "codebook_size": 256,
    "generative_decoder": False,
    "image_size": 256,
    "entropy_mode": "official",
    "sample_weight": 1.0,
    "codebook_weight": 1.0,
}

LAYOUT = ("(y, x, group); group index = sum_j bit_j * 2^j, channel j of the group = bit j (LSB-first); "
          "group k = latent channels [k*d', (k+1)*d')")


def normalize_model_args(model_args: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults, check types and consistency; returns a new JSON-serialisable dict. Raises TokError."""
    unknown = set(model_args) - set(DEFAULT_ARGS)
    if unknown:
        raise TokError(f"unknown wetok model_args {sorted(unknown)} (known: {sorted(DEFAULT_ARGS)})")
    a = {**DEFAULT_ARGS, **model_args}
    try:
        for k in ("ch", "num_res_blocks", "z_channels", "groups", "codebook_size", "image_size"):
            if isinstance(a[k], bool) or int(a[k]) != a[k] or int(a[k]) <= 0:
                raise TokError(f"wetok model_args[{k!r}] must be a positive integer, got {a[k]!r}")
            a[k] = int(a[k])
        a["ch_mult"] = [int(m) for m in a["ch_mult"]]
        a["sample_weight"] = float(a["sample_weight"])
        a["codebook_weight"] = float(a["codebook_weight"])
    except (TypeError, ValueError):
        raise TokError(f"invalid wetok model_args: {model_args!r}") from None
    a["generative_decoder"] = bool(a["generative_decoder"])
    if not a["ch_mult"] or min(a["ch_mult"]) <= 0:
        raise TokError(f"wetok ch_mult must be a non-empty list of positive integers, got {a['ch_mult']!r}")
    if any((a["ch"] * m) % 32 for m in a["ch_mult"]):
        raise TokError(f"wetok channel widths ch*ch_mult must be multiples of 32 (GroupNorm groups), "
                       f"got ch={a['ch']} ch_mult={a['ch_mult']}")
    bits = int(math.log2(a["codebook_size"]))
    if 2 ** bits != a["codebook_size"]:
        raise TokError(f"wetok codebook_size must be a power of two, got {a['codebook_size']}")
    if a["groups"] * bits != a["z_channels"]:
        raise TokError(f"wetok z_channels ({a['z_channels']}) must equal groups ({a['groups']}) x "
                       f"log2(codebook_size) ({bits})")
    if a["entropy_mode"] not in ENTROPY_MODES:
        raise TokError(f"wetok entropy_mode must be one of {ENTROPY_MODES}, got {a['entropy_mode']!r}")
    return a


class WeTok(Tokenizer):
    family = FAMILY
    conv_layout = True  # convolutional networks: either memory layout (tokcli.core.device.memory_format_for)

    def __init__(self, **model_args):
        super().__init__()
        a = normalize_model_args(model_args)
        self.model_args = a
        z = a["z_channels"]
        self.encoder = Encoder(ch=a["ch"], ch_mult=a["ch_mult"], num_res_blocks=a["num_res_blocks"], z_channels=z)
        self.decoder = Decoder(ch=a["ch"], ch_mult=a["ch_mult"], num_res_blocks=a["num_res_blocks"], z_channels=z,
                               noise_channels=z if a["generative_decoder"] else 0)
        self.quantize = GroupLFQ(z, a["groups"], entropy_mode=a["entropy_mode"], sample_weight=a["sample_weight"],
                                 codebook_weight=a["codebook_weight"])
        self._encoder_frozen = False

    # --- description ----------------------------------------------------------------------------------
    @property
    def downsample(self) -> int:
        return 2 ** (len(self.model_args["ch_mult"]) - 1)

    @property
    def generative(self) -> bool:
        return self.decoder.noise_channels > 0

    @property
    def stochastic_decoder(self) -> bool:
        return self.generative

    @property
    def spec(self) -> TokenSpec:
        s = self.model_args["image_size"] // self.downsample
        q = self.quantize
        return TokenSpec(kind="indices", shape=(s, s, q.groups), codebook_size=q.codebook_size,
                         downsample=self.downsample, layout=LAYOUT,
                         extra={"groups": q.groups, "bits_per_group": q.bits_per_group})

    # --- inference ------------------------------------------------------------------------------------
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> pre-quantization latent [B, z, H/f, W/f]."""
        return self.encoder(self.check_images(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> LongTensor [B, H/f, W/f, g]."""
        return self.quantize.codes_to_indices(self.encode_latent(x))

    def tokens_to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, h, w, g] (or [h, w, g]) -> exact +-1 codes [B, z, h, w] on the model's device."""
        t = self.token_tensor(tokens, ("h", "w", self.quantize.groups), integer=True)
        try:
            return self.quantize.decode_ids(t, dtype=next(self.decoder.parameters()).dtype)
        except ValueError as e:
            raise TokError(f"invalid wetok tokens: {e}") from None

    def make_noise(self, codes: torch.Tensor, seed: int | Sequence[int] | None = None) -> torch.Tensor:
        """N(0, 1) noise of the latent's shape for the generative decoder.

        ``seed`` an int: one [B, z, h, w] draw from a torch.Generator on the codes' device; a sequence of B ints:
        image i gets its own draw seeded with ``seed[i]`` (results then do not depend on how images are batched);
        None: the global RNG. This does not reproduce the official code's CPU noise stream (it samples a
        channels-last tensor); pass ``noise=`` to replay it."""
        if seed is None:
            return torch.randn(codes.shape, device=codes.device, dtype=codes.dtype)
        seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
        if not isinstance(seed, int) and len(seeds) != codes.shape[0]:
            raise TokError(f"{len(seeds)} seeds for a batch of {codes.shape[0]} images")
        shape = codes.shape if isinstance(seed, int) else (1, *codes.shape[1:])
        draws = []
        for s in seeds:
            g = torch.Generator(device=codes.device)
            g.manual_seed(s)
            draws.append(torch.randn(shape, generator=g, device=codes.device, dtype=codes.dtype))
        return torch.cat(draws)

    def decode_codes(self, codes: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """+-1 codes [B, z, h, w] -> raw (unclamped) images. The generative decoder draws global-RNG noise when
        ``noise`` is None (like the official ``randn_like``)."""
        codes = self.in_layout(codes)
        if not self.generative:
            if noise is not None:
                raise TokError("this wetok model has a deterministic decoder: it takes no noise")
            return self.decoder(codes)
        if noise is None:
            noise = self.make_noise(codes)
        elif tuple(noise.shape) != tuple(codes.shape):
            raise TokError(f"noise must have the latent's shape {tuple(codes.shape)}, got {tuple(noise.shape)}")
        return self.decoder(codes, self.in_layout(noise.to(device=codes.device, dtype=codes.dtype)))

    def _decode(self, tokens: torch.Tensor, *, seed: int | Sequence[int] | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, h, w, g] -> raw images [B, 3, h f, w f].

        Generative decoder: ``noise`` (shape [B, z, h, w]) is used as given; otherwise it is drawn from a generator
        seeded with ``seed`` (an int, or one int per image; the base class fills in the folder's ``decode.seed``;
        neither: the global RNG). ``seed`` is ignored by deterministic models."""
        codes = self.tokens_to_codes(tokens)
        if self.generative and noise is None:
            noise = self.make_noise(codes, seed)
        return self.decode_codes(codes, noise)

    # --- training -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Training pass: images -> (raw reconstruction, aux). aux holds ``entropy_aux``, ``commitment``,
        ``per_sample_entropy``, ``codebook_entropy`` (computed in training mode only, zeros otherwise or when the
        encoder is frozen) and ``indices`` [B, h, w, g]."""
        if self._encoder_frozen:
            with torch.no_grad():
                z = self.encode_latent(x)
        else:
            z = self.encode_latent(x)
        q = self.quantize(z)  # the quantizer is in eval mode (no entropy terms) when frozen
        return self.decode_codes(q.quantized, noise), {**q.losses, **q.stats, "indices": q.ids}

    def freeze_encoder(self) -> "WeTok":
        """Stage-2 (generative decoder) training: freeze encoder + quantizer (no grads, eval mode, no entropy
        or commitment terms). Returns self."""
        self._encoder_frozen = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
        self.quantize.eval()
        return self

    def train(self, mode: bool = True) -> "WeTok":
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()
            self.quantize.eval()
        return self

    def extend_to_generative(self) -> "WeTok":
        """A generative-decoder copy of this (deterministic) model for stage-2 training: decoder.conv_in gets
        z extra noise inputs with zero weights (bias unchanged), so it decodes exactly like this model whatever
        the noise. The copy lives on the same device; this model is unchanged."""
        if self.generative:
            raise TokError("this wetok model already has a generative decoder")
        new = copy.deepcopy(self)
        new.decoder.add_noise_input(self.model_args["z_channels"])
        new.model_args = {**self.model_args, "generative_decoder": True}
        new.decode_defaults = {**self.decode_defaults, "seed": 0}
        return new


def official_model_args(init_args: dict[str, Any], *, image_size: int = 256) -> dict[str, Any]:
    """Map an official ``model.init_args`` block (LightningCLI YAML: ddconfig, embed_dim, n_embed,
    num_codebooks, gan_decoder, ...) to wetok model_args. Raises TokError on inconsistent values."""
    if not isinstance(init_args, dict) or not isinstance(init_args.get("ddconfig"), dict):
        raise TokError("the config's model.init_args has no ddconfig block: not a WeTok / Open-MAGVIT2 config")
    dd = init_args["ddconfig"]
    missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "z_channels") if k not in dd]
    if missing:
        raise TokError(f"the config's ddconfig lacks {missing}")
    if dd.get("double_z"):
        raise TokError("ddconfig.double_z is True: not supported by WeTok (the encoder must output z channels)")
    if int(dd.get("in_channels", 3)) != 3 or int(dd.get("out_ch", 3)) != 3:
        raise TokError("only RGB WeTok models (in_channels = out_ch = 3) are supported")
    z = int(dd["z_channels"])
    embed_dim = int(init_args.get("embed_dim", z))
    if embed_dim != z:
        raise TokError(f"embed_dim ({embed_dim}) differs from ddconfig.z_channels ({z})")
    n_embed = init_args.get("n_embed")
    if n_embed is None:
        raise TokError("the config's model.init_args has no n_embed")
    groups = int(init_args.get("num_codebooks", 1))
    args = {
        "ch": int(dd["ch"]),
        "ch_mult": [int(m) for m in dd["ch_mult"]],
        "num_res_blocks": int(dd["num_res_blocks"]),
        "z_channels": z,
        "groups": groups,
        "codebook_size": int(n_embed),
        "generative_decoder": bool(init_args.get("gan_decoder", False)),
        "image_size": int(image_size),
        "sample_weight": float(init_args.get("sample_minimization_weight", 1.0)),
        "codebook_weight": float(init_args.get("batch_maximization_weight", 1.0)),
    }
    return normalize_model_args(args)
