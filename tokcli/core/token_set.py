"""Sharded token sets, read one shard at a time (the format is in :mod:`tokcli.core.tokens`).

A set is a folder holding ``manifest.json`` and ``part-XXXXX.npz`` shards. Readers never concatenate a large set:

- :func:`open_tokens` gives a :class:`TokenSource` for a file, stdin or a set, whose :meth:`TokenSource.files`
  yields the shards as validated :class:`TokenFile` objects, each checked against its sha256 and count in the
  manifest before use (`tok decode`, `tok bench`, `tok info` stream through it);
- :class:`TokenArrays` maps every shard's payload read-only from disk (tok writes members uncompressed) and gathers
  rows by global index, so generator training draws random batches from a set larger than memory.

Writing (resumable, many ranks) is :mod:`tokcli.core.set_writer`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tokcli.core.token_reader import (MANIFEST, PAYLOADS, TokenFile, _check_format, _load_members, _plan_members,
                                      _validate, member_bytes, read_one, unpack_bits)
from tokcli.errors import TokError

SHARD_PREFIX = "part-"


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}.npz"


def set_folder(path) -> Path | None:
    """The set folder ``path`` names (the folder or its manifest), or None for a single file / stdin."""
    if str(path) == "-":
        return None
    p = Path(path)
    if p.is_dir():
        return p
    if p.name == MANIFEST and p.is_file():
        return p.parent
    return None


def read_manifest(directory: Path) -> dict:
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise TokError(f"{directory} is a folder without {MANIFEST} (not a sharded token set, or one whose "
                       "encode has not finished: run the same tok encode again to complete it)")
    if mpath.stat().st_size > (256 << 20):
        raise TokError(f"{mpath} is larger than 256 MiB; not a tok manifest")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokError(f"{mpath} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise TokError(f"{mpath} has no shard list")
    _check_format(manifest.get("tok_format"), str(mpath))
    if not isinstance(manifest.get("header", {}), dict):
        raise TokError(f"{mpath}: header is not a JSON object")
    for s in manifest["shards"]:
        if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not isinstance(s.get("count"), int):
            raise TokError(f"{mpath}: every shard needs a file name and a count")
        if "/" in s["file"] or "\\" in s["file"] or s["file"] in ("", ".", ".."):
            raise TokError(f"{mpath}: shard file {s['file']!r} must be a plain name in the same folder")
    return manifest


def read_shard(directory: Path, entry: dict) -> tuple[TokenFile, dict[str, int], int]:
    """One shard of a set, checked against its manifest entry (sha256 when given, count): (TokenFile, member
    nbytes, file size)."""
    spath = directory / entry["file"]
    try:
        data = spath.read_bytes()
    except FileNotFoundError:
        raise TokError(f"{directory}: shard {entry['file']} listed in {MANIFEST} is missing") from None
    if "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise TokError(f"{directory}: shard {entry['file']} does not match its sha256 in {MANIFEST} "
                       "(damaged or replaced)")
    members, stored = _load_members(io.BytesIO(data), str(spath), len(data))
    tf = _validate(members, str(spath))
    if len(tf) != entry["count"]:
        raise TokError(f"{directory}: shard {entry['file']} holds {len(tf)} images but {MANIFEST} says "
                       f"{entry['count']}")
    return tf, member_bytes(members, stored, tf.kind), len(data)


class TokenSource:
    """A token file or set, opened for streaming: ``header``, ``count`` and ``kind`` up front, the tokens shard by
    shard from :meth:`files` (one shard in memory at a time)."""

    def __init__(self, path, header: dict, count: int, *, single: TokenFile | None = None,
                 manifest: dict | None = None):
        self.path, self.header, self.count = path, header, count
        self._single, self.manifest = single, manifest
        self.directory = None if manifest is None else set_folder(path)

    @property
    def shards(self) -> int:
        return 1 if self.manifest is None else len(self.manifest["shards"])

    def __len__(self) -> int:
        return self.count

    def files(self) -> Iterator[TokenFile]:
        """The shards in order, each validated; a set's shards must agree in kind, shape and labels, and no key
        may appear twice in the set."""
        if self._single is not None:
            yield self._single
            return
        first: TokenFile | None = None
        seen: set[str] = set()
        total = 0
        for entry in self.manifest["shards"]:
            tf = read_shard(self.directory, entry)[0]
            if first is None:
                first = tf
            elif tf.kind != first.kind or tf.shape != first.shape or (tf.labels is None) != (first.labels is None):
                raise TokError(f"{self.directory}: shard {entry['file']} holds {tf.kind} of shape {tf.shape}"
                               f"{'' if tf.labels is None else ' with labels'}, unlike the first shard "
                               f"({first.kind} of shape {first.shape}{'' if first.labels is None else ' with labels'})")
            dup = next((k for k in tf.keys if k in seen), None)
            if dup is not None:
                raise TokError(f"{self.directory}: key {dup!r} appears in more than one shard")
            seen.update(tf.keys)
            total += len(tf)
            yield tf
        if total != self.count:
            raise TokError(f"{self.directory}: {MANIFEST} says {self.count} images but the shards hold {total}")


def as_source(tokens) -> TokenSource:
    """A :class:`TokenSource` for a TokenSource, an in-memory TokenFile, or a path (:func:`open_tokens`)."""
    if isinstance(tokens, TokenSource):
        return tokens
    if isinstance(tokens, TokenFile):
        return TokenSource("<memory>", tokens.header, len(tokens), single=tokens)
    return open_tokens(tokens)


def open_tokens(path) -> TokenSource:
    """A token file, ``-`` (stdin) or a set, opened for streaming (a single file is read at once)."""
    directory = set_folder(path)
    if directory is None:
        tf = read_one(path)[0]
        return TokenSource(path, tf.header, len(tf), single=tf)
    manifest = read_manifest(directory)
    if not manifest["shards"]:
        raise TokError(f"{directory}/{MANIFEST} lists no shards")
    header = manifest.get("header") or {}
    if not header:  # an old manifest without a header: the first shard's
        header = read_shard(directory, manifest["shards"][0])[0].header
    count = manifest.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        count = sum(s["count"] for s in manifest["shards"])  # checked against the shards as they are read
    return TokenSource(path, header, count, manifest=manifest)


def read_set(directory: Path) -> TokenFile:
    """A whole set concatenated in memory (small sets; large ones stream through :func:`open_tokens`)."""
    src = open_tokens(directory)
    parts = list(src.files())
    header = {**parts[0].header, **src.header}
    keys = [k for p in parts for k in p.keys]
    cat = (lambda xs: xs[0] if len(xs) == 1 else np.concatenate(xs))
    labels = None if parts[0].labels is None else cat([p.labels for p in parts])
    return TokenFile(header=header, keys=keys, kind=parts[0].kind, array=cat([p.array for p in parts]),
                     labels=labels)


def bytes_report(path) -> dict[str, Any]:
    """Where the bytes of a token file (or set) go, for ``tok info``: payload_bytes are the raw array bytes;
    keys/labels/header_bytes what those members occupy in the files (deflated); overhead_bytes the rest (.npy and
    zip headers, the manifest). Per-image figures divide by N (None when N is 0). A set is read one shard at a time,
    each verified against the manifest (``verified``)."""
    directory = set_folder(path)
    sums = {"n": 0, "file": 0, "payload": 0, "keys": 0, "labels": 0, "header": 0}
    first: TokenFile | None = None
    if directory is None:
        rows = [read_one(path)]
        extra = 0
    else:
        manifest = read_manifest(directory)
        if not manifest["shards"]:
            raise TokError(f"{directory}/{MANIFEST} lists no shards")
        rows = (read_shard(directory, s) for s in manifest["shards"])
        extra = (directory / MANIFEST).stat().st_size
    shards = 0
    for tf, nbytes, size in rows:
        first = first or tf
        shards += 1
        sums["n"] += len(tf)
        sums["file"] += size
        sums["payload"] += nbytes[tf.kind]
        sums["keys"] += nbytes["keys"]
        sums["labels"] += nbytes.get("labels", 0)
        sums["header"] += nbytes["header"]
    n, file_bytes = sums["n"], sums["file"] + extra
    per = (lambda v: v / n) if n else (lambda v: None)
    known = sums["payload"] + sums["keys"] + sums["labels"] + sums["header"]
    report = {
        "path": str(path), "kind": first.kind, "n": n, "shape": list(first.shape),
        "dtype": str(first.array.dtype) if first.kind != "bits" else "packed bits",
        "file_bytes": file_bytes, "payload_bytes": sums["payload"], "payload_bytes_per_image": per(sums["payload"]),
        "keys_bytes": sums["keys"], "labels_bytes": sums["labels"], "header_bytes": sums["header"],
        "overhead_bytes": file_bytes - known, "bytes_per_image": per(file_bytes),
    }
    if directory is not None:
        report["shards"] = shards
        report["verified"] = f"{shards}/{shards} shards: sha256 and counts match {MANIFEST}"
    return report


# --------------------------------------------------------------------------------------------------------
# random access for training
# --------------------------------------------------------------------------------------------------------
def _member_memmap(path: Path, member: str) -> np.ndarray | None:
    """The array of an uncompressed .npz member mapped read-only from disk (None when it is deflated)."""
    size = path.stat().st_size
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        plan = _plan_members(z, str(path), size)
        m = plan[member]
        if m.info.compress_type != zipfile.ZIP_STORED:
            return None
        f.seek(m.info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise TokError(f"{path} is damaged (member {member} has no local header)")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        data = m.info.header_offset + 30 + name_len + extra_len
        nbytes = int(np.prod(m.shape)) * m.dtype.itemsize
        offset = data + m.info.file_size - nbytes  # past the member's .npy header
    if not m.shape or m.shape[0] == 0:
        return np.zeros(m.shape, m.dtype)
    return np.memmap(path, dtype=m.dtype, mode="r", offset=offset, shape=m.shape)


class TokenArrays:
    """Every image of a token file or set, gathered by global index without holding the set in memory.

    Opening validates each shard once (sha256, counts, index ranges: one shard in memory at a time), then maps its
    payload from disk; :meth:`gather` returns rows ([B, *shape], unpacked bits as 0/1 uint8). ``labels`` (small) are
    held in memory, in order."""

    def __init__(self, path):
        self.source = open_tokens(path)
        self.header = self.source.header
        self._parts: list[tuple[np.ndarray, int | None]] = []  # (rows, bit count when the rows are packed bits)
        labels, starts, n = [], [], 0
        directory = self.source.directory
        for i, tf in enumerate(self.source.files()):
            self.kind, self.shape = tf.kind, tf.shape
            mapped = None
            if directory is not None:  # a single file is already in memory
                mapped = _member_memmap(directory / self.source.manifest["shards"][i]["file"], tf.kind)
            if mapped is None:
                self._parts.append((tf.array, None))
            else:
                self._parts.append((mapped, int(tf.header["bit_count"]) if tf.kind == "bits" else None))
            if tf.labels is not None:
                labels.append(np.asarray(tf.labels))
            starts.append(n)
            n += len(tf)
        self._starts = np.asarray(starts)
        self.count = n
        self.labels = np.concatenate(labels) if labels else None

    def __len__(self) -> int:
        return self.count

    def gather(self, index) -> np.ndarray:
        """Rows ``index`` (global positions) as one array [len(index), *shape]."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.count):
            raise IndexError(f"index out of range for {self.count} images")
        shard = np.searchsorted(self._starts, index, side="right") - 1
        rows = []
        for s, i in zip(shard.tolist(), index.tolist()):
            arr, bits = self._parts[s]
            row = np.asarray(arr[i - self._starts[s]])
            rows.append(row if bits is None else unpack_bits(row, bits))
        return np.stack(rows) if rows else np.zeros((0, *self.shape), dtype=self._parts[0][0].dtype)


__all__ = ["PAYLOADS", "TokenArrays", "TokenSource", "as_source", "bytes_report", "open_tokens", "read_manifest", "read_set",
           "read_shard", "set_folder", "shard_name"]
