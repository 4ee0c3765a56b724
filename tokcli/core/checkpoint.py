"""The model folder: ``config.json`` + ``model.safetensors`` (+ ``README.md`` model card).

The same folder is a valid Hugging Face model repo. ``config.json`` holds:
``tok_format`` (schema version), ``family``, ``name``, ``model_args`` (constructor kwargs), the model's own keys
(:meth:`TokModel.folder_config`; tokenizers: ``tokens`` (TokenSpec) and ``preprocess``), ``decode`` (decoding
defaults), ``provenance`` (where the weights came from, ``weights_sha256``, tok version) and optional ``training`` /
``metrics`` records. Only ``family`` and ``model_args`` are required to read a folder.

Folders are written atomically: everything goes to a temporary sibling folder which is then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tokcli.core.atomic import check_overwrite
from tokcli.errors import TokError
from tokcli.version import __version__

TOK_FORMAT = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
REQUIRED_KEYS = ("family", "model_args")
# config keys save_model_folder writes itself; everything else in a config is a folder key of the model
_OWN_KEYS = ("tok_format", "family", "name", "model_args", "decode", "provenance")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclass
class ModelFolder:
    path: Path
    config: dict[str, Any]

    @property
    def family(self) -> str:
        return self.config["family"]

    @property
    def name(self) -> str:
        return self.config.get("name") or self.path.name

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def sha256(self) -> str:
        """sha256 of model.safetensors as recorded at save time (``verify()`` recomputes it)."""
        return self.config.get("provenance", {}).get("weights_sha256", "")

    def verify(self) -> bool:
        return sha256_file(self.weights_path) == self.sha256

    def state_dict(self, device: str = "cpu") -> dict:
        from safetensors.torch import load_file

        try:
            return load_file(str(self.weights_path), device=device)
        except Exception as e:  # safetensors raises several types for damaged files
            raise TokError(f"cannot read weights {self.weights_path}: {e}") from None


def is_model_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def read_model_folder(path: str | os.PathLike) -> ModelFolder:
    """Read and validate a model folder's config (weights are read lazily)."""
    p = Path(path)
    cfg_path = p / CONFIG_NAME
    if not cfg_path.is_file():
        raise TokError(f"{p} is not a tok model folder (no {CONFIG_NAME})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise TokError(f"{cfg_path} is not a JSON object")
    fmt = cfg.get("tok_format")
    if fmt is None:
        raise TokError(f"{cfg_path} has no tok_format: it is not a tok model config "
                       "(official checkpoints are converted with `tok convert`)")
    if not isinstance(fmt, int) or fmt > TOK_FORMAT:
        raise TokError(f"{cfg_path} has tok_format {fmt!r}; this tok reads up to {TOK_FORMAT} (upgrade tok)")
    for key in REQUIRED_KEYS:
        if key not in cfg:
            raise TokError(f"{cfg_path} lacks the required key {key!r}")
    if not (p / WEIGHTS_NAME).is_file():
        raise TokError(f"{p} has no {WEIGHTS_NAME}")
    return ModelFolder(p, cfg)


def model_card(cfg: Mapping[str, Any], body: str = "") -> str:
    """A Hugging Face style model card: YAML front matter + markdown body (default: the folder keys listed)."""
    name = cfg.get("name", "model")
    prov = cfg.get("provenance", {})
    lic = prov.get("license", "other")
    lines = ["---", "library_name: tok", f"license: {lic}", "tags:", "- image-tokenizer", f"- {cfg['family']}", "---", ""]
    if not body:
        keys = "".join(f"- {k}: `{json.dumps(v)}`\n" for k, v in cfg.items()
                       if k not in _OWN_KEYS and k not in ("training", "metrics"))
        body = (f"# {name}\n\nA `{cfg['family']}` model in the tok model-folder format.\n\n{keys}"
                f"- source: {prov.get('source', 'unknown')}\n\nLoad it with `tokcli.load(\"local-dir:PATH\")`.\n")
    return "\n".join(lines) + body


def save_model_folder(dest: str | os.PathLike, *, family: str, model_args: Mapping[str, Any],
                      state_dict: Mapping[str, Any], name: str | None = None,
                      decode: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None,
                      card: str | None = None, extra: Mapping[str, Any] | None = None, overwrite: bool = False,
                      **folder_keys: Mapping[str, Any]) -> ModelFolder:
    """Write a complete model folder atomically and return it.

    ``folder_keys`` are the model's own top-level config keys (:meth:`TokModel.folder_config`: ``tokens`` and
    ``preprocess`` for a tokenizer), written after ``model_args``. ``state_dict`` values must be tensors; they are
    made contiguous and saved with safetensors. ``extra`` adds further top-level keys (``training``, ``metrics``).
    Models write their folder with :meth:`TokModel.save_folder`, which calls this.
    """
    import torch
    from safetensors.torch import save_file

    clash = sorted(set(folder_keys) & set(_OWN_KEYS))
    if clash:
        raise ValueError(f"folder keys {clash} are written by save_model_folder itself")
    dest = check_overwrite(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"tok_format": str(TOK_FORMAT), "family": family})
        prov = dict(provenance or {})
        prov["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
        prov.setdefault("tok_version", __version__)
        cfg: dict[str, Any] = {"tok_format": TOK_FORMAT, "family": family, "name": name or dest.name,
                               "model_args": dict(model_args)}
        cfg.update({k: dict(v) for k, v in folder_keys.items()})
        cfg.update(decode=dict(decode or {}), provenance=prov)
        cfg.update(extra or {})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        (tmp / CARD_NAME).write_text(model_card(cfg, card or ""), encoding="utf-8")
        _replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelFolder(dest, cfg)


def _replace_folder(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``, replacing an existing one with two renames."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / "x")
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
