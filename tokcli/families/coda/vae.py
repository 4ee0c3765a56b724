"""CODA-MAR continuous VAE: the MAR KL-16 VAE (frozen) with CODA's conv LoRA adapters.

Shape of the implementation (as planned in DESIGN.md):

- The VAE is a diffusers :class:`~diffusers.AutoencoderKL`. Its architecture is built from the ``vae`` block of
  the CODA ``config.json`` (``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
  ``decoder_attn_resolutions``, ``resolution``, ``z_channels``/``embed_dim``, ...); nothing is hard-coded.
  ``ch_mult`` gives ``block_out_channels = ch * m``; a level whose resolution ``resolution / 2**i`` is in
  ``attn_resolutions`` becomes an ``AttnDownEncoderBlock2D`` (one single-head attention after every res-block,
  as in the LDM/MAR ``Encoder``); the decoder gets ``num_res_blocks + 1`` res-blocks per level (diffusers
  does the same) and mid attention on both sides.
- The official checkpoints use the flat LDM/MAR names (``encoder.down.{i}.block.{j}.conv1.weight``, ...). They
  are mapped here by :func:`ldm_to_diffusers_key` (our own ~40-line mapper). diffusers'
  ``convert_ldm_vae_checkpoint`` was not used: it maps only the *mid* attention and would leave the
  encoder's per-level attention (``encoder.down.{last}.attn.*``) unmapped. The 1x1-conv attention weights
  ``q/k/v/proj_out`` [C, C, 1, 1] become the Linear ``to_q/to_k/to_v/to_out.0`` [C, C]; ``decoder.up.{b}``
  becomes ``decoder.up_blocks.{L-1-b}`` (reversed), ``nin_shortcut`` -> ``conv_shortcut``,
  ``norm_out`` -> ``conv_norm_out``, ``mid.block_{1,2}`` -> ``mid_block.resnets.{0,1}``.
- The LoRA is **peft** (``inject_adapter_in_model`` with a ``LoraConfig``), which the official CODA LoRA maps
  onto exactly:

  - official ``<conv>.lora_layer.down.weight`` [r, Cin, k, k] (same kernel/stride/padding as the base conv)
    -> peft ``<conv>.lora_A.default.weight``; official ``<conv>.lora_layer.up.weight`` [Cout, r, 1, 1]
    -> peft ``<conv>.lora_B.default.weight``; the base conv moves to ``<conv>.base_layer``.
  - No alpha in the official code (``network_alpha=None``): the scale is 1.0, i.e. peft ``lora_alpha = r``.
    No LoRA bias, no dropout.
  - Targets: the official rule (``build_peft_from_vae``) wraps every ``nn.Conv2d`` whose *LDM* module name
    contains one of ``decoder_lora_module_list`` (MAR: ``conv1, conv2, upsample, downsample``) -- in the
    encoder AND the decoder, despite the key's name. ``conv_in``, ``conv_out``, ``nin_shortcut``, attention,
    ``quant_conv`` and ``post_quant_conv`` are not wrapped. The rule is applied to the LDM names (the
    diffusers module names are mapped back with :func:`diffusers_to_ldm_module`).
  - For the stride-2 downsample convs the LoRA ``down`` conv sees the already (0,1,0,1)-padded input, in the
    official code and in diffusers' ``Downsample2D`` + peft alike.

  The LoRA is kept unmerged by default (bit-for-bit the official forward structure); :meth:`merge_lora`
  fuses it into the conv weights for faster inference (W' = W + up @ down), at float-rounding cost.

Latent convention (official ``train_mar.py``): ``latent = posterior * latent_scale`` (0.2325, no shift; a
``latent_shift`` from the config is honoured as ``(z - shift) * scale``) and ``decode`` divides by the scale
first. The official code uses ``posterior.sample()`` even at evaluation; :meth:`CodaMARVAE.encode` uses the
posterior **mean** (deterministic; this is what the parity fixture's main outputs use), and
:meth:`CodaMARVAE.encode_sampled` replays the official sampling path, with injectable ``noise``.

Checkpoint files (``from_official``): the base VAE in flat LDM naming (``kl16.safetensors``, or the fixture's
``base_vae.safetensors``), then the LoRA-injected VAE state dict ``vae_ema.pth`` (base + LoRA tensors, loaded
strictly, as the official code does after ``build_peft_from_vae``). The raw ``vae.pth`` has exactly the same keys
and base tensors (only the LoRA tensors differ: EMA vs. raw), so the file NAME is the only way to tell them
apart: a file whose name does not contain ``ema`` is refused unless ``allow_non_ema=True``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from tokcli.errors import TokError

__all__ = [
    "CodaMARVAE",
    "diffusers_vae_kwargs",
    "ldm_to_diffusers_key",
    "ldm_to_diffusers_module",
    "diffusers_to_ldm_module",
    "convert_official_vae_state_dict",
    "load_official_vae_file",
]

ADAPTER = "default"
_ATTN_LDM_TO_DIFF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIFF_TO_LDM = {v: k for k, v in _ATTN_LDM_TO_DIFF.items()}
_RES_LDM_TO_DIFF = {"nin_shortcut": "conv_shortcut"}
_RES_DIFF_TO_LDM = {v: k for k, v in _RES_LDM_TO_DIFF.items()}


# ----------------------------------------------------------------------------------------------- config


def _load_config(config: Mapping[str, Any] | str | os.PathLike) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise TokError(f"CODA config not found: {p}") from None


def diffusers_vae_kwargs(vae_cfg: Mapping[str, Any], latent_scale: float = 0.2325) -> dict:
    """``AutoencoderKL`` constructor kwargs for an official LDM/MAR ``Encoder``/``Decoder`` config (the ``vae``
    block of the CODA config.json). Raises :class:`TokError` for settings diffusers cannot express."""
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
    if problems:
        raise TokError("unsupported CODA VAE config: " + "; ".join(problems))
    levels = range(len(ch_mult))
    down = tuple("AttnDownEncoderBlock2D" if res // 2 ** i in enc_attn else "DownEncoderBlock2D" for i in levels)
    # diffusers up_blocks run from the lowest resolution (LDM level L-1) to the highest (level 0)
    up = tuple("AttnUpDecoderBlock2D" if res // 2 ** i in dec_attn else "UpDecoderBlock2D"
               for i in reversed(levels))
    return dict(
        in_channels=int(vae_cfg.get("in_channels", 3)), out_channels=int(vae_cfg.get("out_ch", 3)),
        down_block_types=down, up_block_types=up, block_out_channels=tuple(ch * m for m in ch_mult),
        layers_per_block=int(vae_cfg["num_res_blocks"]), act_fn="silu", latent_channels=z,
        norm_num_groups=int(vae_cfg.get("norm_num_groups", 32)), sample_size=res,
        scaling_factor=float(latent_scale), use_quant_conv=True, use_post_quant_conv=True,
        mid_block_add_attention=True,
    )


# ------------------------------------------------------------------------------------------ key mapping


def ldm_to_diffusers_module(path: str, num_levels: int) -> str:
    """Map an LDM/MAR module path (``encoder.down.0.block.0.conv1``) to the diffusers ``AutoencoderKL`` path."""
    if path in ("quant_conv", "post_quant_conv"):
        return path
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)", path)
    if m:
        return f"{m[1]}.{'conv_norm_out' if m[2] == 'norm_out' else m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)", path)
    if m:
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RES_LDM_TO_DIFF.get(m[3], m[3])}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)", path)
    if m and m[2] in _ATTN_LDM_TO_DIFF:
        return f"{m[1]}.mid_block.attentions.0.{_ATTN_LDM_TO_DIFF[m[2]]}"
    m = re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", path)
    if m:
        side, blocks = ("encoder", "down_blocks") if m[1] == "encoder.down" else ("decoder", "up_blocks")
        b = int(m[2]) if side == "encoder" else num_levels - 1 - int(m[2])
        if m[3] == "block":
            return f"{side}.{blocks}.{b}.resnets.{m[4]}.{_RES_LDM_TO_DIFF.get(m[5], m[5])}"
        if m[5] in _ATTN_LDM_TO_DIFF:
            return f"{side}.{blocks}.{b}.attentions.{m[4]}.{_ATTN_LDM_TO_DIFF[m[5]]}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv", path)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv", path)
    if m:
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv"
    raise TokError(f"unexpected key in the CODA/MAR VAE checkpoint: module {path!r} has no diffusers equivalent")


def diffusers_to_ldm_module(path: str, num_levels: int) -> str:
    """Inverse of :func:`ldm_to_diffusers_module` (diffusers ``AutoencoderKL`` path -> LDM/MAR path)."""
    if path in ("quant_conv", "post_quant_conv"):
        return path
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)", path)
    if m:
        return f"{m[1]}.{'norm_out' if m[2] == 'conv_norm_out' else m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)", path)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RES_DIFF_TO_LDM.get(m[3], m[3])}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", path)
    if m and m[2] in _ATTN_DIFF_TO_LDM:
        return f"{m[1]}.mid.attn_1.{_ATTN_DIFF_TO_LDM[m[2]]}"
    m = re.fullmatch(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        side = "encoder.down" if m[1] == "encoder" else "decoder.up"
        b = int(m[3]) if m[1] == "encoder" else num_levels - 1 - int(m[3])
        if m[4] == "resnets":
            return f"{side}.{b}.block.{m[5]}.{_RES_DIFF_TO_LDM.get(m[6], m[6])}"
        if m[6] in _ATTN_DIFF_TO_LDM:
            return f"{side}.{b}.attn.{m[5]}.{_ATTN_DIFF_TO_LDM[m[6]]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
    if m:
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv"
    raise ValueError(f"no LDM name for diffusers module {path!r}")


def ldm_to_diffusers_key(key: str, num_levels: int, lora_modules: frozenset[str] | set[str] = frozenset()) -> str:
    """Map one official state-dict key to the (peft-injected) diffusers key.

    ``lora_modules`` are the LDM paths of the LoRA-wrapped convs: their base ``weight``/``bias`` live under
    ``.base_layer`` in peft; ``<conv>.lora_layer.{down,up}.weight`` -> ``<conv>.lora_{A,B}.default.weight``.
    """
    if ".lora_layer." in key:
        conv, rest = key.split(".lora_layer.", 1)
        m = re.fullmatch(r"(down|up)\.weight", rest)
        if not m:
            raise TokError(f"unexpected LoRA key in the CODA VAE checkpoint: {key!r}")
        return f"{ldm_to_diffusers_module(conv, num_levels)}.{'lora_A' if m[1] == 'down' else 'lora_B'}.{ADAPTER}.weight"
    mod, param = key.rsplit(".", 1)
    new = ldm_to_diffusers_module(mod, num_levels)
    if mod in lora_modules:
        new += ".base_layer"
    return f"{new}.{param}"


def convert_official_vae_state_dict(sd: Mapping[str, torch.Tensor], num_levels: int,
                                    lora_modules: frozenset[str] | set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Official LDM/MAR (+ CODA LoRA) state dict -> diffusers ``AutoencoderKL`` (+ peft) state dict."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        new = ldm_to_diffusers_key(key, num_levels, lora_modules)
        if re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", new) and t.ndim == 4:
            t = t.reshape(t.shape[0], t.shape[1])  # 1x1 conv -> Linear
        if new in out:
            raise TokError(f"two checkpoint keys map to {new!r} (second: {key!r})")
        out[new] = t
    return out


def load_official_vae_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` (base VAE, flat LDM names) or a torch ``.pth``/``.ckpt`` state dict
    (``vae_ema.pth``; a ``{"model": ...}`` wrapper as in MAR's ``kl16.ckpt`` is unwrapped)."""
    p = Path(path)
    if not p.is_file():
        raise TokError(f"CODA VAE weight file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    if not isinstance(sd, Mapping):
        raise TokError(f"{p} does not hold a state dict (got {type(sd).__name__})")
    return dict(sd)


# ----------------------------------------------------------------------------------------------- model


class CodaMARVAE(nn.Module):
    """MAR KL-VAE (diffusers ``AutoencoderKL``) with optional CODA conv LoRA (peft).

    ``vae_cfg`` is the ``vae`` block of the CODA config.json. Use :meth:`from_official` to build and load the
    official files; :meth:`add_lora` injects the (zero-initialised) adapters on the official target convs.
    """

    def __init__(self, vae_cfg: Mapping[str, Any], *, latent_scale: float = 0.2325, latent_shift: float = 0.0):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae_cfg = dict(vae_cfg)
        self.num_levels = len(self.vae_cfg["ch_mult"])
        self.latent_scale = float(latent_scale)
        self.latent_shift = float(latent_shift)
        self.vae = AutoencoderKL(**diffusers_vae_kwargs(self.vae_cfg, latent_scale))
        self.lora_rank: int | None = None
        self.lora_modules: frozenset[str] = frozenset()  # LDM paths of the wrapped convs

    # ---- LoRA

    def lora_target_modules(self, module_list: Sequence[str]) -> list[str]:
        """LDM paths of the convs the official ``build_peft_from_vae`` wraps: every ``nn.Conv2d`` whose LDM
        module name contains one of ``module_list``."""
        out = []
        for name, mod in self.vae.named_modules():
            if type(mod) is nn.Conv2d:
                ldm = diffusers_to_ldm_module(name, self.num_levels)
                if any(s in ldm for s in module_list):
                    out.append(ldm)
        return out

    def add_lora(self, rank: int, module_list: Sequence[str]) -> list[str]:
        """Inject peft LoRA (``r=rank``, ``lora_alpha=rank`` -> scale 1, no bias/dropout; B zero-initialised) on
        the official targets. Returns the LDM paths of the wrapped convs."""
        from peft import LoraConfig, inject_adapter_in_model

        if self.lora_rank is not None:
            raise TokError("LoRA adapters are already injected")
        targets = self.lora_target_modules(module_list)
        if not targets:
            raise TokError(f"no conv matches the LoRA module list {list(module_list)}")
        cfg = LoraConfig(r=int(rank), lora_alpha=int(rank), lora_dropout=0.0, bias="none",
                         target_modules=[ldm_to_diffusers_module(t, self.num_levels) for t in targets])
        inject_adapter_in_model(cfg, self.vae, adapter_name=ADAPTER)
        self.lora_rank, self.lora_modules = int(rank), frozenset(targets)
        return targets

    def merge_lora(self) -> None:
        """Fuse the LoRA into the base conv weights (W' = W + up @ down); faster, equal up to float rounding."""
        from peft.tuners.lora import LoraLayer

        for mod in self.vae.modules():
            if isinstance(mod, LoraLayer) and not mod.merged:
                mod.merge(adapter_names=[ADAPTER])

    # ---- loading

    def load_official_state_dict(self, sd: Mapping[str, torch.Tensor], *, strict: bool = True):
        """Load an official (LDM-named, optionally LoRA-injected) state dict. With ``strict`` every model tensor
        must be covered and no checkpoint tensor left over; a mismatch raises :class:`TokError` naming keys."""
        conv = convert_official_vae_state_dict(sd, self.num_levels, self.lora_modules)
        mine = self.vae.state_dict()
        bad = [f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(mine[k].shape)}"
               for k, t in conv.items() if k in mine and mine[k].shape != t.shape]
        if bad:
            raise TokError(f"CODA VAE checkpoint does not match the model built from config.json: {len(bad)} "
                           f"tensor shapes differ (e.g. {bad[:3]}); check the config's 'vae' block")
        res = self.vae.load_state_dict(conv, strict=False)
        if strict and (res.missing_keys or res.unexpected_keys):
            raise TokError(f"CODA VAE checkpoint does not match the model built from config.json: "
                           f"{len(res.missing_keys)} missing (e.g. {res.missing_keys[:3]}), "
                           f"{len(res.unexpected_keys)} unexpected (e.g. {res.unexpected_keys[:3]})")
        return res

    @classmethod
    def from_official(cls, config: Mapping[str, Any] | str | os.PathLike, vae_path: str | os.PathLike | None,
                      base_path: str | os.PathLike | None = None, *, allow_non_ema: bool = False) -> "CodaMARVAE":
        """Build from the CODA config (dict, config.json, or its folder) and load the official files, as the
        official code does: ``base_path`` (flat LDM names, e.g. ``kl16.safetensors``) strictly into the plain VAE,
        then LoRA injection (``decoder_lora_rank``, ``decoder_lora_module_list``), then ``vae_path``
        (``vae_ema.pth``, base + LoRA tensors) strictly. ``vae_path=None`` gives the base VAE without LoRA
        (``base_path`` required). A ``vae_path`` whose name lacks ``ema`` (the raw ``vae.pth``) is refused
        unless ``allow_non_ema``."""
        cfg = _load_config(config)
        if "vae" not in cfg:
            raise TokError("CODA config has no 'vae' block (the VAE architecture sizes)")
        model = cls(cfg["vae"], latent_scale=cfg.get("latent_scale", 0.2325),
                    latent_shift=cfg.get("latent_shift", 0.0) or 0.0)
        if vae_path is None and base_path is None:
            raise TokError("give the base VAE file, the LoRA VAE file (vae_ema.pth), or both")
        if vae_path is not None and not allow_non_ema and "ema" not in Path(vae_path).name.lower():
            raise TokError(f"{Path(vae_path).name} looks like the raw (non-EMA) CODA VAE; the released model is "
                           f"vae_ema.pth (the raw file has the same keys but different LoRA weights). "
                           f"Pass allow_non_ema=True to load it anyway.")
        if base_path is not None:
            model.load_official_state_dict(load_official_vae_file(base_path), strict=True)
        if vae_path is not None:
            rank = cfg.get("decoder_lora_rank")
            mods = cfg.get("decoder_lora_module_list")
            if rank is None or not mods:
                raise TokError("CODA config needs decoder_lora_rank and decoder_lora_module_list for the LoRA VAE")
            sd = load_official_vae_file(vae_path)
            found = {t.shape[0] for k, t in sd.items() if k.endswith(".lora_layer.down.weight")}
            if found and found != {int(rank)}:
                raise TokError(f"{Path(vae_path).name} has LoRA rank {sorted(found)}, config says {rank}")
            model.add_lora(int(rank), mods)
            model.load_official_state_dict(sd, strict=True)
        return model.eval().requires_grad_(False)

    # ---- inference

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """``quant_conv(encoder(x))``: [B, 2*z, h, w], mean then (unclamped) log-variance. ``x`` in [-1, 1]."""
        return self.vae.quant_conv(self.vae.encoder(x))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior ``(mean, std)``; ``std = exp(0.5 * clamp(logvar, -30, 20))``."""
        mean, logvar = self.moments(x).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def scale_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_shift) * self.latent_scale

    def unscale_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.latent_scale + self.latent_shift

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic scaled latent: posterior mean * latent_scale (the quantizer's input)."""
        return self.scale_latent(self.posterior(x)[0])

    def encode_sampled(self, x: torch.Tensor, *, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """The official path: ``(mean + std * noise) * latent_scale``; ``noise`` defaults to ``randn``."""
        mean, std = self.posterior(x)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale_latent(mean + std * noise)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """``decoder(post_quant_conv(latent / latent_scale))``: raw image, roughly [-1, 1], NOT clamped."""
        return self.vae.decoder(self.vae.post_quant_conv(self.unscale_latent(latent)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
