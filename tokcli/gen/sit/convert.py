"""An official SiT release of SoftVQ-VAE (a ``PyTorchModelHubMixin`` folder: ``config.json`` + fp32
``model.safetensors``, as ``SoftVQVAE/sit-xl_softvq-*`` on the Hub) -> a tok generator folder.

    tok convert sit-xl_softvq-b-64                                   (fetches both files from the Hub / HF cache)
    tok convert FOLDER/model.safetensors --as sit-xl_softvq-b-64     (config.json beside it)
    tok convert FOLDER/model.safetensors --family sit --config FOLDER/config.json -o DIR

The architecture comes from ``config.json``; its sizes are checked against the weights (depth = the blocks counted,
``in_channels`` / ``hidden_size`` / ``input_size`` against the embedder and the position table) and against the
registry entry. The official module names are tok's, so the keys load strictly with no mapping: anything missing,
unexpected or of another shape is one error listing it, before anything is written. Keys of the config that do not
change the network are ignored and listed in the provenance (the mixin's ``license`` / ``repo_url`` / ``tags``,
``path_type``: only a constructor default, the sampler's path type is a sampling option, ``use_cfg``); a 2-D SiT
(``vae_1d`` false) or a patch size other than 1 is refused.

The folder's ``tokenizer`` block names the SoftVQ model the generator belongs to (``registry.TOKENIZERS``; its
sha256 when that tokenizer is converted on this machine), and ``sample`` holds the official README's sampling
setting (SDE, 250 steps, cfg 1.75 on t in [0, 0.7], cosine path).
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

CONVERTER = "tokcli.gen.sit.convert"
OFFICIAL_REPO = "https://github.com/Hhhhhhao/continuous_tokenizer"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
CONFIG_KEYS = ("input_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "num_classes",
               "class_dropout_prob", "qk_norm")
SIGNATURE = ("input_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes")
# config keys that must hold these values for the network tok builds
REQUIRED_VALUES = {"vae_1d": (True,), "patch_size": (1, None)}


def release_paths(source, config, files: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    src = Path(source)
    weights = src / WEIGHTS if src.is_dir() else src
    cfg = Path(config) if config else Path((files or {}).get("config") or weights.parent / CONFIG)
    if not weights.is_file():
        raise TokError(f"{src} is not a SiT release: no {WEIGHTS} in it" if src.is_dir() else
                       f"no such file: {weights}")
    if not cfg.is_file():
        raise TokError(f"{weights} has no {CONFIG} beside it (a SoftVQVAE/sit-xl_* release is config.json + "
                       f"model.safetensors; pass --config PATH)")
    return weights, cfg


def read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokError(f"cannot read {path} ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise TokError(f"{path} is not a SiT config (a JSON object is expected)")
    lacking = [k for k in SIGNATURE if k not in cfg]
    if lacking:
        raise TokError(f"{path} is not a SiT config: it lacks {', '.join(lacking)}")
    for key, ok in REQUIRED_VALUES.items():
        if cfg.get(key) not in ok:
            raise TokError(f"{path}: {key}={cfg.get(key)!r} is not supported (tok implements the 1-D SiT of the "
                           f"SoftVQ-VAE release: {key} {ok[0]!r})")
    if cfg.get("decoder_hidden_size", cfg["hidden_size"]) != cfg["hidden_size"]:
        raise TokError(f"{path}: decoder_hidden_size {cfg['decoder_hidden_size']} differs from hidden_size "
                       f"{cfg['hidden_size']} (the final layer is built from hidden_size)")
    return cfg


def read_weights(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: one line
        raise TokError(f"cannot read {path} ({' '.join(str(e).split())[:200]}): a truncated download or not a "
                       f"safetensors file") from None
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}


def _sizes_from_weights(state: Mapping[str, Any]) -> dict[str, int]:
    """What the tensors say: depth (blocks counted, 0..n-1), input_size, hidden_size, in_channels."""
    found = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if found != set(range(len(found))):
        raise TokError(f"the checkpoint's blocks.<i> indices are not 0..{len(found) - 1}: {sorted(found)[:8]}")
    out = {"depth": len(found)}
    if "x_embedder.weight" in state:
        out["hidden_size"], out["in_channels"] = (int(s) for s in state["x_embedder.weight"].shape)
    if "pos_embed" in state and state["pos_embed"].dim() == 3:
        out["input_size"] = int(state["pos_embed"].shape[1])
    return out


def model_args_from_config(cfg: Mapping[str, Any], state: Mapping[str, Any], path: Path,
                           registry: Mapping[str, Any] | None = None, name: str | None = None):
    """(model_args, ignored config keys), after checking the config against the weights and the registry entry."""
    args = {k: cfg[k] for k in CONFIG_KEYS if k in cfg and cfg[k] is not None}
    for k, v in _sizes_from_weights(state).items():
        if args.get(k) != v:
            raise TokError(f"{path} says {k}={args.get(k)!r} but the weights have {k}={v}: the config does not "
                           f"describe this checkpoint")
    for k, v in (registry or {}).items():
        if args.get(k) != v:
            raise TokError(f"the release's config.json says {k}={args.get(k)!r}, but {name or 'the registry entry'} "
                           f"has {k}={v!r}: is this the right release?")
    return args, sorted(set(cfg) - set(CONFIG_KEYS))


def tokenizer_ref(gen_name: str | None) -> dict[str, Any]:
    """The folder's ``tokenizer`` block: the SoftVQ registry name of a released generator, with the sha256 of its
    converted folder when there is one on this machine (else null: checked when it is first used)."""
    from tokcli.core.registry import local_folder, read_model_folder
    from tokcli.gen.sit.registry import TOKENIZERS

    tok = TOKENIZERS.get(gen_name or "")
    if tok is None:
        return {}
    folder = local_folder(tok)
    sha = read_model_folder(folder).sha256 if folder is not None else None
    return {"name": tok, "sha256": sha or None}


def _card(name: str, model, weights: Path, tok: Mapping[str, Any]) -> str:
    a = model.model_args
    return (f"# {name}\n\nA SiT generator of SoftVQ-VAE latents converted by `{CONVERTER}` from `{weights}` "
            f"(official code: {OFFICIAL_REPO}).\n\n- {a['depth']} blocks of {a['hidden_size']}, {a['num_heads']} "
            f"heads; {a['input_size']} latent tokens of {a['in_channels']}; {a['num_classes']} classes (null class "
            f"{a['num_classes']})\n- tokenizer: {tok.get('name') or 'not recorded (tok generate --tokenizer NAME)'}\n"
            f"- `tok generate -m {name} --class 207 -n 4 -o out/`\n")


def convert_official(source: str | os.PathLike, config: str | os.PathLike | None, dest: str | os.PathLike, *,
                     name: str | None = None, model_args: dict[str, Any] | None = None,
                     provenance: dict[str, Any] | None = None, overwrite: bool = False,
                     files: Mapping[str, Any] | None = None) -> ModelFolder:
    """``tok convert``'s converter (see the module docstring)."""
    dest = check_overwrite(dest, overwrite)
    weights, cpath = release_paths(source, config, files)
    cfg = read_config(cpath)
    state = read_weights(weights)
    args, ignored = model_args_from_config(cfg, state, cpath, model_args, name)
    from tokcli.gen.sit.model import SiT

    model = SiT.from_state(args, state, what=f"{weights.name} does not match {cpath}")
    name = name or dest.name
    model.tokenizer_ref = tokenizer_ref((provenance or {}).get("registry_name") or name)
    prov = {"source": str(weights), "source_sha256": sha256_file(weights), "source_config": str(cpath),
            "source_config_sha256": sha256_file(cpath), "converter": CONVERTER, "official_code": OFFICIAL_REPO,
            "ignored_config_keys": ignored, **(provenance or {})}
    return model.save_folder(dest, name=name, provenance=prov, card=_card(name, model, weights, model.tokenizer_ref),
                             overwrite=overwrite)
