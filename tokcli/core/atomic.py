"""Atomic file output: write to a temporary file beside the destination, then rename over it.

A crash, a full disk or Ctrl-C never leaves a half-written output under the final name.

Temporary names are ``.NAME.tmp-<pid>-<random>`` (files) and folders alike: when tok next writes into that folder
it removes the ones whose process is gone (after a SIGKILL nothing else would), never the temp of a live process.
Outputs get the permissions any ordinary file would: ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders
(``mkstemp``/``mkdtemp`` alone would make them 0600 / 0700).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from tokcli.errors import TokError

TMP_TAG = ".tmp-"
_STALE = re.compile(r"^\..*\.tmp-(\d+)-[A-Za-z0-9_]+(\.[A-Za-z0-9]+)?$")
_cleaned: set[str] = set()  # folders already swept by this process (a sweep per PNG would be quadratic)


def check_overwrite(dest: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to replace an existing output unless ``overwrite`` (the ``--overwrite`` flag); returns ``dest`` as a
    Path. Every writer of a whole output (model folders, converted checkpoints) checks through this one function."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise TokError(f"{dest} already exists (pass --overwrite to replace it)")
    return dest


# --------------------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------------------
def os_error_message(e: OSError, path: str | os.PathLike | None = None, action: str = "write") -> str:
    """One line for an OSError met while ``action`` ("write" / "create") ``path``: a full disk, a name too long,
    no permission, ..."""
    where = path if path is not None else (e.filename or "the output")
    doing = {"write": "writing", "create": "creating"}.get(action, action)
    if e.errno == errno.ENOSPC:
        return f"no space left on device while {doing} {where}"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded while {doing} {where}"
    if e.errno == errno.ENAMETOOLONG:
        return f"file name too long while {doing} {where}"
    reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
    return f"cannot {action} {where}: {reason}"


# --------------------------------------------------------------------------------------------------------
# permissions and stale temporaries
# --------------------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask (read from /proc where it can be, so no other thread sees a changed umask)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_prefix(name: str) -> str:
    """``.NAME.tmp-<pid>-``: mkstemp / mkdtemp add the random part."""
    return f".{name}{TMP_TAG}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, *, again: bool = False) -> list[Path]:
    """Remove ``.NAME.tmp-<pid>-<random>`` files and folders in ``folder`` whose writing process is gone.
    Returns what was removed; a problem removing one is ignored (it is only litter). Each folder is swept once
    per process unless ``again``."""
    removed: list[Path] = []
    key = os.path.abspath(folder)
    if key in _cleaned and not again:
        return removed
    _cleaned.add(key)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _STALE.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def make_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` and its parents (an existing folder is fine); a one-line TokError when it cannot be, or when
    the path is a file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TokError(f"{folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise TokError(f"{folder} (or a folder above it) is a file, not a folder") from None
    except OSError as e:
        raise TokError(os_error_message(e, folder, "create")) from None
    return folder


def temp_file(folder: Path, name: str, suffix: str = "") -> Path:
    """A new empty temporary file ``folder/.NAME.tmp-<pid>-<random>SUFFIX`` with ordinary permissions."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(name), suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def temp_dir(folder: Path, name: str) -> Path:
    """A new temporary folder ``folder/.NAME.tmp-<pid>-<random>`` with ordinary permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(name), dir=folder))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


# --------------------------------------------------------------------------------------------------------
# checking and writing
# --------------------------------------------------------------------------------------------------------
def check_writable_file(dest: str | os.PathLike) -> Path:
    """Before any work: ``dest`` is not a folder, its folder exists (created) and takes a new file. TokError else."""
    dest = Path(dest)
    if dest.is_dir():
        raise TokError(f"{dest} is a folder; give a file name for the output")
    parent = make_folder(dest.parent)
    try:
        temp_file(parent, dest.name).unlink()
    except OSError as e:
        raise TokError(os_error_message(e, dest)) from None
    return dest


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Before any work: ``folder`` is, or can be made, a folder that takes new files. TokError else. The folders
    made for the check are removed again (the run makes them when it writes), so a run refused later leaves the
    file system as it was."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        make_folder(folder)
        temp_file(folder, "check").unlink()
    except OSError as e:
        raise TokError(os_error_message(e, folder)) from None
    finally:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()
    return folder


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in dest's folder; on success it is renamed to ``dest``, on error removed.

    ``suffix`` defaults to dest's own suffix so libraries that look at the extension (np.savez, PIL) behave.
    Stale temporaries of dead processes in that folder are removed first.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest.parent)
    tmp = temp_file(dest.parent, dest.name, dest.suffix if suffix is None else suffix)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))
