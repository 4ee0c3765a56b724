"""Tar archives as image inputs (ImageNet / WebDataset shards), read in place: nothing is extracted to disk.

An uncompressed tar stores each member's bytes as one contiguous range of the file, so listing an archive only
reads its 512-byte headers (``tarfile`` seeks past the data) and an image is read later with one seek and one
read, from any thread. A compressed tar has no such ranges (reading member N means decompressing members
0..N-1), so ``.tar.gz`` and friends are refused with a line saying to decompress first.

Keys are what the same archive extracted into a folder would give: the member path with ``./`` dropped, names
starting with '.' (or inside such folders) skipped, links, folders and devices skipped. A member that is itself
a ``.tar`` (ImageNet's train archive holds one per class) is opened in place too, its name without ``.tar``
becoming the folder of its images: ``n01440764.tar`` > ``n01440764_10026.JPEG`` gives the key
``n01440764/n01440764_10026.JPEG``, so ``--labels folder`` finds the ImageNet classes.

Archives are untrusted: a member name that is absolute, climbs out with ``..``, holds a NUL, a backslash or a
control character is refused (one line naming archive and member), as is a member whose recorded bytes run past
the end of the file, a header larger than 16 MiB, and an archive that stops before its end-of-archive marker (a
truncated download would otherwise lose its last images without a word).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple

from tokcli.core.atomic import os_error_message
from tokcli.errors import TokError

TAR_SUFFIX = ".tar"
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz", ".tar.zst",
                           ".tzst", ".tar.lz4")
MAX_NESTING = 4  # tars inside tars: ImageNet needs one level; the cap keeps a crafted archive from recursing far
MAX_HEADER_BYTES = 16 << 20  # a pax / GNU long-name header larger than this is not a real one

# Compressed data in a file named .tar: say so rather than "invalid header".
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
          (b"\x04\x22\x4d\x18", "lz4"))
_BLOCK = 512


class Member(NamedTuple):
    """One image inside an archive: its key and where its bytes are in the (outer) archive file."""

    key: str
    offset: int
    size: int


class _HeaderTooLarge(tarfile.ReadError):
    pass


class _Window:
    """A read-only view of bytes [start, start + length) of an open binary file, for ``tarfile``.

    Every read seeks first, so several windows (an archive and the tars inside it) share one file object. Reads
    past the window end give b"" like the end of a file; a single read over MAX_HEADER_BYTES raises (tarfile
    reads only headers here, and a hostile header could claim gigabytes)."""

    def __init__(self, f: BinaryIO, start: int, length: int):
        self.f, self.start, self.length, self._pos = f, start, length, 0

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = (0, self._pos, self.length)[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self.length - self._pos)
        n = left if n is None or n < 0 else min(n, left)
        if n > MAX_HEADER_BYTES:
            raise _HeaderTooLarge(f"a header claiming {n} bytes")
        self.f.seek(self.start + self._pos)
        data = self.f.read(n)
        self._pos += len(data)
        return data


def is_archive_name(name: str) -> bool:
    """Whether a file named ``name`` is taken as a tar archive (``.tar``, or a compressed tar, refused later)."""
    low = name.lower()
    return low.endswith(TAR_SUFFIX) or low.endswith(COMPRESSED_TAR_SUFFIXES)


def _compressed_message(path: Path, kind: str = "") -> str:
    what = f"a {kind}-compressed tar" if kind else "a compressed tar"
    return (f"{path}: {what} is not read (an image in it cannot be reached without decompressing all before it); "
            "decompress it first and pass the uncompressed .tar")


def _member_key(name: str) -> str | None:
    """The key a member name gives (None for the archive root "."); ValueError saying why a name is refused."""
    if "\0" in name:
        raise ValueError("holds a NUL character")
    if "\\" in name:
        raise ValueError("holds a backslash")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("holds a control character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid UTF-8") from None
    pure = PurePosixPath(name)
    if pure.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise ValueError("is an absolute path")
    if ".." in pure.parts:
        raise ValueError("climbs out of the archive with '..'")
    key = pure.as_posix()  # "./a//b/" -> "a/b"
    return None if key == "." else key


def _add(ti: tarfile.TarInfo, win: _Window, shown: str, prefix: str, exts: tuple[str, ...],
         found: dict[str, Member], depth: int) -> None:
    """Record one member: an image, a tar to open in place, or nothing (hidden, not a regular file, other)."""
    try:
        key = _member_key(ti.name)
    except ValueError as e:
        raise TokError(f"{shown}: member {ti.name!r} {e}; refusing the archive") from None
    if key is None or any(p.startswith(".") for p in key.split("/")):
        return
    if not ti.isreg() or ti.issparse():  # links, folders, devices, sparse files: not image bytes
        return
    if ti.size < 0 or ti.offset_data + ti.size > win.length:
        raise TokError(f"{shown}: member {ti.name!r} runs past the end of the archive (a truncated file?)")
    low = key.lower()
    if low.endswith(TAR_SUFFIX):
        if depth >= MAX_NESTING:
            raise TokError(f"{shown}: member {ti.name!r} is a tar nested more than {MAX_NESTING} deep")
        inner = _Window(win.f, win.start + ti.offset_data, ti.size)
        _scan(inner, f"{shown}:{key}", f"{prefix}{key[:-len(TAR_SUFFIX)]}/", exts, found, depth + 1)
    elif os.path.splitext(low)[1] in exts:
        full = prefix + key
        if full in found:
            raise TokError(f"{shown}: two members give the key {full!r} (an archive appended to?); refusing it")
        found[full] = Member(full, win.start + ti.offset_data, ti.size)


def _scan(win: _Window, shown: str, prefix: str, exts: tuple[str, ...], found: dict[str, Member],
          depth: int) -> None:
    """Walk one archive's headers in order (seeking past the data) and record its images in ``found``."""
    count = 0
    try:
        tf = tarfile.TarFile(fileobj=win, mode="r", encoding="utf-8", errors="surrogateescape")
        while (ti := tf.next()) is not None:
            tf.members.clear()  # tarfile keeps every TarInfo; a million-member shard would hold them all
            _add(ti, win, shown, prefix, exts, found, depth)
            count += 1
        win.seek(tf.offset)
        ended = win.read(_BLOCK) == bytes(_BLOCK)
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        what = "not a tar archive, or a damaged one" if count == 0 else f"damaged after {count} members"
        raise TokError(f"{shown}: {what} ({reason})") from None
    if not ended:
        raise TokError(f"{shown}: the archive stops after {count} members without its end-of-archive marker "
                       "(a truncated or damaged file)")


def image_members(path: str | os.PathLike, exts: tuple[str, ...]) -> list[Member]:
    """The images (member extension in ``exts``, lower case) of the tar archive at ``path``, sorted by key.

    TokError (one line) for a compressed tar, a file that is not a tar, a damaged or truncated one, a hostile
    member name, two members with one key, or an archive without images."""
    path = Path(path)
    low = path.name.lower()
    if low.endswith(COMPRESSED_TAR_SUFFIXES):
        raise TokError(_compressed_message(path))
    found: dict[str, Member] = {}
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            for magic, kind in _MAGIC:
                if head.startswith(magic):
                    raise TokError(_compressed_message(path, kind))
            _scan(_Window(f, 0, os.fstat(f.fileno()).st_size), str(path), "", exts, found, 0)
    except OSError as e:
        raise TokError(os_error_message(e, path, "read")) from None
    if not found:
        raise TokError(f"{path} contains no images (looked for members ending in {', '.join(exts)})")
    return sorted(found.values())


def member_byte_limit(max_pixels: int) -> int:
    """The most bytes one image inside an archive may have (it is read into memory whole): 1 GiB, or 16 bytes per
    allowed pixel when that is more (an uncompressed 16-bit RGBA image needs 8 a pixel)."""
    return max(1 << 30, 16 * max_pixels)


def read_member(path: str | os.PathLike, offset: int, size: int, *, limit: int, shown_as: str) -> bytes:
    """The ``size`` bytes at ``offset`` of the archive at ``path``, read with a file opened for this read only
    (safe from decode threads). Refused in one line naming ``shown_as``: a size over ``limit`` (checked before
    anything is read), an empty member, or a range past the end of the file (the archive shrank since it was
    listed)."""
    if size == 0:
        raise TokError(f"{shown_as}: empty file (0 bytes)")
    if size > limit:
        raise TokError(f"{shown_as}: {size} bytes, more than the {limit}-byte limit for one image in an archive "
                       "(raise TOK_MAX_PIXELS to allow larger images)")
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            if offset < 0 or size < 0 or offset + size > end:
                raise TokError(f"{shown_as}: bytes {offset}..{offset + size} lie past the end of {path} ({end} "
                               "bytes; the archive was truncated or replaced?)")
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise TokError(os_error_message(e, path, "read")) from None
    if len(data) != size:
        raise TokError(f"{shown_as}: read {len(data)} of {size} bytes (the archive changed while being read)")
    return data
