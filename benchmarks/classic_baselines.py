"""Classic baselines for a tokenizer's rate-distortion point: what JPEG and plain bicubic resampling achieve on the
same images, under the same protocol as `tok bench` (ADM centre crop, uint8, PSNR per image then the mean,
SSIM on uint8).

    python benchmarks/classic_baselines.py data/heldout --size 256 --bpp 0.25 --json out.json

- `jpeg@bpp`: per image, the highest JPEG quality (Pillow, 4:2:0) whose file fits in `bpp` bits per pixel
  (headers included, so this is harsh on JPEG at low rates).
- `bicubic/F`: downsample by F with BICUBIC, store uint8, upsample back with BICUBIC; its rate is 24 / F^2 bpp.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokcli.core.images import collect_inputs, load_cropped  # noqa: E402
from tokcli.metrics.image import psnr, ssim  # noqa: E402


def jpeg_at(img: np.ndarray, max_bytes: int) -> tuple[np.ndarray, int, int]:
    """Highest quality 1..95 whose encoding fits max_bytes (quality 1 when none does)."""
    best = None
    lo, hi = 1, 95
    while lo <= hi:
        q = (lo + hi) // 2
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=q)
        if buf.tell() <= max_bytes:
            best, lo = (q, buf.getvalue()), q + 1
        else:
            hi = q - 1
    if best is None:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=1)
        best = (1, buf.getvalue())
    q, data = best
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), len(data), q


def bicubic(img: np.ndarray, factor: int) -> np.ndarray:
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((w // factor, h // factor), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--bpp", type=float, default=0.25, help="rate for the JPEG baseline")
    ap.add_argument("--factors", default="4,8", help="bicubic down/up factors")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    items = collect_inputs(a.inputs)
    orig = np.stack([load_cropped(it, a.size) for it in items])
    npix = a.size * a.size
    rows = []

    outs, sizes, quals = [], [], []
    for img in orig:
        rec, nbytes, q = jpeg_at(img, int(a.bpp * npix / 8))
        outs.append(rec), sizes.append(nbytes), quals.append(q)
    rec = np.stack(outs)
    rows.append({"method": f"jpeg@{a.bpp}", "bpp": float(np.mean(sizes) * 8 / npix),
                 "psnr": float(np.mean(psnr(orig, rec))), "ssim": float(np.mean(ssim(orig, rec))),
                 "jpeg_quality": quals})
    for f in [int(x) for x in a.factors.split(",") if x]:
        rec = np.stack([bicubic(img, f) for img in orig])
        rows.append({"method": f"bicubic/{f}", "bpp": 24.0 / f ** 2,
                     "psnr": float(np.mean(psnr(orig, rec))), "ssim": float(np.mean(ssim(orig, rec)))})

    for r in rows:
        print(f"{r['method']:<12} bpp {r['bpp']:.3f}  PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.3f}")
    if a.json:
        a.json.write_text(json.dumps({"images": [it.key for it in items], "size": a.size, "results": rows},
                                     indent=2) + "\n")


if __name__ == "__main__":
    main()
