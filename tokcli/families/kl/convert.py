"""A diffusers ``AutoencoderKL`` (a ``vae/`` folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``) ->
a tok model folder of the ``kl`` family. The latent scale/shift come from the config's ``scaling_factor`` /
``shift_factor`` (diffusers stores them but never applies them; tok does, see tokcli/nn/klvae.py).

    tok convert PATH/vae --family kl -o DIR          (PATH/vae/config.json + the safetensors weights)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokcli.core.checkpoint import ModelFolder, save_model_folder, sha256_file
from tokcli.errors import TokError

CONVERTER = "tokcli.families.kl.convert"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def find_diffusers_vae(path: str | os.PathLike) -> tuple[Path, Path]:
    """(config.json, weights) of a diffusers AutoencoderKL folder (or of its weights file)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if (folder / "vae" / "config.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / "vae"
    cfg = folder / "config.json"
    weights = p if p.is_file() else next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if not cfg.is_file() or weights is None:
        raise TokError(f"{p} is not a diffusers AutoencoderKL folder: it needs config.json and "
                       f"{WEIGHT_NAMES[0]}")
    return cfg, weights


def load_diffusers_vae(path: str | os.PathLike):
    """(vae block, latent_scale, latent_shift, state dict in float32, config path, weights path)."""
    import torch
    from safetensors.torch import load_file

    from tokcli.nn.klvae import vae_block_from_diffusers_config

    cfg_path, weights = find_diffusers_vae(path)
    try:
        dcfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokError(f"cannot read {cfg_path} ({e})") from None
    block, scale, shift = vae_block_from_diffusers_config(dcfg)
    sd = {k: v.to(torch.float32) for k, v in load_file(str(weights), device="cpu").items()}
    return block, scale, shift, sd, cfg_path, weights


def convert_diffusers(ckpt_path: str | os.PathLike, config_path: str | os.PathLike | None, dest: str | os.PathLike,
                      *, name: str | None = None, model_args: dict[str, Any] | None = None,
                      provenance: dict[str, Any] | None = None, overwrite: bool = False) -> ModelFolder:
    from tokcli.families.kl.model import FAMILY, build

    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise TokError(f"{dest} already exists (pass --overwrite to replace it)")
    block, scale, shift, sd, cfg_path, weights = load_diffusers_vae(ckpt_path)
    args = {"vae": block, "latent_scale": scale, "latent_shift": shift, **(model_args or {})}
    args.setdefault("image_size", 256)
    model = build(args)
    model.vae.load_base_state_dict(sd)
    prov = {"source": str(weights), "source_sha256": sha256_file(weights), "source_config": str(cfg_path),
            "converter": CONVERTER, **(provenance or {})}
    card = (f"# {name or dest.name}\n\nA diffusers AutoencoderKL converted by `{CONVERTER}` from `{weights}`.\n"
            f"Latents: (posterior mean - {shift}) * {scale}, {block['embed_dim']} channels, downsampling "
            f"{model.downsample}.\n")
    return save_model_folder(dest, family=FAMILY, model_args=model.model_args, tokens=model.spec.to_dict(),
                             preprocess=model.preprocess, state_dict=model.state_dict(), name=name or dest.name,
                             provenance=prov, card=card, overwrite=overwrite)
