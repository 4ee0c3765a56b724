"""Atomic file output: write to a temporary file beside the destination, then rename over it.

A crash, a full disk or Ctrl-C never leaves a half-written output under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from tokcli.errors import TokError


def check_overwrite(dest: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to replace an existing output unless ``overwrite`` (the ``--overwrite`` flag); returns ``dest`` as a
    Path. Every writer of a whole output (model folders, converted checkpoints) checks through this one function."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise TokError(f"{dest} already exists (pass --overwrite to replace it)")
    return dest


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in dest's folder; on success it is renamed to ``dest``, on error removed.

    ``suffix`` defaults to dest's own suffix so libraries that look at the extension (np.savez, PIL) behave.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", suffix=dest.suffix if suffix is None else suffix,
                               dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
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
