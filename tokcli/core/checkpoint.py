"""The model folder: ``config.json`` + ``model.safetensors`` (+ ``README.md`` model card).

The same folder is a valid Hugging Face model repo. ``config.json`` holds:
``tok_format`` (schema version), ``family``, ``name``, ``model_args`` (constructor kwargs), the model's own keys
(:meth:`TokModel.folder_config`; tokenizers: ``tokens`` (TokenSpec) and ``preprocess``), ``decode`` (decoding
defaults), ``provenance`` (where the weights came from, ``weights_sha256``, tok version) and optional ``training`` /
``metrics`` records. Only ``family`` and ``model_args`` are required to read a folder.

Folders are written atomically: everything goes to a temporary sibling folder which is then renamed into place.

A folder is a file from anywhere, so reading one trusts nothing before it is checked: :func:`read_weights_header`
reads only the safetensors header (names, dtypes, shapes) and checks the file's size against it, and
:meth:`ModelFolder.checked_sha256` compares the weights' sha256 with ``provenance.weights_sha256``, the hash kept in
a small cache (``$TOK_CACHE/verified-weights.json``, keyed by path, size and times) so that a multi-GB file is hashed
once, not on every load. ``TOK_TRUST_WEIGHTS=1`` skips the hashing; the model's sha256 is then unknown (empty), never
the config's claim.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tokcli.core.atomic import atomic_write_text, check_overwrite, current_umask, remove_stale_temps, temp_dir
from tokcli.errors import TokError
from tokcli.version import __version__

TOK_FORMAT = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
REQUIRED_KEYS = ("family", "model_args")
# config keys save_model_folder writes itself; everything else in a config is a folder key of the model
_OWN_KEYS = ("tok_format", "family", "name", "model_args", "decode", "provenance")
VERIFIED_NAME = "verified-weights.json"  # in the tok cache: sha256 of weight files, by (path, size, times)
_VERIFIED_MAX = 512  # entries kept (the oldest are dropped)
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def cache_dir() -> Path:
    """The tok cache: ``$TOK_CACHE``, default ``~/.cache/tok`` (converted models, verified weight hashes)."""
    return Path(os.environ.get("TOK_CACHE") or Path.home() / ".cache" / "tok")


def trust_weights() -> bool:
    """``TOK_TRUST_WEIGHTS=1``: load weights without hashing them (their sha256 is then recorded as unknown)."""
    return os.environ.get("TOK_TRUST_WEIGHTS", "") not in ("", "0")


# --- the weights file: header and hash ------------------------------------------------------------------------

def read_weights_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of every tensor in ``path``, read from the header alone (no tensor is
    read). The file's size must be what its header describes: a truncated copy is one clear TokError."""
    from safetensors import safe_open

    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > min(size - 8, _MAX_HEADER):
            raise TokError(f"{p} is not a safetensors file or is truncated ({size} bytes)")
        raw = f.read(n)
    try:
        meta = json.loads(raw)
        end = max([int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"], default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise TokError(f"{p} is not a safetensors file (its header is damaged)") from None
    if 8 + n + end != size:
        raise TokError(f"{p} is truncated or damaged: its header describes {8 + n + end} bytes but the file has "
                       f"{size} (copy or download it again)")
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged headers
        raise TokError(f"cannot read the header of {p}: {e}") from None


def _file_key(path: Path) -> tuple[str, dict[str, int]]:
    st = path.stat()
    return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _read_verified() -> dict[str, Any]:
    try:
        d = json.loads((cache_dir() / VERIFIED_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}  # absent or corrupt: ignored (rebuilt on the next write)
    files = d.get("files") if isinstance(d, dict) else None
    return files if isinstance(files, dict) else {}


def cached_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 of ``path`` recorded in the cache when its path, size and times still match, else None."""
    key, stamp = _file_key(Path(path))
    hit = _read_verified().get(key)
    if isinstance(hit, dict) and all(hit.get(k) == v for k, v in stamp.items()):
        sha = hit.get("sha256")
        if isinstance(sha, str) and len(sha) == 64:
            return sha
    return None


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, hashed once per (resolved path, size, mtime_ns, ctime_ns) and remembered in the
    tok cache (written atomically; a cache that cannot be written is skipped)."""
    sha = cached_sha256(path)
    if sha is not None:
        return sha
    key, stamp = _file_key(Path(path))
    sha = sha256_file(path)
    files = _read_verified()
    files.pop(key, None)
    files[key] = {**stamp, "sha256": sha}
    files = dict(list(files.items())[-_VERIFIED_MAX:])
    with contextlib.suppress(OSError, TokError):
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_dir() / VERIFIED_NAME, json.dumps({"version": 1, "files": files}) + "\n")
    return sha


@dataclass
class ModelFolder:
    path: Path
    config: dict[str, Any]
    #: how the folder was named when it was resolved: a registry name, ``hf-hub:...``; empty for a folder path
    ref: str = field(default="", compare=False)

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
        """Recompute the weights' sha256 (no cache) and compare it with the recorded one."""
        return sha256_file(self.weights_path) == self.sha256

    def weights_header(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return read_weights_header(self.weights_path)

    def checked_sha256(self) -> str:
        """The sha256 of the weights as they are now, after checking it against ``provenance.weights_sha256``
        (one-line TokError on a mismatch). ``TOK_TRUST_WEIGHTS=1``: nothing is hashed; the cached hash when there
        is one, else ``""`` (unverified)."""
        if trust_weights():
            return cached_sha256(self.weights_path) or ""
        sha = weights_sha256(self.weights_path)
        if self.sha256 and sha != self.sha256:
            raise TokError(f"{self.weights_path} has sha256 {sha} but {self.path / CONFIG_NAME} records {self.sha256}: "
                           "the weights were changed or damaged after the folder was written (restore the file, or "
                           "set TOK_TRUST_WEIGHTS=1 to load it unverified)")
        return sha

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
    generator = isinstance(cfg.get("tokenizer"), Mapping)  # a generator folder names the tokenizer it samples for
    tag, loader = ("image-generator", "load_generator") if generator else ("image-tokenizer", "load")
    lines = ["---", "library_name: tok", f"license: {lic}", "tags:", f"- {tag}", f"- {cfg['family']}", "---", ""]
    if not body:
        keys = "".join(f"- {k}: `{json.dumps(v)}`\n" for k, v in cfg.items()
                       if k not in _OWN_KEYS and k not in ("training", "metrics"))
        body = (f"# {name}\n\nA `{cfg['family']}` model in the tok model-folder format.\n\n{keys}"
                f"- source: {prov.get('source', 'unknown')}\n\nLoad it with `tokcli.{loader}(\"local-dir:PATH\")`.\n")
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
    remove_stale_temps(dest.parent)
    tmp = temp_dir(dest.parent, dest.name)
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"tok_format": str(TOK_FORMAT), "family": family})
        os.chmod(tmp / WEIGHTS_NAME, 0o666 & ~current_umask())  # safetensors writes 0600; a folder is for sharing
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
        old = temp_dir(dest.parent, dest.name + ".old")
        os.replace(dest, old / "x")
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
