"""CODA's Table 1 at small scale: what each ingredient adds on one frozen continuous VAE.

    python benchmarks/coda_table1.py    # tokcli/weights/kl-tiny + tokcli/weights/coda-tiny, data/train, data/heldout

Rows (same VAE, same codebook size, same training crops and steps for rows 1-3):

1. VQ: one nearest-neighbour codebook at the latent resolution, straight-through estimator;
2. + multi-scale residual: the same nearest-neighbour assignment over CODA's scale list (VAR-style residual);
3. + attention assignment: CODA's quantizer (q/k projections + RMSNorm, value table);
4. + LoRA adaptation: the shipped CODA model (quantizer trained jointly with conv LoRA on the VAE, pixel losses,
   ``tok train recipes/coda-tiny-cpu.toml``).

Rows 1-3 train only the quantizer, on latents of random training crops precomputed once with the frozen VAE, with
each quantizer's own loss (VQ: codebook + commitment; CODA: its vq loss + 0.05 entropy), AdamW lr 5e-4 cosine.
Row 4 is trained end to end through the decoder (the recipe), so rows 3 -> 4 change both the LoRA and the
objective; the table says so. Metrics on held-out crops: relative quantization error ||f - f_hat||^2 / ||f||^2 in
the scaled latent space, PSNR / SSIM of the decoded images against the crops (the continuous VAE is the ceiling),
codebook utilisation overall and per level, perplexity. rFID needs the FID Inception weights (see
docs/evaluation.md) and 50k images; it is not computed here.

Prints a table and writes benchmarks/results/coda-table1-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tokcli  # noqa: E402
from tokcli.core.images import to_uint8  # noqa: E402
from tokcli.metrics.image import mean_psnr, psnr, ssim  # noqa: E402
from tokcli.quant.msrq import MultiScaleAttentionQuantizer  # noqa: E402
from tokcli.train.data import TrainData  # noqa: E402
from tokcli.train.recipe import DataSection  # noqa: E402


def crops(roots: list[str], n: int, size: int, seed: int, batch: int = 16) -> torch.Tensor:
    """n deterministic random crops (short side resized to 1-3 x size) in [-1, 1]."""
    data = TrainData(DataSection(roots=roots, crop_size=size, random_resize=[1.0, 3.0], batch_size=batch),
                     seed=seed)
    it = data.batches(0)
    return torch.cat([next(it) for _ in range(math.ceil(n / batch))])[:n]


@torch.no_grad()
def latents_of(vae, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat([vae.encode(x[i:i + batch]) for i in range(0, len(x), batch)])


def train_quantizer(q: MultiScaleAttentionQuantizer, lat: torch.Tensor, steps: int, batch: int, lr: float,
                    entropy_weight: float, seed: int) -> list[float]:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=lr, betas=(0.5, 0.9),
                            weight_decay=0.005)
    g = torch.Generator().manual_seed(seed)
    losses = []
    q.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(lat), (batch,), generator=g)
        out = q(lat[idx])
        loss = out.losses["vq"] + entropy_weight * out.losses["entropy"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(q.parameters(), 10.0)
        opt.step()
        losses.append(float(loss.detach()))
    q.eval()
    return losses


@torch.no_grad()
def evaluate(name: str, encode_latent, quantizer, decode_latent, x: torch.Tensor, batch: int = 16) -> dict:
    errs, f2, ids, recs = [], [], [], []
    for i in range(0, len(x), batch):
        f = encode_latent(x[i:i + batch])
        levels = quantizer.encode(f)
        f_hat = quantizer.decode_ids(levels, size=tuple(f.shape[-2:]))
        errs.append(float(((f - f_hat) ** 2).sum()))
        f2.append(float((f ** 2).sum()))
        ids.append(quantizer.flatten_indices(levels))
        recs.append(decode_latent(f_hat).clamp(-1, 1))
    ids_all = torch.cat(ids).numpy()
    rec = torch.cat(recs)
    a, b = to_uint8(x), to_uint8(rec)
    stats = quantizer.usage_stats(ids_all)
    per_level = [{"scale": u["scale"], "usage": round(u["usage"], 4), "perplexity": round(u["perplexity"], 1)}
                 for u in stats["levels"]]
    overall = stats["overall"]
    return {"name": name, "quant_error_rel": sum(errs) / sum(f2), "psnr": mean_psnr(psnr(a, b)),
            "ssim": float(np.mean(ssim(a, b))), "usage": overall["usage"], "perplexity": overall["perplexity"],
            "tokens_per_image": int(ids_all.shape[1]), "per_level": per_level}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", default="tokcli/weights/kl-tiny", help="the frozen continuous VAE (kl model folder)")
    ap.add_argument("--coda", default="tokcli/weights/coda-tiny", help="the LoRA-adapted CODA model (row 4); '' skips")
    ap.add_argument("--train", nargs="+", default=["data/train"])
    ap.add_argument("--eval", nargs="+", default=["data/heldout"])
    ap.add_argument("--train-crops", type=int, default=1024)
    ap.add_argument("--eval-crops", type=int, default=64)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)

    kl = tokcli.load(f"local-dir:{a.vae}" if Path(a.vae).is_dir() else a.vae, device="cpu")
    coda = tokcli.load(f"local-dir:{a.coda}" if Path(a.coda).is_dir() else a.coda, device="cpu") if a.coda else None
    cfg = coda.model_args if coda is not None else {
        "patch_size_list": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], "codebook_size": 1024, "vq_attn_dim": 32,
        "vq_norm_type": "rms_norm", "vq_commitment_beta": 0.05}
    scales, V = list(cfg["patch_size_list"]), int(cfg["codebook_size"])
    size = scales[-1] * kl.downsample
    dim = kl.latent_dim
    t0 = time.perf_counter()
    x_train = crops(a.train, a.train_crops, size, a.seed)
    x_eval = crops(a.eval, a.eval_crops, size, a.seed + 1)
    lat_train = latents_of(kl.vae, x_train)
    print(f"latents: {len(lat_train)} training crops, {len(x_eval)} held-out crops at {size} px "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    rows = []
    with torch.no_grad():  # the ceiling: the continuous VAE without quantization
        rec = torch.cat([kl.vae.decode(kl.vae.encode(x_eval[i:i + 16])).clamp(-1, 1) for i in range(0, len(x_eval), 16)])
    ua, ub = to_uint8(x_eval), to_uint8(rec)
    ceiling = {"name": "continuous VAE (no quantization)", "psnr": mean_psnr(psnr(ua, ub)),
               "ssim": float(np.mean(ssim(ua, ub)))}

    variants = [
        ("VQ (nearest, one scale)", dict(patch_size_list=[scales[-1]], assignment="nearest"), 0.0),
        ("+ multi-scale residual", dict(patch_size_list=scales, assignment="nearest"), 0.0),
        ("+ attention assignment", dict(patch_size_list=scales, assignment="attention"), 0.05),
    ]
    for name, kw, ent in variants:
        q = MultiScaleAttentionQuantizer(dim, V, kw["patch_size_list"], beta=float(cfg["vq_commitment_beta"]),
                                         norm_type=cfg["vq_norm_type"], attn_dim=int(cfg["vq_attn_dim"]),
                                         assignment=kw["assignment"])
        t1 = time.perf_counter()
        losses = train_quantizer(q, lat_train, a.steps, a.batch, a.lr, ent, a.seed)
        row = evaluate(name, kl.vae.encode, q, kl.vae.decode, x_eval)
        row.update(train_seconds=round(time.perf_counter() - t1, 1), final_loss=float(np.mean(losses[-20:])),
                   trained="quantizer only, on frozen-VAE latents")
        rows.append(row)
        print(f"{name}: {row['quant_error_rel']:.4f} rel. error, {row['psnr']:.2f} dB, usage {row['usage']:.3f}",
              file=sys.stderr)
    if coda is not None:
        row = evaluate("+ LoRA adaptation (shipped CODA)", coda.vae.encode, coda.quantize, coda.vae.decode, x_eval)
        row.update(trained="LoRA + quantizer end to end through the decoder (tok train recipe)",
                   model=str(a.coda))
        rows.append(row)

    print(f"\nCODA Table 1 at small scale: VAE {a.vae}, codebook {V}, {len(x_eval)} held-out crops at {size} px")
    print(f"{'row':36s} {'tokens':>6s} {'rel.err':>8s} {'PSNR':>7s} {'SSIM':>6s} {'usage':>6s} {'perplex.':>8s}")
    for r in rows:
        print(f"{r['name']:36s} {r['tokens_per_image']:6d} {r['quant_error_rel']:8.4f} {r['psnr']:7.2f} "
              f"{r['ssim']:6.3f} {r['usage']:6.3f} {r['perplexity']:8.1f}")
    print(f"{ceiling['name']:36s} {'-':>6s} {'-':>8s} {ceiling['psnr']:7.2f} {ceiling['ssim']:6.3f}")
    print("per-level usage (coarse -> fine):")
    for r in rows:
        print(f"  {r['name']:34s} " + " ".join(f"{lv['usage']:.2f}" for lv in r["per_level"]))

    machine = f"cpu{torch.get_num_threads()}-{platform.machine().lower().replace('_', '-')}"
    out = a.json or REPO / "benchmarks" / "results" / f"coda-table1-{machine}-{dt.date.today().isoformat()}.json"
    env = {"machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "date": dt.date.today().isoformat(), "command": "python benchmarks/coda_table1.py " + " ".join(argv or
                                                                                                         sys.argv[1:])}
    settings = {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(a).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "settings": settings, "ceiling": ceiling, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
