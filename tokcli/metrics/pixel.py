"""PSNR and SSIM as `tok bench` metric objects: per image, in the protocol's mode or a legacy one.

The protocol (``mode="tok"``, metrics/image.py) scores the uint8-rounded reconstructions. The legacy modes
(metrics/legacy.py) reproduce the official scripts, which act on the float decoder output (truncation, +128); when
any legacy mode is chosen for either metric, both are computed on that float output by the legacy functions
(``float_input=True``), as `tok bench` always has.
"""

from __future__ import annotations

import numpy as np

from tokcli.errors import TokUsageError
from tokcli.metrics import image, legacy
from tokcli.metrics.base import Batch, PerImageMetric

FLOWMO_BATCH = 5  # the official FlowMo / Open-MAGVIT2 evaluation batch (its PSNR is per batch)
PSNR_PROTOCOL = "per image, data range 255, mean over images (identical images capped at 100 dB)"
SSIM_PROTOCOL = "Wang et al. 2004: Gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, L 255, per channel, mean"


def check_mode(metric: str, mode: str) -> None:
    if mode not in legacy.MODES:
        raise TokUsageError(f"unknown --{metric}-mode {mode!r}; choose from {', '.join(legacy.MODES)}")


def _legacy_protocol(mode: str) -> str:
    return f"legacy mode {mode!r} (metrics/legacy.py)"


class PSNR(PerImageMetric):
    """PSNR per image, capped at ``image.PSNR_CAP`` (identical images count as 100 dB; JSON has no inf); the mean
    over images, or for ``mode="flowmo"`` the official per-batch figure from the per-image values in input order."""

    name = "psnr"

    def __init__(self, mode: str = "tok", *, float_input: bool = False) -> None:
        super().__init__()
        check_mode("psnr", mode)
        self.mode, self.float_input = mode, float_input or mode != "tok"

    def update(self, batch: Batch) -> None:
        if self.float_input:  # flowmo: per-image values here, its per-batch figure in result()
            v = legacy.psnr(batch.orig, batch.recon_float, "wetok" if self.mode == "flowmo" else self.mode)
        else:
            v = image.psnr(batch.orig, batch.recon_u8)
        self.add(batch, np.minimum(v, image.PSNR_CAP).tolist())

    def result(self) -> dict:
        if self.mode == "flowmo":
            return {"psnr": legacy.flowmo_psnr_mean(self.values, FLOWMO_BATCH)}
        return {"psnr": image.mean_psnr(self.values)}

    def protocol(self) -> dict:
        if self.mode == "tok":
            return {"psnr": PSNR_PROTOCOL}
        if self.mode == "flowmo":
            return {"psnr": f"legacy mode 'flowmo' (metrics/legacy.py): one MSE per {FLOWMO_BATCH} consecutive "
                            f"images in input order, mean over those batches"}
        return {"psnr": _legacy_protocol(self.mode)}


class SSIM(PerImageMetric):
    """SSIM per image and its mean over images; ``size`` (the evaluation size) must hold the 11x11 window."""

    name = "ssim"

    def __init__(self, mode: str = "tok", *, float_input: bool = False, size: int | None = None) -> None:
        super().__init__()
        check_mode("ssim", mode)
        window = 2 * image.SSIM_RADIUS + 1
        if size is not None and size < window:
            raise TokUsageError(f"SSIM needs images of at least {window}x{window} pixels (its window); --size is "
                                f"{size}")
        self.mode, self.float_input = mode, float_input or mode != "tok"

    def update(self, batch: Batch) -> None:
        if self.float_input:
            v = legacy.ssim(batch.orig, batch.recon_float, self.mode)
        else:
            v = image.ssim(batch.orig, batch.recon_u8)
        self.add(batch, v.tolist())

    def result(self) -> dict:
        return {"ssim": self.mean()}

    def protocol(self) -> dict:
        return {"ssim": SSIM_PROTOCOL if self.mode == "tok" else _legacy_protocol(self.mode)}
