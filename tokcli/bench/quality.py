"""`tok bench psnr|ssim|lpips|rfid|usage|all`: reconstruct the images once and feed every metric object.

The steps, each a short function: check the options (:func:`_validate`); load what the weight-dependent metrics
need before any image is processed (:func:`_load_scorers`: a missing file fails fast, or under ``tok bench all``
skips that metric with the reason); build the metric objects for the model's token spec and size
(:func:`_build_metrics`); stream the reconstructions through them (:func:`_stream`); combine the ranks of a
torchrun job (:func:`_sync`); assemble the result (:func:`_assemble`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from tokcli.bench.common import gather_errors, input_positions, model_record, warn
from tokcli.errors import MissingWeightsError, TokError, TokUsageError
from tokcli.metrics.base import Batch, Metric, PerImageMetric
from tokcli.version import __version__

METRICS = ("psnr", "ssim", "lpips", "rfid", "usage", "bpp")
NEEDS_WEIGHTS = ("lpips", "rfid")
CROP = "adm_center (BOX halving, BICUBIC to the short side, centre crop)"
UINT8 = "round(clamp((x + 1) * 127.5)) for both images"


@dataclass(frozen=True)
class Options:
    """The keywords of :func:`evaluate` (see there; the same defaults)."""

    model: str | None = None
    metrics: tuple = ("psnr", "ssim", "usage", "bpp")
    n: int | None = None
    image_size: int | None = None
    batch_size: int = 8
    workers: int = 0
    seed: int = 0
    precision: str = "fp32"
    skip_errors: bool = False
    quiet: bool = False
    save_recon: str | None = None
    psnr_mode: str = "tok"
    ssim_mode: str = "tok"
    lpips_net: str = "alex"
    lpips_weights: str | None = None
    inception_weights: str | None = None
    ref_stats: str | None = None
    strict: bool = True
    grid: int = 8
    inputs: Any = None
    download: bool = False
    latent_dtype: str | None = None
    sampler: Any = None


def evaluate(items, *, model: str | None = None, metrics=("psnr", "ssim", "usage", "bpp"), n: int | None = None,
             image_size: int | None = None, device: str = "auto", batch_size: int = 8, workers: int = 0,
             seed: int = 0, precision: str = "fp32", skip_errors: bool = False, quiet: bool = False,
             save_recon: str | None = None, psnr_mode: str = "tok", ssim_mode: str = "tok", lpips_net: str = "alex",
             lpips_weights: str | None = None, inception_weights: str | None = None, ref_stats: str | None = None,
             strict: bool = True, grid: int = 8, inputs=None, download: bool = False, latent_dtype: str | None = None,
             sampler: Mapping[str, Any] | None = None):
    """Reconstruct ``items`` with ``model`` and score them. Returns (result dict, per-input errors, grid arrays or
    None). ``strict=False`` skips (and records) metrics whose pretrained weights are missing instead of failing;
    ``download`` fetches a missing pretrained file (tokcli/core/pretrained.py: never without it or TOK_DOWNLOAD=1).
    ``sampler``: a stochastic decoder's keywords (``{"steps": 8}``), checked up front and recorded in the protocol
    with the folder's defaults filled in.

    Under torchrun (WORLD_SIZE > 1) each rank takes every world-th image; per-image values, failures, code counts
    and the float64 Inception sums are combined exactly, so the result equals a single-process run (the per-image
    lists come back in input order). Every rank returns the result; the final rFID is computed on rank 0 only.
    """
    from tokcli.core.device import resolve_device
    from tokcli.core.distributed import process_group

    with process_group(resolve_device(device)) as (rank, world, dev):
        opts = Options(model=model, metrics=tuple(metrics), n=n, image_size=image_size, batch_size=batch_size,
                       workers=workers, seed=seed, precision=precision, skip_errors=skip_errors,
                       quiet=quiet or rank != 0, save_recon=save_recon, psnr_mode=psnr_mode, ssim_mode=ssim_mode,
                       lpips_net=lpips_net, lpips_weights=lpips_weights, inception_weights=inception_weights,
                       ref_stats=ref_stats, strict=strict, grid=grid, inputs=inputs, download=download,
                       latent_dtype=latent_dtype, sampler=dict(sampler or {}))
        return _evaluate(items, opts, dev=dev, rank=rank, world=world)


def _evaluate(items, opts: Options, *, dev, rank: int, world: int):
    import tokcli
    from tokcli import pipeline
    from tokcli.core.device import set_precision

    items = _validate(items, opts)
    set_precision(opts.precision)
    scorers, skipped = _load_scorers(opts, dev=dev, primary=rank == 0)
    tok = tokcli.load(opts.model, device=str(dev))
    size = pipeline.image_size_for(tok, opts.image_size)
    metrics = _build_metrics(opts, scorers, tok, size)
    keys, pics = _Keys(), _Grid(opts.grid)
    t0 = time.perf_counter()
    errors = _stream(tok, items, [keys, pics, *metrics], opts, size=size, rank=rank, world=world)
    if world > 1:
        errors = _sync(items, errors, [keys, pics, *metrics])
    if not keys.values:
        raise TokError("no image could be reconstructed" + (f" ({len(errors)} failed)" if errors else ""))
    seconds = time.perf_counter() - t0
    result = _assemble(tok, items, opts, metrics, keys, skipped, size=size, n_failed=len(errors), dev=dev,
                       world=world, seconds=seconds)
    return result, errors, pics.arrays()


def _validate(items, opts: Options) -> list:
    """The input list (the first ``n``) after checking the metric names, the legacy modes and ``n``."""
    from tokcli.metrics.pixel import check_mode

    bad = [m for m in opts.metrics if m not in METRICS]
    if bad or not opts.metrics:
        raise TokUsageError(f"unknown metric(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METRICS)}")
    check_mode("psnr", opts.psnr_mode)
    check_mode("ssim", opts.ssim_mode)
    if opts.n is not None:
        if opts.n <= 0:
            raise TokUsageError("--n must be positive")
        items = list(items)[:opts.n]
    return list(items)


def _load_scorers(opts: Options, *, dev, primary: bool) -> tuple[dict[str, Metric], dict[str, str]]:
    """The weight-dependent metrics (LPIPS, rFID), loaded in the order asked for, and the skipped ones with the
    reason. A file the user named must work; an absent default is an error unless ``opts.strict`` is off."""
    from tokcli.metrics.perceptual import LPIPS
    from tokcli.metrics.rfid import RFID

    loaded: dict[str, Metric] = {}
    skipped: dict[str, str] = {}
    for m in [m for m in opts.metrics if m in NEEDS_WEIGHTS]:
        try:
            if m == "lpips":
                loaded[m] = LPIPS.load(opts.lpips_net, weights=opts.lpips_weights, device=dev,
                                       download=opts.download)
            else:
                loaded[m] = RFID.load(opts.inception_weights, ref_stats=opts.ref_stats, batch_size=opts.batch_size,
                                      device=dev, primary=primary, download=opts.download)
        except MissingWeightsError as e:
            named = opts.lpips_weights if m == "lpips" else opts.inception_weights
            if opts.strict or named:
                raise
            skipped[m] = str(e)
            warn(f"{m} skipped: {e}", opts.quiet)
    return loaded, skipped


def _build_metrics(opts: Options, scorers: dict[str, Metric], tok, size: int) -> list[Metric]:
    """The metric objects, in the order of METRICS (the order of the result's records)."""
    from tokcli.metrics.pixel import PSNR, SSIM
    from tokcli.metrics.usage import Bpp, Usage

    spec = tok.spec
    legacy = opts.psnr_mode != "tok" or opts.ssim_mode != "tok"  # both then score the float decoder output
    out: list[Metric] = []
    for name in METRICS:
        if name not in opts.metrics:
            continue
        if name == "psnr":
            out.append(PSNR(opts.psnr_mode, float_input=legacy))
        elif name == "ssim":
            out.append(SSIM(opts.ssim_mode, float_input=legacy, size=size))
        elif name in scorers:
            out.append(scorers[name])
        elif name == "usage" and spec.kind == "indices":
            out.append(Usage(spec))
        elif name == "usage" and tok.id_spec is not None:
            out.append(_id_usage(tok))
        elif name == "bpp":
            out.append(Bpp(spec, size))
    if "rfid" in scorers:
        scorers["rfid"].check_reference(size)
    return out


def _id_usage(tok) -> Metric:
    """Usage of a continuous model's discrete codes (``tok.usage_ids`` of the cropped originals: one more encoder
    pass per batch, only when usage is asked for)."""
    import torch

    from tokcli.core.images import to_tensor
    from tokcli.metrics.usage import DerivedUsage

    def codes(batch):
        with torch.inference_mode():
            return tok.usage_ids(to_tensor(batch.orig).to(tok.device)).cpu().numpy()

    return DerivedUsage(tok.id_spec, codes, f"{tok.family} {tok.id_spec.layout}")


def _stream(tok, items: list, collectors: list[Metric], opts: Options, *, size: int, rank: int, world: int) -> list:
    """Reconstruct this rank's shard, feeding every batch to ``collectors``; the per-input errors. Under torchrun a
    TokError is raised on every rank after a gather (so that no rank waits forever for the others)."""
    from tokcli import pipeline
    from tokcli.core.distributed import gather_objects

    positions = input_positions(items)

    def on_batch(keys, orig_u8, recon, tokens):
        batch = Batch(list(keys), [positions[k] for k in keys], orig_u8, recon, tokens)
        for c in collectors:
            c.update(batch)

    shard = items[rank::world]
    errors: list = []
    fatal = None
    try:
        if shard:
            errors = pipeline.reconstruct(tok, shard, opts.save_recon, image_size=size, batch_size=opts.batch_size,
                                          workers=opts.workers, seed=opts.seed, skip_errors=opts.skip_errors,
                                          quiet=opts.quiet, on_batch=on_batch,
                                          positions=positions if world > 1 else None,
                                          latent_dtype=opts.latent_dtype, sampler=opts.sampler).errors
    except TokError as e:
        if world == 1:
            raise
        fatal = e
    if world > 1:
        failed = [f for f in gather_objects(fatal and str(fatal)) if f]
        if failed:
            raise TokError(failed[0])
    return errors


def _sync(items: list, errors: list, collectors: list[Metric]) -> list:
    """Combine every rank's collectors (exactly; per-image values in input order) and failures (input order)."""
    errors = gather_errors(errors, input_positions(items))
    for c in collectors:
        c.sync()
    return errors


def _assemble(tok, items: list, opts: Options, metrics: list[Metric], keys: "_Keys", skipped: dict, *, size: int,
              n_failed: int, dev, world: int, seconds: float) -> dict:
    """The result record: model, protocol (every choice), metrics, skipped metrics, per-image values."""
    import torch

    from tokcli import pipeline

    out: dict[str, Any] = {}
    per_image: dict[str, list] = {"key": keys.values}
    for m in metrics:
        out.update(m.result())
        per_image.update(m.per_image())
        for note in m.notes():
            warn(note, opts.quiet)
    keys_sha = hashlib.sha256("\n".join(it.key for it in items).encode()).hexdigest()
    protocol: dict[str, Any] = {
        "data": {"inputs": list(opts.inputs) if opts.inputs else None, "n_inputs": len(items),
                 "keys_sha256": keys_sha},
        "n_images": len(keys.values), "n_failed": n_failed, "image_size": size, "crop": CROP, "uint8": UINT8,
        "psnr": None, "ssim": None, "lpips": None, "rfid": None,  # filled in by the metrics measured
        "seed": opts.seed, "precision": opts.precision, "device": str(dev),
        **({"sampler": tok.sampler_kwargs(dict(opts.sampler or {}))} if tok.sampler_options else {}),
        **({"latent_dtype": pipeline.check_latent_dtype(tok, opts.latent_dtype)} if tok.spec.kind == "latents" else {}),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "batch_size": opts.batch_size, "world_size": world, "torch": torch.__version__, "tok_version": __version__,
        "seconds": round(seconds, 3),
    }
    for m in metrics:
        protocol.update(m.protocol())
    return {"model": model_record(tok), "protocol": protocol, "metrics": out, "skipped": skipped,
            "per_image": per_image}


class _Keys(PerImageMetric):
    """The keys of the scored images (the result's ``per_image["key"]``)."""

    name = "key"

    def update(self, batch: Batch) -> None:
        self.add(batch, batch.keys)


class _Grid(Metric):
    """The first ``limit`` (original, reconstruction) pairs of the input list, for the report's image grid."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.index: list = []
        self.keys: list = []
        self.orig: list = []
        self.recon: list = []

    def update(self, batch: Batch) -> None:
        take = max(0, min(self.limit - len(self.keys), len(batch.keys)))
        self.index += list(batch.index[:take])
        self.keys += list(batch.keys[:take])
        self.orig += list(batch.orig[:take])
        self.recon += list(batch.recon_u8[:take])

    def state(self):
        return self.index, self.keys, self.orig, self.recon

    def merge(self, parts: list) -> None:
        index = [i for p in parts for i in p[0]]
        order = np.argsort(index, kind="stable")[:self.limit]
        cols = [[x for p in parts for x in p[j]] for j in range(4)]
        self.index, self.keys, self.orig, self.recon = ([col[i] for i in order] for col in cols)

    def arrays(self):
        if not self.keys:
            return None
        return np.stack(self.orig), np.stack(self.recon), list(self.keys)
