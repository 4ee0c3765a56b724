"""The CODA tokenizer: a frozen continuous VAE adapted with LoRA (``vae.py``) whose scaled latent is quantized by the
multi-scale attention quantizer (``tokcli/quant/multiscale.py``).

    encode: image in [-1, 1] -> VAE posterior mean * latent_scale -> ids [B, T]  (T = sum of pn^2; 680 for MAR)
    decode: ids -> f_hat (sum of the upsampled per-scale codes) -> VAE decoder -> image

Token layout: one flat index vector per image, scale by scale from coarse (1x1) to fine (16x16 for MAR), row-major
inside a scale; every index lies in one shared codebook. The scale list fixes the latent size, so a CODA model takes
exactly one image size (``image_size`` = last scale x the VAE's downsampling).

Encoding uses the posterior *mean*. The official code samples the posterior (``posterior.sample()``) even at
evaluation; tok is deterministic so that tokens reproduce (docs/design-notes.md). ``CodaMARVAE.encode_sampled``
replays the official path when needed.

model_args mirror the official config keys: ``vae`` (the VAE architecture), ``vae_latent_channels``,
``patch_size_list``, ``codebook_size``, ``vq_attn_dim``, ``vq_norm_type``, ``vq_commitment_beta``,
``decoder_lora_rank``, ``decoder_lora_module_list``, ``latent_scale``, ``latent_shift``, plus ``image_size``.
"""

from __future__ import annotations

from typing import Any

import torch

from tokcli.errors import TokError
from tokcli.families.base import TokenSpec, Tokenizer

FAMILY = "coda"
REQUIRED = ("vae", "vae_latent_channels", "patch_size_list", "codebook_size", "vq_attn_dim", "vq_norm_type",
            "vq_commitment_beta", "decoder_lora_rank", "decoder_lora_module_list", "latent_scale")
VAE_KEYS = ("embed_dim", "z_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
            "decoder_attn_resolutions", "resolution", "in_channels", "out_ch", "double_z", "dropout",
            "resamp_with_conv", "use_variational", "norm_num_groups", "norm_eps", "type")


def normalize_model_args(args: dict[str, Any]) -> dict[str, Any]:
    """Check and complete CODA model_args (from the registry, a model folder or an official config)."""
    missing = [k for k in REQUIRED if k not in args]
    if missing:
        raise TokError(f"CODA model_args lack {', '.join(missing)}")
    out = {k: args[k] for k in REQUIRED}
    out["vae"] = {k: v for k, v in dict(args["vae"]).items() if k in VAE_KEYS}
    out["latent_shift"] = float(args.get("latent_shift", 0.0) or 0.0)
    out["patch_size_list"] = [int(p) for p in out["patch_size_list"]]
    out["decoder_lora_module_list"] = list(out["decoder_lora_module_list"])
    factor = 2 ** (len(out["vae"]["ch_mult"]) - 1)
    size = int(args.get("image_size") or out["patch_size_list"][-1] * factor)
    if size != out["patch_size_list"][-1] * factor:
        raise TokError(f"image_size {size} does not fit the scales: the last scale {out['patch_size_list'][-1]} x "
                       f"the VAE's downsampling {factor} = {out['patch_size_list'][-1] * factor}")
    out["image_size"] = size
    return out


class Coda(Tokenizer):
    family = FAMILY

    def __init__(self, model_args: dict[str, Any]):
        super().__init__()
        from tokcli.families.coda.vae import CodaMARVAE
        from tokcli.quant.multiscale import MultiScaleAttentionQuantizer

        self.model_args = normalize_model_args(model_args)
        a = self.model_args
        self.vae = CodaMARVAE(a["vae"], latent_scale=a["latent_scale"], latent_shift=a["latent_shift"])
        self.vae.add_lora(a["decoder_lora_rank"], a["decoder_lora_module_list"])
        self.quantize = MultiScaleAttentionQuantizer.from_config(a)
        self.downsample = 2 ** (len(a["vae"]["ch_mult"]) - 1)

    @property
    def spec(self) -> TokenSpec:
        q = self.quantize
        return TokenSpec(
            kind="indices", shape=(q.num_tokens,), codebook_size=q.codebook_size, downsample=None,
            layout=("scales coarse -> fine, row-major inside a scale; scale l (pn x pn, pn in patch_size_list) "
                    "starts at level_offsets[l]; one shared codebook"),
            extra={"patch_size_list": list(q.patch_size_list), "level_offsets": list(q.level_offsets)})

    @property
    def preprocess(self) -> dict[str, Any]:
        s = self.model_args["image_size"]
        return {"image_size": s, "crop": "adm_center", "value_range": [-1, 1], "multiple_of": s}

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled continuous latent (posterior mean * latent_scale), the quantizer's input."""
        return self.vae.encode(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.encode_latent(x)
        last = self.quantize.patch_size_list[-1]
        if latent.shape[-2:] != (last, last):
            raise TokError(f"CODA takes {self.model_args['image_size']}x{self.model_args['image_size']} images "
                           f"(its scales end at {last}x{last}); got {x.shape[-2]}x{x.shape[-1]}")
        return self.quantize.flatten_indices(self.quantize.encode(latent))

    def decode(self, tokens: torch.Tensor, *, seed=None, noise=None, clamp: bool = True) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, device=self.device).long()
        if tokens.ndim != 2 or tokens.shape[1] != self.quantize.num_tokens:
            raise TokError(f"CODA tokens must be [N, {self.quantize.num_tokens}], got {list(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.quantize.codebook_size):
            raise TokError(f"CODA token ids must lie in [0, {self.quantize.codebook_size})")
        y = self.vae.decode(self.quantize.decode_indices(tokens))
        return y.clamp(-1, 1) if clamp else y

    def forward(self, x: torch.Tensor):
        """Training forward: (reconstruction, aux with the quantizer's vq and entropy losses and the ids)."""
        out = self.quantize(self.encode_latent(x))
        return self.vae.decode(out.quantized), {"vq_loss": out.vq_loss, "entropy_loss": out.entropy_loss,
                                               "indices": out.indices}


def build(model_args: dict[str, Any]) -> Coda:
    return Coda(model_args)
