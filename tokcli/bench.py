"""The library side of `tok bench`: one evaluation protocol, every choice recorded in the result.

Protocol (DESIGN.md): ADM centre crop to the model resolution; originals and reconstructions both rounded to uint8;
PSNR per image with range 255, then the mean; SSIM (Wang et al.: Gaussian 11x11, sigma 1.5) on uint8; LPIPS with the
lpips package (AlexNet, v0.1) on [-1, 1]; codebook usage and perplexity per group; bits per pixel of the token
payload and of the token file. rFID arrives with the evaluation issue.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tokcli import __version__


def recon_bench(items, *, model: str | None, metrics: list[str], lpips_net: str = "alex", device: str = "auto",
                batch_size: int = 8, workers: int = 0, image_size: int | None = None, seed: int = 0,
                skip_errors: bool = False, quiet: bool = False, save_images: str | None = None):
    import tokcli
    from tokcli import pipeline
    from tokcli.core.device import exact_math

    exact_math()
    lp = None
    if "lpips" in metrics:  # load first: a missing backbone fails before any work is done
        from tokcli.losses.perceptual import load_lpips

        lp = load_lpips(lpips_net, backbone="pretrained", device="cpu")
    tok = tokcli.load(model, device=device)
    size = pipeline.image_size_for(tok, image_size)
    res = pipeline.reconstruct(tok, items, save_images, image_size=size, batch_size=batch_size, workers=workers,
                               seed=seed, skip_errors=skip_errors, quiet=quiet, keep=True)
    orig = np.concatenate([p[0] for p in res.pairs])
    recon = np.concatenate([p[1] for p in res.pairs])
    tokens = np.concatenate([p[2] for p in res.pairs])
    out: dict[str, Any] = {}
    per_image: dict[str, list] = {"key": list(res.keys)}
    if "psnr" in metrics:
        from tokcli.metrics.image import psnr

        v = psnr(orig, recon)
        per_image["psnr"] = [float(x) for x in v]
        out["psnr"] = float(np.mean(np.minimum(v, 100.0)))
    if "ssim" in metrics:
        from tokcli.metrics.image import ssim

        v = ssim(orig, recon)
        per_image["ssim"] = [float(x) for x in v]
        out["ssim"] = float(np.mean(v))
    if lp is not None:
        from tokcli.core.images import to_tensor
        from tokcli.losses.perceptual import lpips_distance

        vals = []
        for s in range(0, len(orig), batch_size):
            vals.append(lpips_distance(lp, to_tensor(orig[s:s + batch_size]), to_tensor(recon[s:s + batch_size])))
        v = np.concatenate([np.asarray(x.detach().cpu()).reshape(-1) for x in vals])
        per_image["lpips"] = [float(x) for x in v]
        out["lpips"] = float(np.mean(v))
    spec = tok.spec
    if "usage" in metrics and spec.kind == "indices":
        from tokcli.metrics.usage import codebook_usage

        out["usage"] = codebook_usage(tokens, spec.codebook_size, group_axis=-1 if tokens.ndim == 4 else None)
    if "bpp" in metrics:
        n_tok = int(np.prod(tokens.shape[1:]))
        bits = n_tok * (math.log2(spec.codebook_size) if spec.kind == "indices" else
                        (1 if spec.kind == "bits" else 16))
        stored = None
        if spec.kind == "indices":  # as the token file stores them (smallest unsigned dtype for the codebook)
            from tokcli.core.tokens import index_dtype

            stored = n_tok * np.dtype(index_dtype(spec.codebook_size - 1)).itemsize
        out["bpp"] = {"tokens": bits / (size * size), "tokens_per_image": n_tok, "stored_bytes_per_image": stored,
                      "stored_bpp": stored * 8 / (size * size) if stored else None}
    result = {
        "model": {"name": tok.name, "family": tok.family, "sha256": tok.sha256, "source": tok.source},
        "protocol": {
            "reference": "the input images after the crop (reconstruction vs original)",
            "n_images": int(len(orig)),
            "n_failed": len(res.errors),
            "image_size": size,
            "crop": "adm_center (BOX halving, BICUBIC to the short side, centre crop)",
            "uint8": "round(clamp((x + 1) * 127.5)) for both images",
            "psnr": "per image, data range 255, mean over images (identical images capped at 100 dB)",
            "ssim": "Wang et al. 2004: Gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, L 255, per channel, mean",
            "lpips": f"lpips {lpips_net} v0.1 on [-1, 1], pretrained backbone" if lp is not None else None,
            "seed": seed,
            "tok_version": __version__,
        },
        "metrics": out,
        "per_image": per_image,
    }
    return result, res.errors
