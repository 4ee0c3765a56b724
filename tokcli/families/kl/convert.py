"""A diffusers ``AutoencoderKL`` (a ``vae/`` folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``) ->
a tok model folder of the ``kl`` family. The latent scale/shift come from the config's ``scaling_factor`` /
``shift_factor`` (diffusers stores them but never applies them; tok does, see tokcli/nn/klvae.py).

    tok convert PATH/vae --family kl -o DIR          (PATH/vae/config.json + the safetensors weights)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokcli.core.checkpoint import ModelFolder, save_model_folder, sha256_file
from tokcli.errors import TokError

CONVERTER = "tokcli.families.kl.convert"
def convert_diffusers(ckpt_path: str | os.PathLike, config_path: str | os.PathLike | None, dest: str | os.PathLike,
                      *, name: str | None = None, model_args: dict[str, Any] | None = None,
                      provenance: dict[str, Any] | None = None, overwrite: bool = False) -> ModelFolder:
    from tokcli.families.kl.model import FAMILY, build

    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise TokError(f"{dest} already exists (pass --overwrite to replace it)")
    from tokcli.nn.klvae import load_diffusers_vae

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
