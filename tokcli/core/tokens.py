"""The token file: one ``.npz`` holding the tokens of N images, and sharded sets of such files.

Layout (always loadable with ``np.load(path, allow_pickle=False)``):

- ``header``: 0-d unicode array holding a JSON object: ``tok_format`` (1), ``tok_version``, ``created`` (UTC),
  ``tokens`` (the token spec, whose ``shape`` is the per-image shape *in this file*), and whatever the writer
  adds (model name, sha256, family, preprocess, ...). Bit files also carry ``bit_count``.
- ``keys``: [N] fixed-width unicode, the relative input paths.
- exactly one payload: ``indices`` [N, *shape] in the smallest unsigned dtype that holds the codebook
  (uint8 / uint16 / uint32); ``bits`` = np.packbits of the [N, *shape] 0/1 array along its last axis;
  or ``latents`` [N, *shape] float16 / float32.
- optional ``labels`` [N].

The payload is stored uncompressed (it costs exactly its bytes plus a 128-byte .npy header, and can be mapped from
disk); keys, labels and header are deflated.
Readers refuse any other member, object arrays and raw bytes, and a deflated member above 16 MiB that unpacks more
than 100:1 (a zip bomb), all before reading the data (``token_reader``).

A sharded set is a folder with ``manifest.json`` = {"tok_format": 1, "header": {...}, "count": total,
"shards": [{"file": "part-00000.npz", "count": n, "sha256": "..."}, ...]} and the shard files beside it.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from tokcli.core.atomic import atomic_path, atomic_write_text, os_error_message
from tokcli.core.checkpoint import sha256_file
from tokcli.core.token_reader import (MANIFEST, PAYLOADS, TOK_FORMAT, TokenFile, bytes_report, read_token_file,
                                      unpack_bits)
from tokcli.errors import TokError
from tokcli.version import __version__

# the token-file API in one place: writing here, reading in token_reader
__all__ = ["MANIFEST", "PAYLOADS", "TOK_FORMAT", "TokenFile", "bytes_report", "index_dtype", "pack_bits",
           "read_token_file", "unpack_bits", "write_manifest", "write_token_file", "write_token_set"]

# --------------------------------------------------------------------------------------------------------
# bits
# --------------------------------------------------------------------------------------------------------
def pack_bits(bits: np.ndarray) -> tuple[np.ndarray, int]:
    """0/1 (or bool) array [..., B] -> (uint8 [..., ceil(B/8)], B), big-endian bit order within a byte."""
    bits = np.asarray(bits)
    if bits.ndim == 0:
        raise ValueError("bits need at least one axis")
    if bits.dtype != np.bool_:
        if bits.dtype.kind not in "uif":
            raise TypeError(f"bits must be 0/1 numbers or booleans, got {bits.dtype}")
        if bits.size and not np.isin(bits, (0, 1)).all():
            raise ValueError("bits must contain only 0 and 1")
        bits = bits.astype(np.bool_)
    return np.packbits(bits, axis=-1), int(bits.shape[-1])


# --------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------
def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; bfloat16 has no numpy twin
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def index_dtype(max_value: int) -> np.dtype:
    """Smallest unsigned dtype holding values up to max_value."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"index {max_value} does not fit in 32 bits")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    raise TypeError(f"header value of type {type(o).__name__} is not JSON serialisable")


def _build_arrays(header: dict, keys: Sequence[str], indices, bits, latents, labels) -> dict[str, np.ndarray]:
    given = {k: v for k, v in (("indices", indices), ("bits", bits), ("latents", latents)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"a token file holds exactly one of indices, bits, latents (got {sorted(given) or 'none'})")
    (kind, arr), = given.items()
    arr = _as_numpy(arr)
    keys = [str(k) for k in keys]
    if arr.ndim < 1 or arr.shape[0] != len(keys):
        raise ValueError(f"{kind} has shape {arr.shape} but there are {len(keys)} keys")
    if len(set(keys)) != len(keys):
        raise ValueError("keys must be unique")

    header = dict(header)
    header.setdefault("tok_format", TOK_FORMAT)
    header.setdefault("tok_version", __version__)
    header.setdefault("created", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    tokens = dict(header.get("tokens") or {})
    if tokens.get("kind", kind) != kind:
        raise ValueError(f"header says the tokens are {tokens['kind']!r} but {kind} were given")
    tokens["kind"] = kind
    shape = list(arr.shape[1:])
    if "shape" in tokens and list(tokens["shape"]) != shape:
        raise ValueError(f"header token shape {list(tokens['shape'])} does not match the array's per-image "
                         f"shape {shape} (use TokenSpec.shape_for(height, width))")
    tokens["shape"] = shape
    header["tokens"] = tokens

    out: dict[str, np.ndarray] = {}
    if kind == "indices":
        if arr.dtype.kind not in "ui":
            raise TypeError(f"indices must be integers, got {arr.dtype}")
        lo = int(arr.min()) if arr.size else 0
        hi = int(arr.max()) if arr.size else 0
        if lo < 0:
            raise ValueError(f"indices must be non-negative, found {lo}")
        cb = tokens.get("codebook_size")
        if cb is not None and hi >= int(cb):
            raise ValueError(f"index {hi} is outside the codebook of {cb}")
        # Dtype by the codebook when known (same model, same dtype in every file), else by the largest value.
        out["indices"] = arr.astype(index_dtype(max(hi, int(cb) - 1 if cb else 0)), copy=False)
    elif kind == "bits":
        packed, count = pack_bits(arr)
        header["bit_count"] = count
        out["bits"] = packed
    else:
        if arr.dtype.kind != "f":
            raise TypeError(f"latents must be floats, got {arr.dtype}")
        out["latents"] = arr if arr.dtype in (np.float16, np.float32) else arr.astype(np.float32)

    out["header"] = np.array(json.dumps(header, ensure_ascii=False, allow_nan=False, default=_json_default))
    out["keys"] = np.array(keys, dtype=str) if keys else np.zeros(0, dtype="<U1")
    if labels is not None:
        labels = _as_numpy(labels)
        if labels.dtype == object or labels.dtype.kind not in "uibU":
            raise TypeError(f"labels must be integers or strings, got {labels.dtype}")
        if labels.shape[:1] != (len(keys),):
            raise ValueError(f"labels have shape {labels.shape} but there are {len(keys)} keys")
        out["labels"] = labels
    return out


DEFLATED_MEMBERS = ("header", "keys", "labels")


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    """An .npz (what ``np.savez`` writes, loadable by ``np.load``) whose token payload is stored as is, so a shard
    can be mapped from disk, while keys, labels and header are deflated: fixed-width UTF-32 keys cost ~120 bytes
    per ImageNet path raw, ~3 deflated, which keeps a file within ~1 % of its payload."""
    with zipfile.ZipFile(f, "w", allowZip64=True) as z:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if name in DEFLATED_MEMBERS else zipfile.ZIP_STORED
            with z.open(info, "w", force_zip64=True) as m:
                np.lib.format.write_array(m, np.asanyarray(arr), allow_pickle=False)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    _write_npz(buf, arrays)
    return buf.getvalue()


def write_token_file(path: str | os.PathLike, *, header: dict, keys: Sequence[str], indices=None, bits=None,
                     latents=None, labels=None) -> None:
    """Write a token file atomically (``path == "-"``: to stdout). Exactly one payload must be given.

    ``header["tokens"]`` (the spec) gets ``kind`` and ``shape`` filled in; a given shape must equal the
    per-image shape of the array. Indices may be any integer dtype (torch tensors too); they are narrowed to
    the smallest unsigned dtype that holds the codebook (``tokens.codebook_size``) or else their largest value.
    Bits are 0/1 [N, ..., B]; they are packed and ``header["bit_count"] = B``.
    """
    arrays = _build_arrays(header, keys, indices, bits, latents, labels)
    if str(path) == "-":
        sys.stdout.buffer.write(_npz_bytes(arrays))
        sys.stdout.buffer.flush()
        return
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            _write_npz(f, arrays)
    except OSError as e:
        raise TokError(os_error_message(e, path)) from None


def write_manifest(directory: str | os.PathLike, shard_files: Sequence[str], header: dict | None = None) -> dict:
    """Write ``manifest.json`` for shard files already in ``directory`` (validating each; counts and sha256
    are computed). ``header`` defaults to the first shard's. Returns the manifest."""
    directory = Path(directory)
    shards = []
    total = 0
    for name in shard_files:
        tf = read_token_file(directory / name)
        if header is None:
            header = tf.header
        shards.append({"file": name, "count": len(tf), "sha256": sha256_file(directory / name)})
        total += len(tf)
    manifest = {"tok_format": TOK_FORMAT, "header": header or {}, "count": total, "shards": shards}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False,
                                                       default=_json_default) + "\n")
    return manifest


def write_token_set(directory: str | os.PathLike, *, header: dict, keys: Sequence[str], shard_size: int,
                    indices=None, bits=None, latents=None, labels=None) -> dict:
    """Write a sharded set: part-00000.npz, ... of at most ``shard_size`` images each, then manifest.json."""
    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payloads = {"indices": indices, "bits": bits, "latents": latents}
    full = {k: _as_numpy(v) for k, v in payloads.items() if v is not None}
    labels = None if labels is None else _as_numpy(labels)
    names = []
    for i, start in enumerate(range(0, max(len(keys), 1), shard_size)):
        sl = slice(start, start + shard_size)
        name = f"part-{i:05d}.npz"
        write_token_file(directory / name, header=header, keys=list(keys[sl]),
                         labels=None if labels is None else labels[sl], **{k: v[sl] for k, v in full.items()})
        names.append(name)
    return write_manifest(directory, names)
