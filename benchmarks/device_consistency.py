"""Are tokens the same on CPU and CUDA? Encode / decode one set of images with one model on both devices and
under both precisions, and report the share of equal token indices and the largest reconstruction difference.

    python benchmarks/device_consistency.py samples/ -m wetok-tiny --json out.json

Needs a CUDA device. The CPU fp32 run is the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokcli  # noqa: E402
from tokcli.core.device import set_precision  # noqa: E402
from tokcli.core.images import collect_inputs, iter_batches, to_tensor, to_uint8  # noqa: E402


def run(model_name: str, imgs: np.ndarray, device: str, precision: str, batch: int):
    set_precision(precision)
    tok = tokcli.load(model_name, device=device)
    toks, recs = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(imgs), batch):
            x = to_tensor(imgs[s:s + batch]).to(device)
            t = tok.encode(x)
            toks.append(t.cpu().numpy())
            recs.append(tok.decode(t, clamp=False).float().cpu().numpy())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return np.concatenate(toks), np.concatenate(recs), time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("-m", "--model", default="wetok-tiny")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("-b", "--batch-size", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("no CUDA device")
    tok = tokcli.load(a.model, device="cpu")
    size = a.image_size or tok.preprocess["image_size"]
    items = collect_inputs(a.inputs)
    imgs = np.concatenate([b for _, b in iter_batches(items, size, 64)])
    ref_t, ref_r, _ = run(a.model, imgs, "cpu", "fp32", a.batch_size)
    rows = []
    for dev, prec in [("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "tf32")]:
        t, r, sec = run(a.model, imgs, dev, prec, a.batch_size)
        rows.append({"device": dev, "precision": prec, "images": len(imgs), "seconds": sec,
                     "equal_indices": float((t == ref_t).mean()),
                     "recon_maxdiff": float(np.abs(r - ref_r).max()),
                     "recon_meandiff": float(np.abs(r - ref_r).mean()),
                     "equal_uint8_pixels": float((to_uint8(torch.from_numpy(r)) ==
                                                  to_uint8(torch.from_numpy(ref_r))).mean())})
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "model": a.model, "image_size": size}
    print(f"# {env}")
    print(f"{'device':<6} {'prec':<5} {'equal idx':>10} {'max|d recon|':>13} {'mean|d|':>9} {'equal px':>9}")
    for r in rows:
        print(f"{r['device']:<6} {r['precision']:<5} {r['equal_indices']:>10.6f} {r['recon_maxdiff']:>13.3e} "
              f"{r['recon_meandiff']:>9.2e} {r['equal_uint8_pixels']:>9.6f}")
    if a.json:
        a.json.write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
