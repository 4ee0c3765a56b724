"""CODA's continuous VAEs: a frozen KL VAE (MAR KL-16 or FLUX.1, :class:`tokcli.nn.klvae.KLVAE`) with CODA's conv
LoRA placed by the official rule, and the readers of the official checkpoint files in their two formats (``ldm``:
coda-mar's flat LDM/MAR names, mapped to diffusers here; ``diffusers``: coda-flux, names as they are). Why the
mapping and the LoRA targeting look the way they do: docs/design-notes.md, "Paper vs code".
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
from tokcli.nn.klvae import ADAPTER, KLVAE, diffusers_vae_kwargs, read_diffusers_vae

__all__ = [
    "CodaVAE",
    "checkpoint_format",
    "key_naming",
    "convert_diffusers_official_state_dict",
    "read_base_vae",
    "complete_vae_config",
    "ldm_to_diffusers_key",
    "ldm_to_diffusers_module",
    "diffusers_to_ldm_module",
    "convert_official_vae_state_dict",
    "load_official_vae_file",
]

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
        lora = "lora_A" if m[1] == "down" else "lora_B"
        return f"{ldm_to_diffusers_module(conv, num_levels)}.{lora}.{ADAPTER}.weight"
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


# ------------------------------------------------------------------------------ formats and diffusers keys

_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_CONV_LORA_PARAMS = {"down.weight": "lora_A", "up.weight": "lora_B"}


def checkpoint_format(vae_cfg: Mapping[str, Any]) -> str:
    """The official checkpoint format of a ``vae`` block: ``"ldm"`` (MAR, ``type`` ``MARAutoencoderKL`` or none --
    tok's own KL VAEs too) or ``"diffusers"`` (FLUX, ``type`` ``AutoencoderKL``). It decides the key names of the
    official files and the module names the official LoRA rule is matched against."""
    t = vae_cfg.get("type")
    if t in (None, "", "MARAutoencoderKL"):
        return "ldm"
    if t == "AutoencoderKL":
        return "diffusers"
    raise TokError(f"unknown CODA VAE type {t!r} in the config's 'vae' block (expected 'MARAutoencoderKL' for the "
                   f"MAR/LDM checkpoint format or 'AutoencoderKL' for the diffusers format of coda-flux)")


def key_naming(keys) -> str | None:
    """``"ldm"`` or ``"diffusers"`` from the key names of a VAE state dict; None when the keys do not tell."""
    keys = list(keys)
    if any(re.match(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.", k) for k in keys):
        return "diffusers"
    if any(re.match(r"(encoder\.down|decoder\.up)\.\d+\.|(encoder|decoder)\.mid\.", k) for k in keys):
        return "ldm"
    return None


def _modern_attention_key(key: str) -> str:
    """Old diffusers attention names (``query/key/value/proj_attn``) -> ``to_q/to_k/to_v/to_out.0``."""
    m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", key)
    return f"{m[1]}.{_LEGACY_ATTN[m[2]]}.{m[3]}" if m else key


def convert_diffusers_official_state_dict(sd: Mapping[str, torch.Tensor],
                                          lora_modules: frozenset[str] | set[str] = frozenset()
                                          ) -> dict[str, torch.Tensor]:
    """Official diffusers-named (coda-flux) state dict -> the peft-injected diffusers state dict.

    Base keys stay as they are, except that the ``weight``/``bias`` of a wrapped conv (``lora_modules``, diffusers
    paths) move under ``.base_layer``; ``<conv>.lora_layer.{down,up}.weight`` -> ``<conv>.lora_{A,B}.default.weight``.
    1x1-conv attention weights [C, C, 1, 1] are flattened to the Linear [C, C] diffusers uses."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if ".lora_layer." in key:
            conv, rest = key.split(".lora_layer.", 1)
            if rest not in _CONV_LORA_PARAMS:
                raise TokError(f"unexpected LoRA key in the CODA VAE checkpoint: {key!r}")
            new = f"{conv}.{_CONV_LORA_PARAMS[rest]}.{ADAPTER}.weight"
        else:
            key = _modern_attention_key(key)
            mod, param = key.rsplit(".", 1)
            new = f"{mod}.base_layer.{param}" if mod in lora_modules else key
            if re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", new) and t.ndim == 4:
                t = t.reshape(t.shape[0], t.shape[1])
        if new in out:
            raise TokError(f"two checkpoint keys map to {new!r} (second: {key!r})")
        out[new] = t
    return out


# ------------------------------------------------------------------------------------------- base VAE


def read_base_vae(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """The base VAE's tensors (float32, official key names: flat LDM or diffusers) and the weight file read.

    ``path`` is a diffusers folder (``vae/``: ``config.json`` + ``diffusion_pytorch_model.safetensors``, 16-bit
    weights are converted to float32), a weight file inside one, or a flat file (``kl16.safetensors``)."""
    p = Path(path)
    found = read_diffusers_vae(p, required=False)
    if found is not None:
        return found.state_dict(), found.weights_path
    if p.is_dir():
        raise TokError(f"{p} is a folder but not a diffusers VAE folder (config.json + "
                       f"diffusion_pytorch_model.safetensors)")
    return {k: v.float() if v.is_floating_point() else v for k, v in load_official_vae_file(p).items()}, p


def _architecture(vae_cfg: Mapping[str, Any]) -> dict:
    kw = diffusers_vae_kwargs(vae_cfg)
    return {k: v for k, v in kw.items() if k not in ("sample_size", "scaling_factor", "shift_factor")}


def complete_vae_config(cfg: Mapping[str, Any], base_path: str | os.PathLike | None) -> dict:
    """The CODA config with its ``vae`` block, ``latent_scale`` and ``latent_shift`` settled against the base VAE.

    A diffusers base folder supplies what the config leaves out (the official FLUX config has no ``vae`` block: the
    official code reads the FLUX ``vae/config.json``; the FLUX scale/shift equal its ``scaling_factor`` /
    ``shift_factor``); when the config has a block, it must describe the same architecture, else :class:`TokError`.
    Without a diffusers base the MAR defaults apply (scale 0.2325, no shift)."""
    out = dict(cfg)
    found = read_diffusers_vae(base_path, required=False) if base_path is not None else None
    if found is None:
        if "vae" not in out:
            raise TokError("CODA config has no 'vae' block (the VAE architecture sizes); for the diffusers format "
                           "(coda-flux) give the base VAE as a diffusers vae/ folder, whose config.json has them")
        if out.get("latent_scale") is None:
            out["latent_scale"] = 0.2325
        if out.get("latent_shift") is None:
            out["latent_shift"] = 0.0
        return out
    block, scale, shift, cfg_path = found.block, found.latent_scale, found.latent_shift, found.config_path
    if "vae" not in out:
        out["vae"] = block
    elif _architecture(out["vae"]) != _architecture(block):
        a, b = _architecture(out["vae"]), _architecture(block)
        diff = [f"{k}: config {a.get(k)!r} vs base {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
        raise TokError(f"the base VAE {cfg_path.parent} does not match the config's 'vae' block "
                       f"({'; '.join(diff[:3])})")
    if out.get("latent_scale") is None:
        out["latent_scale"] = scale
    if out.get("latent_shift") is None:
        out["latent_shift"] = shift
    return out


# ----------------------------------------------------------------------------------------------- model


class CodaVAE(KLVAE):
    """The CODA VAE: :class:`~tokcli.nn.klvae.KLVAE` (diffusers ``AutoencoderKL``) with CODA's conv LoRA placed by
    the official rule, and the loaders for the official checkpoint files in both formats (docs/design-notes.md,
    "Paper vs code").

    ``vae_cfg`` is the ``vae`` block of the CODA config; its ``type`` picks the format (:func:`checkpoint_format`).
    Use :meth:`from_official` to build and load the official files; :meth:`add_lora` injects the adapters on the
    official target convs. ``lora_modules`` holds their official module names (LDM paths for coda-mar, diffusers
    paths for coda-flux); ``lora_targets`` (from KLVAE) the diffusers paths.
    """

    def __init__(self, vae_cfg: Mapping[str, Any], *, latent_scale: float = 0.2325, latent_shift: float = 0.0):
        fmt = checkpoint_format(vae_cfg)
        super().__init__(vae_cfg, latent_scale=latent_scale, latent_shift=latent_shift)
        self.checkpoint_format = fmt
        self.lora_modules: frozenset[str] = frozenset()  # official module names of the wrapped convs

    # ---- official names

    def official_module(self, diffusers_path: str) -> str:
        """The official checkpoint's name for a diffusers module path."""
        if self.checkpoint_format == "diffusers":
            return diffusers_path
        return diffusers_to_ldm_module(diffusers_path, self.num_levels)

    def diffusers_module(self, official_path: str) -> str:
        """The diffusers module path for an official module name (inverse of :meth:`official_module`)."""
        if self.checkpoint_format == "diffusers":
            return official_path
        return ldm_to_diffusers_module(official_path, self.num_levels)

    # ---- LoRA

    def lora_target_modules(self, module_list: Sequence[str]) -> list[str]:
        """Official names of the convs the official builder wraps: every ``nn.Conv2d`` whose official module name
        (LDM for coda-mar, diffusers for coda-flux) contains one of ``module_list``."""
        out = []
        for name, mod in self.vae.named_modules():
            if type(mod) is nn.Conv2d and ".lora_" not in name and not name.endswith(".base_layer"):
                official = self.official_module(name)
                if any(s in official for s in module_list):
                    out.append(official)
        return out

    def add_lora(self, rank: int, module_list: Sequence[str]) -> list[str]:
        """Inject peft LoRA (scale 1, B zero-initialised) on the official targets. Returns their official names."""
        targets = self.lora_target_modules(module_list)
        if not targets:
            raise TokError(f"no conv matches the LoRA module list {list(module_list)}")
        self.inject_lora(rank, [self.diffusers_module(t) for t in targets])
        self.lora_modules = frozenset(targets)
        return targets

    # ---- sampled encode, replayable

    @staticmethod
    def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        """Standard normal noise [B, *shape[1:]], image i drawn on the CPU from its own generator seeded with
        ``seeds[i]`` (the same numbers on every device and whatever the batching)."""
        if len(seeds) != shape[0]:
            raise TokError(f"{len(seeds)} seeds for {shape[0]} images")
        if not len(seeds):
            return torch.zeros(tuple(shape))
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in gens])

    def encode_seeded(self, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """``encode_sampled`` (the official sampled encode) with each image's noise from its own seed: equal to
        ``encode_sampled(x, noise=seeded_noise(mean.shape, seeds))``, in one encoder pass."""
        mean, std = self.posterior(x)
        noise = self.seeded_noise(mean.shape, seeds).to(device=mean.device, dtype=mean.dtype)
        return self.scale_latent(mean + std * noise)

    # ---- loading

    def convert_official_state_dict(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official tensors (LDM or diffusers names, detected from the keys; the model's format when they do not
        tell) -> this model's (peft-injected diffusers) state-dict keys."""
        naming = key_naming(sd) or self.checkpoint_format
        if naming == "ldm":
            ldm_lora = {diffusers_to_ldm_module(t, self.num_levels) for t in self.lora_targets}
            return convert_official_vae_state_dict(sd, self.num_levels, ldm_lora)
        return convert_diffusers_official_state_dict(sd, set(self.lora_targets))

    def load_official_state_dict(self, sd: Mapping[str, torch.Tensor], *, strict: bool = True):
        """Load an official (optionally LoRA-injected) state dict. With ``strict`` every model tensor must be covered
        and no checkpoint tensor left over; a mismatch raises :class:`TokError` naming keys."""
        conv = self.convert_official_state_dict(sd)
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
                      base_path: str | os.PathLike | None = None, *, allow_non_ema: bool = False) -> "CodaVAE":
        """Build from the CODA config (dict, config.json, or its folder) and load the official files, as the
        official code does: the base VAE ``base_path`` (flat LDM ``kl16.safetensors``, or a diffusers ``vae/``
        folder) strictly into the plain VAE, then LoRA injection (``decoder_lora_rank``,
        ``decoder_lora_module_list``), then ``vae_path`` (``vae_ema.pth``, base + LoRA tensors) strictly.
        ``vae_path=None`` gives the base VAE without LoRA (``base_path`` required). A ``vae_path`` whose name lacks
        ``ema`` (the raw ``vae.pth``) is refused unless ``allow_non_ema``. A config without a ``vae`` block takes it
        from a diffusers base folder (:func:`complete_vae_config`)."""
        if vae_path is None and base_path is None:
            raise TokError("give the base VAE file, the LoRA VAE file (vae_ema.pth), or both")
        if vae_path is not None and not allow_non_ema and "ema" not in Path(vae_path).name.lower():
            raise TokError(f"{Path(vae_path).name} looks like the raw (non-EMA) CODA VAE; the released model is "
                           f"vae_ema.pth (the raw file has the same keys but different LoRA weights). "
                           f"Pass allow_non_ema=True to load it anyway.")
        cfg = complete_vae_config(_load_config(config), base_path)
        model = cls(cfg["vae"], latent_scale=cfg["latent_scale"], latent_shift=cfg.get("latent_shift") or 0.0)
        if base_path is not None:
            model.load_official_state_dict(read_base_vae(base_path)[0], strict=True)
        if vae_path is not None:
            rank = cfg.get("decoder_lora_rank")
            mods = cfg.get("decoder_lora_module_list")
            if rank is None or not mods:
                raise TokError("CODA config needs decoder_lora_rank and decoder_lora_module_list for the LoRA VAE")
            sd = load_official_vae_file(vae_path)
            naming = key_naming(sd)
            if naming is not None and naming != model.checkpoint_format:
                raise TokError(f"{Path(vae_path).name} has {naming} key names, but the config's VAE type "
                               f"{cfg['vae'].get('type')!r} means the {model.checkpoint_format} format "
                               f"({'coda-flux' if naming == 'diffusers' else 'coda-mar'} files need "
                               f"{'type AutoencoderKL' if naming == 'diffusers' else 'type MARAutoencoderKL'})")
            found = {t.shape[0] for k, t in sd.items() if k.endswith(".lora_layer.down.weight")}
            if found and found != {int(rank)}:
                raise TokError(f"{Path(vae_path).name} has LoRA rank {sorted(found)}, config says {rank}")
            model.add_lora(int(rank), mods)
            model.load_official_state_dict(sd, strict=True)
        return model.eval().requires_grad_(False)
