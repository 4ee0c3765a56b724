"""A diffusers ``AutoencoderKL`` (a ``vae/`` folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``) ->
a tok model folder of the ``kl`` family. The latent scale/shift come from the config's ``scaling_factor`` /
``shift_factor`` (diffusers stores them but never applies them; tok does, see tokcli/nn/klvae.py).

    tok convert PATH/vae --family kl -o DIR          (PATH/vae/config.json + the safetensors weights)
"""

from __future__ import annotations

import os
from typing import Any

from tokcli.core.atomic import check_overwrite
from tokcli.core.checkpoint import ModelFolder, sha256_file

CONVERTER = "tokcli.families.kl.convert"


def convert_diffusers(ckpt_path: str | os.PathLike, config_path: str | os.PathLike | None, dest: str | os.PathLike,
                      *, name: str | None = None, model_args: dict[str, Any] | None = None,
                      provenance: dict[str, Any] | None = None, overwrite: bool = False) -> ModelFolder:
    from tokcli.families.kl.model import KL
    from tokcli.nn.klvae import read_diffusers_vae

    dest = check_overwrite(dest, overwrite)
    found = read_diffusers_vae(ckpt_path)
    block, scale, shift, weights = found.block, found.latent_scale, found.latent_shift, found.weights_path
    args = {"vae": block, "latent_scale": scale, "latent_shift": shift, **(model_args or {})}
    args.setdefault("image_size", 256)
    model = KL(**args)
    model.vae.load_base_state_dict(found.state_dict())
    prov = {"source": str(weights), "source_sha256": sha256_file(weights), "source_config": str(found.config_path),
            "converter": CONVERTER, **(provenance or {})}
    card = (f"# {name or dest.name}\n\nA diffusers AutoencoderKL converted by `{CONVERTER}` from `{weights}`.\n"
            f"Latents: (posterior mean - {shift}) * {scale}, {block['embed_dim']} channels, downsampling "
            f"{model.downsample}.\n")
    return model.save_folder(dest, name=name or dest.name, provenance=prov, card=card, overwrite=overwrite)
