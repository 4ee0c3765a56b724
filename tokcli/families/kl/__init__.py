"""KL family: a continuous KL autoencoder (diffusers ``AutoencoderKL``) used as a tokenizer of float latents, and as
the frozen base that CODA adapts (:mod:`tokcli.nn.klvae`).

    build(model_args) -> KL                                   (model.py)
    convert_checkpoint(path, dest, ...) -> ModelFolder        (convert.py: a diffusers ``vae/`` folder)

Attributes are imported lazily so that reading the registry (`tok models`) does not import torch.
"""

from tokcli.families import lazy_attributes

FAMILY = "kl"

_LAZY = {"KL": "model", "build": "model", "normalize_model_args": "model", "convert_diffusers": "convert",
         "convert_checkpoint": "convert"}

__all__ = ["FAMILY", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY, {"convert_checkpoint": "convert_diffusers"})
