"""An official WeTok AR checkpoint (the Lightning ``.ckpt`` of ``Net2NetTransformer`` + its GenStage ``config.yaml``)
-> a tok generator folder, with the frozen first stage it carries -> a WeTok tokenizer folder.

    tok convert WeTok_AR.ckpt --family wetok_ar --config config.yaml -o DIR

- The checkpoint is read with ``torch.load(weights_only=True)``; only its ``state_dict`` is used (``optimizer_states``,
  ``loops``, ... are ignored). A container that pickles one of the few known dict-like Lightning classes is
  allowed exactly those (``torch.serialization.safe_globals``); any other global is refused, named.
- ``transformer.*`` is the GPT: the prefix is stripped and the keys must then be exactly tok's (the official module
  names), or one error lists what is missing / unexpected / of another shape. Stale ``attention.kv_cache.*``
  buffers (saved after an official sampling run) are dropped.
- The sizes come from ``model.init_args.transformer_config.params`` (GPT defaults for what it omits) and are checked
  against the tensors: the sub-token widths (heads and embedding tables), ``dim`` and ``class_num`` (the label
  table, one null row), the layer counts, the FFN width and the fused qkv rows. Keys that do not change the network
  are ignored and listed in the provenance (``vocab_size``, ``cond_dim``, ``token_drop`` is kept for training).
- ``first_stage_model.*`` is the frozen WeTok tokenizer (``first_stage_config.params``, GFQ with token
  factorization): converted as ``tokcli.families.wetok`` does (EMA shadows when present, else the raw weights; the
  image size is the generator's grid times the tokenizer's downsampling) into ``DIR/tokenizer`` (or
  ``tokenizer_out``). The generator's ``tokenizer`` block names it (``local-dir:tokenizer`` is resolved against the
  generator folder, so the pair moves together) with its weights' sha256. Its sub-token widths must equal the
  generator's ``factorized_bits``.
- ``sample`` holds the released settings (top-k 0, top-p 1, temperature 1) and the per-sub-token cfg of the
  official evaluation script for that size (B / L / XL), else XL's [1.75, 1.8, 2.0, 2.0] for k = 4 (1.75 otherwise).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from tokcli.core.atomic import check_overwrite, temp_dir
from tokcli.core.checkpoint import ModelFolder, sha256_file
from tokcli.errors import TokError

CONVERTER = "tokcli.gen.wetok_ar.convert"
OFFICIAL_REPO = "https://github.com/zhuangshaobin/WeTok"
GPT_PREFIX, FIRST_STAGE_PREFIX = "transformer.", "first_stage_model."
# official GPT constructor defaults (gpt.py) for the keys tok builds from
GPT_DEFAULTS: dict[str, Any] = {"spatial_n_layer": 12, "n_head": 8, "dim": 256, "factorized_n_layer": 2,
                                "class_num": 1000, "token_drop": 0.1, "resid_dropout_p": 0.0, "attn_dropout_p": 0.0,
                                "ffn_dropout_p": 0.1, "rope_base": 10000, "norm_eps": 1e-5, "multiple_of": 256,
                                "ffn_dim_multiplier": None, "n_kv_head": None, "factorized_k": 2,
                                "factorized_bits": [9, 9], "cls_token_num": 1, "token_factorization": False}
GPT_KEYS = ("block_size", "spatial_n_layer", "factorized_n_layer", "factorized_bits", "n_head", "n_kv_head", "dim",
            "class_num", "rope_base", "norm_eps", "multiple_of", "ffn_dim_multiplier", "token_drop",
            "resid_dropout_p", "attn_dropout_p", "ffn_dropout_p")
# (dim, spatial layers) -> (size name, cfg per sub-token) of scripts/evaluation/sample_gpu_ddp.sh
RELEASED_CFG = {(1024, 24): ("B", [1.95, 2.05, 1.95, 1.95]), (1280, 36): ("L", [1.95, 1.8, 2.0, 1.9]),
                (1536, 48): ("XL", [1.75, 1.8, 2.0, 2.0])}
# dict-like containers Lightning versions have pickled into checkpoints: allowed (only these) when present
SAFE_GLOBALS = ("lightning.fabric.utilities.data.AttributeDict", "pytorch_lightning.utilities.parsing.AttributeDict")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text or type(e).__name__)[:300]


def _import_global(dotted: str):
    import importlib

    mod, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError):
        return None


def _load_allowing(path: Path, error: BaseException):
    """Retry a refused weights_only load when every global it needs is one of ``SAFE_GLOBALS`` (else one line)."""
    import torch

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: report the load error itself
        unsafe = []
    allowed = [obj for g in unsafe if g in SAFE_GLOBALS and (obj := _import_global(g)) is not None]
    if not unsafe or len(allowed) != len(unsafe):
        named = [g for g in unsafe if g not in SAFE_GLOBALS or _import_global(g) is None]
        why = (f"it pickles objects tok does not load with weights_only=True ({', '.join(named[:4])}): only tensors "
               "and plain containers are read") if named else _one_line(error)
        raise TokError(f"cannot read {path} as a PyTorch checkpoint ({why})") from None
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The ``state_dict`` of a Lightning checkpoint, read with weights_only=True (see the module docstring)."""
    import torch

    if not path.is_file():
        raise TokError(f"no such file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, OSError: one line
        obj = _load_allowing(path, e)
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        top = ", ".join(sorted(map(str, obj))[:5]) if isinstance(obj, dict) else type(obj).__name__
        raise TokError(f"{path} is not a Lightning checkpoint: no 'state_dict' (it holds {top})")
    return sd


def read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(GPT params, first-stage params) of an official GenStage YAML (``model.init_args``, or taming ``params``)."""
    import yaml

    if not path.is_file():
        raise TokError(f"config {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise TokError(f"cannot parse {path} as YAML ({_one_line(e)})") from None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    init = model.get("init_args", model.get("params")) if isinstance(model, dict) else None
    blocks = [init.get(k) if isinstance(init, dict) else None for k in ("transformer_config", "first_stage_config")]
    if not all(isinstance(b, dict) and isinstance(b.get("params"), dict) for b in blocks):
        raise TokError(f"{path} has no model.init_args.transformer_config / first_stage_config params: not an "
                       "official WeTok GenStage config")
    gpt, first = (b["params"] for b in blocks)
    if not str(blocks[0].get("target", "")).endswith(".GPT"):
        raise TokError(f"{path}: transformer_config.target {blocks[0].get('target')!r} is not the official GPT")
    if not init.get("token_factorization", False) or not gpt.get("token_factorization", False):
        raise TokError(f"{path}: token_factorization is off; tok implements WeTok's factorised AR (GFQ sub-tokens)")
    return dict(gpt), dict(first)


def _indices(state: Mapping[str, Any], pattern: str) -> int:
    found = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    if found != set(range(len(found))):
        raise TokError(f"the checkpoint's {pattern.split('(')[0]}<i> indices are not 0..{len(found) - 1}")
    return len(found)


def sizes_from_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """What the GPT tensors say: factorized_bits (heads), dim and class_num (label table), the layer counts and the
    FFN / qkv widths."""
    k = _indices(state, r"head\.(\d+)\.weight$")
    table = state.get("class_emb.embedding_table.weight")
    if not k or table is None:
        raise TokError("the checkpoint has no transformer.head.<i> / transformer.class_emb tensors: not a WeTok AR "
                       "(factorised GPT) checkpoint")
    bits = []
    for i in range(k):
        v = int(state[f"head.{i}.weight"].shape[0])
        if v < 2 or 2 ** round(math.log2(v)) != v:
            raise TokError(f"transformer.head.{i} has {v} outputs, not a power of two: not a factorised sub-token head")
        bits.append(round(math.log2(v)))
    out = {"factorized_bits": bits, "dim": int(table.shape[1]), "class_num": int(table.shape[0]) - 1,
           "spatial_n_layer": _indices(state, r"spatial_blocks\.(\d+)\."),
           "factorized_n_layer": _indices(state, r"factorized_blocks\.(\d+)\.")}
    w1 = state.get("spatial_blocks.0.feed_forward.w1.weight", state.get("factorized_blocks.0.feed_forward.w1.weight"))
    qkv = state.get("spatial_blocks.0.attention.wqkv.weight", state.get("factorized_blocks.0.attention.wqkv.weight"))
    out["ffn_hidden"] = int(w1.shape[0]) if w1 is not None else None
    out["qkv_rows"] = int(qkv.shape[0]) if qkv is not None else None
    return out


def model_args_from_config(gpt: Mapping[str, Any], state: Mapping[str, Any], path: Path):
    """(model_args, ignored config keys), after checking the config against the tensors."""
    from tokcli.nn.llama import ffn_hidden

    p = {**GPT_DEFAULTS, **{k: v for k, v in gpt.items() if v is not None or k in ("n_kv_head", "ffn_dim_multiplier")}}
    if "block_size" not in gpt:
        raise TokError(f"{path}: transformer_config.params has no block_size (the number of grid positions)")
    bits = list(p["factorized_bits"])
    if int(p["factorized_k"]) != len(bits):
        raise TokError(f"{path}: factorized_k {p['factorized_k']} but {len(bits)} factorized_bits {bits}")
    if int(p["cls_token_num"]) != 1:
        raise TokError(f"{path}: cls_token_num {p['cls_token_num']} is not supported (the official GPT embeds one "
                       "class token)")
    args = {k: p[k] for k in GPT_KEYS}
    args["factorized_bits"] = bits
    sizes = sizes_from_state(state)
    for key in ("factorized_bits", "dim", "class_num", "spatial_n_layer", "factorized_n_layer"):
        if args[key] != sizes[key]:
            raise TokError(f"{path} says {key}={args[key]!r} but the weights have {key}={sizes[key]!r}: the config "
                           "does not describe this checkpoint")
    hd = int(args["dim"]) // int(args["n_head"])
    checks = {"ffn_hidden": ffn_hidden(int(args["dim"]), int(args["multiple_of"]), args["ffn_dim_multiplier"]),
              "qkv_rows": (int(args["n_head"]) + 2 * int(args["n_kv_head"] or args["n_head"])) * hd}
    for key, want in checks.items():
        if sizes[key] is not None and sizes[key] != want:
            raise TokError(f"{path}: n_head / n_kv_head / multiple_of / ffn_dim_multiplier give {key} {want} but the "
                           f"weights have {sizes[key]}: the config does not describe this checkpoint")
    return args, sorted(set(gpt) - set(GPT_KEYS))


def split_state(sd: Mapping[str, Any], ckpt: Path) -> tuple[dict, dict, int]:
    """(GPT tensors without their prefix, first-stage tensors without theirs, stale KV-cache buffers dropped)."""
    import torch

    gpt, first, other, stale = {}, {}, [], 0
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TokError(f"{ckpt.name}: state_dict entry {key} is a {type(t).__name__}, not a tensor")
        if key.startswith(GPT_PREFIX):
            if ".attention.kv_cache." in key:
                stale += 1
                continue
            gpt[key[len(GPT_PREFIX):]] = t.float() if t.is_floating_point() else t
        elif key.startswith(FIRST_STAGE_PREFIX):
            first[key[len(FIRST_STAGE_PREFIX):]] = t
        else:
            other.append(key)
    if other:
        raise TokError(f"{ckpt.name} has {len(other)} unexpected tensors outside transformer.* / first_stage_model.*: "
                       f"{', '.join(sorted(other)[:4])}")
    return gpt, first, stale


def build_tokenizer(first: Mapping[str, Any], state: Mapping[str, Any], gen, config: Path):
    """The frozen first stage as a tok WeTok model: (model, n EMA tensors, n raw tensors)."""
    from tokcli.families.wetok.convert import pick_weights
    from tokcli.families.wetok.model import WeTok, official_model_args

    if not first.get("use_GFQ", False) or not first.get("token_factorization", False):
        raise TokError(f"{config}: first_stage_config is not a GFQ tokenizer with token_factorization (WeTok's AR "
                       "samples its group sub-tokens)")
    ch_mult = (first.get("ddconfig") or {}).get("ch_mult") or [1]
    args = official_model_args(first, image_size=gen.grid * 2 ** (len(ch_mult) - 1))
    bits = [int(b) for b in first.get("factorized_bits", [])]
    if bits != gen.model_args["factorized_bits"]:
        raise TokError(f"{config}: the first stage's factorized_bits {bits} differ from the transformer's "
                       f"{gen.model_args['factorized_bits']}")
    if not state:
        raise TokError(f"{config}: the checkpoint holds no first_stage_model.* tensors (the frozen tokenizer)")
    tok = WeTok(**args)
    weights, n_ema, n_raw = pick_weights(tok, dict(state))
    tok.load_state_dict(weights, strict=True)
    return tok.eval(), n_ema, n_raw


def sample_defaults(gen) -> tuple[dict[str, Any], str]:
    a = gen.model_args
    size = RELEASED_CFG.get((a["dim"], a["spatial_n_layer"]))
    if size is not None and gen.k == 4:
        return {"cfg": list(size[1])}, f"the official evaluation script's cfg for {size[0]}"
    if gen.k == 4:
        return {"cfg": list(RELEASED_CFG[(1536, 48)][1])}, "the official XL cfg (not a released size)"
    return {"cfg": 1.75}, "cfg 1.75 for every sub-token (the released settings are for k = 4)"


def _card(name: str, gen, ckpt: Path, tok_name: str, cfg_from: str) -> str:
    a = gen.model_args
    return (f"# {name}\n\nWeTok's factorised AR generator converted by `{CONVERTER}` from `{ckpt}` (official code: "
            f"{OFFICIAL_REPO}, Apache-2.0).\n\n- {a['spatial_n_layer']} spatial + {a['factorized_n_layer']} intra "
            f"Llama blocks of {a['dim']}, {a['n_head']} heads; a {gen.grid}x{gen.grid} grid of {gen.k} sub-tokens "
            f"of {a['factorized_bits']} bits; {a['class_num']} classes (null class {a['class_num']})\n"
            f"- tokenizer: `{tok_name}` (the frozen first stage of the checkpoint)\n- sampling defaults: top-k 0, "
            f"top-p 1, temperature 1, {cfg_from}\n- `tok generate -m {name} --class 3 -n 4 -o out/`\n")


def _save_tokenizer(tok, dest: Path, name: str, ckpt: Path, prov: Mapping[str, Any], overwrite: bool) -> ModelFolder:
    card = (f"# {name}\n\nThe frozen WeTok first stage of the AR checkpoint `{ckpt}`, converted by `{CONVERTER}`.\n")
    return tok.save_folder(dest, name=name, provenance=dict(prov), card=card, overwrite=overwrite)


def convert_official(source: str | os.PathLike, config: str | os.PathLike | None, dest: str | os.PathLike, *,
                     name: str | None = None, model_args: dict[str, Any] | None = None,
                     provenance: dict[str, Any] | None = None, overwrite: bool = False,
                     files: Mapping[str, Any] | None = None,
                     tokenizer_out: str | os.PathLike | None = None) -> ModelFolder:
    """``tok convert``'s converter (see the module docstring)."""
    dest = check_overwrite(dest, overwrite)
    if config is None:
        raise TokError("converting a WeTok AR checkpoint needs its official config.yaml (--config)")
    ckpt, cpath = Path(source).resolve(), Path(config).resolve()
    gpt_cfg, first_cfg = read_config(cpath)
    gpt_sd, first_sd, stale = split_state(read_checkpoint(ckpt), ckpt)
    args, ignored = model_args_from_config(gpt_cfg, gpt_sd, cpath)
    if model_args:
        args.update(model_args)
    from tokcli.gen.wetok_ar.model import WeTokAR

    gen = WeTokAR.from_state(args, gpt_sd, what=f"{ckpt.name} (transformer.*) does not match {cpath}")
    tok, n_ema, n_raw = build_tokenizer(first_cfg, first_sd, gen, cpath)
    name = name or dest.name
    src = {"source": str(ckpt), "source_sha256": sha256_file(ckpt), "source_config": str(cpath),
           "source_config_sha256": sha256_file(cpath), "converter": CONVERTER, "official_code": OFFICIAL_REPO,
           "license": "apache-2.0"}
    tok_prov = {**src, "weights": f"first_stage_model.*: {n_ema} EMA, {n_raw} raw tensors",
                "dropped_tensors": len(first_sd) - n_ema - n_raw}
    inner = tokenizer_out is None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(dest.parent, dest.name + ".tokenizer") if inner else None
    try:
        tdest = tmp / "tokenizer" if inner else check_overwrite(tokenizer_out, overwrite)
        tfolder = _save_tokenizer(tok, tdest, f"{name}-tokenizer", ckpt, tok_prov, overwrite or inner)
        ref = "local-dir:tokenizer" if inner else "local-dir:" + str(Path(tdest).resolve())
        gen.tokenizer_ref = {"name": ref, "sha256": tfolder.sha256}
        extra, cfg_from = sample_defaults(gen)
        gen.sample_defaults.update(extra)
        prov = {**src, "ignored_config_keys": ignored, "sample_defaults": cfg_from,
                "dropped_kv_cache_buffers": stale, **(provenance or {})}
        folder = gen.save_folder(dest, name=name, provenance=prov, card=_card(name, gen, ckpt, ref, cfg_from),
                                 overwrite=overwrite)
        if inner:
            os.replace(tdest, dest / "tokenizer")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
