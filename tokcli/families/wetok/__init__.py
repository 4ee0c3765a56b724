"""WeTok family: group-wise lookup-free quantization + MAGVIT-2 CNN, optional generative decoder.

    build(model_args) -> WeTok
    convert_checkpoint(ckpt_path, config_path, dest, ...) -> ModelFolder   (official Lightning .ckpt -> model folder)

Attributes are imported lazily so that reading the registry (`tok models`) does not import torch.
"""

from tokcli.families import lazy_attributes

FAMILY = "wetok"

_LAZY = {
    "WeTok": "model", "build": "model", "normalize_model_args": "model", "official_model_args": "model",
    "DEFAULT_ARGS": "model", "convert_official": "convert", "convert_checkpoint": "convert",
}

__all__ = ["FAMILY", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY, {"convert_checkpoint": "convert_official"})
