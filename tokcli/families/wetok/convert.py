"""Official WeTok Lightning checkpoint (+ inference YAML) -> tok model folder.

The official ``WeTok.ckpt`` is ``{"state_dict": sd, ...}`` where ``sd`` holds the raw ``encoder.*`` / ``decoder.*``
weights, the training loss (``loss.*``: LPIPS, discriminator) and the EMA shadows ``model_ema.<name without
dots>``. The official inference path decodes with the EMA shadows, so for every parameter P of our model we take
``model_ema.`` + P without dots when present, else the raw ``P`` (stage-2 generative-decoder files have no
encoder shadows: the official ``--stage2`` evaluation then uses the raw encoder). Everything else is dropped.
Hyper-parameters come from the YAML's ``model.init_args`` or from explicit ``model_args``; whether the decoder
is generative is read from the shape of ``decoder.conv_in.weight`` (2 z input channels), not from the YAML.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokcli.core.atomic import check_overwrite
from tokcli.core.checkpoint import ModelFolder, sha256_file
from tokcli.errors import TokError
from tokcli.families.wetok.model import WeTok, normalize_model_args, official_model_args

CONVERTER = "tokcli.families.wetok.convert"
OFFICIAL_REPO = "https://github.com/zhuangshaobin/WeTok"
EMA_PREFIX = "model_ema."


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:300]


def load_official_state_dict(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """Read the ``state_dict`` of an official Lightning checkpoint (weights_only, memory-mapped when possible).
    A bare state dict (a flat dict of tensors with ``encoder.*`` keys) is accepted too."""
    import torch

    p = Path(ckpt_path)
    if not p.exists():
        raise TokError(f"checkpoint {p} does not exist")
    if not p.is_file():
        raise TokError(f"checkpoint {p} is not a file")
    obj = None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # legacy (non-zip) files cannot be memory-mapped
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TokError(f"cannot read {p} as a PyTorch checkpoint ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise TokError(f"{p} is not a Lightning checkpoint (it holds a {type(obj).__name__}, not a dict)")
    if "state_dict" in obj:
        sd = obj["state_dict"]
        if not isinstance(sd, dict):
            raise TokError(f"{p}: 'state_dict' is a {type(sd).__name__}, not a dict of tensors")
    elif any(isinstance(k, str) and k.startswith("encoder.") for k in obj):
        sd = obj
    else:
        keys = ", ".join(sorted(map(str, obj))[:5]) or "none"
        raise TokError(f"{p} is not a Lightning checkpoint: no 'state_dict' entry (top-level keys: {keys})")
    return sd


def read_official_config(config_path: str | os.PathLike) -> dict[str, Any]:
    """The ``model.init_args`` block of an official (LightningCLI) YAML; taming-style ``model.params`` too."""
    import yaml

    p = Path(config_path)
    if not p.is_file():
        raise TokError(f"config {p} does not exist")
    try:
        text = p.read_bytes().decode("utf-8-sig").replace("\r\n", "\n")
        cfg = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise TokError(f"cannot parse {p} as YAML ({_one_line(e)})") from None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict):
        raise TokError(f"{p} has no 'model' block: not an official WeTok config")
    init = model.get("init_args", model.get("params"))
    if not isinstance(init, dict):
        raise TokError(f"{p} has no model.init_args block: not an official WeTok config")
    return init


def pick_weights(model, sd: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
    """For every state_dict entry P of ``model``: ``sd["model_ema." + P without dots]`` if present, else
    ``sd[P]``. Returns (state_dict, n_from_ema, n_raw). Raises TokError naming a missing / mis-shaped tensor."""
    import torch

    target = model.state_dict()
    stripped: dict[str, str] = {}
    for name in target:
        key = EMA_PREFIX + name.replace(".", "")
        if key in stripped:  # cannot happen for official layouts (< 10 blocks per level)
            raise TokError(f"EMA names of {stripped[key]} and {name} collide ({key})")
        stripped[key] = name
    out, n_ema, n_raw = {}, 0, 0
    for ema_key, name in stripped.items():
        if ema_key in sd:
            t, n_ema = sd[ema_key], n_ema + 1
        elif name in sd:
            t, n_raw = sd[name], n_raw + 1
        else:
            raise TokError(f"the checkpoint has no tensor for {name} (neither {ema_key} nor {name}): "
                           "it does not match the WeTok architecture in the config")
        if not isinstance(t, torch.Tensor):
            raise TokError(f"checkpoint entry for {name} is a {type(t).__name__}, not a tensor")
        want = target[name]
        if tuple(t.shape) != tuple(want.shape):
            raise TokError(f"tensor {name} has shape {tuple(t.shape)} in the checkpoint but the model built from "
                           f"the config expects {tuple(want.shape)}")
        out[name] = t.to(dtype=want.dtype)
    return out, n_ema, n_raw


def _conv_in_shape(sd: dict[str, Any]):
    for key in (EMA_PREFIX + "decoderconv_inweight", "decoder.conv_in.weight"):
        t = sd.get(key)
        if t is not None and hasattr(t, "shape"):
            return tuple(t.shape)
    raise TokError("the checkpoint has no decoder.conv_in.weight: not a WeTok checkpoint")


def convert_official(ckpt_path: str | os.PathLike, config_path: str | os.PathLike | None, dest: str | os.PathLike,
                     *, name: str | None = None, model_args: dict[str, Any] | None = None,
                     provenance: dict[str, Any] | None = None, overwrite: bool = False) -> ModelFolder:
    """Convert an official WeTok ``.ckpt`` into a model folder at ``dest`` and return it.

    ckpt_path: the Lightning checkpoint. config_path: its official inference YAML (model.init_args), or None when
    ``model_args`` (wetok model_args, e.g. from the registry) are given; model_args win over the YAML.
    provenance: extra fields merged into config.json's provenance (e.g. the download URL as ``source``).
    """
    dest = check_overwrite(dest, overwrite)
    if model_args is not None:
        args = normalize_model_args(dict(model_args))
        config_gd = args["generative_decoder"]
    elif config_path is not None:
        init = read_official_config(config_path)
        args = official_model_args(init)
        config_gd = args["generative_decoder"]
    else:
        raise TokError("converting a WeTok checkpoint needs its official config YAML or explicit model_args")

    sd = load_official_state_dict(ckpt_path)
    z = args["z_channels"]
    cin = _conv_in_shape(sd)
    if len(cin) != 4 or cin[1] not in (z, 2 * z):
        raise TokError(f"decoder.conv_in.weight has shape {cin}: expected {z} (plain) or {2 * z} (generative "
                       f"decoder) input channels for z_channels={z}")
    gd = cin[1] == 2 * z
    notes = []
    if gd != config_gd:
        notes.append(f"the config says generative_decoder={config_gd} but decoder.conv_in.weight {cin} says {gd}; "
                     "the weight shape was used")
    args["generative_decoder"] = gd

    model = WeTok(**args)
    weights, n_ema, n_raw = pick_weights(model, sd)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # pragma: no cover - pick_weights already checked names and shapes
        raise TokError(f"the checkpoint does not fit the WeTok model: {_one_line(e)}") from None
    dropped = len(sd) - n_ema - n_raw  # raw copies of EMA'd tensors, loss.*, model_ema.loss*, EMA bookkeeping

    src = Path(ckpt_path)
    prov: dict[str, Any] = {
        "source": str(src),
        "source_sha256": sha256_file(src),
        "source_config": str(config_path) if config_path is not None else None,
        "converter": CONVERTER,
        "official_repo": OFFICIAL_REPO,
        "weights": "EMA shadows (model_ema.*) where present, else raw tensors, as the official inference path",
        "ema_tensors": n_ema,
        "raw_tensors": n_raw,
        "dropped_tensors": dropped,
        "generative_decoder_from": "decoder.conv_in.weight shape",
        "license": "apache-2.0",
    }
    if notes:
        prov["notes"] = notes
    prov.update(provenance or {})
    spec = model.spec
    q = model.quantize
    card = (
        f"# {name or dest.name}\n\n"
        f"WeTok image tokenizer converted from an official checkpoint of [{OFFICIAL_REPO}]({OFFICIAL_REPO}) "
        f"(Apache-2.0) by `{CONVERTER}`.\n\n"
        f"- source: `{prov['source']}` (sha256 `{prov['source_sha256']}`)\n"
        f"- weights: {n_ema} EMA tensors, {n_raw} raw tensors (the training loss, discriminator and LPIPS "
        f"tensors were dropped)\n"
        f"- architecture: ch {args['ch']}, ch_mult {args['ch_mult']}, {args['num_res_blocks']} res blocks, "
        f"z {z} = {q.groups} groups x {q.bits_per_group} bits, downsample {model.downsample}"
        f"{', generative decoder (noise input, seed in config.json decode.seed)' if gd else ''}\n"
        f"- tokens at {args['image_size']}x{args['image_size']}: {spec.shape} indices in [0, {q.codebook_size})\n"
        f"- layout: {spec.layout}\n\n"
        f"Paper: WeTok: Powerful Discrete Tokenization for High-Fidelity Visual Reconstruction (arXiv 2508.05599).\n"
        f"Load it with `tokcli.load(\"local-dir:PATH\")`.\n"
    )
    model.decode_defaults = {"seed": 0} if gd else {}
    return model.save_folder(dest, name=name, provenance=prov, card=card, overwrite=overwrite)
