"""Model registry and name resolution (timm / open_clip style).

A name resolves, in this order, to a model folder (core/checkpoint.py):

1. ``local-dir:PATH`` or an existing directory            -> that folder
2. ``hf-hub:org/repo[@revision]``                          -> snapshot via huggingface_hub (HF_HUB_OFFLINE honoured)
3. a registry name (``wetok-tiny``, ``wetok-16x``, ...)     -> shipped ``tokcli/weights/<name>``, else the tok cache
   (``$TOK_CACHE``, default ``~/.cache/tok``) ``models/<name>``; released models that are not converted yet
   raise an error that names the official file(s) and the ``tok convert`` command that makes the folder.

A bare name containing ``/`` or ``:`` that is not an existing path is refused with a hint to add a prefix, so a Hub
id can never silently match a registry name. Extra entries can be registered in code (``register``) or listed in
JSON files named by ``$TOK_REGISTRY`` (``os.pathsep``-separated), each holding a list of entry objects.

The registry is passive: families push themselves in with :func:`register_family` (their package ``__init__``
does it at import); this module imports no family. Discovery (importing the family packages) is a hook that the
package top installs with :func:`add_discovery`, run once before the tables are first read.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from pathlib import Path
from typing import Any, Callable

from tokcli.core.checkpoint import ModelFolder, is_model_folder, read_model_folder
from tokcli.core.entry import HubFile, ModelEntry  # noqa: F401 - re-exported: families declare entries with them
from tokcli.core.family import Family
from tokcli.errors import MissingWeightsError, TokError, TokUsageError

DEFAULT_MODEL = "wetok-tiny"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "weights"  # package data: tokcli/weights/NAME


# --- the tables (passive: families push into them) -----------------------------------------------------------

_ENTRIES: dict[str, ModelEntry] = {}
_FAMILIES: dict[str, Family] = {}
_DISCOVERY: list[Callable[[], None]] = []
_discovered = False


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Push a family and its registry entries in (a family package calls this once, at import)."""
    old = _FAMILIES.get(family.name)
    if old is not None and not replace:
        if old == family:
            return old
        raise ValueError(f"family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    for e in family.entries:
        register(e, replace=True)
    return family


def unregister_family(name: str) -> None:
    """Remove a family and its entries (tests register throw-away families and take them out again)."""
    fam = _FAMILIES.pop(name, None)
    for e in fam.entries if fam else ():
        _ENTRIES.pop(e.name, None)


def register(entry: ModelEntry, *, replace: bool = False) -> ModelEntry:
    if entry.name in _ENTRIES and not replace:
        raise ValueError(f"model {entry.name!r} is already registered")
    _ENTRIES[entry.name] = entry
    return entry


def add_discovery(hook: Callable[[], None]) -> None:
    """Run ``hook`` once, before the tables are first read (the package top wires family discovery in here)."""
    global _discovered
    _DISCOVERY.append(hook)
    _discovered = False


def reload() -> None:
    """Forget the entries read from ``$TOK_REGISTRY`` and read the environment again on next use (the families
    stay registered). For long-lived processes whose environment changes, e.g. in-process CLI calls in tests."""
    global _discovered
    _discovered = False
    _ENTRIES.clear()
    for fam in _FAMILIES.values():
        for e in fam.entries:
            register(e, replace=True)


def _ensure_loaded() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for hook in list(_DISCOVERY):
        hook()
    for f in filter(None, os.environ.get("TOK_REGISTRY", "").split(os.pathsep)):
        try:
            items = json.loads(Path(f).read_text(encoding="utf-8"))
            for d in items if isinstance(items, list) else [items]:
                register(ModelEntry(**d), replace=True)
        except (OSError, ValueError, TypeError) as e:
            raise TokError(f"cannot read registry file {f} (from $TOK_REGISTRY): {e}") from None


def families() -> dict[str, Family]:
    _ensure_loaded()
    return dict(_FAMILIES)


def get_family(name: str) -> Family:
    _ensure_loaded()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise TokError(f"unknown model family {name!r} (known: {', '.join(sorted(_FAMILIES)) or 'none'})") from None


def entries() -> dict[str, ModelEntry]:
    _ensure_loaded()
    return dict(_ENTRIES)


def get_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    try:
        return _ENTRIES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_ENTRIES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see `tok models`)"
        raise TokUsageError(f"unknown model {name!r}{hint}") from None


def list_models(filter: str = "") -> list[str]:
    names = sorted(entries())
    return [n for n in names if not filter or fnmatch.fnmatch(n, filter)]


# --- where folders live ---------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("TOK_CACHE") or Path.home() / ".cache" / "tok")


def weights_dirs() -> list[Path]:
    """Folders searched for shipped weights: ``$TOK_WEIGHTS`` then the package's ``tokcli/weights/`` (installed with
    the wheel, so a plain ``pip install`` has the demo models)."""
    dirs = [Path(p) for p in os.environ.get("TOK_WEIGHTS", "").split(os.pathsep) if p]
    dirs.append(SHIPPED_DIR)
    return dirs


def converted_dir(name: str) -> Path:
    """Where `tok convert NAME` writes the converted folder of a registry model."""
    return cache_dir() / "models" / name


def local_folder(name: str) -> Path | None:
    for d in weights_dirs():
        if is_model_folder(d / name):
            return d / name
    if is_model_folder(converted_dir(name)):
        return converted_dir(name)
    return None


# --- resolution -----------------------------------------------------------------------------------------------

def hf_env() -> tuple[str | None, bool]:
    """(cache dir, offline) from the environment as it is now: huggingface_hub freezes its constants when it is
    first imported, so a later HF_HUB_CACHE / HF_HUB_OFFLINE would otherwise be ignored."""
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub")
                                               if os.environ.get("HF_HOME") else None)
    return cache, offline


def _hf_snapshot(spec: str) -> Path:
    repo, _, rev = spec.partition("@")
    if repo.count("/") != 1:
        raise TokUsageError(f"hf-hub:{spec} is not of the form hf-hub:org/name[@revision]")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # pragma: no cover - a declared dependency
        raise TokError("huggingface_hub is not installed (pip install huggingface-hub)") from None
    cache, offline_now = hf_env()
    try:
        path = snapshot_download(repo, revision=rev or None, cache_dir=cache, local_files_only=offline_now,
                                 allow_patterns=["config.json", "model.safetensors", "README.md"])
    except HFValidationError as e:
        raise TokUsageError(f"hf-hub:{spec}: {e}") from None
    except Exception as e:  # offline, not found, network: one line with what to do
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline else \
            f"it could not be fetched ({type(e).__name__})"
        raise MissingWeightsError(
            f"model hf-hub:{spec} is not available: {why}; on a connected machine run "
            f"`hf download {repo}{' --revision ' + rev if rev else ''}` to fill the cache "
            f"({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'})") from None
    return Path(path)


def resolve(name_or_path: str | os.PathLike | None = None) -> ModelFolder:
    """Turn a model name or path into a validated ModelFolder (see the module docstring)."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if not name:
        raise TokUsageError("empty model name")
    if name.startswith("local-dir:"):
        p = Path(name[len("local-dir:"):]).expanduser()
        if not p.is_dir():
            raise TokError(f"local-dir:{p}: no such folder")
        return read_model_folder(p)
    if name.startswith(("hf-hub:", "hf_hub:")):
        return read_model_folder(_hf_snapshot(name.split(":", 1)[1]))
    p = Path(name).expanduser()
    if p.is_dir():
        return read_model_folder(p)
    if p.is_file():
        raise TokUsageError(f"{name} is a file; a model is a folder with config.json + model.safetensors "
                            "(official checkpoints are converted first: tok convert --help)")
    if "/" in name or ":" in name or "\\" in name:
        raise TokUsageError(f"{name!r} is neither a folder nor a registry name; use local-dir:PATH for a folder "
                            f"or hf-hub:{name} for a Hugging Face repo")
    entry = get_entry(name)
    folder = local_folder(name)
    if folder is not None:
        return read_model_folder(folder)
    if entry.hub_repo:
        files = entry.release_files()
        what = (f"the official checkpoint {files[0].spec}" if len(files) == 1 else
                f"the official files {', '.join(f.spec for f in files)}")
        raise MissingWeightsError(
            f"model {name} is not converted on this machine: run `tok convert {name}` (it needs {what}, from the "
            f"Hub or the Hugging Face cache) to create {converted_dir(name)}, or convert local copies with "
            f"{entry.local_convert_hint()}")
    how = f"; {entry.notes}" if entry.notes and not entry.shipped else ""
    raise MissingWeightsError(f"model {name} has no weights on this machine (looked in "
                              f"{', '.join(str(d / name) for d in weights_dirs())} and {converted_dir(name)}){how}")


def describe(name: str) -> dict[str, Any]:
    """Registry entry plus where (if anywhere) its folder is, for `tok models --json`."""
    e = get_entry(name)
    folder = local_folder(name)
    d = e.to_dict()
    d["available"] = folder is not None
    d["path"] = str(folder) if folder else None
    d["default"] = name == DEFAULT_MODEL
    return d
