"""Model registry and name resolution (timm / open_clip style).

A name resolves, in this order, to a model folder (core/checkpoint.py):

1. ``local-dir:PATH``, or a path (it holds a separator or starts with ``.``/``~``, or it exists and is not a
   registry name)                                          -> that folder (``no such file or folder: PATH`` else)
2. ``hf-hub:org/repo[@revision]``                          -> snapshot via huggingface_hub (HF_HUB_OFFLINE honoured;
   offline is detected at once by a short connect probe, :func:`hub_unreachable`)
3. a registry name (``wetok-tiny``, ``wetok-16x``, ...)     -> shipped ``tokcli/weights/<name>``, else the tok cache
   (``$TOK_CACHE``, default ``~/.cache/tok``) ``models/<name>``; released models that are not converted yet
   raise an error that names the official file(s) and the ``tok convert`` command that makes the folder. A folder
   ``./<name>`` in the working folder is used instead only when it is a real tok model folder, with a warning.

A bare name containing ``:`` that is no known prefix is refused with a hint naming only valid forms, so a Hub id can
never silently match a registry name. Extra entries can be registered in code (``register``) or listed in
JSON files named by ``$TOK_REGISTRY`` (``os.pathsep``-separated), each holding a list of entry objects.

The registry is passive: families push themselves in with :func:`register_family` (their package ``__init__``
does it at import); this module imports no family. Discovery (importing the family packages) is a hook that the
package top installs with :func:`add_discovery`, run once before the tables are first read.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from tokcli.core.checkpoint import ModelFolder, cache_dir, is_model_folder, read_model_folder  # noqa: F401
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


HUB_PROBE_TIMEOUT_S = 2.5


def hf_endpoint() -> str:
    """The Hub's address as the environment says now (``HF_ENDPOINT``; huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _connect(host: str, port: int, timeout: float) -> None:
    """Open and close a TCP connection within ``timeout`` seconds, name lookup included (getaddrinfo has no
    timeout of its own, so it runs in a daemon thread). OSError when it cannot."""
    found: list = []

    def lookup():
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            found.append(e)

    t = threading.Thread(target=lookup, daemon=True)
    t.start()
    t.join(timeout)
    if not found:
        raise socket.timeout("name lookup timed out")
    if isinstance(found[0], OSError):
        raise found[0]
    family, kind, proto, _, addr = found[0][0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout)
        sock.connect(addr)


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the Hub (or to the HTTPS proxy, when one is set) opens within ``timeout``
    seconds, else a short reason. Without it an offline machine spends ~20 s in huggingface_hub's retries."""
    from urllib.parse import urlsplit

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), "")
    url = urlsplit(proxy if "://" in proxy else f"http://{proxy}") if proxy else urlsplit(hf_endpoint())
    try:
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return f"{'the proxy' if proxy else 'HF_ENDPOINT'} is not a valid address"
    if not host:
        return f"{'the proxy' if proxy else 'HF_ENDPOINT'} names no host"
    try:
        _connect(host, port, timeout)
    except OSError as e:
        what = f"the proxy {host}:{port}" if proxy else f"the Hub at {host}:{port}"
        return f"{what} is not reachable: {e.strerror or type(e).__name__}"
    return None


def _hf_snapshot(spec: str) -> Path:
    repo, _, rev = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise TokUsageError(f"hf-hub:{spec} is not of the form hf-hub:org/name[@revision]")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # pragma: no cover - a declared dependency
        raise TokError("huggingface_hub is not installed (pip install huggingface-hub)") from None
    cache, offline = hf_env()
    kw = dict(revision=rev or None, cache_dir=cache, allow_patterns=["config.json", "model.safetensors", "README.md"])
    try:
        return Path(snapshot_download(repo, local_files_only=True, **kw))
    except HFValidationError as e:
        raise TokUsageError(f"hf-hub:{spec}: {e}") from None
    except Exception:  # noqa: BLE001 - not in the cache: the Hub, unless offline
        pass
    why = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline else hub_unreachable()
    if why is None:
        try:
            return Path(snapshot_download(repo, endpoint=hf_endpoint(), **kw))
        except Exception as e:  # noqa: BLE001 - not found, gated, network: one line with what to do
            why = f"it could not be fetched ({type(e).__name__})"
    raise MissingWeightsError(
        f"model hf-hub:{spec} is not available: {why}; on a connected machine run "
        f"`hf download {repo}{' --revision ' + rev if rev else ''}` to fill the cache "
        f"({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'})")


def looks_like_path(name: str) -> bool:
    """A name the user meant as a path: absolute, or starting with ``.`` / ``~``, or with a backslash or two ``/``,
    or ``A/B`` where ``A`` exists (``org/name`` alone could be a Hub id as well: :func:`_not_a_name` says both)."""
    if name.startswith(("/", ".", "~")) or "\\" in name or os.sep in name.replace("/", "") or name.count("/") > 1:
        return True
    return "/" in name and Path(name).parent.exists()


def _folder_path(name: str, given: str) -> ModelFolder:
    p = Path(name).expanduser()
    if not p.exists():
        raise TokError(f"no such file or folder: {name}")
    if not p.is_dir():
        raise TokUsageError(f"{given} is a file; a model is a folder with config.json + model.safetensors "
                            "(official checkpoints are converted first: tok convert --help)")
    return read_model_folder(p)


def _shadowing_folder(name: str) -> Path | None:
    """``./NAME`` when it is a real tok model folder (it then shadows the registry name NAME), else None."""
    p = Path(name)
    if not p.is_dir():
        return None
    try:
        read_model_folder(p)
    except TokError:
        return None  # an output folder or anything else that happens to bear the name: the registry is meant
    return p


def _not_a_name(name: str) -> TokUsageError:
    """The error for a name that is neither a path nor a registry name; it suggests only valid forms."""
    repo = name.partition("@")[0]
    if repo.count("/") == 1 and ":" not in name and all(repo.split("/")):
        hub = f"hf-hub:{name} for that Hugging Face repo"
    else:
        hub = "hf-hub:org/name[@revision] for a Hugging Face repo"
    return TokUsageError(f"{name!r} is neither a folder nor a registry name; use local-dir:PATH for a folder, {hub}, "
                         "or a name from `tok models`")


def resolve(name_or_path: str | os.PathLike | None = None) -> ModelFolder:
    """Turn a model name or path into a validated ModelFolder (see the module docstring). A bare name that is a
    registry name means the registry entry, unless ``./NAME`` is a real tok model folder: then that folder is used
    with a warning on stderr (``local-dir:NAME`` picks it explicitly). A path that does not exist is a TokError
    ``no such file or folder: PATH``."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if not name:
        raise TokUsageError("empty model name")
    if name.startswith("local-dir:"):
        return _folder_path(name[len("local-dir:"):], name)
    if name.startswith(("hf-hub:", "hf_hub:")):
        spec = name.split(":", 1)[1]
        return dataclasses.replace(read_model_folder(_hf_snapshot(spec)), ref="hf-hub:" + spec)
    if looks_like_path(name) or (Path(name).exists() and name not in entries()):
        return _folder_path(name, name)
    if ":" in name or "/" in name:
        raise _not_a_name(name)
    shadow = _shadowing_folder(name)
    if shadow is not None:
        print(f"warning: the local folder ./{name} is a tok model folder and shadows the registry model {name}; "
              f"using the folder (local-dir:{name} picks it explicitly)", file=sys.stderr, flush=True)
        return read_model_folder(shadow)
    return dataclasses.replace(registry_folder(name), ref=name)


def registry_folder(name: str) -> ModelFolder:
    """The folder of registry model ``name`` on this machine; MissingWeightsError naming how to get it."""
    entry = get_entry(name)
    folder = local_folder(name)
    if folder is not None:
        return read_model_folder(folder)
    raise MissingWeightsError(missing_weights_message(entry))


def missing_weights_message(entry: ModelEntry) -> str:
    name = entry.name
    if entry.hub_repo:
        files = entry.release_files()
        what = (f"the official checkpoint {files[0].spec}" if len(files) == 1 else
                f"the official files {', '.join(f.spec for f in files)}")
        return (f"model {name} is not converted on this machine: run `tok convert {name}` (it needs {what}, from "
                f"the Hub or the Hugging Face cache) to create {converted_dir(name)}, or convert local copies with "
                f"{entry.local_convert_hint()}")
    how = f"; {entry.notes}" if entry.notes and not entry.shipped else ""
    return (f"model {name} has no weights on this machine (looked in "
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
