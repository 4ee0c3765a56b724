"""Model registry and name resolution (timm / open_clip style).

A name resolves, in this order, to a model folder (core/checkpoint.py):

1. ``local-dir:PATH`` or an existing directory            -> that folder
2. ``hf-hub:org/repo[@revision]``                          -> snapshot via huggingface_hub (HF_HUB_OFFLINE honoured)
3. a registry name (``wetok-tiny``, ``wetok-16x``, ...)     -> shipped ``weights/<name>``, else the tok cache
   (``$TOK_CACHE``, default ``~/.cache/tok``) ``models/<name>``; released models that are not converted yet
   raise an error that names the official file(s) and the ``tok convert`` command that makes the folder.

A bare name containing ``/`` or ``:`` that is not an existing path is refused with a hint to add a prefix, so a Hub
id can never silently match a registry name. Extra entries can be registered in code (``register``) or listed in
JSON files named by ``$TOK_REGISTRY`` (``os.pathsep``-separated), each holding a list of entry objects.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tokcli.core.checkpoint import ModelFolder, is_model_folder, read_model_folder
from tokcli.errors import MissingWeightsError, TokError, TokUsageError

DEFAULT_MODEL = "wetok-tiny"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class HubFile:
    """One file of an official release on the Hugging Face Hub.

    ``role`` tells the family's converter what the file is (``checkpoint`` for the main file; e.g. ``quantizer``,
    ``base_vae``, ``base_vae_config`` for the others); ``local`` is where the file goes, relative to the folder of
    the main checkpoint, when a user lays out downloaded copies for ``tok convert FILE --as NAME``."""

    repo: str
    filename: str
    revision: str | None = None
    role: str = "checkpoint"
    local: str | None = None

    @property
    def spec(self) -> str:
        """``repo:filename[@revision]``, the form error messages use."""
        return f"{self.repo}:{self.filename}" + (f"@{self.revision}" if self.revision else "")

    @property
    def local_name(self) -> str:
        return self.local or self.filename.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about a named model before any weights are read."""

    name: str
    family: str
    description: str
    model_args: dict[str, Any] = field(default_factory=dict)
    # Official release (for `tok convert NAME`): Hub repo + file + revision, and the original config.
    hub_repo: str | None = None
    hub_filename: str | None = None
    hub_revision: str | None = None
    # Further files the conversion needs (a release spread over several files or repos): one object per file with
    # the keys of HubFile (repo, filename, and optionally revision, role, local). JSON-friendly, as TOK_REGISTRY
    # files give them.
    extra_hub_files: tuple[dict[str, Any], ...] = ()
    license: str = "unknown"
    paper: str = ""
    paper_metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    shipped: bool = False  # a folder under weights/ in this repository

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_hub_files"] = [dict(f) for f in self.extra_hub_files]
        return d

    def release_files(self) -> list[HubFile]:
        """Every Hub file `tok convert NAME` needs: the main checkpoint first, then ``extra_hub_files``."""
        if not self.hub_repo or not self.hub_filename:
            return []
        out = [HubFile(self.hub_repo, self.hub_filename, self.hub_revision)]
        for d in self.extra_hub_files:
            try:
                f = HubFile(**d)
            except TypeError as e:
                raise TokError(f"registry entry {self.name}: bad extra_hub_files item {d!r} ({e})") from None
            out.append(f if "role" in d else replace(f, role=f.filename))
        roles = [f.role for f in out]
        if len(set(roles)) != len(roles):
            raise TokError(f"registry entry {self.name}: two release files share a role ({roles})")
        return out

    def local_convert_hint(self) -> str:
        """How to convert downloaded copies of the release instead (``tok convert FILE --as NAME``)."""
        files = self.release_files()
        if not files:
            return ""
        main = files[0].local_name
        if len(files) == 1:
            return f"`tok convert PATH/{main} --as {self.name}`"
        layout = ", ".join(f"FOLDER/{f.local_name}" for f in files)
        return f"`tok convert FOLDER/{main} --as {self.name}` with the files laid out as {layout}"


_ENTRIES: dict[str, ModelEntry] = {}


def register(entry: ModelEntry, *, replace: bool = False) -> ModelEntry:
    if entry.name in _ENTRIES and not replace:
        raise ValueError(f"model {entry.name!r} is already registered")
    _ENTRIES[entry.name] = entry
    return entry


def _load_builtin() -> None:
    if _ENTRIES:
        return
    from tokcli.families import registry_entries

    for e in registry_entries():
        register(e)
    for f in filter(None, os.environ.get("TOK_REGISTRY", "").split(os.pathsep)):
        try:
            items = json.loads(Path(f).read_text(encoding="utf-8"))
            for d in items if isinstance(items, list) else [items]:
                register(ModelEntry(**d), replace=True)
        except (OSError, ValueError, TypeError) as e:
            raise TokError(f"cannot read registry file {f} (from $TOK_REGISTRY): {e}") from None


def entries() -> dict[str, ModelEntry]:
    _load_builtin()
    return dict(_ENTRIES)


def get_entry(name: str) -> ModelEntry:
    _load_builtin()
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
    """Folders searched for shipped weights: ``$TOK_WEIGHTS`` then the repository's ``weights/``."""
    dirs = [Path(p) for p in os.environ.get("TOK_WEIGHTS", "").split(os.pathsep) if p]
    dirs.append(REPO_ROOT / "weights")
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
