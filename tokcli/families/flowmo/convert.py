"""An official FlowMo checkpoint (``flowmo_lo.pth`` / ``flowmo_hi.pth``: a ``torch.save`` dict with
``model_ema_state_dict``) plus its OmegaConf ``config.yaml`` -> a tok model folder.

    tok convert flowmo-lo                                   (fetches flowmo_lo.pth from the Hub / HF cache)
    tok convert PATH/flowmo_lo.pth --as flowmo-lo [--config config.yaml]
    tok convert PATH/model.pth --family flowmo --config PATH/config.yaml -o DIR

The file is read with ``torch.load(weights_only=True)`` and only the EMA weights are used (what the official
evaluator and notebook load). Layer sizes come from the state dict, never from ``mup_width`` (the parity fixture's
README explains why): hidden = ``img_in.weight`` rows, head_dim = the QK-norm scale's length, heads = hidden /
head_dim, depth = the number of ``double_blocks.N``. The config (or the registry entry) gives what the weights
cannot: image size, patch size, code length, ``context_dim``, the LFQ group size and the sampler defaults
(``eval.sampling`` -> the folder's ``decode``). A config that contradicts the weights (``context_dim``, patch size,
depths) is refused with one line, before anything is written; the folder is written atomically.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any, Mapping

from tokcli.core.atomic import check_overwrite
from tokcli.core.checkpoint import ModelFolder, sha256_file
from tokcli.errors import TokError

CONVERTER = "tokcli.families.flowmo.convert"
OFFICIAL_REPO = "https://github.com/kylesargent/FlowMo"
STATE_KEY = "model_ema_state_dict"
# official config.yaml model.* keys -> model_args of the same name (image_size comes from data.image_size)
CONFIG_KEYS = ("patch_size", "code_length", "context_dim", "codebook_size_for_entropy")
DROPPED = ("encoder.quantizer.", "decoder.quantizer.", "quantizer.")  # non-persistent LFQ buffers, if ever saved


def _one_line(e: BaseException) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:200]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The EMA state dict of an official ``.pth`` (weights_only), or one line saying why not."""
    import torch

    if not path.is_file():
        raise TokError(f"no such file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped: try once more
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated, not a torch file, or pickled code: one line
            raise TokError(f"cannot read {path} as a PyTorch checkpoint ({_one_line(e)})") from None
    if not isinstance(obj, dict) or STATE_KEY not in obj:
        keys = ", ".join(sorted(map(str, obj))[:6]) if isinstance(obj, dict) else type(obj).__name__
        raise TokError(f"{path} has no {STATE_KEY} (found: {keys or 'nothing'}): not an official FlowMo checkpoint")
    state = obj[STATE_KEY]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TokError(f"{path}: {STATE_KEY} is not a dict of tensors")
    return {k: v for k, v in state.items() if not k.startswith(DROPPED)}


def read_config(path: Path) -> dict[str, Any]:
    """The official (OmegaConf-saved, plain YAML) config as a dict with ``model``, ``data`` and ``eval`` blocks."""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise TokError(f"cannot read {path} as YAML ({_one_line(e)})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise TokError(f"{path} has no 'model' block: not an official FlowMo config.yaml")
    qt = cfg["model"].get("quantization_type", "lfq")
    if qt != "lfq":
        raise TokError(f"{path}: model.quantization_type={qt!r} is not supported (tok implements the released "
                       f"FlowMo: lfq)")
    return cfg


def args_from_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(model_args, decode defaults, depths the config claims) from an official config."""
    m = cfg["model"]
    args = {k: m[k] for k in CONFIG_KEYS if m.get(k) is not None}
    size = (cfg.get("data") or {}).get("image_size")
    if size is not None:
        args["image_size"] = size
    if "enable_mup" in m:
        args["mup_attention"] = bool(m["enable_mup"])
    s = ((cfg.get("eval") or {}).get("sampling")) or {}
    if s.get("mode", "rf") != "rf":
        raise TokError(f"eval.sampling.mode={s['mode']!r} is not supported (tok samples the rf ODE)")
    decode: dict[str, Any] = {}
    for ours, theirs in (("steps", "sample_steps"), ("cfg", "cfg"), ("schedule", "schedule")):
        if s.get(theirs) is not None:
            decode[ours] = s[theirs]
    if "cfg_interval" in s:
        iv = s["cfg_interval"]
        try:
            decode["cfg_interval"] = None if iv is None else [float(x) for x in
                                                              (ast.literal_eval(iv) if isinstance(iv, str) else iv)]
        except (ValueError, SyntaxError, TypeError):
            raise TokError(f"eval.sampling.cfg_interval={iv!r} is not an interval (lo, hi)") from None
    depths = {k: m[k] for k in ("enc_depth", "dec_depth") if m.get(k) is not None}
    return args, decode, depths


def tower_sizes(state: Mapping[str, Any], tower: str) -> dict[str, int]:
    """hidden, heads, depth and input widths of one tower, read from the state dict."""
    def shape(key: str):
        t = state.get(f"{tower}.{key}")
        if t is None:
            raise TokError(f"the checkpoint has no {tower}.{key}: not a FlowMo checkpoint")
        return tuple(t.shape)

    hidden, img_in = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    pat = re.compile(re.escape(tower) + r"\.double_blocks\.(\d+)\.")
    found = {int(mm.group(1)) for k in state if (mm := pat.match(k))}
    if found != set(range(len(found))):
        raise TokError(f"the checkpoint's {tower}.double_blocks indices are not 0..{len(found) - 1}")
    if hidden % head_dim:
        raise TokError(f"{tower}: hidden size {hidden} is not a multiple of the head size {head_dim}")
    return {"hidden": hidden, "heads": hidden // head_dim, "depth": len(found), "img_in": img_in,
            "txt_in": shape("txt_in.weight")[1], "txt_out": shape("final_layer_txt.linear.weight")[0]}


def check_against_weights(args: Mapping[str, Any], enc: Mapping[str, int], dec: Mapping[str, int],
                          depths: Mapping[str, Any], what: str) -> None:
    """One line when the config (``what``) contradicts the weights."""
    c, p = args["context_dim"], args["patch_size"]
    checks = [
        (enc["txt_in"] == c, f"model.context_dim={c}, but encoder.txt_in takes {enc['txt_in']} channels"),
        (enc["txt_out"] == c, f"model.context_dim={c}, but encoder.final_layer_txt gives {enc['txt_out']}"),
        (dec["txt_in"] == c + 1, f"model.context_dim={c}, but decoder.txt_in takes {dec['txt_in']} channels "
                                 f"(context_dim + 1 expected)"),
        (enc["img_in"] == dec["img_in"] == 3 * p * p, f"model.patch_size={p}, but img_in takes "
                                                      f"{enc['img_in']} / {dec['img_in']} features (3 p^2)"),
        (depths.get("enc_depth", enc["depth"]) == enc["depth"],
         f"model.enc_depth={depths.get('enc_depth')}, but the encoder has {enc['depth']} blocks"),
        (depths.get("dec_depth", dec["depth"]) == dec["depth"],
         f"model.dec_depth={depths.get('dec_depth')}, but the decoder has {dec['depth']} blocks"),
    ]
    bad = [msg for ok, msg in checks if not ok]
    if bad:
        raise TokError(f"{what} does not match the checkpoint's weights: {bad[0]}")


def model_args_for(state, cfg, registry: Mapping[str, Any] | None, name: str | None, what: str):
    """(model_args, decode defaults): the config's / registry's values, the sizes from the weights."""
    from tokcli.families.flowmo.model import DECODE_DEFAULTS

    args, decode, depths = args_from_config(cfg) if cfg is not None else ({}, {}, {})
    for k, v in (registry or {}).items():
        if k in args and args[k] != v:
            raise TokError(f"{what} says {k}={args[k]!r}, but {name or 'the registry entry'} has {k}={v!r}: is "
                           f"this the right release?")
        args[k] = v
    missing = [k for k in ("context_dim", "codebook_size_for_entropy") if k not in args]
    if missing:
        raise TokError(f"{what} lacks model.{', model.'.join(missing)}")
    enc, dec = tower_sizes(state, "encoder"), tower_sizes(state, "decoder")
    args.setdefault("patch_size", 4)
    check_against_weights(args, enc, dec, depths, what)
    for side, t in (("enc", enc), ("dec", dec)):
        args.update({f"{side}_hidden_size": t["hidden"], f"{side}_num_heads": t["heads"], f"{side}_depth": t["depth"]})
    return args, {**DECODE_DEFAULTS, **decode}


def _card(name: str, model, path: Path) -> str:
    a, q = model.model_args, model.quantizer
    return (f"# {name}\n\nA FlowMo tokenizer converted by `{CONVERTER}` from `{path}` (EMA weights; official "
            f"code: {OFFICIAL_REPO}, Apache-2.0).\n\n"
            f"- encoder: MMDiT {a['enc_hidden_size']} wide x {a['enc_depth']} blocks; decoder: "
            f"{a['dec_hidden_size']} wide x {a['dec_depth']} blocks (rectified flow), patch {a['patch_size']}\n"
            f"- {a['image_size']} px -> {a['code_length']} x {a['context_dim']} sign bits = "
            f"{a['code_length'] * a['context_dim']} bits per image, stored as {model.num_tokens} ids of {q.fg} bits\n"
            f"- decoder defaults (config.json `decode`): {model.decode_defaults}\n")


def convert_official(source: str | os.PathLike, config: str | os.PathLike | None, dest: str | os.PathLike, *,
                     name: str | None = None, model_args: dict[str, Any] | None = None,
                     provenance: dict[str, Any] | None = None, overwrite: bool = False,
                     files: Mapping[str, Any] | None = None) -> ModelFolder:
    """``tok convert``'s converter (see the module docstring). ``model_args``: a registry entry's (checked against
    the config when one is given). ``files``: role -> path from the Hub (``config``, when the release has one)."""
    dest = check_overwrite(dest, overwrite)
    path = Path(source)
    cpath = Path(config) if config else (Path(files["config"]) if files and files.get("config") else None)
    if cpath is None and not model_args:
        raise TokError("converting a FlowMo checkpoint needs its official config.yaml (--config) or --as NAME")
    cfg = read_config(cpath) if cpath is not None else None
    state = read_checkpoint(path)
    what = str(cpath) if cpath is not None else f"the registry entry {name}"
    args, decode = model_args_for(state, cfg, model_args, name, what)
    from tokcli.families.flowmo.model import FlowMo

    model = FlowMo.from_state(args, {k: v.float() for k, v in state.items()},
                              what=f"{path.name} does not fit the FlowMo model its config describes")
    model.decode_defaults = decode
    prov = {"source": str(path), "source_sha256": sha256_file(path), "converter": CONVERTER,
            "official_code": OFFICIAL_REPO, "weights": STATE_KEY, **(provenance or {})}
    if cpath is not None:
        prov.update(source_config=str(cpath), source_config_sha256=sha256_file(cpath))
    name = name or Path(dest).name
    return model.save_folder(dest, name=name, provenance=prov, card=_card(name, model, path), overwrite=overwrite)
