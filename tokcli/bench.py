"""The library side of `tok bench`: one evaluation protocol, every choice recorded in the result.

Protocol (DESIGN.md, docs/evaluation.md): ADM centre crop to the model resolution; originals and reconstructions
both rounded to uint8; PSNR per image with range 255, then the mean; SSIM (Wang et al.: Gaussian 11x11, sigma 1.5)
on uint8; LPIPS with the lpips package (AlexNet, v0.1) on [-1, 1]; rFID between the Inception statistics of the
originals (or a reference statistics file) and of the reconstructions, FID Inception weights
(pt_inception-2015-12-05), 2048-d pool features, float64 statistics; codebook usage and perplexity per group; bits
per pixel of the tokens and of what the token file stores. Legacy PSNR / SSIM modes of the official repositories are
available by name (metrics/legacy.py).

Everything streams batch by batch: memory does not grow with the number of images (50k ImageNet-val is fine).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokcli import __version__
from tokcli.core.checkpoint import sha256_file
from tokcli.errors import MissingWeightsError, TokError, TokUsageError

METRICS = ("psnr", "ssim", "lpips", "rfid", "usage", "bpp")
NEEDS_WEIGHTS = ("lpips", "rfid")
FLOWMO_BATCH = 5  # the official FlowMo / Open-MAGVIT2 evaluation batch (its PSNR is per batch)
JOINT_MAX = 1 << 20  # joint-code usage is counted when the joint codebook has at most this many entries


def _warn(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"warning: {msg}", file=sys.stderr)


@dataclass
class _Grid:
    """The first few (original, reconstruction) pairs, for the report's image grid."""

    limit: int
    orig: list = field(default_factory=list)
    recon: list = field(default_factory=list)
    keys: list = field(default_factory=list)

    def add(self, keys, orig, recon) -> None:
        take = max(0, min(self.limit - len(self.keys), len(keys)))
        self.keys += list(keys[:take])
        self.orig += list(orig[:take])
        self.recon += list(recon[:take])

    def arrays(self):
        if not self.keys:
            return None
        return np.stack(self.orig), np.stack(self.recon), list(self.keys)


def _load_scorers(metrics, *, lpips_net, lpips_weights, inception_weights, ref_stats, device, strict, quiet):
    """Load what the weight-dependent metrics need before any image is processed (a missing file fails fast).
    With ``strict=False`` (``tok bench all``) a metric whose weights are missing is skipped, with the reason."""
    loaded: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for m in [m for m in metrics if m in NEEDS_WEIGHTS]:
        try:
            if m == "lpips":
                from tokcli.losses.perceptual import backbone_path, load_lpips

                lp = load_lpips(lpips_net, backbone="pretrained", device=device, weights=lpips_weights)
                src = Path(lpips_weights) if lpips_weights else backbone_path(lpips_net)
                loaded["lpips"] = (lp, {"net": lpips_net, "version": "0.1", "backbone_file": src.name,
                                        "backbone_sha256": sha256_file(src)})
            else:
                from tokcli.metrics import fid

                net, sha = fid.load_fid_inception(inception_weights, device=device)
                ref = None
                if ref_stats is not None:
                    ref = fid.FeatureStats.from_npz(ref_stats)
                loaded["rfid"] = (net, sha, ref)
        except MissingWeightsError as e:
            named = lpips_weights if m == "lpips" else inception_weights
            if strict or named:  # a file the user named must work; only absent defaults are skipped
                raise
            skipped[m] = str(e)
            _warn(f"{m} skipped: {e}", quiet)
    return loaded, skipped


def _check_ref_stats(ref, *, size: int, weights_sha: str, ref_stats) -> None:
    """A reference statistics file must match the features being compared (2048-d) and, when it records them
    (files from `tok bench stats`), the image size and the Inception weights."""
    from tokcli.metrics.fid import FEATURE_DIM

    if ref.dim != FEATURE_DIM:
        raise TokError(f"{ref_stats}: statistics of {ref.dim}-d features; rFID uses the {FEATURE_DIM}-d Inception "
                       f"pool features")
    meta = getattr(ref, "meta", {}) or {}
    if meta.get("image_size") not in (None, size):
        raise TokError(f"{ref_stats} was computed at {meta['image_size']} px but this run evaluates at {size} px; "
                       f"make statistics at the same size (tok bench stats DATA --size {size})")
    if meta.get("weights_sha256") not in (None, weights_sha):
        raise TokError(f"{ref_stats} was computed with other Inception weights (sha256 "
                       f"{meta['weights_sha256'][:12]}..., these are {weights_sha[:12]}...)")


def evaluate(items, *, model: str | None = None, metrics=("psnr", "ssim", "usage", "bpp"), n: int | None = None,
             image_size: int | None = None, device: str = "auto", batch_size: int = 8, workers: int = 0,
             seed: int = 0, precision: str = "fp32", skip_errors: bool = False, quiet: bool = False,
             save_recon: str | None = None, psnr_mode: str = "tok", ssim_mode: str = "tok", lpips_net: str = "alex",
             lpips_weights: str | None = None, inception_weights: str | None = None, ref_stats: str | None = None,
             strict: bool = True, grid: int = 8, inputs=None):
    """Reconstruct ``items`` with ``model`` and score them. Returns (result dict, per-input errors, grid arrays or
    None). ``strict=False`` skips (and records) metrics whose pretrained weights are missing instead of failing.

    Under torchrun (WORLD_SIZE > 1) each rank takes every world-th image; per-image values, failures, code counts
    and the float64 Inception sums are combined exactly, so the result equals a single-process run (the per-image
    lists come back in input order). Every rank returns the result; the final rFID is computed on rank 0 only.
    """
    from tokcli.core.device import resolve_device
    from tokcli.core.distributed import process_group

    with process_group(resolve_device(device)) as (rank, world, dev):
        return _evaluate(items, dev=dev, rank=rank, world=world, model=model, metrics=metrics, n=n,
                         image_size=image_size, batch_size=batch_size, workers=workers, seed=seed,
                         precision=precision, skip_errors=skip_errors, quiet=quiet or rank != 0,
                         save_recon=save_recon, psnr_mode=psnr_mode, ssim_mode=ssim_mode, lpips_net=lpips_net,
                         lpips_weights=lpips_weights, inception_weights=inception_weights, ref_stats=ref_stats,
                         strict=strict, grid=grid, inputs=inputs)


def _evaluate(items, *, dev, rank, world, model, metrics, n, image_size, batch_size, workers, seed, precision,
              skip_errors, quiet, save_recon, psnr_mode, ssim_mode, lpips_net, lpips_weights, inception_weights,
              ref_stats, strict, grid, inputs):
    import torch

    import tokcli
    from tokcli import pipeline
    from tokcli.core.device import set_precision
    from tokcli.core.distributed import gather_objects
    from tokcli.core.images import to_tensor, to_uint8
    from tokcli.metrics import legacy

    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise TokUsageError(f"unknown metric(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METRICS)}")
    for name, mode in (("psnr", psnr_mode), ("ssim", ssim_mode)):
        if mode not in legacy.MODES:
            raise TokUsageError(f"unknown --{name}-mode {mode!r}; choose from {', '.join(legacy.MODES)}")
    if n is not None:
        if n <= 0:
            raise TokUsageError("--n must be positive")
        items = list(items)[:n]
    items = list(items)
    positions = {it.key: i for i, it in enumerate(items)}
    set_precision(precision)
    scorers, skipped = _load_scorers(metrics, lpips_net=lpips_net, lpips_weights=lpips_weights,
                                     inception_weights=inception_weights, ref_stats=ref_stats, device=dev,
                                     strict=strict, quiet=quiet)
    tok = tokcli.load(model, device=str(dev))
    size = pipeline.image_size_for(tok, image_size)
    spec = tok.spec
    if "ssim" in metrics and size < 11:
        raise TokUsageError(f"SSIM needs images of at least 11x11 pixels (its window); --size is {size}")
    if "rfid" in scorers and scorers["rfid"][2] is not None:
        _check_ref_stats(scorers["rfid"][2], size=size, weights_sha=scorers["rfid"][1], ref_stats=ref_stats)

    per_image: dict[str, list] = {"key": []}
    usage = joint = None
    if "usage" in metrics and spec.kind == "indices":
        from tokcli.metrics.usage import UsageCounter

        usage = UsageCounter(spec.codebook_size, group_axis=-1 if len(spec.shape) == 3 else None)
        groups = spec.shape[-1] if len(spec.shape) == 3 else 1
        if groups > 1 and spec.codebook_size ** groups <= JOINT_MAX:  # joint codes, where countable
            joint = UsageCounter(spec.codebook_size ** groups)
    fid_real = fid_fake = None
    if "rfid" in scorers:
        from tokcli.metrics.fid import FeatureStats, features_from_uint8

        fid_fake = FeatureStats()
        fid_real = FeatureStats() if scorers["rfid"][2] is None else None
    tokens_shape = None
    pics = _Grid(grid)

    def on_batch(keys, orig_u8, recon, tokens):
        nonlocal tokens_shape
        tokens_shape = tokens.shape[1:]
        recon_u8 = to_uint8(recon)
        per_image["key"] += list(keys)
        pics.add(keys, orig_u8, recon_u8)
        if "psnr" in metrics or "ssim" in metrics:
            if psnr_mode == "tok" and ssim_mode == "tok":
                from tokcli.metrics import image

                if "psnr" in metrics:
                    per_image.setdefault("psnr", []).extend(image.psnr(orig_u8, recon_u8).tolist())
                if "ssim" in metrics:
                    per_image.setdefault("ssim", []).extend(image.ssim(orig_u8, recon_u8).tolist())
            else:  # legacy modes act on the float decoder output (truncation, +128); originals as loaded
                rf = recon.detach().float().permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)
                if "psnr" in metrics:  # flowmo: per-image values here, its per-batch figure at the end
                    mode = "wetok" if psnr_mode == "flowmo" else psnr_mode
                    per_image.setdefault("psnr", []).extend(legacy.psnr(orig_u8, rf, mode).tolist())
                if "ssim" in metrics:
                    per_image.setdefault("ssim", []).extend(legacy.ssim(orig_u8, rf, ssim_mode).tolist())
        if "lpips" in scorers:
            from tokcli.losses.perceptual import lpips_distance

            lp = scorers["lpips"][0]
            with torch.inference_mode():
                v = lpips_distance(lp, to_tensor(orig_u8).to(dev), to_tensor(recon_u8).to(dev))
            per_image.setdefault("lpips", []).extend(v.float().cpu().numpy().reshape(-1).tolist())
        if fid_fake is not None:
            net = scorers["rfid"][0]
            fid_fake.update(features_from_uint8(net, recon_u8, batch_size=batch_size, device=dev))
            if fid_real is not None:
                fid_real.update(features_from_uint8(net, orig_u8, batch_size=batch_size, device=dev))
        if usage is not None:
            usage.update(tokens)
        if joint is not None:  # group j is digit j of the joint code (base codebook_size)
            base = spec.codebook_size ** np.arange(tokens.shape[-1], dtype=np.int64)
            joint.update((tokens.astype(np.int64) * base).sum(axis=-1))

    t0 = time.perf_counter()
    shard = items[rank::world]
    errors: list = []
    fatal = None
    try:
        if shard:
            errors = pipeline.reconstruct(tok, shard, save_recon, image_size=size, batch_size=batch_size,
                                          workers=workers, seed=seed, skip_errors=skip_errors, quiet=quiet,
                                          on_batch=on_batch, positions=positions if world > 1 else None).errors
    except TokError as e:
        if world == 1:
            raise
        fatal = e  # raised on every rank below, after the gather, so no rank waits forever
    if world > 1:
        parts = gather_objects((per_image, errors, tokens_shape, joint.counts if joint is not None else None,
                                usage.counts if usage is not None else None, fatal and str(fatal)))
        failed = [f for *_, f in parts if f]
        if failed:
            raise TokError(failed[0])
        merged: dict[str, list] = {}
        for part, *_ in parts:
            for k, v in part.items():
                merged.setdefault(k, []).extend(v)
        order = np.argsort([positions[k] for k in merged["key"]], kind="stable")
        per_image = {k: [v[i] for i in order] for k, v in merged.items()}
        errors = sorted((e for _, errs, *_ in parts for e in errs), key=lambda e: positions.get(e[0], -1))
        tokens_shape = next((t for _, _, t, *_ in parts if t is not None), None)
        for pos, counter in ((3, joint), (4, usage)):
            if counter is not None:
                counts = [part[pos] for part in parts if part[pos] is not None]
                counter.counts = sum(counts[1:], counts[0]) if counts else None
        if fid_fake is not None:
            fid_fake.all_reduce()
            if fid_real is not None:
                fid_real.all_reduce()
    if not per_image["key"]:
        raise TokError("no image could be reconstructed" + (f" ({len(errors)} failed)" if errors else ""))
    seconds = time.perf_counter() - t0
    n_img = len(per_image["key"])

    out: dict[str, Any] = {}
    if "psnr" in per_image:
        per_image["psnr"] = [min(v, 100.0) for v in per_image["psnr"]]  # identical images: 100 dB (JSON has no inf)
        out["psnr"] = (legacy.flowmo_psnr_mean(per_image["psnr"], FLOWMO_BATCH) if psnr_mode == "flowmo"
                       else float(np.mean(per_image["psnr"])))
    if "ssim" in per_image:
        out["ssim"] = float(np.mean(per_image["ssim"]))
    if "lpips" in per_image:
        out["lpips"] = float(np.mean(per_image["lpips"]))
    if fid_fake is not None:
        from tokcli.metrics.fid import frechet_distance

        ref = scorers["rfid"][2] if fid_real is None else fid_real
        if fid_fake.n < 2 or ref.n is not None and ref.n < 2:
            raise TokError(f"rFID needs at least 2 images (got {fid_fake.n}); use a few thousand for a meaningful "
                           f"value (the usual protocol is ImageNet-val, 50,000 images)")
        if rank == 0:  # the one number every rank would compute; a 2048x2048 sqrtm takes seconds
            out["rfid"] = float(frechet_distance(ref.mean(), ref.cov(), fid_fake.mean(), fid_fake.cov()))
        if n_img < 2048:
            _warn(f"rFID on {n_img} images is dominated by the small sample (2048 features); compare only "
                  f"values computed on the same N", quiet)
    if usage is not None:
        out["usage"] = usage.result()
        out["usage"]["joint"] = joint.result() if joint is not None else None
    if "bpp" in metrics and tokens_shape is not None:
        n_tok = int(np.prod(tokens_shape))
        bits = n_tok * (math.log2(spec.codebook_size) if spec.kind == "indices" else
                        (1 if spec.kind == "bits" else 16))
        stored = None
        if spec.kind == "indices":  # as the token file stores them (smallest unsigned dtype for the codebook)
            from tokcli.core.tokens import index_dtype

            stored = n_tok * np.dtype(index_dtype(spec.codebook_size - 1)).itemsize
        out["bpp"] = {"tokens": bits / (size * size), "tokens_per_image": n_tok, "stored_bytes_per_image": stored,
                      "stored_bpp": stored * 8 / (size * size) if stored else None,
                      "compression_ratio": 24 * size * size / bits}  # 8-bit RGB pixels over token bits

    keys_sha = hashlib.sha256("\n".join(it.key for it in items).encode()).hexdigest()
    protocol = {
        "data": {"inputs": list(inputs) if inputs else None, "n_inputs": len(items), "keys_sha256": keys_sha},
        "n_images": n_img,
        "n_failed": len(errors),
        "image_size": size,
        "crop": "adm_center (BOX halving, BICUBIC to the short side, centre crop)",
        "uint8": "round(clamp((x + 1) * 127.5)) for both images",
        "psnr": {"tok": "per image, data range 255, mean over images (identical images capped at 100 dB)",
                 "flowmo": f"legacy mode 'flowmo' (metrics/legacy.py): one MSE per {FLOWMO_BATCH} consecutive "
                           f"images in input order, mean over those batches"}.get(
            psnr_mode, f"legacy mode {psnr_mode!r} (metrics/legacy.py)") if "psnr" in metrics else None,
        "ssim": {"tok": "Wang et al. 2004: Gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, L 255, per channel, mean"}.get(
            ssim_mode, f"legacy mode {ssim_mode!r} (metrics/legacy.py)") if "ssim" in metrics else None,
        "lpips": scorers["lpips"][1] if "lpips" in scorers else None,
        "rfid": None,
        "seed": seed,
        "precision": precision,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "batch_size": batch_size,
        "world_size": world,
        "torch": torch.__version__,
        "tok_version": __version__,
        "seconds": round(seconds, 3),
    }
    if "rfid" in scorers:
        protocol["rfid"] = {
            "reference": ("the same images before tokenization (originals after the crop)" if ref_stats is None
                          else f"statistics file {Path(ref_stats).name} (sha256 {sha256_file(ref_stats)})"),
            "feature_extractor": "FID Inception-v3 (TF port, pt_inception-2015-12-05), pool3 2048-d",
            "weights_sha256": scorers["rfid"][1],
            "resize": "bilinear to 299x299, align_corners=False, no antialias (as pytorch-fid)",
            "input": "uint8 images (rounded), as for PSNR",
            "statistics": "float64 mean and covariance (ddof 1); Frechet distance with scipy sqrtm",
        }
    result = {
        "model": {"name": tok.name, "family": tok.family, "sha256": tok.sha256, "source": tok.source},
        "protocol": protocol,
        "metrics": out,
        "skipped": skipped,
        "per_image": per_image,
    }
    grid_arrays = pics.arrays()
    if world > 1:  # the first images of the whole input list, whichever rank scored them
        parts = [g for g in gather_objects(grid_arrays) if g is not None]
        if parts:
            keys = [k for g in parts for k in g[2]]
            orig = np.concatenate([g[0] for g in parts])
            recon = np.concatenate([g[1] for g in parts])
            order = np.argsort([positions[k] for k in keys], kind="stable")[:grid]
            grid_arrays = (orig[order], recon[order], [keys[i] for i in order])
    return result, errors, grid_arrays


def folder_stats(items, out: str | Path, *, size: int = 256, inception_weights: str | None = None,
                 device: str = "auto", batch_size: int = 50, workers: int = 0, skip_errors: bool = False,
                 quiet: bool = False):
    """Inception statistics of a folder (ADM centre crop to ``size``) written as an ADM-style ``mu``/``sigma``
    npz at ``out`` (plus the exact sums and a protocol record). Under torchrun each rank takes every world-th image
    and the float64 sums are all-reduced; rank 0 writes. Returns (summary for the CLI, per-input errors)."""
    from tqdm import tqdm

    from tokcli.core.device import resolve_device
    from tokcli.core.distributed import gather_objects, process_group
    from tokcli.core.images import iter_batches
    from tokcli.metrics import fid

    items = list(items)
    positions = {it.key: i for i, it in enumerate(items)}
    with process_group(resolve_device(device)) as (rank, world, dev):
        net, sha = fid.load_fid_inception(inception_weights, device=dev)
        stats = fid.FeatureStats(device=dev)
        errors: list = []
        shard = items[rank::world]
        bar = tqdm(total=len(shard), desc="stats", unit="img", disable=quiet or rank != 0, leave=False)
        for keys, imgs in iter_batches(shard, size, batch_size, skip_errors=skip_errors, errors=errors,
                                       workers=workers):
            stats.update(fid.features_from_uint8(net, imgs, batch_size=batch_size, device=dev))
            bar.update(len(keys))
        bar.close()
        if world > 1:
            stats.all_reduce()
            errors = sorted((e for part in gather_objects(errors) for e in part),
                            key=lambda e: positions.get(e[0], -1))
        if stats.n < 2:
            raise TokError(f"statistics need at least 2 images, got {stats.n}")
        if rank == 0:
            stats.to_npz(out, meta={"image_size": size, "crop": "adm_center", "weights_sha256": sha,
                                    "n": int(stats.n), "tok_version": __version__})
    return {"output": str(out), "n_images": int(stats.n), "image_size": size, "weights_sha256": sha,
            "world_size": world, "n_failed": len(errors)}, errors


def throughput(model: str | None = None, *, batch_sizes=(1, 8), size: int | None = None, device: str = "auto",
               precision: str = "fp32", warmup: int = 2, iters: int = 5, quiet: bool = False) -> dict[str, Any]:
    """encode / decode / reconstruct images per second (median of ``iters`` timed repeats after ``warmup``) and
    peak memory, on random images in [-1, 1]."""
    import resource

    import torch

    import tokcli
    from tokcli.core.device import resolve_device, set_precision

    set_precision(precision)
    dev = resolve_device(device)
    tok = tokcli.load(model, device=str(dev))
    from tokcli import pipeline

    size = pipeline.image_size_for(tok, size)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn):
        for _ in range(warmup):
            fn()
        sync()
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    rows = []
    for b in batch_sizes:
        if b <= 0:
            raise TokUsageError("batch sizes must be positive")
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(b, 3, size, size, generator=g) * 2 - 1).to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            codes = tok.encode(x)
            t_enc = timed(lambda: tok.encode(x))
            t_dec = timed(lambda: tok.decode(codes))
            t_rec = timed(lambda: tok.decode(tok.encode(x)))
        row = {"batch": b, "encode_img_s": b / t_enc, "decode_img_s": b / t_dec, "reconstruct_img_s": b / t_rec,
               "encode_s": t_enc, "decode_s": t_dec, "reconstruct_s": t_rec}
        if dev.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        else:  # the process's peak resident set so far (Linux reports KiB)
            row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        rows.append(row)
        if not quiet:
            print(f"batch {b}: encode {row['encode_img_s']:.2f} img/s, decode {row['decode_img_s']:.2f} img/s, "
                  f"reconstruct {row['reconstruct_img_s']:.2f} img/s", file=sys.stderr)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {
        "model": {"name": tok.name, "family": tok.family, "sha256": tok.sha256, "source": tok.source},
        "protocol": {"image_size": size, "input": "uniform random images in [-1, 1]", "warmup": warmup,
                     "iters": iters, "statistic": "median", "precision": precision, "device": dev_name,
                     "torch": torch.__version__, "tok_version": __version__},
        "results": rows,
    }
