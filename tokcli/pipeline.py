"""The library side of `tok encode / decode / reconstruct`: images -> tokens -> images, batched, with every
failure reported. The CLI only parses options and calls these functions.

Determinism: tokens do not depend on batch size; stochastic decoders draw each image's noise from its own
generator seeded with ``seed + index`` (index = position in the token file), so results replay exactly whatever the
batching.

Run settings are arguments, never attributes set on the model: ``precision`` ("fp32" / "tf32"; None leaves the
process's maths settings alone, e.g. when a caller has set them) is applied here and recorded in the token header;
``sampler`` (e.g. ``{"steps": 8, "cfg": 2.0}``) goes to ``model.decode(..., **sampler)``, which refuses keywords its
family does not take.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from tokcli.errors import TokError, TokUsageError
from tokcli.version import __version__


@dataclass
class Result:
    keys: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    tokens: np.ndarray | None = None


def image_size_for(model, image_size: int | None) -> int:
    pre = model.preprocess
    size = int(image_size or pre["image_size"])
    m = int(pre.get("multiple_of", 1))
    if size % m:
        raise TokUsageError(f"--image-size {size} is not a multiple of {m} (what {model.name or 'the model'} needs)")
    return size


def model_ref(name_or_path: str | None, model) -> str:
    """How a token file names its model: the registry name, or local-dir:<absolute path>."""
    from tokcli.core.registry import DEFAULT_MODEL

    ref = name_or_path or DEFAULT_MODEL
    p = Path(ref[len("local-dir:"):] if ref.startswith("local-dir:") else ref).expanduser()
    if ref.startswith("local-dir:") or p.is_dir():
        return "local-dir:" + str(p.resolve())
    return ref


def apply_precision(model, precision: str | None) -> str:
    """Set the maths precision for this run (None: keep the current settings) and return the one in effect on the
    model's device ("tf32" only on CUDA with TF32 allowed)."""
    import torch

    from tokcli.core.device import set_precision

    if precision is not None:
        set_precision(precision)
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    return "tf32" if model.device.type == "cuda" and tf32 else "fp32"


def check_sampler(model, sampler: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sampler keywords for ``model.decode``, refused up front (before any image is read or written) when the
    family does not take them (:class:`TokUsageError`, exit code 2)."""
    sampler = {k: v for k, v in (sampler or {}).items() if v is not None}
    model.sampler_kwargs(sampler)
    return sampler


def token_header(model, ref: str, size: int, precision: str = "fp32") -> dict[str, Any]:
    spec = model.spec.to_dict()
    spec["shape"] = list(model.spec.shape_for(size, size))
    pre = dict(model.preprocess)
    pre["image_size"] = size
    return {
        "model": ref,
        "model_sha256": model.sha256,
        "family": model.family,
        "tokens": spec,
        "preprocess": pre,
        "precision": precision,
        "tok_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def check_header(model, header: dict[str, Any], *, force: bool = False) -> int:
    """Refuse a token file made by another model; return the image size it was encoded at."""
    fam = header.get("family")
    if fam != model.family:
        raise TokError(f"token file was made by a {fam!r} model, not {model.family!r} ({model.name})")
    t = header.get("tokens", {})
    mine = model.spec
    for k in ("kind", "codebook_size", "bits", "latent_dim", "downsample"):
        if t.get(k) != getattr(mine, k):
            raise TokError(f"token file spec {k}={t.get(k)!r} does not match model {model.name} ({getattr(mine, k)!r})")
    size = int(header.get("preprocess", {}).get("image_size", model.preprocess["image_size"]))
    if list(t.get("shape", [])) != list(mine.shape_for(size, size)):
        raise TokError(f"token shape {t.get('shape')} does not match model {model.name} at {size}px "
                       f"({list(mine.shape_for(size, size))})")
    sha = header.get("model_sha256")
    if not force and sha and model.sha256 and sha != model.sha256:
        raise TokError(f"token file was made by model weights {sha[:12]}…, but {model.name} has {model.sha256[:12]}… "
                       "(a different checkpoint; --force decodes anyway)")
    return size


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, dynamic_ncols=True, leave=False)


def _encode_batches(model, items, size, batch_size, workers, skip_errors, quiet, res: Result):
    """Yield (keys, uint8 images, token tensor) for each batch of good images."""
    import torch

    from tokcli.core.images import iter_batches, to_tensor

    bar = _progress(len(items), "encode", quiet)
    try:
        for keys, imgs in iter_batches(items, size, batch_size, skip_errors=skip_errors, errors=res.errors,
                                       workers=workers):
            x = to_tensor(imgs).to(model.device)
            with torch.inference_mode():
                tok = model.encode(x)
            yield keys, imgs, tok
            bar.update(len(keys))
        bar.update(len(items) - bar.n)
    finally:
        bar.close()


def encode(model, items, *, ref: str, output: str | Path, image_size: int | None = None, batch_size: int = 8,
           workers: int = 0, skip_errors: bool = False, quiet: bool = False, precision: str | None = None) -> Result:
    """Encode images to a token file written atomically at ``output`` (``-`` = stdout)."""
    from tokcli.core.tokens import write_token_file

    size = image_size_for(model, image_size)
    precision = apply_precision(model, precision)
    res = Result()
    chunks = []
    for keys, _, tok in _encode_batches(model, items, size, batch_size, workers, skip_errors, quiet, res):
        res.keys.extend(keys)
        chunks.append(tok.cpu().numpy())
    if not res.keys:
        raise TokError("no image could be encoded" + (f" ({len(res.errors)} failed)" if res.errors else ""))
    res.tokens = np.concatenate(chunks)
    kind = model.spec.kind
    write_token_file(output, header=token_header(model, ref, size, precision), keys=res.keys, **{kind: res.tokens})
    return res


def _decode_batch(model, tokens: np.ndarray, start: int, seed: int, positions=None, sampler=None):
    """Decode one batch; stochastic decoders seed image i with ``seed + start + i`` (its index in the file), or
    with ``seed + positions[i]`` when the caller knows the images' global positions (sharded runs). ``sampler``:
    keywords for ``model.decode``."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(tokens))
    t = t.long() if model.spec.kind == "indices" else t.float()
    t = t.to(model.device)
    with torch.inference_mode():
        if model.stochastic_decoder:
            seeds = ([seed + p for p in positions] if positions is not None else
                     [seed + start + i for i in range(len(tokens))])
            return model.decode(t, seed=seeds, **(sampler or {}))
        return model.decode(t, **(sampler or {}))


def _write_pngs(out_dir: Path, keys: Iterable[str], images, res: Result) -> None:
    from tokcli.core.images import output_path, save_png, to_uint8

    arr = to_uint8(images)
    for key, img in zip(keys, arr):
        dest = output_path(out_dir, key)
        save_png(img, dest)
        res.written.append(dest)


def decode(model, token_file, out_dir: str | Path, *, batch_size: int = 8, seed: int = 0, force: bool = False,
           quiet: bool = False, precision: str | None = None, sampler: Mapping[str, Any] | None = None) -> Result:
    """Decode a token file (already read) into PNGs under ``out_dir``, mirroring the keys."""
    check_header(model, token_file.header, force=force)
    sampler = check_sampler(model, sampler)
    apply_precision(model, precision)
    res = Result(keys=list(token_file.keys))
    arr = token_file.array
    out_dir = Path(out_dir)
    from tokcli.core.images import output_paths

    output_paths(out_dir, res.keys)
    bar = _progress(len(arr), "decode", quiet)
    try:
        for s in range(0, len(arr), batch_size):
            imgs = _decode_batch(model, arr[s:s + batch_size], s, seed, sampler=sampler)
            _write_pngs(out_dir, res.keys[s:s + batch_size], imgs, res)
            bar.update(len(imgs))
    finally:
        bar.close()
    return res


def reconstruct(model, items, out_dir: str | Path, *, image_size: int | None = None, batch_size: int = 8,
                workers: int = 0, seed: int = 0, skip_errors: bool = False, quiet: bool = False,
                on_batch=None, positions: dict[str, int] | None = None, precision: str | None = None,
                sampler: Mapping[str, Any] | None = None) -> Result:
    """encode -> decode through exactly the code path of `tok encode` + `tok decode` (bit-identical results).

    ``on_batch(keys, originals, recon, tokens)`` is called for every batch with the uint8 originals after the crop
    [B, H, W, 3], the decoder output (float tensor [B, 3, H, W] in [-1, 1]) and the tokens (numpy): metrics stream
    through it, so memory does not grow with the number of images. ``out_dir=None`` writes no PNGs.
    ``positions`` (key -> index in the whole input list) seeds stochastic decoders by global position, so a shard
    of a distributed run draws the same noise as a single process (when no input fails). ``precision`` and
    ``sampler`` as in :func:`encode` / :func:`decode`.
    """
    size = image_size_for(model, image_size)
    sampler = check_sampler(model, sampler)
    apply_precision(model, precision)
    res = Result()
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        from tokcli.core.images import output_paths

        output_paths(out_dir, [it.key for it in items])  # two inputs that would write one PNG: refuse up front
    for keys, imgs, tok in _encode_batches(model, items, size, batch_size, workers, skip_errors, quiet, res):
        start = len(res.keys)
        res.keys.extend(keys)
        recon = _decode_batch(model, tok.cpu().numpy(), start, seed,
                              [positions[k] for k in keys] if positions is not None else None, sampler)
        if out_dir is not None:
            _write_pngs(out_dir, keys, recon, res)
        if on_batch is not None:
            on_batch(keys, imgs, recon, tok.cpu().numpy())
    if not res.keys:
        raise TokError("no image could be reconstructed" + (f" ({len(res.errors)} failed)" if res.errors else ""))
    return res
