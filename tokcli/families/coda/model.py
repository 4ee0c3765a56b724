"""The CODA tokenizer: a frozen continuous VAE adapted with LoRA (``vae.py``) whose scaled latent is quantized by the
multi-scale attention quantizer (``tokcli/quant/msrq.py``).

    encode: image in [-1, 1] -> VAE posterior mean * latent_scale -> ids [B, T]  (T = sum of pn^2; 680 for MAR)
    decode: ids -> f_hat (sum of the upsampled per-scale codes) -> VAE decoder -> image

Token layout: one flat index vector per image, scale by scale from coarse (1x1) to fine (16x16 for MAR), row-major
inside a scale; every index lies in one shared codebook. The scale list fixes the latent size, so a CODA model takes
exactly one image size (``image_size`` = last scale x the VAE's downsampling).

Encoding uses the posterior *mean*. The official code samples the posterior (``posterior.sample()``) even at
evaluation; tok is deterministic so that tokens reproduce (docs/design-notes.md). ``encode(x, sample_posterior=True,
seed=[...])`` (``tok encode --sample-posterior``) takes the official sampled path, image i's noise drawn from its own
seed so it replays; ``CodaVAE.encode_sampled`` takes explicit noise.

model_args mirror the official config keys: ``vae`` (the VAE architecture), ``vae_latent_channels``,
``patch_size_list``, ``codebook_size``, ``vq_attn_dim``, ``vq_norm_type``, ``vq_commitment_beta``,
``decoder_lora_rank`` (0 = no LoRA), ``decoder_lora_module_list``, ``latent_scale``, ``latent_shift``, plus
``image_size`` and ``vq_assignment`` ("attention", CODA; "nearest" = multi-scale residual VQ without attention, and
with a single scale plain VQ: the baselines of the paper's Table 1).

At inference (``tokcli.load``) the LoRA is fused into the conv weights; training keeps it separate.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from tokcli.core.checkpoint import ModelFolder, read_model_folder
from tokcli.errors import TokError
from tokcli.families.base import TokenSpec, Tokenizer

FAMILY = "coda"
REQUIRED = ("vae", "vae_latent_channels", "patch_size_list", "codebook_size", "vq_attn_dim", "vq_norm_type",
            "vq_commitment_beta", "decoder_lora_rank", "decoder_lora_module_list", "latent_scale")
ASSIGNMENTS = ("attention", "nearest")


def normalize_model_args(args: dict[str, Any]) -> dict[str, Any]:
    """Check and complete CODA model_args (from the registry, a model folder or an official config)."""
    from tokcli.nn.klvae import VAE_CONFIG_KEYS

    missing = [k for k in REQUIRED if k not in args]
    if missing:
        raise TokError(f"CODA model_args lack {', '.join(missing)}")
    out = {k: args[k] for k in REQUIRED}
    out["vae"] = {k: v for k, v in dict(args["vae"]).items() if k in VAE_CONFIG_KEYS}
    out["latent_shift"] = float(args.get("latent_shift", 0.0) or 0.0)
    out["patch_size_list"] = [int(p) for p in out["patch_size_list"]]
    out["decoder_lora_rank"] = int(out["decoder_lora_rank"] or 0)
    out["decoder_lora_module_list"] = list(out["decoder_lora_module_list"])
    out["vq_assignment"] = str(args.get("vq_assignment", "attention"))
    if out["vq_assignment"] not in ASSIGNMENTS:
        raise TokError(f"vq_assignment must be one of {', '.join(ASSIGNMENTS)}, got {out['vq_assignment']!r}")
    factor = 2 ** (len(out["vae"]["ch_mult"]) - 1)
    size = int(args.get("image_size") or out["patch_size_list"][-1] * factor)
    if size != out["patch_size_list"][-1] * factor:
        raise TokError(f"image_size {size} does not fit the scales: the last scale {out['patch_size_list'][-1]} x "
                       f"the VAE's downsampling {factor} = {out['patch_size_list'][-1] * factor}")
    out["image_size"] = size
    return out


class Coda(Tokenizer):
    family = FAMILY
    conv_layout = True  # convolutional networks: either memory layout (tokcli.core.device.memory_format_for)
    compile_targets = ("vae.vae.encoder", "vae.vae.decoder")  # diffusers' AutoencoderKL halves

    def __init__(self, **model_args):
        super().__init__()
        from tokcli.families.coda.vae import CodaVAE
        from tokcli.quant.msrq import MultiScaleAttentionQuantizer

        self.model_args = normalize_model_args(model_args)
        a = self.model_args
        self.vae = CodaVAE(a["vae"], latent_scale=a["latent_scale"], latent_shift=a["latent_shift"])
        self.vae.requires_grad_(False)  # the base VAE stays frozen; only the LoRA and the quantizer train
        if a["decoder_lora_rank"]:
            self.vae.add_lora(a["decoder_lora_rank"], a["decoder_lora_module_list"])
        self.quantize = MultiScaleAttentionQuantizer.from_config(a)
        self.downsample = 2 ** (len(a["vae"]["ch_mult"]) - 1)

    def prepare_for_inference(self) -> None:
        """Fuse the LoRA into the conv weights (W' = W + up @ down): inference runs at the base VAE's cost (and
        the decoder's upsampling at low resolution, :meth:`KLVAE.prepare_for_inference`). Called by
        :meth:`TokModel.from_folder` (``inference=True``); the unfused model is what training optimises."""
        self.vae.prepare_for_inference()

    @property
    def spec(self) -> TokenSpec:
        q = self.quantize
        return TokenSpec(
            kind="indices", shape=(q.num_tokens,), codebook_size=q.codebook_size, downsample=None,
            layout=("scales coarse -> fine, row-major inside a scale; scale l (pn x pn, pn in patch_size_list) "
                    "starts at level_offsets[l]; one shared codebook"),
            extra={"patch_size_list": list(q.patch_size_list), "level_offsets": list(q.level_offsets),
                   "latent_scale": self.model_args["latent_scale"], "latent_shift": self.model_args["latent_shift"],
                   "posterior": "mean", "assignment": self.model_args["vq_assignment"]})

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled continuous latent (posterior mean * latent_scale), the quantizer's input."""
        return self.vae.encode(self.check_images(x))

    def encode_latent_sampled(self, x: torch.Tensor, seed=None) -> torch.Tensor:
        """Scaled posterior sample (the official encode). ``seed``: one int per image (replayable; an int seeds
        image i with ``seed + i``), or None for the global RNG."""
        x = self.check_images(x)
        if seed is None:
            return self.vae.encode_sampled(x)
        seeds = [int(seed) + i for i in range(x.shape[0])] if isinstance(seed, int) else [int(s) for s in seed]
        return self.vae.encode_seeded(x, seeds)

    def encode(self, x: torch.Tensor, *, sample_posterior: bool = False, seed=None) -> torch.Tensor:
        """Images -> ids [B, T]; the posterior mean, or with ``sample_posterior`` a seeded posterior sample."""
        latent = self.encode_latent_sampled(x, seed) if sample_posterior else self.encode_latent(x)
        last = self.quantize.patch_size_list[-1]
        if latent.shape[-2:] != (last, last):
            raise TokError(f"CODA takes {self.model_args['image_size']}x{self.model_args['image_size']} images "
                           f"(its scales end at {last}x{last}); got {x.shape[-2]}x{x.shape[-1]}")
        return self.quantize.flatten_indices(self.quantize.encode(latent))

    def _decode(self, tokens: torch.Tensor, *, seed=None, noise=None) -> torch.Tensor:
        q = self.quantize
        tokens = self.token_tensor(tokens, (q.num_tokens,), integer=True)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= q.codebook_size):
            raise TokError(f"CODA token ids must lie in [0, {q.codebook_size})")
        return self.vae.decode(self.in_layout(q.decode_ids(tokens)))

    def forward(self, x: torch.Tensor):
        """Training forward: (reconstruction, aux with the quantizer's vq and entropy losses and the ids)."""
        out = self.quantize(self.encode_latent(x))
        return self.vae.decode(out.quantized), {"vq_loss": out.losses["vq"], "entropy_loss": out.losses["entropy"],
                                               "indices": out.ids}


def init_model(model_args: Mapping[str, Any], base: ModelFolder | str | os.PathLike) -> Coda:
    """A CODA model around a trained KL VAE (``base``: a model folder of the ``kl`` family, or its path), for
    ``tok train``.

    The VAE architecture and its latent scale/shift come from the folder (``model_args`` may leave them out; if
    given they must agree); the base weights are loaded and frozen; LoRA and quantizer start from their init."""
    if not isinstance(base, ModelFolder):
        base = read_model_folder(base)
    if base.family != "kl":
        raise TokError(f"CODA adapts a continuous KL VAE: model.init_from must be a 'kl' model folder, "
                       f"{base.path} is {base.family!r}")
    b = base.config["model_args"]
    args = dict(model_args)
    for key in ("vae", "latent_scale", "latent_shift"):
        if key in args and args[key] != b.get(key):
            raise TokError(f"model_args.{key} ({args[key]!r}) contradicts the base VAE {base.path} ({b.get(key)!r})")
        args[key] = b.get(key, 0.0)
    args.setdefault("vae_latent_channels", int(b["vae"]["embed_dim"]))
    model = Coda(**args)
    prefix = "vae.vae."
    model.vae.load_base_state_dict({k[len(prefix):]: v for k, v in base.state_dict().items()
                                    if k.startswith(prefix)})
    return model
