"""`tok info`: describe a token file or a model folder (JSON-ready dicts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def describe_token_file(path: str) -> dict[str, Any]:
    """A token file or set: header, count, shapes, bytes per image; a set is read one shard at a time and every
    shard verified against its sha256 (``bytes.verified``)."""
    from tokcli.core.token_set import bytes_report, open_tokens, read_shard

    src = open_tokens(path)
    first = next(src.files()) if src.manifest is None else read_shard(src.directory, src.manifest["shards"][0])[0]
    arr = first.array
    out: dict[str, Any] = {
        "type": "token_file" if src.manifest is None else "token_set",
        "path": path,
        "header": src.header,
        "count": len(src),
        "kind": first.kind,
        "array": {"shape": [len(src), *arr.shape[1:]], "dtype": str(arr.dtype)},
        "keys_sample": list(first.keys[:5]),
    }
    if src.manifest is not None:
        out["shards"] = src.shards
    rate = token_rate(src.header, arr)
    if rate:
        out["rate"] = rate
    if path != "-":
        out["bytes"] = bytes_report(path)
    return out


def describe_set_in_progress(path: str) -> dict[str, Any]:
    """A token set whose encode has not finished (no manifest yet): how far it got, from its shard records."""
    import json

    from tokcli.core.set_writer import PROGRESS, shard_count

    recs = []
    for p in sorted(Path(path, PROGRESS).glob("part-*.json")):
        try:
            recs.append(json.loads(p.read_text(encoding="utf-8")))
        except (ValueError, OSError):
            continue
    fp = next((r["set"] for r in recs if isinstance(r.get("set"), dict)), {})
    total = shard_count(fp["inputs"], fp["shard_size"]) if fp.get("inputs") is not None else None
    return {"type": "token_set_in_progress", "path": path, "complete": False, "shards_done": len(recs),
            "shards": total, "images_done": sum(int(r.get("count", 0)) for r in recs), "inputs": fp.get("inputs"),
            "failed": sum(len(r.get("failed") or []) for r in recs), "model_sha256": fp.get("model_sha256"),
            "how": "run the same tok encode command again to finish it (verified shards are kept)"}


def token_rate(header: dict, arr) -> dict[str, Any] | None:
    """Bits of one image's tokens (ids: log2 of the codebook each; latents: the stored float width) and bits per
    pixel at the header's image size; None when the header does not say enough."""
    import math

    import numpy as np

    t, size = header.get("tokens") or {}, (header.get("preprocess") or {}).get("image_size")
    per_image = int(np.prod(arr.shape[1:])) if arr.ndim > 1 else 1
    if t.get("kind") == "indices" and t.get("codebook_size"):
        bits = per_image * math.log2(int(t["codebook_size"]))
    elif t.get("kind") == "latents":
        bits = per_image * 8 * arr.dtype.itemsize
    else:
        return None
    out: dict[str, Any] = {"bits_per_image": round(bits, 3)}
    if isinstance(size, int) and size > 0:
        out["bits_per_pixel"] = round(bits / (size * size), 6)
    return out


def describe_model(name_or_path: str, verify: bool = False) -> dict[str, Any]:
    from tokcli.core.registry import entries, resolve
    from tokcli.errors import MissingWeightsError

    try:
        folder = resolve(name_or_path)
    except MissingWeightsError:
        if name_or_path in entries():  # a registry model whose weights are not here: what it is, how to get it
            return describe_registry_entry(name_or_path)
        raise
    out: dict[str, Any] = {
        "type": "model_folder",
        "path": str(folder.path),
        "name": folder.name,
        "family": folder.family,
        "config": folder.config,
        "weights_bytes": folder.weights_path.stat().st_size,
    }
    if verify:
        out["sha256_ok"] = folder.verify()
    return out


def describe_registry_entry(name: str) -> dict[str, Any]:
    """A registry model that is not on this machine: its entry, ``available: false`` and how to get it."""
    from tokcli.core.registry import get_entry, missing_weights_message

    e = get_entry(name)
    get = f"tok convert {name}" if e.hub_repo else None
    return {"type": "registry_entry", "name": name, "family": e.family, "available": False, "get": get,
            "how": missing_weights_message(e), "entry": e.to_dict()}


def describe_path(path: str, verify: bool = False) -> dict[str, Any]:
    from tokcli.core.registry import entries, looks_like_path
    from tokcli.errors import TokError

    from tokcli.core.set_writer import PROGRESS

    p = Path(path)
    if path == "-" or (p.is_file() and p.suffix == ".npz") or (p.is_dir() and (p / "manifest.json").is_file()):
        return describe_token_file(path)
    if p.is_dir() and (p / PROGRESS).is_dir():
        return describe_set_in_progress(path)
    if p.is_file():
        # any other file: try it as a token file (gives a clear error if it is not one)
        return describe_token_file(path)
    if not p.exists() and path not in entries() and (looks_like_path(path) or p.suffix in (".npz", ".json")):
        raise TokError(f"no such file or folder: {path}")
    return describe_model(path, verify=verify)
