"""Converting official checkpoints into tok model folders (the library side of `tok convert`).

Each family's converter does the tensor mapping; this module decides where the checkpoint comes from (a file, or
the Hub / Hugging Face cache for a registry name) and where the folder goes.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokcli.core.checkpoint import ModelFolder
from tokcli.core.registry import converted_dir, get_entry
from tokcli.errors import MissingWeightsError, TokError, TokUsageError
from tokcli.families import get_family


def fetch_official(entry) -> Path:
    """Path of a registry entry's official checkpoint: from the HF cache, or downloaded when online."""
    from huggingface_hub import hf_hub_download

    from tokcli.core.registry import hf_env

    cache, offline = hf_env()
    try:
        return Path(hf_hub_download(entry.hub_repo, entry.hub_filename, revision=entry.hub_revision,
                                    cache_dir=cache, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - offline / missing / network: one actionable line
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = ("HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache" if offline
               else f"it could not be downloaded ({type(e).__name__})")
        rev = f" --revision {entry.hub_revision}" if entry.hub_revision else ""
        raise MissingWeightsError(
            f"{entry.name} needs {entry.hub_repo}:{entry.hub_filename}, but {why}; get it with "
            f"`hf download {entry.hub_repo} {entry.hub_filename}{rev}` (fills "
            f"{os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}) or convert a local copy with "
            f"`tok convert PATH/WeTok.ckpt --as {entry.name}`") from None


def convert(source: str, *, output: str | None = None, family: str | None = None, config: str | None = None,
            as_model: str | None = None, name: str | None = None, overwrite: bool = False) -> ModelFolder:
    src = Path(source).expanduser()
    model_args = None
    prov: dict = {}
    if src.is_dir():
        raise TokUsageError(f"{source} is a folder; tok convert takes an official checkpoint file or a registry name")
    if src.is_file():
        if as_model:
            entry = get_entry(as_model)
            family = family or entry.family
            if family != entry.family:
                raise TokUsageError(f"--family {family} contradicts --as {as_model} (a {entry.family} model)")
            model_args = dict(entry.model_args)
            name = name or entry.name
            dest = Path(output) if output else converted_dir(entry.name)
            prov["registry_name"] = entry.name
        else:
            if not family:
                raise TokUsageError("converting a file needs --family (e.g. --family wetok) or --as REGISTRY_NAME")
            if not config:
                raise TokUsageError("converting a file needs its official --config YAML (or --as REGISTRY_NAME)")
            if not output:
                raise TokUsageError("converting a file needs -o/--output DIR (or --as REGISTRY_NAME)")
            dest = Path(output)
        ckpt = src
        prov["source"] = str(src.resolve())
    else:
        if "/" in source or "\\" in source or source.endswith((".ckpt", ".pth", ".pt", ".safetensors")):
            raise TokError(f"no such file: {source}")
        entry = get_entry(source)
        if not entry.hub_repo:
            if entry.shipped:
                raise TokUsageError(f"{source} has no official checkpoint to convert (it is a tok-native model)")
            raise TokError(f"{source} cannot be fetched as one file: {entry.notes}")
        family = entry.family
        model_args = dict(entry.model_args)
        name = name or entry.name
        dest = Path(output) if output else converted_dir(entry.name)
        ckpt = fetch_official(entry)
        prov.update(source=f"hf-hub:{entry.hub_repo}/{entry.hub_filename}" +
                    (f"@{entry.hub_revision}" if entry.hub_revision else ""), registry_name=entry.name,
                    license=entry.license, paper=entry.paper)
    if dest.exists() and not overwrite:
        raise TokError(f"{dest} already exists (pass --overwrite to replace it)")
    fam = get_family(family)
    return fam.convert(ckpt, config, dest, name=name, model_args=model_args, provenance=prov, overwrite=overwrite)
