"""`tok encode DATA -o codes/`: a sharded token set, from one process or ``torchrun`` ranks, resumable.

Shard ``i`` holds inputs ``[i * shard_size, (i + 1) * shard_size)``; rank ``r`` of ``W`` encodes shards ``r, r + W,
...`` that the folder does not already hold verified (:mod:`tokcli.core.set_writer`), streaming its images through
the same batches as a single-file encode (tokens do not depend on batching, posterior samples are seeded by the
image's position in the whole input list), and writes each shard as soon as its last input is done, so memory is
bounded by one shard. Rank 0 writes the manifest once every rank has finished. The set equals a single process's,
for any number of ranks, killed and resumed included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokcli.errors import TokError, TokUsageError

DEFAULT_SHARD_SIZE = 10_000


@dataclass
class SetResult:
    directory: Path
    image_size: int
    count: int = 0                                     # images in the finished set (rank 0)
    shards: int = 0                                    # shards in the set
    encoded: list[int] = field(default_factory=list)   # shards encoded by this run (every rank, on rank 0)
    kept: list[int] = field(default_factory=list)      # verified shards found in the folder and kept
    errors: list[tuple[str, str]] = field(default_factory=list)  # inputs left out (--skip-errors), all shards
    upscaled: int = 0
    complete: bool = False                             # this rank wrote the manifest


def is_set_output(output: str, shard_size: int | None, world: int) -> bool:
    """Whether ``-o output`` is a token set: a folder (existing, or named with a trailing /), ``--shard-size``, or
    a torchrun job (ranks cannot share one file)."""
    if output == "-":
        if shard_size is not None or world > 1:
            raise TokUsageError("a sharded token set is a folder; -o - writes one token file to stdout")
        return False
    p = Path(output)
    folder = output.endswith(("/", "\\")) or p.is_dir()
    if not folder and p.suffix.lower() == ".npz" and (shard_size is not None or world > 1):
        why = "--shard-size" if shard_size is not None else f"a torchrun job of {world} ranks"
        raise TokUsageError(f"{why} writes a token set, which is a folder: give -o {p.with_suffix('')}/ instead "
                            f"of {output}")
    return folder or shard_size is not None or world > 1


def _empty(model, size: int, latent_dtype: str | None) -> np.ndarray:
    shape = model.spec.shape_for(size, size)
    dtype = {"indices": np.int64, "bits": np.uint8}.get(model.spec.kind, latent_dtype or np.float32)
    return np.zeros((0, *shape), dtype=dtype)


class _Shards:
    """The rows of the shards this rank is encoding, written as soon as each is complete."""

    def __init__(self, writer, todo, header, kind, empty, *, shard_size, n, positions, label_ids, errors):
        self.writer, self.pending, self.header, self.kind, self.empty = writer, list(todo), header, kind, empty
        self.size, self.n, self.positions, self.label_ids, self.errors = shard_size, n, positions, label_ids, errors
        self.rows: dict[int, tuple[list[str], list[np.ndarray]]] = {}
        self.written: list[int] = []

    def add(self, keys: list[str], arr: np.ndarray) -> None:
        shard = [self.positions[k] // self.size for k in keys]
        for i in sorted(set(shard)):
            sel = [j for j, s in enumerate(shard) if s == i]
            ks, parts = self.rows.setdefault(i, ([], []))
            ks.extend(keys[j] for j in sel)
            parts.append(arr[sel])
        self.flush(before=shard[-1])  # every input before the batch's last one is done

    def flush(self, before: int | None = None) -> None:
        while self.pending and (before is None or self.pending[0] < before):
            self._write(self.pending.pop(0))

    def _write(self, i: int) -> None:
        from tokcli.core.tokens import write_token_file

        lo, hi = i * self.size, min((i + 1) * self.size, self.n)
        keys, parts = self.rows.pop(i, ([], []))
        arr = np.concatenate(parts) if parts else self.empty
        failed = [(k, m) for k, m in self.errors if lo <= self.positions[k] < hi]
        header = {**self.header, "shard": {"index": i, "inputs": [lo, hi], "failed": [k for k, _ in failed]}}
        labels = None if self.label_ids is None else self.label_ids[[self.positions[k] for k in keys]]
        self.writer.write_shard(i, lambda path: write_token_file(path, header=header, keys=keys, labels=labels,
                                                                 **{self.kind: arr}), len(keys), failed)
        self.written.append(i)


def encode_set(model, items, *, ref: str, output: str | Path, shard_size: int | None = None,
               image_size: int | None = None, batch_size: int = 8, workers: int = 0, skip_errors: bool = False,
               quiet: bool = False, precision: str | None = None, sample_posterior: bool = False, seed: int = 0,
               latent_dtype: str | None = None, labels: str | None = None, rank: int = 0, world: int = 1
               ) -> SetResult:
    """Encode ``items`` into the token set folder ``output`` as rank ``rank`` of ``world`` (module docstring);
    options as in :func:`tokcli.pipeline.encode`. Rank 0's result describes the whole set."""
    from tokcli import pipeline
    from tokcli.core.distributed import all_ok
    from tokcli.core.labels import resolve_labels
    from tokcli.core.set_writer import SetWriter, fingerprint

    shard_size = DEFAULT_SHARD_SIZE if shard_size is None else int(shard_size)
    if shard_size < 1:
        raise TokUsageError(f"--shard-size must be at least 1, got {shard_size}")
    size = pipeline.image_size_for(model, image_size)
    posterior = pipeline._Posterior(pipeline.check_posterior(model, sample_posterior), int(seed))
    latent_dtype = pipeline.check_latent_dtype(model, latent_dtype)
    keys = [it.key for it in items]
    label_ids, label_header = resolve_labels(labels, keys)
    precision = pipeline.apply_precision(model, precision)
    header = pipeline.token_header(model, ref, size, precision, posterior.seed if posterior.sample else None,
                                   latent_dtype)
    if label_header is not None:
        header["labels"] = label_header
    writer = SetWriter(output, fingerprint(header, keys, shard_size), rank=rank)
    mine = list(range(rank, writer.n, world))
    kept = writer.scan(only=mine)
    todo = [i for i in mine if i not in kept]
    res = SetResult(Path(output), size, shards=writer.n, kept=sorted(kept))
    positions = {k: i for i, k in enumerate(keys)}
    work = [it for i in todo for it in items[i * shard_size:(i + 1) * shard_size]]
    errors: list[tuple[str, str]] = []
    shards = _Shards(writer, todo, header, model.spec.kind, _empty(model, size, latent_dtype), shard_size=shard_size,
                     n=len(keys), positions=positions, label_ids=label_ids, errors=errors)
    failure = None
    try:
        if work:
            r = pipeline.Result(image_size=size, errors=errors)
            for bkeys, _, tok in pipeline._encode_batches(model, work, size, batch_size, workers, skip_errors,
                                                          quiet or rank > 0, r, posterior, positions):
                shards.add(bkeys, pipeline.stored_tokens(tok, latent_dtype))
            res.upscaled = r.upscaled
        shards.flush()
    except Exception as e:  # noqa: BLE001 - every rank hears of it (all_ok) before anyone waits for the manifest
        failure = e
    all_ok(failure, world)
    res.encoded = shards.written
    res.errors = [tuple(f) for i in res.kept for f in kept[i].get("failed", [])] + errors
    res.errors.sort(key=lambda e: positions[e[0]])
    return _finish(writer, header, res, rank, world)


def _finish(writer, header: dict[str, Any], res: SetResult, rank: int, world: int) -> SetResult:
    """Every rank has written its shards: rank 0 writes the manifest (the others' outcomes gathered first)."""
    from tokcli.core.distributed import gather_objects

    parts = gather_objects((res.encoded, res.kept, res.errors, res.upscaled)) if world > 1 else None
    if rank != 0:
        return res
    if parts is not None:
        res.encoded = sorted(i for p in parts for i in p[0])
        res.kept = sorted(i for p in parts for i in p[1])
        res.errors = [tuple(e) for p in parts for e in p[2]]
        res.upscaled = sum(p[3] for p in parts)
    manifest = writer.finish(header)
    res.count, res.complete = manifest["count"], True
    if not res.count:
        raise TokError("no image could be encoded" + (f" ({len(res.errors)} failed)" if res.errors else ""))
    return res
