"""Writing a sharded token set shard by shard, from one process or many, resumably.

Shard ``i`` always holds inputs ``[i * shard_size, (i + 1) * shard_size)`` of the input list (minus inputs that
failed under ``--skip-errors``, listed in its header), whichever rank encodes it, so a set made by N ranks equals
the set made by one process. While a set is being written its folder holds:

- ``part-XXXXX.npz``: finished shards, each moved into place whole (``os.replace``);
- ``.tok-progress/part-XXXXX.json``: one record per finished shard (file, count, sha256, the inputs that failed,
  the run's fingerprint), written after its shard; a shard without a record is encoded again;
- ``.tok-progress/r<RANK>/``: each rank's temporary files. Ranks never clean each other's temporaries, so ranks on
  several machines sharing one file system cannot remove a file another one is writing.

``manifest.json`` is written last, by rank 0, and the progress folder removed; a reader refuses a folder without it.

The **fingerprint** is everything that decides the tokens: model weights (sha256), family, token spec, preprocess,
precision, memory layout, latent dtype, posterior sampling, labels, shard size and the input list (count and sha256 of the keys).
Re-running on a folder made with another fingerprint is refused, naming the first difference; a shard whose file
does not match its record's sha256 (damaged, replaced) is encoded again. Verified shards are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from tokcli.core.checkpoint import sha256_file
from tokcli.core.token_reader import MANIFEST, TOK_FORMAT
from tokcli.core.token_set import SHARD_PREFIX, read_manifest, shard_name
from tokcli.errors import TokError

PROGRESS = ".tok-progress"
HEADER_FIELDS = ("model_sha256", "family", "tokens", "preprocess", "precision", "memory_format", "compiled",
                 "latent_dtype", "labels")
FINGERPRINT_FIELDS = (*HEADER_FIELDS, "shard_size", "inputs", "inputs_sha256")


def keys_sha256(keys: Sequence[str]) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def fingerprint(header: dict[str, Any], keys: Sequence[str], shard_size: int) -> dict[str, Any]:
    """The settings that decide a set's tokens (module docstring), from its token header."""
    fp = {k: header.get(k) for k in HEADER_FIELDS}
    fp.update(shard_size=int(shard_size), inputs=len(keys), inputs_sha256=keys_sha256(keys))
    return fp


def _digest(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()


def _difference(there: dict[str, Any], here: dict[str, Any]) -> str:
    for k in FINGERPRINT_FIELDS:
        if there.get(k) != here.get(k):
            if k == "inputs_sha256":
                return "other input files (same count, other keys)"
            a, b = json.dumps(there.get(k), default=str), json.dumps(here.get(k), default=str)
            if len(a) + len(b) > 160:
                return f"another {k}"
            return f"{k} {a} there, {b} now"
    return "other settings"


def _strays(directory: Path) -> list[str]:
    """What a set folder must not hold: anything but the manifest, shards, the progress folder and dot files."""
    return sorted(p.name for p in directory.iterdir() if p.name not in (MANIFEST, PROGRESS)
                  and not p.name.startswith(".") and not (p.name.startswith(SHARD_PREFIX) and p.name.endswith(".npz")))


def check_set_folder(directory: str | os.PathLike) -> None:
    """Before any work: ``directory`` can become a token set (absent, empty, or a set, finished or not) and can be
    written; nothing is created."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise TokError(f"{d} is a file; a token set is written into a folder")
    if d.is_dir():
        strays = _strays(d)
        if strays and not (d / MANIFEST).is_file() and not (d / PROGRESS).is_dir():
            raise TokError(f"{d} already holds other files ({', '.join(strays[:3])}) and no token set; write the "
                           "set to a new or empty folder")
    parent = d if d.is_dir() else d.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise TokError(f"cannot write {d}: {parent} is not a writable folder")


def shard_count(n_inputs: int, shard_size: int) -> int:
    return max(1, -(-n_inputs // shard_size))


class SetWriter:
    """One rank's view of a set folder being written (module docstring)."""

    def __init__(self, directory: str | os.PathLike, fp: dict[str, Any], *, rank: int = 0):
        self.dir = Path(directory)
        self.fp, self.digest, self.rank = fp, _digest(fp), rank
        self.n = shard_count(fp["inputs"], fp["shard_size"])
        self.progress = self.dir / PROGRESS
        self._records: dict[int, dict] = {}

    # -- what is there ------------------------------------------------------------------------------------
    def scan(self, only: Sequence[int] | None = None) -> dict[int, dict]:
        """The verified shards already in the folder (index -> record; ``only``: verify just these shards);
        refuses a folder holding another set or other files. Read-only: ranks may scan concurrently."""
        check_set_folder(self.dir)
        if not self.dir.exists():
            return {}
        candidates: dict[int, dict] = {}
        if (self.dir / MANIFEST).is_file():
            manifest = read_manifest(self.dir)
            self._check_same(manifest.get("header", {}).get("set"), MANIFEST)
            for i, s in enumerate(manifest["shards"]):
                candidates[i] = s
        if self.progress.is_dir():
            for p in sorted(self.progress.glob(f"{SHARD_PREFIX}*.json")):
                rec = self._read_record(p)
                self._check_same(rec.get("set"), f"{PROGRESS}/{p.name}")
                candidates[int(rec["index"])] = rec
        wanted = set(range(self.n) if only is None else only)
        self._records = {i: r for i, r in candidates.items() if i in wanted and self._verified(i, r)}
        return dict(self._records)

    def _read_record(self, p: Path) -> dict:
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(rec, dict) or not isinstance(rec.get("index"), int):
                raise ValueError
        except (ValueError, UnicodeDecodeError, OSError):
            return {"index": -1, "set": self.fp}  # unreadable: its shard is encoded again
        return rec

    def _check_same(self, there: dict | None, where: str) -> None:
        if there != self.fp:
            why = _difference(there or {}, self.fp) if isinstance(there, dict) else "no fingerprint"
            raise TokError(f"{self.dir} holds a token set made with {why} ({where}); finish it with the command "
                           "that started it, or write to another folder")

    def _verified(self, i: int, rec: dict) -> bool:
        path = self.dir / shard_name(i)
        if rec.get("file") != shard_name(i) or not path.is_file():
            return False
        ok = sha256_file(path) == rec.get("sha256")
        if not ok:
            self.warn(f"{path} does not match its recorded sha256 (damaged or replaced): encoding it again")
        return ok

    @staticmethod
    def warn(msg: str) -> None:
        import sys

        print(f"warning: {msg}", file=sys.stderr, flush=True)

    # -- writing ------------------------------------------------------------------------------------------
    def _tmp(self) -> Path:
        d = self.progress / f"r{self.rank}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_shard(self, index: int, write, count: int, failed: list[tuple[str, str]]) -> dict:
        """``write(path)`` writes shard ``index`` to a temporary path; it is moved into place, then its record."""
        from tokcli.core.atomic import os_error_message

        self._unfinish()
        tmp = self._tmp() / f".{shard_name(index)}"
        dest = self.dir / shard_name(index)
        try:
            write(tmp)
            rec = {"index": index, "file": dest.name, "count": int(count), "sha256": sha256_file(tmp),
                   "failed": [list(f) for f in failed], "set": self.fp}
            os.replace(tmp, dest)
            self._record(rec)
        except OSError as e:
            raise TokError(os_error_message(e, dest)) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._records[index] = rec
        return rec

    def _record(self, rec: dict) -> None:
        rtmp = self._tmp() / f".{rec['index']}.json"
        rtmp.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(rtmp, self.progress / f"{Path(rec['file']).stem}.json")

    def _unfinish(self) -> None:
        """A finished set is about to change (a damaged shard is encoded again): its manifest's shards become
        progress records first, then the manifest goes (a reader must not trust it meanwhile)."""
        if not (self.dir / MANIFEST).is_file():
            return
        for i, s in enumerate(read_manifest(self.dir)["shards"]):
            self._record({"index": i, "file": s["file"], "count": s["count"], "sha256": s["sha256"],
                          "failed": s.get("failed", []), "set": self.fp})
        with contextlib.suppress(FileNotFoundError):
            (self.dir / MANIFEST).unlink()

    def finish(self, header: dict[str, Any]) -> dict:
        """Write ``manifest.json`` from every shard's record (all must be there) and remove the progress folder."""
        from tokcli.core.atomic import atomic_write_text

        recs = {i: r for i, r in self.scan().items()}
        missing = [i for i in range(self.n) if i not in recs]
        if missing:
            raise TokError(f"{self.dir}: shard(s) {', '.join(shard_name(i) for i in missing[:3])} were not written; "
                           "run the same command again to finish the set")
        shards = [{"file": recs[i]["file"], "count": recs[i]["count"], "sha256": recs[i]["sha256"],
                   **({"failed": recs[i]["failed"]} if recs[i].get("failed") else {})} for i in range(self.n)]
        header = {**header, "set": self.fp}
        manifest = {"tok_format": TOK_FORMAT, "header": header, "count": sum(s["count"] for s in shards),
                    "shards": shards}
        atomic_write_text(self.dir / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False, default=str) + "\n")
        shutil.rmtree(self.progress, ignore_errors=True)
        return manifest
