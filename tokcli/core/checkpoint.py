"""The model folder: ``config.json`` + ``model.safetensors`` (+ ``README.md`` model card).

The same folder is a valid Hugging Face model repo. ``config.json`` holds:
``tok_format`` (schema version), ``family``, ``name``, ``model_args`` (constructor kwargs), ``tokens`` (TokenSpec),
``preprocess``, ``decode`` (decoding defaults), ``provenance`` (where the weights came from, ``weights_sha256``,
tok version) and optional ``training`` / ``metrics`` records.

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

from tokcli.errors import TokError

TOK_FORMAT = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


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
    for key in ("family", "model_args", "tokens", "preprocess"):
        if key not in cfg:
            raise TokError(f"{cfg_path} lacks the required key {key!r}")
    if not (p / WEIGHTS_NAME).is_file():
        raise TokError(f"{p} has no {WEIGHTS_NAME}")
    return ModelFolder(p, cfg)


def model_card(cfg: Mapping[str, Any], body: str = "") -> str:
    """A Hugging Face style model card: YAML front matter + markdown body."""
    name = cfg.get("name", "model")
    prov = cfg.get("provenance", {})
    lic = prov.get("license", "other")
    lines = ["---", "library_name: tok", f"license: {lic}", "tags:", "- image-tokenizer", f"- {cfg['family']}", "---", ""]
    if not body:
        body = (f"# {name}\n\nA `{cfg['family']}` image tokenizer in the tok model-folder format.\n\n"
                f"- tokens: `{json.dumps(cfg['tokens'])}`\n- preprocess: `{json.dumps(cfg['preprocess'])}`\n"
                f"- source: {prov.get('source', 'unknown')}\n\nLoad it with `tokcli.load(\"local-dir:PATH\")`.\n")
    return "\n".join(lines) + body


def save_model_folder(dest: str | os.PathLike, *, family: str, model_args: Mapping[str, Any],
                      tokens: Mapping[str, Any], preprocess: Mapping[str, Any], state_dict: Mapping[str, Any],
                      name: str | None = None, decode: Mapping[str, Any] | None = None,
                      provenance: Mapping[str, Any] | None = None, card: str | None = None,
                      extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> ModelFolder:
    """Write a complete model folder atomically and return it.

    ``state_dict`` values must be tensors; they are made contiguous and saved with safetensors.
    ``extra`` adds top-level config keys (e.g. ``training``, ``metrics``).
    """
    import torch
    from safetensors.torch import save_file

    from tokcli import __version__

    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise TokError(f"{dest} already exists (pass --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"tok_format": str(TOK_FORMAT), "family": family})
        prov = dict(provenance or {})
        prov["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
        prov.setdefault("tok_version", __version__)
        cfg: dict[str, Any] = {
            "tok_format": TOK_FORMAT,
            "family": family,
            "name": name or dest.name,
            "model_args": dict(model_args),
            "tokens": dict(tokens),
            "preprocess": dict(preprocess),
            "decode": dict(decode or {}),
            "provenance": prov,
        }
        for k, v in (extra or {}).items():
            cfg[k] = v
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        (tmp / CARD_NAME).write_text(model_card(cfg, card or ""), encoding="utf-8")
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelFolder(dest, cfg)
