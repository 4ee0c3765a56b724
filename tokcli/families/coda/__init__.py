"""CODA family (LeapLabTHU/CODA): a frozen continuous KL-VAE with conv LoRA adapters, followed by the
multi-scale attention quantizer (:mod:`tokcli.quant.msrq`).

    build(model_args) -> Coda                                   (model.py)
    init_model(model_args, kl_folder) -> Coda                   (model.py: tok train on a trained KL VAE)
    convert_checkpoint(vae_ema_path, config_path, dest, ...) -> ModelFolder (convert.py: official files -> model folder)

- :mod:`tokcli.families.coda.vae`: the CODA-MAR KL-VAE (diffusers ``AutoencoderKL`` + peft LoRA) and the loader
  for the official checkpoint files (``kl16.safetensors``-style base weights + ``vae_ema.pth``).

Attributes are imported lazily so that reading the registry (`tok models`) does not import torch.
"""

from tokcli.families import lazy_attributes

FAMILY = "coda"

_LAZY = {"Coda": "model", "build": "model", "init_model": "model", "normalize_model_args": "model",
         "convert_official": "convert", "convert_checkpoint": "convert"}

__all__ = ["FAMILY", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY, {"convert_checkpoint": "convert_official"})
