"""The library side of `tok bench`: one evaluation protocol, every choice recorded in the result.

Protocol (DESIGN.md, docs/evaluation.md): ADM centre crop to the model resolution; originals and reconstructions
both rounded to uint8; PSNR per image with range 255, then the mean; SSIM (Wang et al.: Gaussian 11x11, sigma 1.5)
on uint8; LPIPS with the lpips package (AlexNet, v0.1) on [-1, 1]; rFID between the Inception statistics of the
originals (or a reference statistics file) and of the reconstructions, FID Inception weights
(pt_inception-2015-12-05), 2048-d pool features, float64 statistics; codebook usage and perplexity per group; bits
per pixel of the tokens and of what the token file stores. Legacy PSNR / SSIM modes of the official repositories are
available by name (metrics/legacy.py).

Each measurement is a small metric object (tokcli/metrics/base.py: ``update`` per batch, ``merge`` across torchrun
ranks, ``result`` / ``protocol``): PSNR and SSIM in metrics/pixel.py, LPIPS in metrics/perceptual.py, rFID in
metrics/rfid.py, usage and bpp in metrics/usage.py. This package drives them:

- quality.py: :func:`evaluate` (``tok bench psnr|ssim|lpips|rfid|usage|all``);
- refstats.py: :func:`folder_stats` (``tok bench stats``, reference statistics for ``--ref-stats``);
- speed.py: :func:`throughput` (``tok bench throughput``).

Everything streams batch by batch: memory does not grow with the number of images (50k ImageNet-val is fine).
"""

from __future__ import annotations

from tokcli.bench.quality import METRICS, NEEDS_WEIGHTS, evaluate
from tokcli.bench.refstats import folder_stats
from tokcli.bench.speed import throughput

__all__ = ["METRICS", "NEEDS_WEIGHTS", "evaluate", "folder_stats", "throughput"]
