"""Per-image PSNR and SSIM on uint8 images (the tok evaluation protocol, see DESIGN.md).

Both take uint8 arrays [N, H, W, C] (or one image [H, W, C]) and return a float64 array [N].

- PSNR: data range 255, MSE per image over all pixels and channels (computed exactly in integers), then
  10·log10(255² / MSE). Identical images give ``inf``; :func:`mean_psnr` counts every value above
  ``PSNR_CAP`` (100 dB, which only a handful of off-by-one values in a whole image can exceed) as 100 dB so
  that the mean stays finite.
- SSIM: Wang et al. 2004: Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, population
  (not sample) covariances, computed per channel on float64 over the 'valid' region (window fully inside
  the image), averaged over that region and then over channels. Equal to skimage's
  ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=255, channel_axis=-1)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PSNR_CAP = 100.0
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): an 11-tap window
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise TypeError(f"metrics expect uint8 images, got {a.dtype} and {b.dtype} (use images.to_uint8)")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"expected [N, H, W, C] or [H, W, C] images, got shape {a.shape}")
    return a, b


def mse(a, b) -> np.ndarray:
    """Mean squared error per image (exact: integer sums, one float64 division)."""
    a, b = _pair(a, b)
    d = a.astype(np.int32) - b.astype(np.int32)
    sq = (d * d).reshape(len(d), -1).sum(axis=1, dtype=np.int64)
    return sq / float(d[0].size if len(d) else 1)


def psnr(a, b) -> np.ndarray:
    """PSNR in dB per image, data range 255; identical images give inf."""
    m = mse(a, b)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(DATA_RANGE ** 2 / m)


def mean_psnr(values, cap: float = PSNR_CAP) -> float:
    """Mean of per-image PSNRs with each value capped at ``cap`` dB (so identical images count as 100 dB)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan")
    return float(np.minimum(v, cap).mean())


def _gaussian_window() -> np.ndarray:
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return w / w.sum()


_WINDOW = _gaussian_window()


def _blur_valid(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian over axes -3 and -2 ([..., H, W, C]), keeping only the 'valid' region."""
    for axis in (-3, -2):
        x = ndimage.correlate1d(x, _WINDOW, axis=axis, mode="reflect")
    r = SSIM_RADIUS
    return x[..., r:-r, r:-r, :]


def _ssim_map_stats(ux, uy, uxx, uyy, uxy):
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def ssim(a, b, *, device=None, chunk: int = 16) -> np.ndarray:
    """SSIM per image (mean over the valid region and the channels).

    ``device=None`` computes on the CPU with scipy (about 20 ms per 256x256 image); a torch device (e.g.
    "cuda") computes the same float64 maths with torch convolutions, ``chunk`` images at a time.
    """
    a, b = _pair(a, b)
    if min(a.shape[1:3]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1}x{2 * SSIM_RADIUS + 1} pixels, "
                         f"got {a.shape[2]}x{a.shape[1]}")
    if device is not None:
        return _ssim_torch(a, b, device, chunk)
    out = np.empty(len(a), dtype=np.float64)
    for i in range(len(a)):  # one image at a time keeps the float64 maps small
        x = a[i].astype(np.float64)
        y = b[i].astype(np.float64)
        s = _ssim_map_stats(*_blur_valid(np.stack([x, y, x * x, y * y, x * y])))
        out[i] = s.mean(axis=(0, 1)).mean()
    return out


def _ssim_torch(a: np.ndarray, b: np.ndarray, device, chunk: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    w = torch.tensor(_WINDOW, dtype=torch.float64, device=device)
    out = []
    for s in range(0, len(a), chunk):
        x = torch.from_numpy(a[s:s + chunk]).to(device).permute(0, 3, 1, 2).double()
        y = torch.from_numpy(b[s:s + chunk]).to(device).permute(0, 3, 1, 2).double()
        m = torch.cat([x, y, x * x, y * y, x * y], 1)  # [n, 5*C, H, W]
        c = m.shape[1]
        m = F.conv2d(m, w.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # 'valid' along H
        m = F.conv2d(m, w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # 'valid' along W
        smap = _ssim_map_stats(*m.chunk(5, dim=1))
        out.append(smap.mean(dim=(2, 3)).mean(dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
