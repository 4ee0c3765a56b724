"""Encode / decode throughput of tok's WeTok, optionally side by side with the official implementation.

    python benchmarks/wetok_speed.py --configs parity --device cpu
    python benchmarks/wetok_speed.py --configs parity,ds16 --device cuda --batch-sizes 1,4 --json out.json
    python benchmarks/wetok_speed.py --configs ds16 --device cuda --official-src ~/src/WeTok

Random weights (seeded). encode = images -> token indices (encoder + quantizer); decode = indices -> images
(codes from indices + decoder, unclamped). With ``--official-src`` (a checkout of github.com/zhuangshaobin/WeTok),
the official ``Encoder`` / ``Decoder`` / ``GANDecoder`` (improved_model.py) and ``LFQ`` (lookup_free_quantize.py)
are imported by file path (they need einops), loaded with the same weights and timed in the same process; the
official input is the channels-last view its data pipeline produces (``--official-input contiguous`` to change).
Reported: median seconds per call, images/s, the speed ratio official/ours, and max |difference| of the latent,
the share of equal indices and max |difference| of the reconstruction (the GD noise is shared).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokcli.families.wetok.model import WeTok  # noqa: E402

CONFIGS = {
    # the parity fixture's architecture (tiny)
    "parity": dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=16, groups=2),
    # paper ablation base
    "ds16-ch128": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=4, z_channels=32, groups=4),
    # released ImageNet/downsample16 and GeneralDomain/compratio192 architecture
    "ds16": dict(ch=256, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=4, z_channels=32, groups=4),
    # released ImageNet/downsample8 and GeneralDomain/compratio48 architecture
    "ds8": dict(ch=256, ch_mult=[1, 2, 2, 4], num_res_blocks=4, z_channels=32, groups=4),
    # released GeneralDomain/compratio768 (generative decoder, 1.67B parameters)
    "cr768": dict(ch=256, ch_mult=[1, 1, 2, 2, 4, 8], num_res_blocks=4, z_channels=32, groups=4,
                  generative_decoder=True),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _load_by_path(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_official(src: Path):
    base = src / "src" / "WeTok" / "modules"
    files = {"model": base / "diffusionmodules" / "improved_model.py", "lfq": base / "vqvae" / "lookup_free_quantize.py"}
    for f in files.values():
        if not f.is_file():
            raise SystemExit(f"--official-src: {f} not found (expected a checkout of zhuangshaobin/WeTok)")
    return (_load_by_path(files["model"], "wetok_official_improved_model"),
            _load_by_path(files["lfq"], "wetok_official_lookup_free_quantize"))


class Official:
    """The official modules with our model's weights."""

    def __init__(self, mods, ours, args):
        im, lfq = mods
        dd = dict(double_z=False, z_channels=args["z_channels"], resolution=256, in_channels=3, out_ch=3,
                  ch=args["ch"], ch_mult=list(args["ch_mult"]), num_res_blocks=args["num_res_blocks"])
        dev = ours.device
        self.encoder = im.Encoder(**dd)
        self.decoder = (im.GANDecoder if args.get("generative_decoder") else im.Decoder)(**dd)
        self.encoder.load_state_dict(ours.encoder.state_dict(), strict=True)
        self.decoder.load_state_dict(ours.decoder.state_dict(), strict=True)
        self.quantize = lfq.LFQ(dim=args["z_channels"], codebook_size=args["codebook_size"],
                                num_codebooks=args["groups"])
        for m in (self.encoder, self.decoder, self.quantize):
            m.to(dev).eval()

    def encode(self, x):
        """-> (latent, quantized, flat indices) as VQModel.encode computes them."""
        h = self.encoder(x)
        out = self.quantize(h)
        if isinstance(out[0], tuple):  # (ret, loss_breakdown)
            out = out[0]
        return h, out[0], out[-1]

    def decode(self, quant):
        return self.decoder(quant)


def official_flags():
    """cuDNN as the official scripts run it: their main.py (imported by the evaluation scripts) sets
    deterministic=True, benchmark=False; TF32 stays as this process set it."""
    return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                      allow_tf32=torch.backends.cudnn.allow_tf32)


def bench_config(name, args, device, batch, size, warmup, iters, official_mods, official_input, memory_format):
    torch.manual_seed(0)
    model = WeTok(**args, image_size=size).to(device).eval()
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    nparams = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    if memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    row = {"config": name, "batch": batch, "size": size, "params_M": round(nparams / 1e6, 2)}
    with torch.inference_mode():
        tokens = model.encode(x)
        noise = None
        if model.stochastic_decoder:
            noise = torch.randn(tokens.shape[0], args["z_channels"], *tokens.shape[1:3],
                                generator=torch.Generator().manual_seed(2)).to(device)
        t_enc = time_fn(lambda: model.encode(x), device, warmup, iters)
        t_dec = time_fn(lambda: model.decode(tokens, noise=noise, clamp=False), device, warmup, iters)
        row.update(encode_s=statistics.median(t_enc), decode_s=statistics.median(t_dec))
        row.update(encode_img_s=batch / row["encode_s"], decode_img_s=batch / row["decode_s"])
        if official_mods is not None:
            off = Official(official_mods, model, model.model_args)
            xo = x.contiguous()
            if official_input == "channels_last":  # what the official get_input (NHWC batch permuted) gives
                xo = xo.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
            with official_flags():
                h_off, q_off, idx_off = off.encode(xo)
            z_ours = model.encode_latent(x)
            row["official_latent_maxdiff"] = (h_off.float() - z_ours.float()).abs().max().item()
            row["official_index_match"] = (idx_off.reshape(-1).cpu() == tokens.reshape(-1).cpu()).float().mean().item()
            if model.stochastic_decoder:
                # the official GANDecoder draws randn_like(quant) inside: replay the same draw for ours
                torch.manual_seed(3)
                noise_o = torch.randn_like(q_off)
                torch.manual_seed(3)
                with official_flags():
                    r_off = off.decode(q_off)
                r_ours = model.decode(tokens, noise=noise_o.contiguous(), clamp=False)
            else:
                with official_flags():
                    r_off = off.decode(q_off)
                r_ours = model.decode(tokens, clamp=False)
            row["official_recon_maxdiff"] = (r_off.float() - r_ours.float()).abs().max().item()
            row["official_recon_meandiff"] = (r_off.float() - r_ours.float()).abs().mean().item()
            with official_flags():
                o_enc = time_fn(lambda: off.encode(xo), device, warmup, iters)
                o_dec = time_fn(lambda: off.decode(q_off), device, warmup, iters)
            row.update(official_encode_s=statistics.median(o_enc), official_decode_s=statistics.median(o_dec))
            row["encode_speedup"] = row["official_encode_s"] / row["encode_s"]
            row["decode_speedup"] = row["official_decode_s"] / row["decode_s"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def print_table(rows):
    cols = ["config", "batch", "size", "params_M", "encode_s", "encode_img_s", "decode_s", "decode_img_s"]
    extra = ["official_encode_s", "official_decode_s", "encode_speedup", "decode_speedup",
             "official_latent_maxdiff", "official_index_match", "official_recon_maxdiff"]
    cols += [c for c in extra if any(c in r for r in rows)]

    def fmt(v, col=""):
        if col == "official_index_match":  # a single flipped token must show: 0.99997, not 1
            return f"{v:.6f}" if isinstance(v, float) else str(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [cols] + [[fmt(r.get(c, ""), c) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for i, row in enumerate(table):
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="parity,ds16", help=f"comma list from {', '.join(CONFIGS)}")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--size", type=int, default=256, help="image side (default 256)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"],
                    help="layout for tok's model (the official one always gets what its pipeline gives)")
    ap.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                    help="turn off cuDNN autotuning for tok (on by default, as in tok's own device policy); the "
                         "official code always runs with its shipped settings (deterministic, no autotuning)")
    ap.add_argument("--official-src", type=Path, default=None, help="checkout of github.com/zhuangshaobin/WeTok")
    ap.add_argument("--official-input", default="channels_last", choices=["channels_last", "contiguous"])
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 convolutions/matmuls on CUDA for both (PyTorch's default for cuDNN convs; "
                         "faster, but near-zero latents can flip tokens)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    a = ap.parse_args(argv)

    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {', '.join(CONFIGS)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":  # exact fp32 maths: TF32 could flip the sign of near-zero latents (tokens)
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        torch.backends.cudnn.allow_tf32 = a.tf32
        torch.backends.cudnn.benchmark = a.cudnn_benchmark  # tok's policy (core/device.py); official: see official_flags
    mods = load_official(a.official_src) if a.official_src else None

    rows = []
    for n in names:
        for b in [int(s) for s in a.batch_sizes.split(",") if s.strip()]:
            r = bench_config(n, CONFIGS[n], device, b, a.size, a.warmup, a.iters, mods, a.official_input,
                             a.memory_format)
            rows.append(r)
            print(json.dumps(r), flush=True)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "memory_format": a.memory_format, "cudnn_benchmark": a.cudnn_benchmark, "tf32": a.tf32, "warmup": a.warmup,
           "iters": a.iters, "official_src": str(a.official_src) if a.official_src else None,
           "official_input": a.official_input if a.official_src else None}
    print()
    print(f"# {env}")
    print_table(rows)
    if a.json:
        a.json.write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
