"""The one rule for the pretrained files tok uses (FID Inception, LPIPS backbones, the DINOv2 teachers to come).

1. Look in the documented local places, in order: the file the user named (``--inception-weights FILE`` ...; it
   must exist), the file's folder (``$TORCH_HOME/hub/checkpoints`` for torch hub files) under its name or an
   accepted alias, then the Hugging Face cache for files that live on the Hub.
2. Never download unless asked: ``--download`` on the commands that need a pretrained file, or ``TOK_DOWNLOAD=1``.
3. ``HF_HUB_OFFLINE=1`` or ``TOK_OFFLINE=1`` forbid any download, even when asked.
4. A missing file is one line (:class:`MissingWeightsError`) naming the exact file, where to put it, and the flag
   that fetches it.
5. A fetched file is announced on stderr with its full path before, and its sha256 after.

Standard library only (``huggingface_hub`` is imported lazily for Hub files), so metrics/ and losses/ share it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tokcli.core.atomic import atomic_path
from tokcli.errors import MissingWeightsError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TOK_OFFLINE")
DOWNLOAD_VAR = "TOK_DOWNLOAD"
_CHUNK = 1 << 20


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def offline_var() -> str | None:
    """The variable that forbids downloads (``HF_HUB_OFFLINE`` or ``TOK_OFFLINE``), or None."""
    return next((v for v in OFFLINE_VARS if _env_true(v)), None)


def download_asked(flag: bool | None = False) -> bool:
    """Whether the user asked for downloads: the command's ``--download`` or ``TOK_DOWNLOAD=1``."""
    return bool(flag) or _env_true(DOWNLOAD_VAR)


@dataclass(frozen=True)
class PretrainedFile:
    """One pretrained file: what it is, its name, the folder it is looked for and fetched into, where it comes
    from (``url``, or ``hf = (repo_id, filename)`` on the Hub), and the option that names a local copy."""

    what: str                      # "the FID Inception weights"
    name: str                      # pt_inception-2015-12-05-6726825d.pth
    folder: Path                   # $TORCH_HOME/hub/checkpoints
    url: str | None = None
    hf: tuple[str, str] | None = None
    hf_cache: Path | None = None   # the HF cache folder (None: huggingface_hub's default)
    aliases: tuple[str, ...] = ()  # other names accepted in ``folder`` (torch-fidelity's copy, ...)
    option: str | None = None      # "--inception-weights"
    sha256_prefix: str | None = None  # checked after a download (torchvision names: NAME-<sha256[:8]>.pth)
    fetch_flag: str | None = "--download"  # the flag of the command at hand; None: only TOK_DOWNLOAD=1

    @property
    def path(self) -> Path:
        return Path(self.folder) / self.name

    def source(self) -> str:
        return self.url or (f"https://huggingface.co/{self.hf[0]}/blob/main/{self.hf[1]}" if self.hf else "?")


def _hf_cached(spec: PretrainedFile) -> Path | None:
    if spec.hf is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(spec.hf[0], spec.hf[1], cache_dir=spec.hf_cache)
    return Path(hit) if isinstance(hit, (str, os.PathLike)) and Path(hit).is_file() else None


def locate(spec: PretrainedFile, explicit: str | os.PathLike | None = None) -> Path | None:
    """The local copy that would be used (no network): ``explicit`` (must exist), the folder, the HF cache."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"{spec.option or 'the weights file'} {path} does not exist (expected "
                                      f"{spec.what} {spec.name})")
        return path
    for name in (spec.name, *spec.aliases):
        if (Path(spec.folder) / name).is_file():
            return Path(spec.folder) / name
    return _hf_cached(spec)


def _where(spec: PretrainedFile, *, named: bool = False) -> str:
    """How to provide the file by hand; ``named``: the message has not yet said which file and folder."""
    alt = f" or pass {spec.option} FILE" if spec.option else ""
    if spec.hf is not None and spec.url is None:
        return f"get it with `hf download {spec.hf[0]} {spec.hf[1]}`{alt}"
    there = f"{spec.name} in {spec.folder}" if named else "it there"
    return f"put {there} (from {spec.source()}){alt}"


def missing_message(spec: PretrainedFile, *, hint: str = "") -> str:
    """The one line for a missing file that the user did not ask to download."""
    fetch = (f"rerun with {spec.fetch_flag} (or set {DOWNLOAD_VAR}=1)" if spec.fetch_flag
             else f"set {DOWNLOAD_VAR}=1")
    return (f"{spec.what} {spec.name} not found in {spec.folder}: {_where(spec)}, or {fetch} to download it"
            f"{hint}")


def ensure(spec: PretrainedFile, explicit: str | os.PathLike | None = None, *, download: bool | None = False,
           hint: str = "") -> Path:
    """The local path of ``spec``, downloaded only when asked (``download`` or ``TOK_DOWNLOAD=1``) and allowed
    (no ``HF_HUB_OFFLINE`` / ``TOK_OFFLINE``). ``hint`` is appended to the missing-file line (other choices)."""
    found = locate(spec, explicit)
    if found is not None:
        return found
    if not download_asked(download):
        raise MissingWeightsError(missing_message(spec, hint=hint))
    var = offline_var()
    if var:
        raise MissingWeightsError(f"{spec.what} {spec.name} not found in {spec.folder} and {var} is set, so it is "
                                  f"not downloaded: {_where(spec)}")
    try:
        return _fetch(spec)
    except MissingWeightsError:
        raise
    except Exception as e:  # network, disk, HTTP errors: one line
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise MissingWeightsError(f"downloading {spec.what} from {spec.source()} failed ({type(e).__name__}: "
                                  f"{detail}): {_where(spec, named=True)}") from None


def _fetch(spec: PretrainedFile) -> Path:
    if spec.url is None and spec.hf is not None:
        from huggingface_hub import hf_hub_download

        _say(f"downloading {spec.what} {spec.hf[1]} from the Hugging Face repo {spec.hf[0]} into the HF cache")
        path = Path(hf_hub_download(spec.hf[0], spec.hf[1], cache_dir=spec.hf_cache))
        _say(f"downloaded {path} (sha256 {sha256_of(path)})")
        return path
    dest = spec.path.resolve()
    _say(f"downloading {spec.what} {spec.url} -> {dest}")
    digest = fetch_url(spec.url, dest, sha256_prefix=spec.sha256_prefix)
    _say(f"downloaded {dest} (sha256 {digest})")
    return dest


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_url(url: str, dest: str | os.PathLike, *, sha256_prefix: str | None = None) -> str:
    """Stream ``url`` into ``dest`` (atomically: a failed or refused download leaves nothing under the name) and
    return its sha256; a file whose sha256 does not start with ``sha256_prefix`` is refused."""
    import urllib.request

    h = hashlib.sha256()
    with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
        total, done, shown = int(r.headers.get("Content-Length") or 0), 0, -1
        for chunk in iter(lambda: r.read(_CHUNK), b""):
            f.write(chunk)
            h.update(chunk)
            done += len(chunk)
            pct = 100 * done // total if total else -1
            if sys.stderr.isatty() and pct != shown:
                print(f"\r  {done / 2**20:.0f} / {total / 2**20:.0f} MiB", end="", file=sys.stderr, flush=True)
                shown = pct
        if sys.stderr.isatty() and shown >= 0:
            print(file=sys.stderr)
        digest = h.hexdigest()
        if sha256_prefix and not digest.startswith(sha256_prefix):
            raise MissingWeightsError(f"the file downloaded from {url} has sha256 {digest}, not {sha256_prefix}...: "
                                      f"not kept (a changed or damaged file); put the original at {dest}")
    return digest
