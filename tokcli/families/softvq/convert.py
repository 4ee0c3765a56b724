"""An official SoftVQ-VAE release (a ``PyTorchModelHubMixin`` folder: ``config.json`` + fp32 ``model.safetensors``,
as ``SoftVQVAE/<name>`` on the Hub) -> a tok model folder.

    tok convert softvq-l-64                                          (fetches both files from the Hub / HF cache)
    tok convert FOLDER/model.safetensors --as softvq-l-64            (config.json beside it)
    tok convert FOLDER/model.safetensors --family softvq --config FOLDER/config.json -o DIR

The architecture comes from ``config.json`` (never from the repo name): the timm names give each ViT's width and
heads, the checkpoint gives its depth (the blocks are counted: ``encoder.model.blocks.<i>.``), the other sizes are
the config's. Config keys that do not change the inference model (loss weights, REPA, CNN leftovers such as
``encoder_ch_mult``, ``repa_layer_indices``) are ignored and listed in the provenance; keys that would change it in
ways tok does not implement (a non-ViT encoder, LoRA, RoPE) are refused.

Keys are the official names, loaded strictly, with one mapping and one allow-list:

- ``decoder.to_pixel.model.{weight,bias}`` -> ``decoder.to_pixel.{weight,bias}`` (the pixel head is a plain Linear);
- dropped: ``decoder.model.patch_embed.*`` (unused; absent from the release code's checkpoints, present in HEAD's),
  ``quantize.codebook_used`` (the official usage-statistics buffer, broken and without effect), ``repa_model.*`` and
  ``projection.*`` (the training-only alignment teacher and projector).

Anything else missing, unexpected or of another shape is one error listing it, before anything is written; the
model folder itself is written atomically (``TokModel.save_folder``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from tokcli.core.atomic import check_overwrite
from tokcli.core.checkpoint import ModelFolder, sha256_file
from tokcli.errors import TokError

CONVERTER = "tokcli.families.softvq.convert"
OFFICIAL_REPO = "https://github.com/Hhhhhhao/continuous_tokenizer"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
# official config.json keys -> the model_args of the same name
CONFIG_KEYS = ("encoder_model", "decoder_model", "image_size", "enc_patch_size", "dec_patch_size",
               "num_latent_tokens", "codebook_embed_dim", "codebook_size", "num_codebooks", "tau",
               "codebook_l2_norm", "vq_mean", "vq_std")
SIGNATURE = ("encoder_model", "decoder_model", "num_latent_tokens", "codebook_embed_dim", "codebook_size", "tau")
# config values that describe a model tok does not implement: key -> the accepted values
SUPPORTED_VALUES = {"enc_type": ("vit",), "dec_type": ("vit",), "enc_tuning_method": ("full", "frozen"),
                    "dec_tuning_method": ("full", "frozen"), "to_pixel": ("linear",), "use_rope": (False, None),
                    "rope_mixed": (False, None)}
RENAMES = (("decoder.to_pixel.model.", "decoder.to_pixel."),)
DROPPED = ("decoder.model.patch_embed.", "quantize.codebook_used", "repa_model.", "projection.")


def release_paths(source: str | os.PathLike, config: str | os.PathLike | None,
                  files: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """(weights, config.json) of a release given as its folder or its ``model.safetensors`` (config beside it,
    unless given)."""
    src = Path(source)
    weights = src / WEIGHTS if src.is_dir() else src
    cfg = Path(config) if config else Path((files or {}).get("config") or weights.parent / CONFIG)
    if not weights.is_file():
        raise TokError(f"{src} is not a SoftVQ-VAE release: no {WEIGHTS} in it" if src.is_dir() else
                       f"no such file: {weights}")
    if not cfg.is_file():
        raise TokError(f"{weights} has no {CONFIG} beside it (a SoftVQVAE/* release is config.json + "
                       f"model.safetensors; pass --config PATH)")
    return weights, cfg


def read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokError(f"cannot read {path} ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise TokError(f"{path} is not a SoftVQ-VAE config (a JSON object is expected)")
    lacking = [k for k in SIGNATURE if k not in cfg]
    if lacking:
        raise TokError(f"{path} is not a SoftVQ-VAE config: it lacks {', '.join(lacking)} (a SoftVQVAE/* "
                       f"config.json has {', '.join(SIGNATURE)})")
    for key, ok in SUPPORTED_VALUES.items():
        if key in cfg and cfg[key] not in ok:
            raise TokError(f"{path}: {key}={cfg[key]!r} is not supported (tok implements the released SoftVQ-VAE: "
                           f"{key} in {[v for v in ok if v is not None]})")
    return cfg


def read_weights(path: Path) -> dict:
    """All tensors of a safetensors file as float32 CPU tensors, or one line saying why they cannot be read."""
    import torch
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError (truncated, not safetensors), OSError: one line
        raise TokError(f"cannot read {path} ({' '.join(str(e).split())[:200]}): a truncated download or not a "
                       f"safetensors file") from None
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}


def block_count(keys, prefix: str) -> int:
    """Number of transformer blocks ``<prefix><i>.`` in the checkpoint (indices must run 0..n-1)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    if not found:
        raise TokError(f"the checkpoint has no {prefix}<i> tensors: not a SoftVQ-VAE checkpoint")
    if found != set(range(len(found))):
        raise TokError(f"the checkpoint's {prefix}<i> indices are not 0..{len(found) - 1}: {sorted(found)[:8]}")
    return len(found)


def model_args_from_config(cfg: Mapping[str, Any], keys, registry: Mapping[str, Any] | None = None,
                           name: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """(model_args, ignored config keys): the config's sizes, the checkpoint's depths, and the registry entry's
    arguments, which must agree with the config where both give a value."""
    args = {k: cfg[k] for k in CONFIG_KEYS if k in cfg and cfg[k] is not None}
    args["encoder_depth"] = block_count(keys, "encoder.model.blocks.")
    args["decoder_depth"] = block_count(keys, "decoder.model.blocks.")
    for k, v in (registry or {}).items():
        if k in args and args[k] != v:
            raise TokError(f"the release's config.json says {k}={args[k]!r}, but {name or 'the registry entry'} "
                           f"has {k}={v!r}: is this the right release?")
        args[k] = v
    ignored = sorted(set(cfg) - set(CONFIG_KEYS))
    return args, ignored


def map_official(state: Mapping[str, Any]) -> dict[str, Any]:
    """Official key names -> tok's (see the module docstring); allow-listed tensors dropped."""
    out = {}
    for k, v in state.items():
        if k.startswith(DROPPED):
            continue
        for old, new in RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out


def _card(name: str, model, weights: Path) -> str:
    a = model.model_args
    return (f"# {name}\n\nA SoftVQ-VAE release converted by `{CONVERTER}` from `{weights}` (official code: "
            f"{OFFICIAL_REPO}).\n\n- encoder: {a['encoder_model']} x {a['encoder_depth']} blocks, patch "
            f"{a['enc_patch_size']}; decoder: {a['decoder_model']} x {a['decoder_depth']} blocks\n"
            f"- {a['image_size']} px -> {a['num_latent_tokens']} tokens of {a['codebook_embed_dim']} floats (soft "
            f"mix of {a['num_codebooks']} codebooks of {a['codebook_size']}, tau {a['tau']})\n"
            f"- latent statistics for generators: vq_mean {a['vq_mean']}, vq_std {a['vq_std']}\n")


def convert_official(source: str | os.PathLike, config: str | os.PathLike | None, dest: str | os.PathLike, *,
                     name: str | None = None, model_args: dict[str, Any] | None = None,
                     provenance: dict[str, Any] | None = None, overwrite: bool = False,
                     files: Mapping[str, Any] | None = None) -> ModelFolder:
    """``tok convert``'s converter (see the module docstring). ``model_args``: a registry entry's (checked against
    the config; tok-only keys such as ``normalize_latents`` apply). ``files``: role -> path from the Hub
    (``config``)."""
    dest = check_overwrite(dest, overwrite)
    weights, cpath = release_paths(source, config, files)
    cfg = read_config(cpath)
    state = read_weights(weights)
    args, ignored = model_args_from_config(cfg, state.keys(), model_args, name)
    from tokcli.families.softvq.model import SoftVQ

    model = SoftVQ.from_state(args, map_official(state), what=f"{weights.name} does not match {cpath}")
    dropped = sorted({p for k in state for p in DROPPED if k.startswith(p)})
    prov = {"source": str(weights), "source_sha256": sha256_file(weights), "source_config": str(cpath),
            "source_config_sha256": sha256_file(cpath), "converter": CONVERTER, "official_code": OFFICIAL_REPO,
            "ignored_config_keys": ignored, "dropped_tensors": dropped, **(provenance or {})}
    name = name or dest.name
    return model.save_folder(dest, name=name, provenance=prov, card=_card(name, model, weights), overwrite=overwrite)
