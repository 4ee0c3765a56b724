"""`tok bench gfid`: generation FID and Inception Score of a generator's samples, decoded through its tokenizer.

The samples are exactly those of ``tok generate`` (tokcli/gen/generate.py): class-major order, sample j seeded
``seed + j``, the same batches, decoded by the same code path and rounded to uint8 as the PNGs are. Their FID
Inception features (metrics/fid.py: the same weights, the same loading rule, never downloaded unasked) give

- **FID** against ``--ref-stats``: an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``: ``mu`` / ``sigma``)
  or a `tok bench stats` file (read by :class:`~tokcli.metrics.fid_stats.FeatureStats`, no pickle, shapes checked);
- **IS** ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` splits (sample j in split ``j % splits``), p(y|x) the
  softmax of the unbiased 1008-class logits (:func:`~tokcli.metrics.fid.logits_from_features`); per split only
  the sums ``n``, ``Σ p(y|x)`` and ``Σ_x Σ_y p log p`` are kept, which is the same number;
- **speed**: images per second of sampling + decoding (Inception excluded) and network calls per image (forward
  calls of the generator counted by a hook; the sampler's steps when the family calls no module forward).

Under torchrun the batches are dealt to the ranks as ``tok generate`` deals them; the float64 sums are all-reduced
(as ``tok bench rfid`` does), so the result equals one process's up to float64 rounding; rank 0 computes it.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tokcli.bench.common import model_record
from tokcli.errors import TokError, TokUsageError
from tokcli.version import __version__

SMALL_N = 2048  # below this many samples the FID is dominated by the sample (as many as the feature dimensions)


class ISStats:
    """Per-split sums for the Inception Score: n, Σ p(y|x) [C] and Σ_x Σ_y p log p, float64, mergeable."""

    def __init__(self, splits: int, classes: int) -> None:
        self.splits = splits
        self.sums = np.zeros((splits, classes + 2), dtype=np.float64)  # [n, Σ p log p, Σ p ...]

    def update(self, logits: np.ndarray, positions) -> None:
        from tokcli.metrics.fid import log_softmax

        lp = log_softmax(logits)
        p = np.exp(lp)
        plogp = (p * lp).sum(axis=1)
        for i, pos in enumerate(positions):
            row = self.sums[pos % self.splits]
            row[0] += 1
            row[1] += plogp[i]
            row[2:] += p[i]

    def all_reduce(self) -> None:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        t = torch.from_numpy(self.sums)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.sums = t.cpu().numpy()

    def result(self) -> tuple[float, float]:
        n = self.sums[:, 0]
        if (n < 1).any():
            raise TokError(f"the Inception Score needs at least {self.splits} samples (one per split)")
        pbar = self.sums[:, 2:] / n[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = np.where(pbar > 0, pbar * np.log(pbar), 0.0).sum(axis=1)
        scores = np.exp(self.sums[:, 1] / n - ent)
        return float(scores.mean()), float(scores.std())


def read_reference(path: str | None):
    """The reference statistics file (2048-d mu / sigma, tok's or ADM's), read before anything is sampled."""
    from tokcli.metrics.fid_stats import FEATURE_DIM, FeatureStats

    if path is None:
        raise TokUsageError("--ref-stats is required: FID reference statistics (an ADM reference batch such as "
                            "VIRTUAL_imagenet256_labeled.npz, or tok bench stats DATA -o ref.npz)")
    ref = FeatureStats.from_npz(path)
    if ref.dim != FEATURE_DIM:
        raise TokError(f"{path}: statistics of {ref.dim}-d features; FID uses the {FEATURE_DIM}-d Inception pool "
                       f"features")
    return ref


def check_reference(ref, path: str, size: int, weights_sha: str) -> None:
    """A `tok bench stats` file records its image size and Inception weights: they must be this run's."""
    meta = getattr(ref, "meta", {}) or {}
    if meta.get("image_size") not in (None, size):
        raise TokError(f"{path} was computed at {meta['image_size']} px but the generator's tokenizer decodes "
                       f"{size} px images")
    if meta.get("weights_sha256") not in (None, weights_sha):
        raise TokError(f"{path} was computed with other Inception weights (sha256 "
                       f"{meta['weights_sha256'][:12]}..., these are {weights_sha[:12]}...)")


class _CallCounter:
    """Counts forward calls of the generator module while sampling."""

    def __init__(self, module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1


def _plan(gen, classes: str | None, n: int | None, num_samples: int | None):
    from tokcli.gen import generate as gen_lib

    ids = gen_lib.parse_classes(classes or "all", gen.num_classes)
    if num_samples is not None:
        if n is not None:
            raise TokUsageError("give -n (samples per class) or --num-samples (in all), not both")
        return gen_lib.plan_total(ids, num_samples)
    return gen_lib.plan(ids, 1 if n is None else n)


def gfid(model: str, *, ref_stats: str | None, classes: str | None = None, n: int | None = None,
         num_samples: int | None = None, sampler: Mapping[str, Any] | None = None, seed: int = 0,
         batch_size: int = 8, splits: int = 10, inception_weights: str | None = None, download: bool = False,
         tokenizer: str | None = None, device: str = "auto", quiet: bool = False) -> dict:
    """Sample, decode and score (see the module docstring). Returns the result dict (rank 0's under torchrun)."""
    import tokcli
    from tokcli.core.device import resolve_device, set_precision
    from tokcli.core.distributed import process_group
    from tokcli.gen import generate as gen_lib
    from tokcli.metrics import fid

    for name, v in (("-n", n), ("--num-samples", num_samples)):
        if v is not None and v < 1:
            raise TokUsageError(f"{name} must be at least 1, got {v}")
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise TokUsageError(f"--splits must be at least 1, got {splits!r}")
    set_precision("fp32")
    with process_group(resolve_device(device)) as (rank, world, dev):
        ref = read_reference(ref_stats)
        net, sha = fid.load_fid_inception(inception_weights, device=dev, download=download)
        gen = tokcli.load_generator(model, device=str(dev))
        keys, labels = _plan(gen, classes, n, num_samples)
        if len(keys) < max(2, splits):
            raise TokUsageError(f"{len(keys)} sample(s): FID needs at least 2 and the Inception Score one per split "
                                f"(--splits {splits}); use a few thousand for meaningful values")
        opts = gen.sampler_kwargs(dict(sampler or {}))
        tok = gen_lib.load_tokenizer(gen, tokenizer, device=str(gen.device))
        size = int(tok.image_size)
        check_reference(ref, ref_stats, size, sha)
        run = _Run(gen, tok, net, labels, opts, seed=seed, splits=splits, dev=dev, batch_size=batch_size)
        spans = gen_lib.batch_spans(len(keys), batch_size, rank, world)
        failure = None
        try:
            run.stream(spans, quiet=quiet or rank != 0)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank by all_ok
            failure = e
        gen_lib.all_ok(failure, world)
        totals = run.sync(world)
        if rank != 0:
            return {}
        result = _assemble(run, ref, totals, gen, tok, keys, labels, opts, seed=seed, batch_size=batch_size,
                           world=world, sha=sha, ref_stats=ref_stats, size=size)
    return result


class _Run:
    """The streaming state of one rank: Inception statistics, IS sums, timing and network calls."""

    def __init__(self, gen, tok, net, labels, opts, *, seed, splits, dev, batch_size) -> None:
        from tokcli.metrics.fid import NUM_CLASSES, FeatureStats

        self.gen, self.tok, self.net, self.labels, self.opts = gen, tok, net, labels, opts
        self.seed, self.dev, self.batch_size = seed, dev, batch_size
        self.stats = FeatureStats(device=dev)
        self.iscore = ISStats(splits, NUM_CLASSES)
        self.seconds = 0.0
        self.weighted_calls = 0  # Σ over batches of (calls of the batch) x (its size)
        self.n = 0

    def stream(self, spans, quiet: bool) -> None:
        from tokcli import pipeline
        from tokcli.core.images import to_uint8
        from tokcli.gen.generate import sample_batch
        from tokcli.metrics import fid

        bar = pipeline.progress_bar(sum(b - a for a, b in spans), "gfid", quiet)
        counter = _CallCounter(self.gen)
        try:
            for a, b in spans:
                before = counter.calls
                t0 = time.perf_counter()
                _, imgs = sample_batch(self.gen, self.tok, self.labels, a, b, seed=self.seed, sampler=self.opts)
                u8 = to_uint8(imgs)
                self.seconds += time.perf_counter() - t0
                self.weighted_calls += (counter.calls - before) * (b - a)
                feats = fid.features_from_uint8(self.net, u8, batch_size=max(self.batch_size, 1), device=self.dev)
                self.stats.update(feats)
                self.iscore.update(fid.logits_from_features(self.net, feats), range(a, b))
                self.n += b - a
                bar.update(b - a)
        finally:
            counter.handle.remove()
            bar.close()

    def sync(self, world: int) -> dict:
        """All-reduce the sums; every rank's (n, seconds, weighted calls)."""
        from tokcli.core.distributed import gather_objects

        if world > 1:
            self.stats.all_reduce()
            self.iscore.all_reduce()
        parts = gather_objects((self.n, self.seconds, self.weighted_calls))
        return {"n": sum(p[0] for p in parts), "seconds": max(p[1] for p in parts),
                "weighted_calls": sum(p[2] for p in parts)}


def _assemble(run: _Run, ref, totals: dict, gen, tok, keys, labels, opts, *, seed, batch_size, world, sha,
              ref_stats, size) -> dict:
    import torch

    from tokcli.core.checkpoint import sha256_file
    from tokcli.metrics.fid_stats import frechet_distance

    n = totals["n"]
    value = frechet_distance(ref.mean(), ref.cov(), run.stats.mean(), run.stats.cov())
    is_mean, is_std = run.iscore.result()
    if totals["weighted_calls"]:
        nfe, nfe_source = totals["weighted_calls"] / n, "forward calls of the generator, counted (a guided " \
                                                        "step's two branches in one batch count once)"
    else:
        nfe, nfe_source = opts.get("steps"), "the sampler's steps (the generator's forward was not called)"
    dev = run.dev
    notes = [] if n >= SMALL_N else [f"FID on {n} samples is dominated by the small sample (2048 features); "
                                     f"compare only values computed on the same N (the usual protocol is 50,000)"]
    counts = Counter(labels)
    return {
        "model": {"name": gen.name, "family": gen.family, "sha256": gen.sha256, "source": gen.source},
        "tokenizer": model_record(tok),
        "metrics": {"gfid": float(value), "is": is_mean, "is_std": is_std,
                    "images_per_s": n / totals["seconds"] if totals["seconds"] > 0 else None,
                    "nfe_per_image": nfe},
        "protocol": {
            "n_samples": n, "n_classes": len(counts), "per_class": sorted(set(counts.values())),
            "seed": int(seed), "seeding": "sample j (class-major order): seed + j", "sampler": dict(opts),
            "batch_size": batch_size, "image_size": size, "input": "decoded samples rounded to uint8 (the PNGs of "
                                                                   "tok generate)",
            "reference": f"statistics file {Path(ref_stats).name} (sha256 {sha256_file(ref_stats)})",
            "feature_extractor": "FID Inception-v3 (TF port, pt_inception-2015-12-05), pool3 2048-d",
            "weights_sha256": sha,
            "resize": "bilinear to 299x299, align_corners=False, no antialias (as pytorch-fid)",
            "inception_score": {"splits": run.iscore.splits, "split_of_sample_j": "j % splits",
                                "logits": "pool3 @ fc.weight.T, no bias (ADM evaluator, torch-fidelity "
                                          "logits_unbiased), softmax over 1008", "std": "over splits, ddof 0"},
            "speed": {"images_per_s": "samples / seconds of sampling + decoding (Inception excluded; under "
                                      "torchrun the slowest rank's seconds)", "nfe_source": nfe_source},
            "world_size": world,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} "
                                                                                 f"threads)",
            "torch": torch.__version__, "tok_version": __version__,
        },
        "notes": notes,
    }
