"""rFID as a `tok bench` metric object: the Fréchet distance between the FID Inception statistics of the originals
(or of a reference statistics file) and of the reconstructions (metrics/fid.py, metrics/fid_stats.py).

Both sides are uint8 images (the reconstructions rounded, as for PSNR); the statistics are float64 sums, so the
shards of a torchrun job merge exactly (``sync`` all-reduces the sums; ``merge`` adds gathered ones).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tokcli.errors import TokError
from tokcli.metrics.base import Batch, Metric
from tokcli.metrics.fid_stats import FEATURE_DIM, FeatureStats, frechet_distance

SMALL_N = 2048  # below this many images the sample dominates (as many as the feature dimensions)


def _sums(stats: FeatureStats | None):
    return None if stats is None else (stats.n, stats.sum.cpu().numpy(), stats.outer.cpu().numpy())


def _add(stats: FeatureStats, parts: list) -> None:
    """Set ``stats`` to the sum of the (n, sum, outer) ``parts``, in order."""
    import torch

    stats.n = 0
    stats.sum.zero_()
    stats.outer.zero_()
    for n, s, o in parts:
        stats.n += int(n)
        stats.sum += torch.as_tensor(s, dtype=torch.float64, device=stats.device)
        stats.outer += torch.as_tensor(o, dtype=torch.float64, device=stats.device)


class RFID(Metric):
    """Streaming Inception statistics of the reconstructions (``fake``) and, without a reference file, of the
    originals (``real``). ``primary``: whether this process computes the distance (rank 0; a 2048x2048 sqrtm takes
    seconds and every rank would get the same number)."""

    name = "rfid"

    def __init__(self, net, weights_sha: str, *, ref: FeatureStats | None = None, ref_path: str | None = None,
                 batch_size: int = 50, device="cpu", primary: bool = True) -> None:
        self.net, self.weights_sha, self.ref, self.ref_path = net, weights_sha, ref, ref_path
        self.batch_size, self.device, self.primary = batch_size, device, primary
        self.fake = FeatureStats()
        self.real = FeatureStats() if ref is None else None

    @classmethod
    def load(cls, weights: str | None = None, *, ref_stats: str | None = None, download: bool = False,
             **kw) -> "RFID":
        """The FID Inception (``weights`` or the cached file, fetched only when ``download``; MissingWeightsError
        when absent) and the reference statistics file, if any. ``kw``: batch_size, device, primary."""
        from tokcli.metrics.fid import load_fid_inception

        net, sha = load_fid_inception(weights, device=kw.get("device", "cpu"), download=download)
        ref = FeatureStats.from_npz(ref_stats) if ref_stats is not None else None
        return cls(net, sha, ref=ref, ref_path=ref_stats, **kw)

    def check_reference(self, size: int) -> None:
        """A reference statistics file must match the features being compared (2048-d) and, when it records them
        (files from `tok bench stats`), the image size and the Inception weights."""
        ref, path = self.ref, self.ref_path
        if ref is None:
            return
        if ref.dim != FEATURE_DIM:
            raise TokError(f"{path}: statistics of {ref.dim}-d features; rFID uses the {FEATURE_DIM}-d Inception "
                           f"pool features")
        meta = getattr(ref, "meta", {}) or {}
        if meta.get("image_size") not in (None, size):
            raise TokError(f"{path} was computed at {meta['image_size']} px but this run evaluates at {size} px; "
                           f"make statistics at the same size (tok bench stats DATA --size {size})")
        if meta.get("weights_sha256") not in (None, self.weights_sha):
            raise TokError(f"{path} was computed with other Inception weights (sha256 "
                           f"{meta['weights_sha256'][:12]}..., these are {self.weights_sha[:12]}...)")

    def _features(self, images) -> np.ndarray:
        from tokcli.metrics.fid import features_from_uint8

        return features_from_uint8(self.net, images, batch_size=self.batch_size, device=self.device)

    def update(self, batch: Batch) -> None:
        self.fake.update(self._features(batch.recon_u8))
        if self.real is not None:
            self.real.update(self._features(batch.orig))

    def state(self):
        return _sums(self.fake), _sums(self.real)

    def merge(self, parts: list) -> None:
        _add(self.fake, [p[0] for p in parts])
        if self.real is not None:
            _add(self.real, [p[1] for p in parts])

    def sync(self) -> None:
        """All-reduce the float64 sums (the collective form of ``merge``: 32 MB per side is no object to gather)."""
        self.fake.all_reduce()
        if self.real is not None:
            self.real.all_reduce()

    def result(self) -> dict:
        ref = self.ref if self.real is None else self.real
        if self.fake.n < 2 or ref.n is not None and ref.n < 2:
            raise TokError(f"rFID needs at least 2 images (got {self.fake.n}); use a few thousand for a meaningful "
                           f"value (the usual protocol is ImageNet-val, 50,000 images)")
        if not self.primary:
            return {}
        return {"rfid": float(frechet_distance(ref.mean(), ref.cov(), self.fake.mean(), self.fake.cov()))}

    def notes(self) -> list[str]:
        if self.fake.n >= SMALL_N:
            return []
        return [f"rFID on {self.fake.n} images is dominated by the small sample (2048 features); compare only "
                f"values computed on the same N"]

    def protocol(self) -> dict:
        from tokcli.core.checkpoint import sha256_file

        return {"rfid": {
            "reference": ("the same images before tokenization (originals after the crop)" if self.ref_path is None
                          else f"statistics file {Path(self.ref_path).name} (sha256 {sha256_file(self.ref_path)})"),
            "feature_extractor": "FID Inception-v3 (TF port, pt_inception-2015-12-05), pool3 2048-d",
            "weights_sha256": self.weights_sha,
            "resize": "bilinear to 299x299, align_corners=False, no antialias (as pytorch-fid)",
            "input": "uint8 images (rounded), as for PSNR",
            "statistics": "float64 mean and covariance (ddof 1); Frechet distance with scipy sqrtm",
        }}
