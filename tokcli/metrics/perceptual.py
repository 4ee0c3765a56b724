"""LPIPS as a `tok bench` metric object: the lpips package (v0.1 heads, AlexNet by default) on [-1, 1] images made
from the uint8 originals and uint8-rounded reconstructions, per image, then the mean."""

from __future__ import annotations

from pathlib import Path

from tokcli.metrics.base import Batch, PerImageMetric


class LPIPS(PerImageMetric):
    """Per-image LPIPS of an already loaded ``lpips.LPIPS`` module; ``info`` is its protocol record."""

    name = "lpips"

    def __init__(self, model, info: dict, device) -> None:
        super().__init__()
        self.model, self.info, self.device = model, info, device

    @classmethod
    def load(cls, net: str = "alex", *, weights: str | None = None, device="cpu",
             download: bool = False) -> "LPIPS":
        """The pretrained LPIPS-``net`` (backbone from ``weights`` or the torch hub cache, fetched only when
        ``download``); MissingWeightsError naming the file when it is absent."""
        from tokcli.core.checkpoint import sha256_file
        from tokcli.losses.perceptual import load_lpips

        model = load_lpips(net, backbone="pretrained", device=device, weights=weights, download=download)
        src = Path(model.backbone_file)
        info = {"net": net, "version": "0.1", "backbone_file": src.name, "backbone_sha256": sha256_file(src)}
        return cls(model, info, device)

    def update(self, batch: Batch) -> None:
        import torch

        from tokcli.core.images import to_tensor
        from tokcli.losses.perceptual import lpips_distance

        with torch.inference_mode():
            v = lpips_distance(self.model, to_tensor(batch.orig).to(self.device),
                               to_tensor(batch.recon_u8).to(self.device))
        self.add(batch, v.float().cpu().numpy().reshape(-1).tolist())

    def result(self) -> dict:
        return {"lpips": self.mean()}

    def protocol(self) -> dict:
        return {"lpips": self.info}
