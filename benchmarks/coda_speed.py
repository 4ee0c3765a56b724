"""CODA inference speed: the quantizer's inference path against its training path, and fused vs unfused LoRA.

    python benchmarks/coda_speed.py                       # CPU, both parts
    python benchmarks/coda_speed.py --quick --threads 1   # a smoke run (about two minutes on 2 cores)
    python benchmarks/coda_speed.py --device cuda         # on a GPU (the LoRA part stays on CPU unless --lora-device)

(a) Quantizer (``tokcli.quant.msrq``, attention assignment, random weights, latent ~ N(0, 1)) for the MAR
(V = 16384, scales 1..16, 16x16 latent) and FLUX (V = 65536, scales 1..32, 32x32 latent) configurations, D = 16,
attention width 32. Timed in interleaved rounds (one call of each path per round, so that background load hits
all alike; at least ``--iters`` rounds, more for cheap configurations, up to ``--min-seconds``), medians of:

- ``encode``: the inference path (per level: logits in row blocks, argmax, gather from the value table);
- ``forward``: the training path as tok runs it (dense logits, softmax, soft assignment ``(soft - sg(soft)) @ values``,
  entropy at T = 0.01, vq terms), under ``torch.no_grad`` (no autograd graph: the cheapest the training path gets);
- ``dense``: a literal official-style transcription, also under no_grad: dense logits, softmax, argmax of the
  softmax, a dense one-hot, ``(hard - sg(soft) + soft) @ values``, ``hard @ values``, vq and entropy terms;
- ``decode``: ``decode_ids`` (gather + bicubic upsampling).

The ids of ``encode`` must equal ``forward``'s bit for bit (the script exits with status 1 otherwise); the share of
ids equal to the official-style argmax-of-softmax is reported too. Dense paths whose tensors would not fit in
``--max-dense-gib`` (default: half the free memory, at most 8 GiB on CPU) are skipped and say so.

(b) LoRA: the CODA MAR VAE (``CodaVAE`` with the coda-mar registry ``vae`` block, random weights) with rank-32
LoRA on conv1 / conv2 / upsample / downsample and random non-zero LoRA B weights, encode + decode of one 256 px image:
unfused (peft adapters run beside the convs, as in training) against a copy with ``merge_lora()`` (as ``tokcli.load``
runs it). The two alternate call by call so that background load hits both alike; reported: median seconds, the
speed-up, and max |difference| of the latents and of the reconstructions.

Prints tables and writes ``benchmarks/results/coda-speed-<machine>-<date>.json`` (``--json`` to change it).
On a CPU shared with other jobs use ``--threads 1``: with more threads than free cores every OpenMP barrier waits for
a descheduled thread, and the many small calls of the block-wise ``encode`` measure the scheduler, not the code.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import machine_name  # noqa: E402
from tokcli.quant.msrq import MultiScaleAttentionQuantizer  # noqa: E402

QUANT_CONFIGS = {
    "mar": dict(codebook_size=16384, scales=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16]),
    "flux": dict(codebook_size=65536, scales=[1, 2, 3, 4, 6, 9, 13, 18, 24, 32]),
}
DIM, ATTN_DIM = 16, 32
LORA_RANK, LORA_MODULES = 32, ["conv1", "conv2", "upsample", "downsample"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, device: torch.device, warmup: int, iters: int, min_seconds: float) -> dict:
    """Median seconds per call of each function, called in turn (a, b, c, a, b, c, ...) so that background load
    drifts hit all alike, after ``warmup`` untimed calls each. Rounds: at least ``iters``, and as many as fill about
    ``min_seconds`` (at most 50), so that cheap configurations get enough repeats for a stable median."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {k: [] for k in fns}
    rounds, i = iters, 0
    while i < rounds:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
        if i == 0:
            rounds = min(50, max(iters, math.ceil(min_seconds / max(sum(t[0] for t in times.values()), 1e-9))))
        i += 1
    return {k: statistics.median(v) for k, v in times.items()} | {"rounds": rounds}


def free_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2 ** 30
    import psutil

    return psutil.virtual_memory().available / 2 ** 30


# ---- (a) quantizer ------------------------------------------------------------------------------------------------


def official_style_forward(q: MultiScaleAttentionQuantizer, f: torch.Tensor):
    """The official algorithm written out densely (softmax, argmax of the softmax, one-hot, soft/hard products,
    vq and entropy terms), for timing and as an independent id reference. Returns (ids [B, T], f_hat)."""
    B, D, H, W = f.shape
    C = q.codebooks.weight
    keys, values = q.attn.keys(C), q.attn.values(C)
    f_hat, residual, ids, losses = torch.zeros_like(f), f, [], []
    for pn in q.patch_size_list:
        r = F.interpolate(residual, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(B, pn * pn, D)
        logits = q.attn.queries(r) @ keys.t() / math.sqrt(keys.shape[-1])
        soft = logits.softmax(-1)
        idx = soft.argmax(-1)
        hard = torch.zeros_like(soft).scatter_(-1, idx[..., None], 1.0)
        z = (hard - soft.detach() + soft) @ values
        z_hard = hard @ values
        flat = logits.reshape(-1, logits.shape[-1]) / q.entropy_temperature
        p = flat.softmax(-1)
        sample_h = (-(p * F.log_softmax(flat + 1e-5, -1)).sum(-1)).mean()
        avg = p.mean(0)
        losses.append(((z - r) ** 2).mean() + ((z_hard.detach() - r) ** 2).mean()
                      + q.beta * ((z_hard - r.detach()) ** 2).mean() + sample_h + (avg * torch.log(avg + 1e-5)).sum())
        up = F.interpolate(z.reshape(B, pn, pn, D).permute(0, 3, 1, 2), size=(H, W), mode="bicubic")
        f_hat, residual = f_hat + up, residual - up
        ids.append(idx)
    return torch.cat(ids, 1), f_hat


def bench_quantizer(name: str, batch: int, device: torch.device, warmup: int, iters: int,
                    max_dense_gib: float, min_seconds: float) -> dict:
    cfg = QUANT_CONFIGS[name]
    V, scales = cfg["codebook_size"], cfg["scales"]
    torch.manual_seed(0)
    q = MultiScaleAttentionQuantizer(DIM, V, scales, attn_dim=ATTN_DIM, beta=0.05).to(device).eval()
    with torch.no_grad():  # non-trivial RMSNorm weights (the init is all ones)
        q.attn.norm_q.weight.uniform_(0.5, 1.5)
        q.attn.norm_k.weight.uniform_(0.5, 1.5)
    side = scales[-1]
    f = torch.randn(batch, DIM, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    row = {"config": name, "batch": batch, "codebook_size": V, "tokens": q.num_tokens, "latent": side}
    with torch.no_grad():
        ids = q.flatten_indices(q.encode(f))
        fns = {"encode_s": lambda: q.encode(f), "decode_s": lambda: q.decode_ids(ids)}
        # the largest dense [rows, V] fp32 tensor, times the ~8 of them the dense paths keep alive at once
        need = 8 * batch * side * side * V * 4 / 2 ** 30
        row["dense_need_gib"] = round(need, 2)
        if need > max_dense_gib:
            row["skipped"] = f"dense paths need ~{need:.1f} GiB > --max-dense-gib {max_dense_gib:.1f}"
        else:
            out = q(f)
            row["ids_equal_forward"] = bool(torch.equal(q.flatten_indices(out.ids), ids))
            row["decode_equal_forward"] = bool(torch.equal(q.decode_ids(ids), out.quantized))
            del out
            off_ids, off_fhat = official_style_forward(q, f)
            row["ids_equal_dense_share"] = (off_ids == ids).float().mean().item()
            row["dense_fhat_maxdiff"] = (off_fhat - q.decode_ids(ids)).abs().max().item()
            del off_ids, off_fhat
            fns |= {"forward_s": lambda: q(f), "dense_s": lambda: official_style_forward(q, f)}
        row |= time_interleaved(fns, device, warmup, iters, min_seconds)
    if "forward_s" in row:
        row["speedup_vs_forward"] = row["forward_s"] / row["encode_s"]
        row["speedup_vs_dense"] = row["dense_s"] / row["encode_s"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ---- (b) LoRA fused vs unfused ------------------------------------------------------------------------------------


def bench_lora(device: torch.device, reps: int, size: int, b_std: float) -> dict:
    from tokcli.families.coda.registry import REGISTRY
    from tokcli.families.coda.vae import CodaVAE

    entry = next(e for e in REGISTRY if e.name == "coda-mar")
    args = entry.model_args
    torch.manual_seed(0)
    unfused = CodaVAE(args["vae"], latent_scale=args["latent_scale"], latent_shift=args["latent_shift"])
    targets = unfused.add_lora(LORA_RANK, LORA_MODULES)
    with torch.no_grad():
        for n, p in unfused.vae.named_parameters():
            if ".lora_B." in n:  # B is zero at init, which would make the LoRA a no-op
                p.normal_(0.0, b_std)
    unfused = unfused.to(device).eval().requires_grad_(False)
    fused = copy.deepcopy(unfused)
    fused.merge_lora()
    x = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(device)
    row = {"model": "coda-mar VAE (MAR kl16, random weights)", "size": size, "lora_rank": LORA_RANK,
           "lora_convs": len(targets), "lora_b_std": b_std,
           "params_M": round(sum(p.numel() for p in unfused.parameters()) / 1e6, 2)}
    with torch.inference_mode():
        lat_u, lat_f = unfused.encode(x), fused.encode(x)
        rec_u, rec_f = unfused.decode(lat_u), fused.decode(lat_f)
        row["latent_maxdiff"] = (lat_u - lat_f).abs().max().item()
        row["recon_maxdiff"] = (rec_u - rec_f).abs().max().item()
        row["recon_maxabs"] = rec_u.abs().max().item()  # the scale the difference is relative to
        times = {"unfused": [], "fused": []}
        for i in range(reps):  # alternate, and alternate who goes first, so that load drifts hit both
            order = ("unfused", "fused") if i % 2 == 0 else ("fused", "unfused")
            for key in order:
                m = unfused if key == "unfused" else fused
                t0 = time.perf_counter()
                m.decode(m.encode(x))
                _sync(device)
                times[key].append(time.perf_counter() - t0)
        for key in times:  # the first call of each is a warm-up
            row[f"{key}_s"] = statistics.median(times[key][1:] if len(times[key]) > 1 else times[key])
            row[f"{key}_all_s"] = [round(t, 3) for t in times[key]]
        row["speedup"] = row["unfused_s"] / row["fused_s"]
        fused.unmerge_lora()  # base weights back: the output without the LoRA's contribution ...
        for n, p in fused.vae.named_parameters():
            if ".lora_B." in n:
                p.zero_()
        row["lora_effect_recon_maxabs"] = (rec_u - fused.decode(fused.encode(x))).abs().max().item()
    return row


# ---- output -------------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def print_table(rows: list[dict], cols: list[str]) -> None:
    cols = [c for c in cols if any(c in r for r in rows)]
    table = [cols] + [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    for i, t in enumerate(table):
        print("  ".join(v.rjust(w) for v, w in zip(t, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the quantizer part")
    ap.add_argument("--configs", default="mar,flux", help=f"comma list from {', '.join(QUANT_CONFIGS)}")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3, help="timed rounds at least")
    ap.add_argument("--min-seconds", type=float, default=10.0,
                    help="time cheap configs for about this long (more rounds, at most 50)")
    ap.add_argument("--max-dense-gib", type=float, default=None,
                    help="skip the dense paths above this estimate (default: half the free memory; CPU: at most 8)")
    ap.add_argument("--lora-device", default="cpu", choices=["cpu", "cuda"], help="device of the LoRA part")
    ap.add_argument("--lora-reps", type=int, default=4, help="calls per LoRA variant (the first is a warm-up)")
    ap.add_argument("--lora-b-std", type=float, default=2e-4, help="std of the random LoRA B (up) weights")
    ap.add_argument("--size", type=int, default=256, help="image side for the LoRA part")
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--skip-quantizer", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="batch 1 only, 2 timed calls, 3 LoRA calls per variant (a smoke run)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (default: exact fp32)")
    ap.add_argument("--json", type=Path, default=None,
                    help="result file [benchmarks/results/coda-speed-<machine>-<date>.json]")
    a = ap.parse_args(argv)

    if a.quick:
        a.batch_sizes, a.iters, a.lora_reps, a.min_seconds = "1", 2, 3, 2.0
    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [n for n in names if n not in QUANT_CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {', '.join(QUANT_CONFIGS)}")
    if "cuda" in (a.device, a.lora_device) and not torch.cuda.is_available():
        ap.error("cuda requested but torch sees no CUDA device")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if torch.cuda.is_available():  # exact fp32: TF32 could change near-tie argmaxes
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        torch.backends.cudnn.allow_tf32 = a.tf32
    max_dense = a.max_dense_gib
    if max_dense is None:
        max_dense = free_gib(device) / 2
        if device.type == "cpu":
            max_dense = min(max_dense, 8.0)

    machine = machine_name(a.device)
    env = {"machine": machine, "torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(),
           "lora_device": a.lora_device, "threads": torch.get_num_threads(), "tf32": a.tf32, "warmup": a.warmup,
           "iters": a.iters, "min_seconds": a.min_seconds, "quick": a.quick, "max_dense_gib": round(max_dense, 2),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/coda_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    doc = {"env": env, "quantizer": [], "lora": None}

    ok = True
    if not a.skip_quantizer:
        for n in names:
            for b in [int(s) for s in a.batch_sizes.split(",") if s.strip()]:
                r = bench_quantizer(n, b, device, a.warmup, a.iters, max_dense, a.min_seconds)
                doc["quantizer"].append(r)
                ok &= r.get("ids_equal_forward", True) and r.get("decode_equal_forward", True)
                print(json.dumps(r), file=sys.stderr, flush=True)
    if not a.skip_lora:
        doc["lora"] = bench_lora(torch.device(a.lora_device), max(a.lora_reps, 2), a.size, a.lora_b_std)
        print(json.dumps(doc["lora"]), file=sys.stderr, flush=True)

    print(f"# {json.dumps({k: env[k] for k in ('machine', 'device', 'torch', 'threads', 'tf32', 'quick')})}")
    if doc["quantizer"]:
        print("\nquantizer: inference path (encode) vs training path (forward) vs official-style dense, median s")
        print_table(doc["quantizer"], ["config", "batch", "tokens", "encode_s", "forward_s", "dense_s",
                                       "speedup_vs_forward", "speedup_vs_dense", "ids_equal_forward",
                                       "ids_equal_dense_share", "decode_equal_forward", "decode_s", "skipped"])
    if doc["lora"]:
        print("\nLoRA: unfused (training layout) vs fused (merge_lora), encode + decode of one image, median s")
        print_table([doc["lora"]], ["size", "lora_convs", "unfused_s", "fused_s", "speedup", "latent_maxdiff",
                                    "recon_maxdiff", "recon_maxabs", "lora_effect_recon_maxabs"])

    out = a.json or HERE / "results" / f"coda-speed-{machine}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwritten: {out}")
    if not ok:
        print("ERROR: encode ids (or decoded values) differ from the training path", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
