"""The SoftVQ-VAE tokenizer: a ViT encoder with L learned latent tokens, the soft vector quantizer and a ViT decoder
that rebuilds the image from mask tokens (tokcli/nn/vit.py, tokcli/quant/softvq.py).

    encode: image [B, 3, H, W] in [-1, 1] -> encoder -> quant_conv (Linear D_enc -> d) -> z_hat [B, L, d]
            -> soft VQ -> z [B, L, d] float32 (the decoder's input; what the official SiT / DiT consume)
    decode: z -> post_quant_conv (Linear d -> D_dec) -> decoder -> image (raw; the base class clamps)

Tokens are the soft latents z (``kind="latents"``, shape (L, d), one-dimensional: they do not scale with the image,
so a model works at its trained ``image_size`` only). With ``normalize_latents=True`` the tokens are
``(z - vq_mean) / vq_std`` (the scalars the official generators divide by) and ``decode`` undoes it first; both
scalars are in the model config and in every token-file header (``tokens.extra``). The per-token argmax ids are
``encode_ids`` (statistics, discrete models); ``latents_from_ids`` maps them back to codewords, the hard
approximation of z.

model_args (the official ``config.json`` names, plus tok's): ``encoder_model`` / ``decoder_model`` (timm DINOv2
names: S/B/L), ``encoder_depth`` / ``decoder_depth`` (blocks; default the name's depth; the converter counts them in
the checkpoint), ``image_size`` (256), ``enc_patch_size`` / ``dec_patch_size`` (16), ``num_latent_tokens`` (L),
``codebook_embed_dim`` (d), ``codebook_size`` (8192), ``num_codebooks`` (4), ``tau`` (0.07), ``codebook_l2_norm``
(true), ``vq_mean`` (0), ``vq_std`` (1), ``entropy_temperature`` (0.01), ``enc_drop_path_rate`` /
``dec_drop_path_rate`` (0), ``normalize_latents`` (false), ``layer_scale_init`` (1e-5, DINOv2's: the initial
LayerScale only, a training choice). ``tok_vit_tiny`` (width 192, 3 heads) is tok's own block width for CPU demos.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokcli.core.model_args import complete
from tokcli.errors import TokError
from tokcli.families.base import TokenSpec, Tokenizer

FAMILY = "softvq"
REQUIRED = ("encoder_model", "decoder_model", "num_latent_tokens", "codebook_embed_dim")
DEFAULTS: dict[str, Any] = {
    "encoder_depth": None, "decoder_depth": None, "image_size": 256, "enc_patch_size": 16, "dec_patch_size": 16,
    "codebook_size": 8192, "num_codebooks": 4, "tau": 0.07, "codebook_l2_norm": True, "vq_mean": 0.0,
    "vq_std": 1.0, "entropy_temperature": 0.01, "enc_drop_path_rate": 0.0, "dec_drop_path_rate": 0.0,
    "normalize_latents": False, "layer_scale_init": 1e-5,
}
_INTS = ("image_size", "enc_patch_size", "dec_patch_size", "num_latent_tokens", "codebook_embed_dim",
         "codebook_size", "num_codebooks")
_FLOATS = ("tau", "vq_mean", "vq_std", "entropy_temperature", "enc_drop_path_rate", "dec_drop_path_rate",
           "layer_scale_init")


def _number(args: dict, key: str, kind: type):
    v = args[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
        raise TokError(f"SoftVQ model_args {key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if not math.isfinite(float(v)):
        raise TokError(f"SoftVQ model_args {key} must be finite, got {v!r}")
    return kind(v)


def normalize_model_args(args: dict[str, Any]) -> dict[str, Any]:
    """Checked, complete model_args (defaults filled in, depths resolved from the timm names)."""
    from tokcli.nn.vit import vit_arch

    a = complete("SoftVQ", args, REQUIRED, DEFAULTS)
    for k in _INTS:
        a[k] = _number(a, k, int)
        if a[k] < 1:
            raise TokError(f"SoftVQ model_args {k} must be positive, got {a[k]}")
    for k in _FLOATS:
        a[k] = _number(a, k, float)
    for side in ("encoder", "decoder"):
        a[f"{side}_model"] = str(a[f"{side}_model"])
        depth = a[f"{side}_depth"]
        a[f"{side}_depth"] = vit_arch(a[f"{side}_model"])[2] if depth is None else _number(a, f"{side}_depth", int)
    for k, p in (("enc_patch_size", a["enc_patch_size"]), ("dec_patch_size", a["dec_patch_size"])):
        if a["image_size"] % p:
            raise TokError(f"SoftVQ image_size {a['image_size']} is not a multiple of {k} {p}")
    if a["num_latent_tokens"] % a["num_codebooks"]:
        raise TokError(f"SoftVQ num_latent_tokens {a['num_latent_tokens']} is not a multiple of num_codebooks "
                       f"{a['num_codebooks']} (the codebooks split the tokens into equal groups)")
    if a["vq_std"] <= 0 or a["tau"] <= 0:
        raise TokError(f"SoftVQ vq_std and tau must be positive, got {a['vq_std']} and {a['tau']}")
    a["codebook_l2_norm"], a["normalize_latents"] = bool(a["codebook_l2_norm"]), bool(a["normalize_latents"])
    return a


class SoftVQ(Tokenizer):
    family = FAMILY
    header_checked_extra = ("normalized", "vq_mean", "vq_std")

    def __init__(self, **model_args):
        super().__init__()
        from tokcli.nn.vit import ViTDecoder, ViTEncoder
        from tokcli.quant.softvq import SoftVectorQuantizer

        self.model_args = a = normalize_model_args(model_args)
        n, d = a["num_latent_tokens"], a["codebook_embed_dim"]
        self.encoder = ViTEncoder(a["encoder_model"], depth=a["encoder_depth"], image_size=a["image_size"],
                                  patch_size=a["enc_patch_size"], num_latent_tokens=n,
                                  drop_path=a["enc_drop_path_rate"], layer_scale_init=a["layer_scale_init"])
        self.quant_conv = nn.Linear(self.encoder.width, d)
        self.quantize = SoftVectorQuantizer(a["codebook_size"], d, a["num_codebooks"], tau=a["tau"],
                                            l2_norm=a["codebook_l2_norm"],
                                            entropy_temperature=a["entropy_temperature"])
        self.decoder = ViTDecoder(a["decoder_model"], depth=a["decoder_depth"], image_size=a["image_size"],
                                  patch_size=a["dec_patch_size"], num_latent_tokens=n,
                                  drop_path=a["dec_drop_path_rate"], layer_scale_init=a["layer_scale_init"])
        self.post_quant_conv = nn.Linear(d, self.decoder.width)
        self.num_latent_tokens, self.latent_dim = n, d

    def prepare_for_inference(self) -> None:
        """Fold the LayerScale of every block into its Linear (tokcli.nn.vit.fold_layer_scale). Called by
        :meth:`TokModel.from_folder` (``inference=True``); training optimises the unfolded model."""
        from tokcli.nn.vit import fold_layer_scale

        fold_layer_scale(self.encoder.model)
        fold_layer_scale(self.decoder.model)

    # --- the contract -------------------------------------------------------------------------------
    @property
    def spec(self) -> TokenSpec:
        a = self.model_args
        what = "(z - vq_mean) / vq_std" if a["normalize_latents"] else "z"
        return TokenSpec(
            kind="latents", shape=(self.num_latent_tokens, self.latent_dim), latent_dim=self.latent_dim,
            downsample=None,
            layout=f"latent tokens, channels: {what}, z = softmax(cos / tau) @ codebook (the decoder's input); "
                   f"token t uses codebook t // {self.num_latent_tokens // a['num_codebooks']}",
            extra={"vq_mean": a["vq_mean"], "vq_std": a["vq_std"], "normalized": a["normalize_latents"],
                   "num_codebooks": a["num_codebooks"], "codebook_size": a["codebook_size"], "tau": a["tau"]})

    @property
    def id_spec(self) -> TokenSpec:
        """The argmax ids as :meth:`usage_ids` lays them out: [L / G, G], group (codebook) on the last axis."""
        a = self.model_args
        g = a["num_codebooks"]
        return TokenSpec(kind="indices", shape=(self.num_latent_tokens // g, g), codebook_size=a["codebook_size"],
                         layout="argmax ids [position in group, group]", extra={"groups": g})

    def usage_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> argmax ids [B, L / G, G] (token t = group t // (L / G) is at [t % (L / G), t // (L / G)])."""
        g = self.model_args["num_codebooks"]
        ids = self.encode_ids(x)
        return ids.reshape(ids.shape[0], g, -1).transpose(1, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the soft latents z [B, L, d] float32 (normalised when ``normalize_latents``)."""
        return self.normalize(self.quantize_images(x).quantized).float()

    def _decode(self, tokens: torch.Tensor, *, seed=None, noise=None) -> torch.Tensor:
        t = self.token_tensor(tokens, (self.num_latent_tokens, self.latent_dim), integer=False)
        return self.decode_latents(self.denormalize(t))

    # --- the parts ------------------------------------------------------------------------------------
    def encode_hat(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> z_hat [B, L, d], the quantizer's input (``quant_conv`` of the encoder's latent tokens)."""
        return self.quant_conv(self.encoder(self.check_images(x)))

    def quantize_images(self, x: torch.Tensor):
        """Images -> the quantizer's :class:`~tokcli.quant.base.QuantOut` (soft z, argmax ids, losses, stats)."""
        return self.quantize(self.encode_hat(x))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (not normalised) latents z [B, L, d] -> the decoder's raw image [B, 3, H, W]."""
        return self.decoder(self.post_quant_conv(z))

    def encode_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> per-token argmax code ids [B, L] int64 (local to the token's group codebook)."""
        return self.quantize_images(x).ids

    def latents_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids [B, L] -> tokens (the argmax codewords; normalised when ``normalize_latents``): the HARD approximation
        of what ``encode`` returns; ``decode`` of these is not the tokenizer's reconstruction."""
        return self.normalize(self.quantize.decode_ids(ids)).float()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        a = self.model_args
        return (z - a["vq_mean"]) / a["vq_std"] if a["normalize_latents"] else z

    def denormalize(self, t: torch.Tensor) -> torch.Tensor:
        a = self.model_args
        return t * a["vq_std"] + a["vq_mean"] if a["normalize_latents"] else t

    # --- training -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Training pass: images -> (raw reconstruction, aux). aux: the quantizer's ``entropy`` term (training mode
        only), its statistics (usage, perplexity, zq_cos, max_prob), ``ids`` [B, L] and the soft latent ``z``
        [B, L, d] (what representation alignment projects)."""
        q = self.quantize_images(x)
        return self.decode_latents(q.quantized), {**q.losses, **q.stats, "ids": q.ids, "z": q.quantized}
