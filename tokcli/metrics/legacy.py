"""PSNR / SSIM as the official repositories compute them, by name, for exact parity with a paper's table.

tok's own protocol (``metrics/image.py``) rounds both images to uint8, takes PSNR per image with range 255 and SSIM
with an 11x11 Gaussian window. The papers' numbers come from code that does otherwise (research notes, ecosystem
§2.4); these modes reproduce that code's arithmetic on the same images so the two can be told apart:

=============  =============================================================================================
mode           what the official evaluation does
=============  =============================================================================================
``tok``        the protocol: round to uint8, PSNR per image (range 255), SSIM Gaussian 11x11 sigma 1.5
``wetok``      WeTok ``evaluation_image_ddp.py``: recon to uint8 by *truncation* of (x+1)/2*255; PSNR per image;
               SSIM skimage defaults (7x7 uniform window, sample covariance), range 255
``flowmo``     FlowMo / Open-MAGVIT2 ``evaluate.py``: recon truncated; PSNR of the *whole batch* (one MSE
               over ``batch`` images, the bug in the official loop), averaged over batches; SSIM skimage defaults
``llamagen``   LlamaGen ``reconstruction_vq_ddp.py`` (and SoftVQ): reconstruction to uint8 as
               clamp(127.5x + 128) (note +128), original as float in [0, 1]; PSNR per image on [0, 1];
               SSIM skimage defaults with ``data_range=2.0`` on [0, 1] images (inflates SSIM)
=============  =============================================================================================

All functions take the originals as loaded (uint8 [N, H, W, 3]) and the reconstructions as the decoder's float
output in [-1, 1] (numpy [N, H, W, 3]), because truncation and the +128 offset act before any uint8 exists. What
they reproduce is the official conversion and scoring of the *reconstructions*; the originals are scored as
loaded. (The official scripts also round-trip the originals through float32 [-1, 1] and truncate them back, which
moves some grey levels down by one depending on the exact float path; that is not reproduced.)
Each returns per-image values; ``flowmo`` PSNR returns one value per batch (its mean is the paper's figure), and
:func:`flowmo_psnr_mean` computes it from per-image values in input order.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MODES = ("tok", "wetok", "flowmo", "llamagen")
SKIMAGE_WIN = 7


def _check(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b, dtype=np.float64)
    if a.dtype != np.uint8:
        raise TypeError(f"originals must be uint8 images as loaded, got {a.dtype}")
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two [N, H, W, C] arrays of one shape, got {a.shape} and {b.shape}")
    return a, b


def flowmo_psnr_mean(per_image_psnr, batch: int = 5) -> float:
    """The FlowMo / Open-MAGVIT2 figure from per-image PSNRs (truncated uint8, range 255) of equal-size images in
    input order: one MSE per consecutive ``batch`` images, PSNR of each, then the mean over batches."""
    p = np.asarray(per_image_psnr, dtype=np.float64)
    mse = 255.0 ** 2 / 10 ** (p / 10)
    with np.errstate(divide="ignore"):
        vals = [10 * np.log10(255.0 ** 2 / mse[s:s + batch].mean()) for s in range(0, len(p), batch)]
    return float(np.mean(vals))


def _truncate(x: np.ndarray) -> np.ndarray:
    """(x + 1) / 2 * 255 cast to uint8 (C truncation), as ``.to(torch.uint8)`` / ``.astype(np.uint8)`` do."""
    return np.clip((np.clip(x, -1, 1) + 1) / 2 * 255, 0, 255).astype(np.uint8)


def _round(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


def _psnr_per_image(a: np.ndarray, b: np.ndarray, data_range: float) -> np.ndarray:
    d = (a.astype(np.float64) - b.astype(np.float64)).reshape(len(a), -1)
    m = (d * d).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range ** 2 / m)


def ssim_skimage_default(a: np.ndarray, b: np.ndarray, data_range: float) -> np.ndarray:
    """skimage ``structural_similarity(a, b, data_range=..., channel_axis=-1)`` with its defaults: 7x7 uniform
    window, sample covariance (N/(N-1)), K1 0.01, K2 0.03, border of 3 pixels cropped, mean over channels."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    npix = SKIMAGE_WIN ** 2
    cov_norm = npix / (npix - 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    pad = (SKIMAGE_WIN - 1) // 2
    out = np.empty(len(a))
    for i in range(len(a)):
        vals = []
        for c in range(a.shape[-1]):
            x, y = a[i, ..., c], b[i, ..., c]
            f = [ndimage.uniform_filter(v, size=SKIMAGE_WIN) for v in (x, y, x * x, y * y, x * y)]
            ux, uy, uxx, uyy, uxy = f
            vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
            s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
            vals.append(s[pad:-pad, pad:-pad].mean())
        out[i] = np.mean(vals)
    return out


def psnr(orig, recon, mode: str = "tok", *, batch: int = 5) -> np.ndarray:
    """PSNR under ``mode`` (see the module table); ``batch`` is the official batch size for ``flowmo``."""
    a, b = _check(orig, recon)
    if mode == "tok":
        return _psnr_per_image(a, _round(b), 255.0)
    if mode == "wetok":
        return _psnr_per_image(a, _truncate(b), 255.0)
    if mode == "flowmo":
        tb = _truncate(b)
        return np.array([_psnr_per_image(a[s:s + batch].reshape(1, -1), tb[s:s + batch].reshape(1, -1), 255.0)[0]
                         for s in range(0, len(a), batch)])
    if mode == "llamagen":
        rec = np.clip(127.5 * b + 128, 0, 255).astype(np.uint8) / 255.0
        return _psnr_per_image(a / 255.0, rec, 1.0)
    raise ValueError(f"unknown PSNR mode {mode!r} (choose from {', '.join(MODES)})")


def ssim(orig, recon, mode: str = "tok") -> np.ndarray:
    """SSIM per image under ``mode`` (see the module table)."""
    a, b = _check(orig, recon)
    if mode == "tok":
        from tokcli.metrics.image import ssim as ssim_tok

        return ssim_tok(a, _round(b))
    if mode in ("wetok", "flowmo"):
        return ssim_skimage_default(a, _truncate(b), 255.0)
    if mode == "llamagen":
        rec = np.clip(127.5 * b + 128, 0, 255).astype(np.uint8) / 255.0
        return ssim_skimage_default(a / 255.0, rec, 2.0)
    raise ValueError(f"unknown SSIM mode {mode!r} (choose from {', '.join(MODES)})")
