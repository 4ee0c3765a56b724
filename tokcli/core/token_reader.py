"""Reading token files and sharded sets (the format is described in :mod:`tokcli.core.tokens`, which re-exports
everything public here): every problem is a one-line :class:`TokError`, pickles are refused.

Hostile files: only the known members are read, and each member's .npy header (shape, dtype) is checked against the
zip's sizes, the keys' N and the JSON header before any of its data is read; unknown members, object dtypes, raw
(pickled) bytes and deflated members that unpack more than 100:1 past 16 MiB (zip bombs) are refused."""

from __future__ import annotations

import io
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

from tokcli.errors import TokError

TOK_FORMAT = 1
PAYLOADS = ("indices", "bits", "latents")
MANIFEST = "manifest.json"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
KNOWN_MEMBERS = ("header", "keys", "labels", *PAYLOADS)
MAX_HEADER_BYTES = 16 << 20        # the JSON header of a token file is a few kB
MAX_COMPRESSION_RATIO = 100        # tok writes members uncompressed; a deflated member may shrink this much...
RATIO_FREE_BYTES = 16 << 20        # ... once its data is larger than this (zeros deflate ~1000:1: a zip bomb)


@dataclass
class TokenFile:
    """A validated token file (or a whole sharded set, concatenated).

    ``array`` is [N, *shape]: unsigned integer indices, unpacked 0/1 uint8 bits, or float latents.
    """

    header: dict[str, Any]
    keys: list[str]
    kind: str
    array: np.ndarray
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def spec(self) -> dict[str, Any]:
        """The token spec stored in the header (TokenSpec.to_dict() form)."""
        return self.header["tokens"]

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-image token shape."""
        return tuple(self.array.shape[1:])


def unpack_bits(packed: np.ndarray, bit_count: int) -> np.ndarray:
    """Inverse of pack_bits: uint8 [..., ceil(B/8)] -> uint8 0/1 [..., B]."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=int(bit_count))


# --------------------------------------------------------------------------------------------------------
# members, checked before their data is read (zip bombs, pickles, unknown members)
# --------------------------------------------------------------------------------------------------------
@dataclass
class _Member:
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype


def _npy_header(z: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> _Member:
    """Shape and dtype from a member's .npy header (a few hundred bytes are decompressed, no data)."""
    what = f"{name}: member {info.filename}"
    with z.open(info) as m:
        magic = m.read(8)
        if magic[:6] != _NPY_MAGIC or len(magic) < 8:
            raise TokError(f"{what} is not a .npy array (raw or pickled bytes are refused)")
        version = (magic[6], magic[7])
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(m)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(m)
        else:
            raise TokError(f"{what} has an unknown .npy version {version[0]}.{version[1]}")
        offset = m.tell()
    if dtype.hasobject:
        raise TokError(f"{name} contains Python objects in {info.filename} (pickled arrays are refused)")
    nbytes = math.prod(shape) * dtype.itemsize
    if info.file_size != offset + nbytes:
        raise TokError(f"{what} declares a {dtype} array of shape {tuple(shape)} ({nbytes} bytes) but holds "
                       f"{info.file_size - offset} bytes (damaged or forged)")
    return _Member(info, tuple(int(d) for d in shape), dtype)


def _check_zip_entry(info: zipfile.ZipInfo, name: str, size: int) -> str:
    """The array name of a known member; refuses unknown members, members past the end and zip bombs."""
    key = info.filename[:-4] if info.filename.endswith(".npy") else None
    if key not in KNOWN_MEMBERS:
        raise TokError(f"{name} has an unknown member {info.filename!r} (a token file holds only "
                       f"{', '.join(k + '.npy' for k in KNOWN_MEMBERS)})")
    if info.header_offset + info.compress_size > size:
        raise TokError(f"{name} is damaged or truncated (member {info.filename} extends past the end of the file)")
    stored = info.compress_type == zipfile.ZIP_STORED
    if stored and info.compress_size != info.file_size:
        raise TokError(f"{name} is damaged (stored member {info.filename} has two sizes)")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_FREE_BYTES and ratio > MAX_COMPRESSION_RATIO:
        raise TokError(f"{name}: member {info.filename} unpacks {info.compress_size} bytes into {info.file_size} "
                       f"({ratio:.0f}:1, more than {MAX_COMPRESSION_RATIO}:1); refused as a possible zip bomb")
    return key


def _plan_members(z: zipfile.ZipFile, name: str, size: int) -> dict[str, _Member]:
    """Every member's declared shape and dtype, checked against each other and the zip's sizes; no data read."""
    plan: dict[str, _Member] = {}
    for info in z.infolist():
        key = _check_zip_entry(info, name, size)
        if key in plan:
            raise TokError(f"{name} holds member {info.filename} twice")
        plan[key] = _npy_header(z, info, name)
    if "header" not in plan:
        raise TokError(f"{name} has no header (not a tok token file)")
    h = plan["header"]
    if h.shape != () or h.dtype.kind not in "US" or h.info.file_size > MAX_HEADER_BYTES:
        raise TokError(f"{name}: header must be a single string of at most {MAX_HEADER_BYTES} bytes, got a "
                       f"{h.dtype} array of shape {h.shape}")
    keys = plan.get("keys")
    if keys is None:
        raise TokError(f"{name} has no keys array")
    if len(keys.shape) != 1 or keys.dtype.kind != "U":
        raise TokError(f"{name}: keys must be a 1-D string array, got {keys.dtype} of shape {keys.shape}")
    n = keys.shape[0]
    for k in PAYLOADS:
        if k in plan and not plan[k].shape:
            raise TokError(f"{name}: {k} must have an image axis, got a scalar")
        if k in plan and plan[k].shape[0] != n:
            raise TokError(f"{name} has {n} keys but {plan[k].shape[0]} images of {k}")
    if "labels" in plan and plan["labels"].shape[:1] != (n,):
        raise TokError(f"{name}: labels have shape {plan['labels'].shape} but there are {n} images")
    if "labels" in plan and plan["labels"].dtype.kind not in "uibU":
        raise TokError(f"{name}: labels have dtype {plan['labels'].dtype}; expected integers or strings")
    return plan


def _check_against_header(plan: dict[str, _Member], header: dict, name: str) -> None:
    """The payload's declared per-image shape and dtype agree with the JSON header (before reading it)."""
    tokens = header.get("tokens")
    kinds = [k for k in PAYLOADS if k in plan]
    if not isinstance(tokens, dict) or len(kinds) != 1:
        return  # _validate says what is wrong
    kind, m = kinds[0], plan[kinds[0]]
    want = tokens.get("shape")
    if not isinstance(want, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in want):
        raise TokError(f"{name}: header token shape {want!r} is not a list of integers")
    if kind == "bits":
        count = header.get("bit_count")
        if isinstance(count, int) and want:
            want = [*want[:-1], math.ceil(count / 8)]
    if list(m.shape[1:]) != want:
        raise TokError(f"{name}: {kind} have per-image shape {m.shape[1:]} but the header says {tuple(want)}")
    ok = {"indices": m.dtype.kind in "ui" and m.dtype.itemsize <= 8, "bits": m.dtype == np.uint8,
          "latents": m.dtype.kind == "f" and m.dtype.itemsize <= 8}[kind]
    if not ok:
        raise TokError(f"{name}: {kind} have dtype {m.dtype}, which a token file does not use")
    stored = header.get("latent_dtype")
    if kind == "latents" and stored is not None and str(stored) != str(m.dtype):
        raise TokError(f"{name}: latents are stored as {m.dtype} but the header says {stored}")


def _read_member(z: zipfile.ZipFile, m: _Member, name: str) -> np.ndarray:
    with z.open(m.info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


# --------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------
def _open_source(path: str | os.PathLike) -> tuple[BinaryIO, str, int]:
    """(binary file object, name for messages, size in bytes)."""
    if str(path) == "-":
        data = sys.stdin.buffer.read()
        return io.BytesIO(data), "<stdin>", len(data)
    p = Path(path)
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise TokError(f"no such file or folder: {p}") from None
    except IsADirectoryError:
        raise TokError(f"{p} is a folder without {MANIFEST} (not a sharded token set)") from None
    except OSError as e:
        raise TokError(f"cannot read {p}: {e.strerror or e}") from None
    return f, str(p), os.fstat(f.fileno()).st_size


def _load_members(f: BinaryIO, name: str, size: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The known arrays of an .npz, each checked from its .npy header before a byte of its data is read
    (:func:`_plan_members`), and the bytes each occupies in the archive (deflated size where deflated); every
    failure is a one-line TokError."""
    if size == 0:
        raise TokError(f"{name} is empty (0 bytes), not a token file")
    magic = f.read(4)
    f.seek(0)
    if magic not in _ZIP_MAGIC:
        raise TokError(f"{name} is not a token file (not an .npz archive)")
    try:
        with zipfile.ZipFile(f) as z:
            plan = _plan_members(z, name, size)
            header = _read_member(z, plan["header"], name)
            _check_against_header(plan, _parse_header(header, name), name)
            stored = {k: int(m.info.compress_size) for k, m in plan.items()}
            return {k: (header if k == "header" else _read_member(z, m, name)) for k, m in plan.items()}, stored
    except TokError:
        raise
    except MemoryError:
        raise TokError(f"{name}: out of memory while reading") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, zlib.error, ... from damaged archives
        reason = " ".join(str(e).split()) or type(e).__name__
        raise TokError(f"{name} is damaged or truncated ({reason})") from None


def _parse_header(raw: np.ndarray | None, name: str) -> dict:
    if raw is None:
        raise TokError(f"{name} has no header (not a tok token file)")
    if raw.ndim != 0 or raw.dtype.kind not in "US":
        raise TokError(f"{name}: header must be a single string, got a {raw.dtype} array of shape {raw.shape}")
    text = raw.item()
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokError(f"{name}: header is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(header, dict):
        raise TokError(f"{name}: header is not a JSON object")
    for k in ("tokens", "preprocess", "decode"):
        if k in header and not isinstance(header[k], dict):
            raise TokError(f"{name}: header {k} must be a JSON object, got {type(header[k]).__name__}")
    _check_format(header.get("tok_format"), name)
    return header


def _check_format(fmt, name: str) -> None:
    if fmt is None:
        raise TokError(f"{name}: header has no tok_format (not a tok token file)")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise TokError(f"{name}: tok_format {fmt!r} is not valid")
    if fmt > TOK_FORMAT:
        raise TokError(f"{name} uses token format {fmt}, newer than this tok reads ({TOK_FORMAT}): upgrade tok")


def _first_duplicate(keys: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            return k
        seen.add(k)
    return None


def _validate(members: dict[str, np.ndarray], name: str) -> TokenFile:
    header = _parse_header(members.get("header"), name)
    keys_arr = members.get("keys")
    if keys_arr is None:
        raise TokError(f"{name} has no keys array")
    if keys_arr.ndim != 1 or keys_arr.dtype.kind != "U":
        raise TokError(f"{name}: keys must be a 1-D string array, got {keys_arr.dtype} of shape {keys_arr.shape}")
    present = [k for k in PAYLOADS if k in members]
    if len(present) != 1:
        what = "no payload" if not present else f"{len(present)} payloads ({', '.join(present)})"
        raise TokError(f"{name} has {what}; a token file holds exactly one of indices, bits, latents")
    kind = present[0]
    arr = members[kind]
    if arr.ndim < 1:
        raise TokError(f"{name}: {kind} must have an image axis, got a scalar")
    n = arr.shape[0]
    if len(keys_arr) != n:
        raise TokError(f"{name} has {len(keys_arr)} keys but {n} images of {kind}")
    keys = keys_arr.tolist()
    dup = _first_duplicate(keys)
    if dup is not None:
        raise TokError(f"{name}: key {dup!r} appears more than once")

    tokens = header.get("tokens")
    if not isinstance(tokens, dict) or "shape" not in tokens:
        raise TokError(f"{name}: header has no token spec (tokens.shape)")
    if tokens.get("kind", kind) != kind:
        raise TokError(f"{name}: header says {tokens['kind']!r} tokens but the file holds {kind}")
    try:
        want = tuple(int(s) for s in tokens["shape"])
    except (TypeError, ValueError):
        raise TokError(f"{name}: header token shape {tokens['shape']!r} is not a list of integers") from None

    if kind == "indices":
        if arr.dtype.kind not in "ui":
            raise TokError(f"{name}: indices have dtype {arr.dtype}; expected unsigned integers")
        if tuple(arr.shape[1:]) != want:
            raise TokError(f"{name}: indices have per-image shape {tuple(arr.shape[1:])} but the header says {want}")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0:
                raise TokError(f"{name}: negative index {lo}")
            cb = tokens.get("codebook_size")
            if cb is not None and hi >= int(cb):
                raise TokError(f"{name}: index {hi} is outside the codebook of {cb}")
    elif kind == "bits":
        count = header.get("bit_count")
        if not isinstance(count, int) or count <= 0:
            raise TokError(f"{name}: a bit file needs a positive integer bit_count in its header")
        if arr.dtype != np.uint8:
            raise TokError(f"{name}: packed bits have dtype {arr.dtype}; expected uint8")
        if not want or want[-1] != count:
            raise TokError(f"{name}: header token shape {want} disagrees with bit_count {count}")
        if tuple(arr.shape[1:]) != (*want[:-1], math.ceil(count / 8)):
            raise TokError(f"{name}: packed bits have per-image shape {tuple(arr.shape[1:])}, expected "
                           f"{(*want[:-1], math.ceil(count / 8))} for {want}")
        arr = unpack_bits(arr, count)
    else:
        if arr.dtype.kind != "f":
            raise TokError(f"{name}: latents have dtype {arr.dtype}; expected floats")
        if tuple(arr.shape[1:]) != want:
            raise TokError(f"{name}: latents have per-image shape {tuple(arr.shape[1:])} but the header says {want}")

    labels = members.get("labels")
    if labels is not None and (labels.ndim < 1 or labels.shape[0] != n):
        raise TokError(f"{name}: labels have shape {labels.shape} but there are {n} images")
    return TokenFile(header=header, keys=keys, kind=kind, array=arr, labels=labels)


def member_bytes(members: dict[str, np.ndarray], stored: dict[str, int], kind: str) -> dict[str, int]:
    """Bytes per member for ``tok info``: the payload's raw bytes, the others' bytes in the archive."""
    return {k: int(members[k].nbytes) if k == kind else stored[k] for k in members}


def read_one(path: str | os.PathLike) -> tuple[TokenFile, dict[str, int], int]:
    """(TokenFile, bytes per member as :func:`member_bytes` counts them, file size)."""
    f, name, size = _open_source(path)
    with f:
        members, stored = _load_members(f, name, size)
    tf = _validate(members, name)
    return tf, member_bytes(members, stored, tf.kind), size


def read_token_file(path: str | os.PathLike) -> TokenFile:
    """Read and validate a token file, ``-`` (stdin), or a sharded set (a folder with manifest.json, or the
    manifest itself; concatenated in memory: stream a large set with :func:`tokcli.core.token_set.open_tokens`).
    Every problem is a one-line TokError."""
    from tokcli.core.token_set import read_set, set_folder

    directory = set_folder(path)
    if directory is not None:
        return read_set(directory)
    return read_one(path)[0]


def bytes_report(path: str | os.PathLike) -> dict[str, Any]:
    """Where the bytes of a token file (or set) go, for ``tok info`` (see :func:`tokcli.core.token_set.bytes_report`)."""
    from tokcli.core.token_set import bytes_report as report

    return report(path)
