"""Continuous KL autoencoder: a diffusers :class:`~diffusers.AutoencoderKL` described by an LDM-style config block,
with the latent scale/shift applied explicitly and optional conv LoRA adapters (peft).

Used by the ``kl`` family (a continuous tokenizer, and the frozen base of CODA) and by CODA itself
(:mod:`tokcli.families.coda.vae` adds the official checkpoint mapping and LoRA targeting rule).

Config block (the ``vae`` entry of a model's ``model_args``; the LDM/MAR ``Encoder``/``Decoder`` argument names):

    ch, ch_mult          block_out_channels = ch * m per level (level 0 = full resolution)
    num_res_blocks       res-blocks per encoder level (the decoder has one more, as in LDM and diffusers)
    attn_resolutions     encoder levels (by resolution) with one single-head attention after every res-block
    decoder_attn_resolutions   the same for the decoder (MAR: none)
    resolution           the training resolution the two lists refer to
    z_channels = embed_dim     latent channels; double_z (mean and log-variance) is required
    use_quant_conv, use_post_quant_conv   1x1 convs around the latent (LDM/MAR: true; FLUX: false)
    norm_num_groups (32), norm_eps (1e-6), dropout (0), resamp_with_conv (true): fixed, checked

Latent convention: ``latent = (z - shift) * scale`` where z is the posterior mean (``encode``) or a posterior sample
(``encode_sampled``); ``decode`` undoes it first. diffusers stores ``scaling_factor``/``shift_factor`` in its config
but never applies them inside ``encode``/``decode``; here they are applied, always, by this class.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from tokcli.errors import TokError

ADAPTER = "default"
# the keys of a ``vae`` config block (LDM Encoder/Decoder argument names, plus the diffusers quant-conv switches)
VAE_CONFIG_KEYS = ("type", "embed_dim", "z_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                   "decoder_attn_resolutions", "resolution", "in_channels", "out_ch", "double_z", "dropout",
                   "resamp_with_conv", "use_variational", "norm_num_groups", "norm_eps", "use_quant_conv",
                   "use_post_quant_conv")


def diffusers_vae_kwargs(vae_cfg: Mapping[str, Any], latent_scale: float = 1.0,
                         latent_shift: float | None = None) -> dict:
    """``AutoencoderKL`` constructor kwargs for an LDM-style config block. Raises :class:`TokError` for settings
    diffusers cannot express."""
    ch, ch_mult = int(vae_cfg["ch"]), [int(m) for m in vae_cfg["ch_mult"]]
    res = int(vae_cfg["resolution"])
    z, embed = int(vae_cfg.get("z_channels", vae_cfg["embed_dim"])), int(vae_cfg["embed_dim"])
    enc_attn = {int(r) for r in vae_cfg.get("attn_resolutions", [])}
    dec_attn = {int(r) for r in vae_cfg.get("decoder_attn_resolutions", [])}
    problems = []
    if z != embed:
        problems.append(f"z_channels ({z}) != embed_dim ({embed})")
    if not vae_cfg.get("double_z", True) or not vae_cfg.get("use_variational", True):
        problems.append("double_z/use_variational must be true (KL VAE)")
    if float(vae_cfg.get("norm_eps", 1e-6)) != 1e-6:
        problems.append("norm_eps must be 1e-6")
    if float(vae_cfg.get("dropout", 0.0)) != 0.0:
        problems.append("dropout must be 0")
    if not vae_cfg.get("resamp_with_conv", True):
        problems.append("resamp_with_conv must be true")
    groups = int(vae_cfg.get("norm_num_groups", 32))
    if any((ch * m) % groups for m in ch_mult):
        problems.append(f"every level's width (ch * ch_mult) must be a multiple of norm_num_groups ({groups})")
    if problems:
        raise TokError("unsupported KL-VAE config: " + "; ".join(problems))
    levels = range(len(ch_mult))
    down = tuple("AttnDownEncoderBlock2D" if res // 2 ** i in enc_attn else "DownEncoderBlock2D" for i in levels)
    # diffusers up_blocks run from the lowest resolution (LDM level L-1) to the highest (level 0)
    up = tuple("AttnUpDecoderBlock2D" if res // 2 ** i in dec_attn else "UpDecoderBlock2D"
               for i in reversed(levels))
    return dict(
        in_channels=int(vae_cfg.get("in_channels", 3)), out_channels=int(vae_cfg.get("out_ch", 3)),
        down_block_types=down, up_block_types=up, block_out_channels=tuple(ch * m for m in ch_mult),
        layers_per_block=int(vae_cfg["num_res_blocks"]), act_fn="silu", latent_channels=z,
        norm_num_groups=groups, sample_size=res, scaling_factor=float(latent_scale),
        shift_factor=None if not latent_shift else float(latent_shift),
        use_quant_conv=bool(vae_cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(vae_cfg.get("use_post_quant_conv", True)),
        mid_block_add_attention=True,
    )


def downsample_factor(vae_cfg: Mapping[str, Any]) -> int:
    return 2 ** (len(vae_cfg["ch_mult"]) - 1)


class KLVAE(nn.Module):
    """diffusers ``AutoencoderKL`` + explicit latent scale/shift + optional peft conv LoRA."""

    def __init__(self, vae_cfg: Mapping[str, Any], *, latent_scale: float = 1.0, latent_shift: float = 0.0):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae_cfg = dict(vae_cfg)
        self.num_levels = len(self.vae_cfg["ch_mult"])
        self.latent_scale = float(latent_scale)
        self.latent_shift = float(latent_shift or 0.0)
        self.vae = AutoencoderKL(**diffusers_vae_kwargs(self.vae_cfg, self.latent_scale, self.latent_shift))
        self.lora_rank: int | None = None
        self.lora_targets: list[str] = []  # diffusers module paths of the wrapped convs

    # ---- LoRA

    def inject_lora(self, rank: int, targets: Sequence[str]) -> None:
        """peft LoRA (``r = lora_alpha = rank`` -> scale 1, no bias/dropout, A ~ N(0, 1/r), B = 0) on the convs
        at the given diffusers module paths. peft leaves only the adapters trainable."""
        from peft import LoraConfig, inject_adapter_in_model

        if self.lora_rank is not None:
            raise TokError("LoRA adapters are already injected")
        if not targets:
            raise TokError("no conv to put a LoRA adapter on")
        cfg = LoraConfig(r=int(rank), lora_alpha=int(rank), lora_dropout=0.0, bias="none",
                         init_lora_weights="gaussian", target_modules=list(targets))
        inject_adapter_in_model(cfg, self.vae, adapter_name=ADAPTER)
        self.lora_rank, self.lora_targets = int(rank), list(targets)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.vae.named_parameters() if ".lora_A." in n or ".lora_B." in n]

    def merge_lora(self) -> None:
        """Fuse the LoRA into the base conv weights (W' = W + up @ down); faster, equal up to float rounding."""
        from peft.tuners.lora import LoraLayer

        for mod in self.vae.modules():
            if isinstance(mod, LoraLayer) and not mod.merged:
                mod.merge(adapter_names=[ADAPTER])

    def prepare_for_inference(self) -> None:
        """Inference form, the same maps up to float rounding: the LoRA fused into its convs, and every nearest 2x
        upsample + 3x3 conv of the decoder computed at the low resolution (tokcli/nn/phase_upsample.py: 2.25x fewer
        multiply-adds in those layers)."""
        from tokcli.nn.phase_upsample import phase_upsamplers

        if self.lora_rank:
            self.merge_lora()
        phase_upsamplers(self.vae)

    def unmerge_lora(self) -> None:
        from peft.tuners.lora import LoraLayer

        for mod in self.vae.modules():
            if isinstance(mod, LoraLayer) and mod.merged:
                mod.unmerge()

    def load_base_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Load plain diffusers ``AutoencoderKL`` weights (no adapters) into this model, adapters or not: the base
        weights of a wrapped conv live under ``<conv>.base_layer``. Strict on the base tensors."""
        mine = self.vae.state_dict()
        wrapped = {t for t in self.lora_targets}
        out = {}
        for k, v in sd.items():
            mod, param = k.rsplit(".", 1)
            key = f"{mod}.base_layer.{param}" if mod in wrapped else k
            if key not in mine:
                raise TokError(f"VAE weights hold {k!r}, which this architecture lacks (check the 'vae' config)")
            if mine[key].shape != v.shape:
                raise TokError(f"VAE weight {k!r} has shape {tuple(v.shape)}, the model {tuple(mine[key].shape)}")
            out[key] = v
        missing = [k for k in mine if k not in out and ".lora_" not in k]
        if missing:
            raise TokError(f"VAE weights lack {len(missing)} tensors (e.g. {missing[:3]})")
        self.vae.load_state_dict(out, strict=False)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain diffusers weights (LoRA neither included nor merged) -- the inverse of load_base_state_dict."""
        out = {}
        for k, v in self.vae.state_dict().items():
            if ".lora_" in k:
                continue
            out[k.replace(".base_layer.", ".")] = v
        return out

    # ---- inference

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """``quant_conv(encoder(x))``: [B, 2*z, h, w], mean then (unclamped) log-variance. ``x`` in [-1, 1]."""
        h = self.vae.encoder(x)
        return h if self.vae.quant_conv is None else self.vae.quant_conv(h)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior ``(mean, std)``; ``std = exp(0.5 * clamp(logvar, -30, 20))``."""
        mean, logvar = self.moments(x).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def scale_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_shift) * self.latent_scale

    def unscale_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.latent_scale + self.latent_shift

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic scaled latent: (posterior mean - shift) * scale."""
        return self.scale_latent(self.posterior(x)[0])

    def encode_sampled(self, x: torch.Tensor, *, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample, scaled: ``(mean + std * noise - shift) * scale``; ``noise`` defaults to ``randn``."""
        mean, std = self.posterior(x)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale_latent(mean + std * noise)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """``decoder(post_quant_conv(latent / scale + shift))``: raw image, roughly [-1, 1], NOT clamped."""
        z = self.unscale_latent(latent)
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def kl_divergence(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, 1)) summed over C, H, W, averaged over the batch (the LDM convention)."""
    var = std.pow(2)
    kl = 0.5 * (mean.pow(2) + var - 1.0 - torch.log(var))
    return kl.flatten(1).sum(1).mean()


def vae_block_from_diffusers_config(cfg: Mapping[str, Any]) -> tuple[dict, float, float]:
    """A diffusers ``AutoencoderKL`` ``config.json`` -> (LDM-style ``vae`` block, latent_scale, latent_shift).

    The inverse of :func:`diffusers_vae_kwargs` for the configurations it can express (e.g. the FLUX.1 and SD VAEs):
    ``block_out_channels`` must be multiples of the first; attention blocks are recorded by resolution relative to
    ``sample_size``. Raises :class:`TokError` otherwise."""
    cls = cfg.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise TokError(f"expected a diffusers AutoencoderKL config, got {cls!r}")
    boc = [int(c) for c in cfg.get("block_out_channels", [64])]
    ch = boc[0]
    if any(c % ch for c in boc):
        raise TokError(f"block_out_channels {boc} are not multiples of the first width")
    res = int(cfg.get("sample_size", 32) if not isinstance(cfg.get("sample_size"), (list, tuple))
              else cfg["sample_size"][0])
    down = list(cfg.get("down_block_types", ["DownEncoderBlock2D"] * len(boc)))
    up = list(cfg.get("up_block_types", ["UpDecoderBlock2D"] * len(boc)))
    known = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"}
    if set(down) - known or set(up) - known or len(down) != len(boc) or len(up) != len(boc):
        raise TokError(f"unsupported AutoencoderKL block types {down} / {up}")
    if cfg.get("act_fn", "silu") != "silu" or not cfg.get("mid_block_add_attention", True):
        raise TokError("only act_fn 'silu' with mid-block attention is supported")
    z = int(cfg.get("latent_channels", 4))
    block = {
        "type": "AutoencoderKL", "ch": ch, "ch_mult": [c // ch for c in boc],
        "num_res_blocks": int(cfg.get("layers_per_block", 1)),
        "attn_resolutions": [res // 2 ** i for i, t in enumerate(down) if t.startswith("Attn")],
        "decoder_attn_resolutions": [res // 2 ** (len(up) - 1 - i) for i, t in enumerate(up) if t.startswith("Attn")],
        "resolution": res, "z_channels": z, "embed_dim": z, "in_channels": int(cfg.get("in_channels", 3)),
        "out_ch": int(cfg.get("out_channels", 3)), "double_z": True, "dropout": 0.0, "resamp_with_conv": True,
        "use_variational": True, "norm_num_groups": int(cfg.get("norm_num_groups", 32)), "norm_eps": 1e-6,
        "use_quant_conv": bool(cfg.get("use_quant_conv", True)),
        "use_post_quant_conv": bool(cfg.get("use_post_quant_conv", True)),
    }
    return block, float(cfg.get("scaling_factor") or 1.0), float(cfg.get("shift_factor") or 0.0)


# ------------------------------------------------------------------- diffusers folders (vae/ of a pipeline repo)
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


@dataclass(frozen=True)
class DiffusersVAE:
    """A diffusers ``AutoencoderKL`` folder on disk, as :func:`read_diffusers_vae` found it."""

    config_path: Path
    weights_path: Path
    block: dict          # the LDM-style ``vae`` block (:func:`vae_block_from_diffusers_config`)
    latent_scale: float  # the config's scaling_factor
    latent_shift: float  # the config's shift_factor (0 when absent)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in float32 (released VAEs are often 16-bit), diffusers key names."""
        from safetensors.torch import load_file

        return {k: v.to(torch.float32) for k, v in load_file(str(self.weights_path), device="cpu").items()}


def _autoencoder_config(path: Path) -> dict | None:
    """The parsed config.json when it is a diffusers AutoencoderKL config (not, e.g., a CODA config.json)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("_class_name") == "AutoencoderKL" else None


def read_diffusers_vae(path: str | os.PathLike, *, required: bool = True) -> DiffusersVAE | None:
    """The diffusers ``AutoencoderKL`` folder that ``path`` names: the folder itself, its ``vae/`` subfolder (a
    pipeline repo), or the folder of a ``diffusion_pytorch_model*.safetensors`` file given directly. A folder
    counts when its config.json says ``_class_name: AutoencoderKL``. Anything else: None, or :class:`TokError` when
    ``required``. A folder with such a config but no weight file is always an error. Weights are read lazily."""
    p = Path(path)
    if p.is_dir():
        candidates = [(d, None) for d in (p, p / "vae")]
    elif p.is_file() and p.name.startswith("diffusion_pytorch_model"):
        candidates = [(p.parent, p)]
    else:
        candidates = []
    for folder, weights in candidates:
        cfg = _autoencoder_config(folder / "config.json")
        if cfg is None:
            continue
        weights = weights or next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
        if weights is None:
            raise TokError(f"{folder} is a diffusers AutoencoderKL folder without weights ({WEIGHT_NAMES[0]})")
        block, scale, shift = vae_block_from_diffusers_config(cfg)
        return DiffusersVAE(folder / "config.json", weights, block, scale, shift)
    if required:
        raise TokError(f"{p} is not a diffusers AutoencoderKL folder: it needs config.json (_class_name "
                       f"AutoencoderKL) and {WEIGHT_NAMES[0]}")
    return None
