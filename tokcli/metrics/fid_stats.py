"""FID statistics: streaming float64 sums of feature vectors, the stats files, and the Fréchet distance.

The features are those of :mod:`tokcli.metrics.fid` (the FID Inception's 2048-d pool3 output).

- **Statistics.** :class:`FeatureStats` keeps n, the feature sum and the sum of outer products ``Σ x xᵀ`` in
  float64; mean ``μ = Σx / n`` and the unbiased covariance ``Σ = (Σ x xᵀ - n μ μᵀ) / (n - 1)`` (as ``np.cov(...,
  rowvar=False)``, which pytorch-fid uses). Statistics of disjoint sets merge exactly by adding the sums.
- **Stats files.** npz in the ADM / pytorch-fid layout: ``mu`` float64 [D], ``sigma`` float64 [D, D]. tok also
  writes ``n``, ``feature_sum`` and ``feature_outer`` so that its files can be merged exactly; files with only
  ``mu``/``sigma`` (ADM reference batches, ``pytorch_fid --save-stats``) are read too. Files are read with
  ``allow_pickle=False`` only and written atomically.
- **FID.** ``d² = ||μ₁ - μ₂||² + Tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^½)`` with ``scipy.linalg.sqrtm``. As in pytorch-fid:
  when the square root is not finite (a singular product) ``eps`` is added to both diagonals and it is
  retried; an imaginary part is dropped when the diagonal's is below 1e-3 in absolute value, otherwise it is an
  error.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from tokcli.core.atomic import atomic_path
from tokcli.errors import TokError

FEATURE_DIM = 2048  # the FID Inception's pool3 features
STATS_EXTRA_KEYS = ("n", "feature_sum", "feature_outer")

# ----------------------------------------------------------------------------------------------------- statistics


class FeatureStats:
    """Streaming float64 statistics of feature vectors: ``n``, ``sum`` [D] and ``outer`` = Σ x xᵀ [D, D].

    The sums live on ``device`` as float64 torch tensors (accumulate on the GPU when the features are there).
    A stats object read from a file with only ``mu``/``sigma`` has no sums (``n`` is None): it can be compared
    but not updated or merged.
    """

    def __init__(self, dim: int = FEATURE_DIM, device="cpu") -> None:
        self.dim = int(dim)
        self.device = torch.device(device)
        self.n: int | None = 0
        self.sum: torch.Tensor | None = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.outer: torch.Tensor | None = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        self._fixed: tuple[np.ndarray, np.ndarray] | None = None  # (mu, sigma) of a file without sums
        self.source: str | None = None

    @property
    def has_sums(self) -> bool:
        return self._fixed is None

    def _need_sums(self, what: str) -> None:
        if not self.has_sums:
            raise TokError(f"cannot {what} FID statistics read from {self.source or 'a file'}: it has only mu/sigma, "
                           f"not the sums (n, feature_sum, feature_outer) that tok writes")

    def update(self, features) -> "FeatureStats":
        """Add a batch of features [B, D] (numpy or torch, any float dtype); summed in float64."""
        self._need_sums("update")
        x = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [B, {self.dim}], got shape {tuple(x.shape)}")
        x = x.detach().to(device=self.device, dtype=torch.float64)
        self.n += int(x.shape[0])
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add the statistics of another (disjoint) set of features in place; exact up to float64 rounding."""
        self._need_sums("merge")
        other._need_sums("merge")
        if other.dim != self.dim:
            raise TokError(f"cannot merge FID statistics of {other.dim}-d features into {self.dim}-d ones")
        self.n += other.n
        self.sum += other.sum.to(self.device)
        self.outer += other.outer.to(self.device)
        return self

    def all_reduce(self) -> "FeatureStats":
        """Sum n, sum and outer over all processes of an initialised ``torch.distributed`` group (else no-op)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        self._need_sums("all-reduce")
        comm = self.device
        if dist.get_backend() == "nccl" and comm.type != "cuda":
            comm = torch.device("cuda", torch.cuda.current_device())
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=comm)
        s, o = self.sum.to(comm), self.outer.to(comm)
        for t in (n, s, o):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.n = int(round(n.item()))
        self.sum, self.outer = s.to(self.device), o.to(self.device)
        return self

    def mean(self) -> np.ndarray:
        """μ = Σx / n, float64 [D]."""
        if self._fixed is not None:
            return self._fixed[0].copy()
        if self.n < 1:
            raise TokError("FID statistics of zero images have no mean")
        return (self.sum / self.n).cpu().numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance (Σ x xᵀ - n μ μᵀ) / (n - 1), float64 [D, D] (``np.cov(rowvar=False)``)."""
        if self._fixed is not None:
            return self._fixed[1].copy()
        if self.n < 2:
            raise TokError(f"FID statistics need at least 2 images for a covariance, got {self.n}")
        mu = self.sum / self.n
        c = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        c = 0.5 * (c + c.T)  # exactly symmetric, as np.cov's product is
        return c.cpu().numpy()

    def to_npz(self, path: str | os.PathLike, meta: dict | None = None) -> Path:
        """Write ``mu``, ``sigma`` (ADM / pytorch-fid layout) plus ``n``, ``feature_sum``, ``feature_outer``
        (when known), atomically. ``meta`` (JSON-able: image size, crop, weights sha256) is stored as the 0-d
        string ``meta`` so a later run can check it was made under the same protocol."""
        path = Path(path)
        arrays = {"mu": self.mean(), "sigma": self.cov()}
        if meta:
            import json

            arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
        if self.has_sums:
            arrays.update(n=np.asarray(self.n, dtype=np.int64), feature_sum=self.sum.cpu().numpy(),
                          feature_outer=self.outer.cpu().numpy())
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def from_npz(cls, path: str | os.PathLike, device="cpu") -> "FeatureStats":
        """Read a stats npz: tok's (with sums, mergeable) or ADM's / pytorch-fid's (``mu``, ``sigma`` only)."""
        path = Path(path)
        arrays = _read_npz(path)
        mu, sigma = arrays["mu"], arrays["sigma"]
        stats = cls(dim=mu.shape[0], device=device)
        stats.source = str(path)
        stats.meta = {}
        if "meta" in arrays and arrays["meta"].dtype.kind == "U" and arrays["meta"].ndim == 0:
            import json

            try:
                stats.meta = json.loads(str(arrays["meta"][()]))
            except ValueError:
                raise TokError(f"{path}: the 'meta' entry is not JSON") from None
        present = [k for k in STATS_EXTRA_KEYS if k in arrays]
        if not present:
            stats.n, stats.sum, stats.outer = None, None, None
            stats._fixed = (mu, sigma)
            return stats
        if len(present) != len(STATS_EXTRA_KEYS):
            raise TokError(f"FID statistics file {path} has {', '.join(present)} but not all of "
                           f"{', '.join(STATS_EXTRA_KEYS)}")
        n, s, o = arrays["n"], arrays["feature_sum"], arrays["feature_outer"]
        d = mu.shape[0]
        if n.shape != () or n.dtype.kind not in "iu" or int(n) < 2:
            raise TokError(f"FID statistics file {path}: 'n' must be an integer >= 2, got {n!r}")
        if s.shape != (d,) or o.shape != (d, d):
            raise TokError(f"FID statistics file {path}: feature_sum {s.shape} / feature_outer {o.shape} do not "
                           f"match mu {mu.shape}")
        stats.n = int(n)
        stats.sum = torch.from_numpy(s).to(stats.device)
        stats.outer = torch.from_numpy(o).to(stats.device)
        if not (np.allclose(stats.mean(), mu, rtol=1e-9, atol=1e-12)
                and np.allclose(stats.cov(), sigma, rtol=1e-7, atol=1e-10)):
            raise TokError(f"FID statistics file {path}: mu/sigma disagree with its sums (n, feature_sum, "
                           f"feature_outer); the file was altered")
        return stats


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Validated float64 arrays of a stats npz (``allow_pickle=False``; one-line TokError on anything odd)."""
    if not path.is_file():
        raise TokError(f"FID statistics file {path} does not exist")
    not_npz = TokError(f"{path} is not an npz archive (FID statistics need keys mu and sigma)")
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as e:  # a pickle file under allow_pickle=False
        raise TokError(f"FID statistics file {path} holds pickled objects, which tok does not load "
                       f"({str(e).splitlines()[0]}); expected plain numeric arrays mu and sigma") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise TokError(f"cannot read FID statistics file {path} ({type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
        raise not_npz
    try:
        names = set(z.files)
        meta = None
        missing = [k for k in ("mu", "sigma") if k not in names]
        if missing:
            raise TokError(f"FID statistics file {path} has no {' or '.join(missing)} (keys: "
                           f"{', '.join(sorted(names)) or 'none'}); expected mu [D] and sigma [D, D]")
        arrays = {k: z[k] for k in ("mu", "sigma", *STATS_EXTRA_KEYS) if k in names}
        meta = z["meta"] if "meta" in names else None
    except ValueError as e:  # object arrays under allow_pickle=False
        raise TokError(f"FID statistics file {path} holds pickled objects, which tok does not load "
                       f"({str(e).splitlines()[0]}); expected plain numeric arrays mu and sigma") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise TokError(f"cannot read FID statistics file {path} ({type(e).__name__}: {e})") from None
    finally:
        z.close()
    for k, a in arrays.items():
        if a.dtype.kind not in "fiu":
            raise TokError(f"FID statistics file {path}: '{k}' has dtype {a.dtype}, expected real numbers")
        if not np.isfinite(a).all():
            raise TokError(f"FID statistics file {path}: '{k}' has non-finite values")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise TokError(f"FID statistics file {path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected "
                       f"[D] and [D, D]")
    arrays["mu"], arrays["sigma"] = mu, sigma
    for k in ("feature_sum", "feature_outer"):
        if k in arrays:
            arrays[k] = arrays[k].astype(np.float64)
    if meta is not None:  # tok's protocol record (a 0-d JSON string); checked by the caller
        arrays["meta"] = meta
    return arrays


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as float64 from any supported stats npz."""
    s = FeatureStats.from_npz(path)
    return s.mean(), s.cov()


# ----------------------------------------------------------------------------------------------------- distance


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``||μ₁ - μ₂||² + Tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^½)`` in float64 (the FID when given pool3 statistics)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != mu1.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise TokError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                       f"{sigma2.shape} (were they computed with the same feature extractor?)")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # "matrix is singular" whenever N <= 2048; the eps fallback below handles it
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: the covariance product is singular; adding {eps} to both diagonals", RuntimeWarning,
                      stacklevel=2)
        offset = np.eye(d) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise TokError(f"FID: the matrix square root has a large imaginary part "
                           f"({np.max(np.abs(covmean.imag)):.3g}); the statistics are degenerate")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))