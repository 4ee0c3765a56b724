"""WeTok family: group-wise lookup-free quantization + MAGVIT-2 CNN, optional generative decoder.

    build(model_args) -> WeTok
    convert(ckpt_path, config_path, dest, ...) -> ModelFolder   (official Lightning .ckpt -> model folder)
"""

from tokcli.families.wetok.convert import convert_official
from tokcli.families.wetok.model import DEFAULT_ARGS, FAMILY, WeTok, build, normalize_model_args, official_model_args

convert = convert_official

__all__ = ["FAMILY", "WeTok", "build", "convert", "convert_official", "official_model_args", "normalize_model_args",
           "DEFAULT_ARGS"]
