"""What each opt-in faster path costs: share of tokens that change and the PSNR change on the demo photos, next to
its speed, against the default exact path of the same model.

    python benchmarks/fast_paths.py --models wetok-tiny,coda-tiny,kl-tiny --photos samples --json out.json

Paths (each compared with the default: fp32, the device's default layout, eager, batch 1):

- ``channels_last`` — the other memory layout (exact GroupNorm kept; only convolution rounding differs);
- ``compile`` — ``tokcli.load(..., compile=True)`` (``--compile``): torch.compile of encoder and decoder;
- ``bf16`` — ``--precision bf16``: bfloat16 autocast around the networks (quantizer maths stays float32);
- ``batch8`` — the same photos encoded / decoded 8 at a time (all of them when fewer) instead of one by one.

For each: tokens changed (discrete families: share of ids that differ; continuous: share of latent values that
differ by more than 1e-3 of the latents' std, and the max difference), PSNR of the reconstruction against the
photo and its change from the default, and encode / decode images/s measured interleaved with the default round
by round (the ratio is path / default). ``compile`` reports its first-call compile time separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conv_speed import interleaved  # noqa: E402

PATHS = ("channels_last", "compile", "bf16", "batch8")


def photos(folder: Path, size: int) -> torch.Tensor:
    from tokcli.core.images import collect_inputs, load_cropped, to_tensor

    items = collect_inputs([str(folder)])
    return to_tensor(np.stack([load_cropped(it, size) for it in items]))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], on the 8-bit grid the PNGs would hold."""
    q = lambda t: torch.round((t.float().clamp(-1, 1) + 1) * 127.5)
    mse = ((q(a) - q(b)) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0 ** 2 / mse)


def run(tok, x: torch.Tensor, batch: int, bf16: bool):
    """Tokens and reconstructions of ``x`` in batches of ``batch``."""
    from tokcli.core.device import autocast, set_precision

    set_precision("bf16" if bf16 else "fp32")
    dev = x.device
    toks, recs = [], []
    with torch.inference_mode(), autocast(dev):
        for i in range(0, len(x), batch):
            t = tok.encode(x[i:i + batch])
            toks.append(t)
            recs.append(tok.decode(t, seed=0).float())
    set_precision("fp32")
    return torch.cat(toks), torch.cat(recs)


def changed(a: torch.Tensor, b: torch.Tensor) -> dict:
    if not a.is_floating_point():
        return {"tokens_changed": (a != b).float().mean().item()}
    tol = 1e-3 * a.float().std().item()
    d = (a.float() - b.float()).abs()
    return {"tokens_changed": (d > tol).float().mean().item(), "latent_maxdiff": d.max().item()}


def timed(prec: str, fn):
    """``fn`` as one call under precision ``prec`` (inference mode, autocast when bf16), back to fp32 after."""
    from tokcli.core.device import autocast, set_precision

    def call():
        set_precision(prec)
        with torch.inference_mode(), autocast("cpu"):
            fn()
        set_precision("fp32")
    return call


def medians(fns: dict, rounds: int) -> dict:
    """Median seconds per call, after one warm-up call each, interleaved round by round (conv_speed's timer)."""
    times = interleaved(fns, torch.device("cpu"), rounds, warmup=1)
    return {n: statistics.median(v) for n, v in times.items()}


def bench_model(name: str, base, x: torch.Tensor, rounds: int, paths=PATHS) -> list[dict]:
    """The rows of model ``name`` (``base``: it as loaded by default) on photos ``x``."""
    import tokcli
    ref_tok, ref_rec = run(base, x, 1, False)
    ref_psnr = psnr(ref_rec, x)
    rows = [{"model": name, "path": "default", "layout": base.memory_format, "psnr_db": ref_psnr.mean().item(),
             "tokens_changed": 0.0}]
    one = x[:1]
    for path in paths:
        t_compile = None
        if path == "channels_last":
            tok = tokcli.load(name, device="cpu", memory_format="channels_last")
        elif path == "compile":
            tok = tokcli.load(name, device="cpu", compile=True)
            t0 = time.perf_counter()
            with torch.inference_mode():
                tok.decode(tok.encode(one), seed=0)
            t_compile = time.perf_counter() - t0
        else:
            tok = base
        batch = 8 if path == "batch8" else 1
        bf16 = path == "bf16"
        toks, rec = run(tok, x, batch, bf16)
        p = psnr(rec, x)
        row = {"model": name, "path": path, "layout": tok.memory_format, "psnr_db": p.mean().item(),
               "psnr_change_db": (p - ref_psnr).mean().item(), "psnr_change_max_db": (p - ref_psnr).abs().max().item(),
               "recon_maxdiff": (rec - ref_rec).abs().max().item(), **changed(ref_tok, toks)}
        if t_compile is not None:
            row["first_call_s"] = t_compile
        xb = x[:8] if path == "batch8" else one
        nb = len(xb)

        with torch.inference_mode():
            tb = base.encode(one)
            tp = tok.encode(xb)
        prec = "bf16" if bf16 else "fp32"
        te = medians({"default": timed("fp32", lambda: base.encode(one)),
                      "path": timed(prec, lambda: tok.encode(xb))}, rounds)
        td = medians({"default": timed("fp32", lambda: base.decode(tb, seed=0)),
                      "path": timed(prec, lambda: tok.decode(tp, seed=0))}, rounds)
        row["encode_speedup"] = (nb / te["path"]) / (1 / te["default"])
        row["decode_speedup"] = (nb / td["path"]) / (1 / td["default"])
        row["default_encode_img_s"], row["default_decode_img_s"] = 1 / te["default"], 1 / td["default"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def print_rows(rows):
    print("| model | path | tokens changed | PSNR dB (change; max per photo) | encode speed-up | decode speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["path"] == "default":
            print(f"| {r['model']} | default ({r['layout']}, fp32, eager, batch 1) | - | {r['psnr_db']:.2f} | 1 | 1 |")
            continue
        tc = f"{100 * r['tokens_changed']:.2f} %"
        if "latent_maxdiff" in r:
            tc += f" (max Δ {r['latent_maxdiff']:.1e})"
        first = f" (first call {r['first_call_s']:.0f} s)" if "first_call_s" in r else ""
        print(f"| {r['model']} | {r['path']}{first} | {tc} | {r['psnr_db']:.2f} ({r['psnr_change_db']:+.3f}; "
              f"{r['psnr_change_max_db']:.3f}) | {r['encode_speedup']:.2f}x | {r['decode_speedup']:.2f}x |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="wetok-tiny,coda-tiny,kl-tiny")
    ap.add_argument("--photos", type=Path, default=Path("samples"))
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma list from {', '.join(PATHS)}")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    if not paths or set(paths) - set(PATHS):
        ap.error(f"--paths takes a comma list from {', '.join(PATHS)}, got {a.paths!r}")
    import tokcli

    rows = []
    for name in a.models.split(","):
        base = tokcli.load(name, device="cpu")
        rows += bench_model(name, base, photos(a.photos, base.image_size), a.rounds, paths)
    print_rows(rows)
    if a.json:
        meta = {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "photos": str(a.photos)}
        a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
