"""`tok bench` of stored tokens: a token set (or file) written by `tok encode`, scored without encoding again.

- :func:`evaluate_tokens` (``tok bench usage codes/``): codebook usage, perplexity and bits per pixel from the
  tokens alone, no image and no model run (the model named in the header is loaded only to check the header and
  name the result), one shard in memory at a time;
- :func:`evaluate_stored` (``tok bench psnr|ssim|lpips|rfid|all IMAGES --tokens codes/``): the set's tokens decoded
  in the batches of ``tokcli.pipeline._batches`` and every reconstruction scored against its original, found by key
  among the images (ADM-centre-cropped to the header's image size). Stochastic decoders seed image i of the set with
  ``seed + i``, as `tok decode` and `tok bench` of the images do, so the result equals the bench of the images the
  set was encoded from with the same model.

Both build their metrics and assemble their result with the functions of :mod:`tokcli.bench.quality`, so the
JSON has the same shape as an image bench (``tok bench report`` takes it); the protocol adds ``tokens`` (the path)
and ``tokens_sha256`` (of the manifest, or of the file), and the token-only form ``source``. Both run in one
process: under torchrun they refuse with one line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tokcli.bench.quality import (Options, _assemble, _build_metrics, _Grid, _Keys, _load_scorers, _validate)
from tokcli.errors import TokError, TokUsageError
from tokcli.metrics.base import Batch

TOKEN_METRICS = ("usage", "bpp")
CHUNK = 256  # images per usage update of the token-only form (bounds the int64 copies of a large shard)


@dataclass(frozen=True)
class _Stored:
    """An input of the result's key list (``_assemble`` reads ``.key``)."""

    key: str


def looks_like_tokens(path: str) -> bool:
    """Whether a DATA argument is a token set (a folder with manifest.json or part-*.npz shards, or its manifest)
    or a token file (.npz) rather than images."""
    from tokcli.core.token_reader import MANIFEST
    from tokcli.core.token_set import SHARD_PREFIX

    p = Path(path)
    if p.is_dir():
        return (p / MANIFEST).is_file() or any(p.glob(f"{SHARD_PREFIX}*.npz"))
    return p.is_file() and (p.suffix.lower() == ".npz" or p.name == MANIFEST)


def _single_process(what: str) -> None:
    from tokcli.core.distributed import dist_env

    if dist_env()[1] > 1:
        raise TokUsageError(f"{what} runs in one process; run it without torchrun")


def _token_record(src) -> dict[str, Any]:
    """``tokens`` (the path) and ``tokens_sha256``: of the manifest for a set, of the file (None for stdin)."""
    import hashlib

    from tokcli.core.checkpoint import sha256_file
    from tokcli.core.token_reader import MANIFEST

    if src.directory is not None:
        sha = hashlib.sha256((src.directory / MANIFEST).read_bytes()).hexdigest()
    else:
        sha = None if str(src.path) == "-" else sha256_file(src.path)
    return {"tokens": str(src.path), "tokens_sha256": sha, "tokens_shards": src.shards}


def _open(tokens, model: str | None, device: str, image_size: int | None):
    """(source, model, image size): the set opened, the model it names (or ``model``) loaded on ``device``, the
    header checked against it, and ``image_size`` (when given) checked against the header's."""
    import tokcli
    from tokcli import pipeline
    from tokcli.core.token_set import open_tokens

    src = open_tokens(tokens)
    name = model or src.header.get("model")
    if not name:
        raise TokUsageError(f"{tokens}: the token header names no model; give it with -m")
    tok = tokcli.load(name, device=device)
    size = pipeline.check_header(tok, src.header)
    if image_size is not None and int(image_size) != size:
        raise TokUsageError(f"--size {image_size}: the tokens in {tokens} were encoded at {size}px (leave --size out)")
    return src, tok, size


# ----------------------------------------------------------------------------------------------- tokens only
def evaluate_tokens(tokens, *, model: str | None = None, metrics=TOKEN_METRICS, n: int | None = None,
                    image_size: int | None = None, quiet: bool = False, inputs=None, **_ignored):
    """Codebook usage / perplexity per group and bits per pixel of the tokens stored in ``tokens`` (a set folder,
    its manifest, or a token file), one shard at a time; ``n``: only the set's first n images. Returns (result,
    [], None) like :func:`tokcli.bench.quality.evaluate`. The model is the header's unless ``model`` is given (the
    header is checked against it either way); a continuous model whose usage counts codes derived from the images
    (SoftVQ) is refused: that needs ``tok bench usage IMAGES``."""
    import torch

    _single_process("tok bench usage of stored tokens")
    metrics = tuple(metrics)
    opts = Options(model=model, metrics=metrics, n=n, image_size=image_size, quiet=quiet,
                   inputs=inputs if inputs is not None else [str(tokens)])
    _validate([], opts)
    other = [m for m in metrics if m not in TOKEN_METRICS]
    if other:
        raise TokUsageError(f"{', '.join(other)} of stored tokens needs the images: tok bench ... IMAGES "
                            f"--tokens {tokens}")
    src, tok, size = _open(tokens, model, "cpu", image_size)
    if "usage" in metrics and tok.spec.kind != "indices" and tok.id_spec is not None:
        raise TokUsageError(f"the usage of a {tok.family} model counts codes derived from the images, not its "
                            f"stored {tok.spec.kind}: tok bench usage IMAGES -m {tok.name}")
    opts = replace(opts, precision=str(src.header.get("precision") or opts.precision))
    built = _build_metrics(opts, {}, tok, size)
    keys = _Keys()
    t0 = time.perf_counter()
    done = _stream_tokens(src, tok, [keys, *built], n)
    if not done:
        raise TokError(f"{tokens} holds no tokens")
    result = _assemble(tok, done, opts, built, keys, {}, size=size, n_failed=0, dev=torch.device("cpu"), world=1,
                       seconds=time.perf_counter() - t0)
    record = _token_record(src)
    result["protocol"].update(record)
    result["protocol"]["source"] = {"tokens": record["tokens"], "sha256": record["tokens_sha256"]}
    return result, [], None


def _stream_tokens(src, tok, collectors: list, n: int | None) -> list[_Stored]:
    """Feed the shards' tokens (in chunks of CHUNK images, the first ``n``) to ``collectors``; the keys read."""
    from tokcli import pipeline

    done: list[_Stored] = []
    for tf in src.files():
        if src.shards > 1:
            pipeline.check_header(tok, tf.header)  # every shard names its model, not only the manifest
        take = len(tf) if n is None else min(len(tf), n - len(done))
        for lo in range(0, take, CHUNK):
            hi = min(lo + CHUNK, take)
            index = list(range(len(done) + lo, len(done) + hi))
            batch = Batch(list(tf.keys[lo:hi]), index, None, None, tf.array[lo:hi])
            for c in collectors:
                c.update(batch)
        done += [_Stored(k) for k in tf.keys[:take]]
        if n is not None and len(done) >= n:
            break
    return done


# ----------------------------------------------------------------------------------------- tokens + images
def evaluate_stored(items, tokens, *, device: str = "auto", **options):
    """Score the reconstructions of the tokens stored in ``tokens`` against their originals among ``items`` (found
    by key); ``options`` are the keywords of :func:`tokcli.bench.quality.evaluate` (``n``: the set's first n
    images; then ``items`` may hold more images than those). Returns (result, per-input errors, grid arrays or
    None). A key of the set without an image, or (without ``n``) an image the set does not hold, is refused with
    one line (exit code 2), before any decoding where the counts already tell."""
    from tokcli.core.device import resolve_device, set_precision

    _single_process("tok bench --tokens")
    options.setdefault("sampler", {})
    opts = Options(**options)
    items = list(items)
    _validate([], opts)
    dev = resolve_device(device)
    set_precision(opts.precision)
    src, tok, size = _open(tokens, opts.model, str(dev), opts.image_size)
    opts = _stored_options(opts, tok, src)
    if opts.n is None and len(items) != src.count:
        raise TokUsageError(f"DATA holds {len(items)} images but {tokens} the tokens of {src.count}: give the "
                            "images the tokens were encoded from (or --n N to score the first N of the set)")
    scorers, skipped = _load_scorers(opts, dev=dev, primary=True)
    built = _build_metrics(opts, scorers, tok, size)
    keys, pics = _Keys(), _Grid(opts.grid)
    t0 = time.perf_counter()
    done, errors = _stream_stored(src, tok, {it.key: it for it in items}, [keys, pics, *built], opts, size)
    if not keys.values:
        raise TokError("no image could be reconstructed" + (f" ({len(errors)} failed)" if errors else ""))
    result = _assemble(tok, done, opts, built, keys, skipped, size=size, n_failed=len(errors), dev=dev, world=1,
                       seconds=time.perf_counter() - t0)
    result["protocol"].update(_token_record(src))
    return result, errors, pics.arrays()


def _stored_options(opts: Options, tok, src) -> Options:
    """``opts`` with the sampler checked and the latent dtype the tokens were stored at (``--latent-dtype`` is
    refused unless it is that one: stored tokens are not rounded again)."""
    from tokcli import pipeline

    sampler = pipeline.check_sampler(tok, opts.sampler)
    stored = pipeline.check_latent_dtype(tok, src.header.get("latent_dtype"))  # None unless latents
    if opts.latent_dtype is not None and pipeline.check_latent_dtype(tok, opts.latent_dtype) != stored:
        raise TokUsageError(f"--latent-dtype {opts.latent_dtype}: the stored tokens are {stored}; leave it out")
    return replace(opts, sampler=sampler, latent_dtype=stored)


def _originals(keys: list, by_key: dict, size: int, opts: Options, errors: list, where: str):
    """(positions in ``keys`` of the images that loaded, their crops); a key without an image is refused."""
    from tokcli.core.images import load_cropped

    good, crops = [], []
    for j, k in enumerate(keys):
        item = by_key.get(k)
        if item is None:
            raise TokUsageError(f"{where}: key {k!r} has no image among the inputs (give the images the tokens "
                                "were encoded from)")
        try:
            crops.append(load_cropped(item, size))
            good.append(j)
        except TokError as e:
            if not opts.skip_errors:
                raise
            errors.append((k, str(e)))
    return good, crops


def _stream_stored(src, tok, by_key: dict, collectors: list, opts: Options, size: int):
    """Decode the set batch by batch (the first ``opts.n`` images), feed every (original, reconstruction) batch to
    ``collectors`` and save the reconstructions when asked; (the set's inputs read, per-input errors)."""
    from tokcli import pipeline

    stage = pipeline.Stage(Path(opts.save_recon)) if opts.save_recon else None
    out_dir = Path(opts.save_recon or ".")
    done: list[_Stored] = []
    errors: list = []
    res = pipeline.Result()
    bar = pipeline.progress_bar(src.count if opts.n is None else min(opts.n, src.count), "bench", opts.quiet)
    try:
        for keys, rows in pipeline._batches(src, tok, False, out_dir, opts.batch_size):
            if opts.n is not None:
                keys, rows = keys[:opts.n - len(done)], rows[:opts.n - len(done)]
            good, crops = _originals(keys, by_key, size, opts, errors, str(src.path))
            if good:
                index = [len(done) + j for j in good]
                recon = pipeline.decode_batch(tok, rows[good], len(done), opts.seed, positions=index,
                                              sampler=opts.sampler)
                batch = Batch([keys[j] for j in good], index, np.stack(crops), recon, rows[good])
                for c in collectors:
                    c.update(batch)
                if stage is not None:
                    pipeline.write_pngs(stage, batch.keys, recon, res)
            done += [_Stored(k) for k in keys]
            bar.update(len(keys))
            if opts.n is not None and len(done) >= opts.n:
                break
        _check_covered(done, by_key, opts, str(src.path))
        if stage is not None:
            stage.commit()
    except BaseException:
        if stage is not None:
            stage.abort()
        raise
    finally:
        bar.close()
    return done, errors


def _check_covered(done: list, by_key: dict, opts: Options, where: str) -> None:
    """Without ``n`` every input image must be in the set (nothing left out silently)."""
    if opts.n is not None:
        return
    held = {d.key for d in done}
    left = [k for k in by_key if k not in held]
    if left:
        raise TokUsageError(f"{len(left)} input image(s) are not in {where} (first: {left[0]!r}): give the images "
                            "the tokens were encoded from (or --n N to score the first N of the set)")


__all__ = ["evaluate_stored", "evaluate_tokens", "looks_like_tokens"]
