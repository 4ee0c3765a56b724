"""The convolutional families side by side, in one process, interleaved round by round: tok as it loads by default
vs the official WeTok modules, and tok's KL / CODA VAE vs a plain diffusers ``AutoencoderKL`` (same weights).

    python benchmarks/conv_speed.py --official-src PATH --parts wetok,kl --size 128 --batch-sizes 1,8 --rounds 10
    python benchmarks/conv_speed.py --parts kl --vae mar,flux --device cuda --json out.json

Each round times tok then the other side (the order alternates every round) on the same input, so a noisy shared
machine slows both alike; reported are the medians over rounds, the ratio other / tok of the medians and the spread
of the per-round ratios (min - max). Outputs are compared: share of equal indices (WeTok) and max |difference| of
the latents and reconstructions. Both sides run under the same precision (exact fp32, TF32 off) and, on CUDA, the
same cuDNN policy (``--cudnn-benchmark``, off by default: the official scripts pin deterministic algorithms).
A second table gives tok's GFLOP per image (PyTorch's flop counter on tok's model), its GFLOP/s and the share of the
device's fp32 conv peak measured in the same process (``tokcli.bench.limits``; ``--no-peaks`` skips the peak).

tok's side is what ``tokcli.load`` gives on the device: the layout of ``tokcli.core.device.memory_format_for``
(``--tok-layout`` overrides it; channels-last uses the accurate GroupNorm), the KL decoders' upsampling at low
resolution (``tokcli/nn/phase_upsample.py``). The official WeTok side gets the channels-last
view its data pipeline produces (``get_input`` permutes an NHWC batch); diffusers gets contiguous NCHW as its
users pass it. Random weights (seeded): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wetok_speed import CONFIGS, Official, load_official  # noqa: E402

WETOK = {"ds16": CONFIGS["ds16"], "ds8": CONFIGS["ds8"], "gd": {**CONFIGS["ds16"], "generative_decoder": True},
         "ds16-ch128": CONFIGS["ds16-ch128"], "parity": CONFIGS["parity"]}


def _vae_configs():
    from tokcli.families.coda.registry import _FLUX_VAE, _MAR_VAE

    return {"mar": _MAR_VAE, "flux": _FLUX_VAE}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def interleaved(fns: dict, dev, rounds: int, warmup: int) -> dict:
    """Time every function of ``fns`` once per round, the order rotating each round; per-function lists of seconds."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(dev)
    out = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            _sync(dev)
            out[n].append(time.perf_counter() - t0)
    return out


def summarise(times: dict, batch: int, ours: str, other: str, what: str) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    per_round = [o / t for o, t in zip(times[other], times[ours])]
    return {f"{what}_tok_img_s": batch / med[ours], f"{what}_other_img_s": batch / med[other],
            f"{what}_ratio": med[other] / med[ours], f"{what}_ratio_min": min(per_round),
            f"{what}_ratio_max": max(per_round)}


LAYOUT = {"fmt": None}  # --tok-layout
PEAK = {"conv_flop_s": None}  # measured once in main (--no-peaks: not measured)


def add_limits(row: dict, key: dict, encode_one, decode_one) -> dict:
    """tok's model GFLOP per image (PyTorch's count, one image) and, with the measured conv peak, the share of it
    tok's medians reach: "how far from the limit", as ``tok bench throughput`` reports it."""
    from tokcli.bench.limits import count_flops

    for what, fn in (("encode", encode_one), ("decode", decode_one)):
        gflop = count_flops({**key, "fn": what}, fn) / 1e9
        row[f"{what}_gflop_per_img"] = gflop
        row[f"{what}_tok_gflop_s"] = gflop * row[f"{what}_tok_img_s"]
        if PEAK["conv_flop_s"]:
            row[f"{what}_of_conv_peak"] = row[f"{what}_tok_gflop_s"] * 1e9 / PEAK["conv_flop_s"]
    return row


def _tok_wetok(args, size, dev):
    """tok's WeTok as tokcli.load prepares it on ``dev`` (same code path: inference prep + default layout)."""
    from tokcli.core.device import memory_format_for
    from tokcli.families.wetok.model import WeTok

    torch.manual_seed(0)
    m = WeTok(**args, image_size=size)
    m.prepare_for_inference()
    m = m.to(dev).eval().requires_grad_(False)
    return m.set_memory_format(memory_format_for(dev, LAYOUT["fmt"]))


def bench_wetok(name, size, batch, dev, rounds, warmup, mods) -> dict:
    args = WETOK[name]
    tok = _tok_wetok(args, size, dev)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(dev)
    off = Official(mods, tok, tok.model_args)
    for m in (off.encoder, off.decoder):  # the official modules hold plain contiguous weights, as loaded
        m.to(memory_format=torch.contiguous_format)
    xo = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # the official get_input's channels-last view
    row = {"part": "wetok", "config": name, "batch": batch, "size": size,
           "params_M": round(sum(p.numel() for p in tok.parameters()) / 1e6, 1), "tok_layout": tok.memory_format}
    with torch.inference_mode():
        ids = tok.encode(x)
        h_off, q_off, idx_off = off.encode(xo)
        row["equal_indices"] = (idx_off.reshape(-1).cpu() == ids.reshape(-1).cpu()).float().mean().item()
        row["latent_maxdiff"] = (h_off.float() - tok.encode_latent(x).float()).abs().max().item()
        noise = None
        if tok.stochastic_decoder:
            torch.manual_seed(3)
            noise = torch.randn_like(q_off)
        if noise is not None:
            torch.manual_seed(3)
        r_off = off.decode(q_off)
        r_tok = tok.decode(ids, noise=noise, clamp=False)
        row["recon_maxdiff"] = (r_off.float() - r_tok.float()).abs().max().item()
        enc = interleaved({"tok": lambda: tok.encode(x), "official": lambda: off.encode(xo)}, dev, rounds, warmup)
        dec = interleaved({"tok": lambda: tok.decode(ids, noise=noise, clamp=False),
                           "official": lambda: off.decode(q_off)}, dev, rounds, warmup)
    row.update(summarise(enc, batch, "tok", "official", "encode"))
    row.update(summarise(dec, batch, "tok", "official", "decode"))
    with torch.inference_mode():
        add_limits(row, {"wetok": name, "size": size}, lambda: tok.encode(x[:1]),
                   lambda: tok.decode(ids[:1], noise=None if noise is None else noise[:1], clamp=False))
    return row


def bench_vae(name, size, batch, dev, rounds, warmup) -> dict:
    """tok's KL family (the VAE under CODA too) vs plain diffusers AutoencoderKL with the same weights."""
    from tokcli.core.device import memory_format_for
    from tokcli.families.kl.model import KL

    torch.manual_seed(0)
    tok = KL(vae=_vae_configs()[name], latent_scale=1.0, latent_shift=0.0, image_size=size)
    plain = copy.deepcopy(tok.vae.vae).to(dev).eval().requires_grad_(False)  # before tok's inference preparation
    tok.prepare_for_inference()
    tok = tok.to(dev).eval().requires_grad_(False).set_memory_format(memory_format_for(dev, LAYOUT["fmt"]))
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(dev)
    row = {"part": "kl", "config": name, "batch": batch, "size": size, "tok_layout": tok.memory_format,
           "params_M": round(sum(p.numel() for p in plain.parameters()) / 1e6, 1)}
    with torch.inference_mode():
        lat = tok.encode(x)  # [B, h, w, C]
        z = plain.encode(x).latent_dist.mean
        row["latent_maxdiff"] = (z.permute(0, 2, 3, 1) - lat).abs().max().item()
        row["recon_maxdiff"] = (plain.decode(z).sample - tok.decode(lat, clamp=False)).abs().max().item()
        enc = interleaved({"tok": lambda: tok.encode(x), "diffusers": lambda: plain.encode(x).latent_dist.mean},
                          dev, rounds, warmup)
        dec = interleaved({"tok": lambda: tok.decode(lat, clamp=False), "diffusers": lambda: plain.decode(z).sample},
                          dev, rounds, warmup)
    row.update(summarise(enc, batch, "tok", "diffusers", "encode"))
    row.update(summarise(dec, batch, "tok", "diffusers", "decode"))
    with torch.inference_mode():
        add_limits(row, {"vae": name, "size": size}, lambda: tok.encode(x[:1]),
                   lambda: tok.decode(lat[:1], clamp=False))
    return row


def print_rows(rows):
    print("| part | config | batch | size | encode tok / other img/s | ratio (per-round range) | decode tok / other "
          "img/s | ratio (per-round range) | equal indices | max Δ latent / recon |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        eq = f"{100 * r['equal_indices']:.3f} %" if "equal_indices" in r else "-"
        print(f"| {r['part']} | {r['config']} | {r['batch']} | {r['size']} | {r['encode_tok_img_s']:.3g} / "
              f"{r['encode_other_img_s']:.3g} | **{r['encode_ratio']:.2f}** ({r['encode_ratio_min']:.2f}-"
              f"{r['encode_ratio_max']:.2f}) | {r['decode_tok_img_s']:.3g} / {r['decode_other_img_s']:.3g} | "
              f"**{r['decode_ratio']:.2f}** ({r['decode_ratio_min']:.2f}-{r['decode_ratio_max']:.2f}) | {eq} | "
              f"{r['latent_maxdiff']:.1e} / {r['recon_maxdiff']:.1e} |", flush=True)
    if not rows or "encode_gflop_per_img" not in rows[0]:
        return
    print("\n| part | config | batch | size | encode GFLOP/img | encode GFLOP/s (of conv peak) | decode GFLOP/img | "
          "decode GFLOP/s (of conv peak) |")
    print("|---|---|---|---|---|---|---|---|")
    share = lambda r, d: f" ({100 * r[d + '_of_conv_peak']:.0f} %)" if d + "_of_conv_peak" in r else ""
    for r in rows:
        print(f"| {r['part']} | {r['config']} | {r['batch']} | {r['size']} | {r['encode_gflop_per_img']:.1f} | "
              f"{r['encode_tok_gflop_s']:.1f}{share(r, 'encode')} | {r['decode_gflop_per_img']:.1f} | "
              f"{r['decode_tok_gflop_s']:.1f}{share(r, 'decode')} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="wetok,kl")
    ap.add_argument("--wetok", default="ds16,ds8,gd", help=f"comma list from {', '.join(WETOK)}")
    ap.add_argument("--vae", default="mar,flux", help="comma list from mar, flux")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN autotuning for both sides")
    ap.add_argument("--official-src", type=Path, default=None, help="checkout of github.com/zhuangshaobin/WeTok")
    ap.add_argument("--tok-layout", default=None, choices=["auto", "contiguous", "channels_last"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-peaks", action="store_true", help="do not measure the device's conv peak")
    a = ap.parse_args(argv)
    LAYOUT["fmt"] = a.tok_layout
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    torch.backends.cudnn.deterministic = not a.cudnn_benchmark
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    if "wetok" in parts and a.official_src is None:
        ap.error("--parts wetok needs --official-src (a checkout of zhuangshaobin/WeTok)")
    mods = load_official(a.official_src) if "wetok" in parts else None
    batches = [int(b) for b in a.batch_sizes.split(",") if b.strip()]
    if not a.no_peaks:
        from tokcli.bench.limits import measure_peaks

        PEAK.update(measure_peaks(a.device))
    rows = []
    for part in parts:
        names = (a.wetok if part == "wetok" else a.vae).split(",")
        for n in [n.strip() for n in names if n.strip()]:
            for b in batches:
                r = (bench_wetok(n, a.size, b, dev, a.rounds, a.warmup, mods) if part == "wetok"
                     else bench_vae(n, a.size, b, dev, a.rounds, a.warmup))
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
           (platform.processor() or platform.machine()), "threads": torch.get_num_threads(), "rounds": a.rounds,
           "warmup": a.warmup, "cudnn_benchmark": a.cudnn_benchmark, "precision": "fp32 (TF32 off)",
           "official_src": str(a.official_src) if a.official_src else None,
           "conv_peak_gflop_s": PEAK["conv_flop_s"] and PEAK["conv_flop_s"] / 1e9,
           "matmul_peak_gflop_s": PEAK.get("matmul_flop_s") and PEAK["matmul_flop_s"] / 1e9}
    print(f"# {env}")
    print_rows(rows)
    if a.json:
        a.json.write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
