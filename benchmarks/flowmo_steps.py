"""FlowMo reconstruction quality against sampler steps: PSNR / SSIM for the official Euler sampler and the others.

    python benchmarks/flowmo_steps.py -m runs/flowmo-tiny/model                       # data/heldout, 4 8 12 25
    python benchmarks/flowmo_steps.py -m runs/flowmo-tiny/model --steps 2,4,8,12,25 --variants heun:pow_0.25
    python benchmarks/flowmo_steps.py -m /tmp/fm-random --images data/heldout --steps 2,4 --json /tmp/steps.json

Variants are ``solver:schedule`` (tokcli/families/flowmo/sampler.py); the default set is ``euler:pow_0.25`` (the
official sampler), ``euler:linear`` and ``heun:pow_0.25`` (Heun's second-order step on the official grid, Euler on
the last step to t = 0). CFG and its interval are the folder's ``decode`` defaults (official: 1.5 in (.17, 1.02))
unless ``--cfg`` / ``--cfg-interval`` say otherwise.

Protocol (tok bench's): every image of ``--images`` is ADM-centre-cropped to the model's size, encoded once (the
tokens are deterministic), then decoded by every (variant, steps) with the same per-image noise (seed + i, the
folder's seed unless ``--seed``), clamped, and both images rounded to uint8 (tokcli.core.images.to_uint8); PSNR and
SSIM are tokcli.metrics.image's, averaged over the images. Reported per row: mean PSNR / SSIM, the decoder calls of
one decode (tok's, a guided evaluation is one call on a doubled batch) and the network passes per image as the
official code counts them, the seconds the decodes took, and the PSNR of the reconstruction against the official
sampler's at the largest step count (how closely a cheaper sampler reproduces the official output). Below the
table: for each variant, the fewest steps whose PSNR reaches the official sampler's at its largest step count.

Writes ``benchmarks/results/flowmo_steps_<model name>-<date>.json`` (``--json`` to change it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import tokcli  # noqa: E402
from tokcli.core.images import collect_inputs, load_cropped, to_uint8  # noqa: E402
from tokcli.errors import TokError  # noqa: E402
from tokcli.families.flowmo import sampler as fm_sampler  # noqa: E402
from tokcli.metrics.image import psnr, ssim  # noqa: E402

DEFAULT_VARIANTS = "euler:pow_0.25,euler:linear,heun:pow_0.25"
OFFICIAL = ("euler", "pow_0.25")


def load_images(folder: str, size: int, n: int | None) -> torch.Tensor:
    """[-1, 1] float images [N, 3, size, size] from uint8 ADM centre crops."""
    items = collect_inputs([folder])[:n]
    if not items:
        raise SystemExit(f"no images under {folder}")
    arr = np.stack([load_cropped(item, size) for item in items]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def parse_variants(text: str) -> list[tuple[str, str]]:
    out = []
    for v in (s.strip() for s in text.split(",") if s.strip()):
        solver, _, schedule = v.partition(":")
        fm_sampler.check_options(solver=solver, schedule=schedule or "pow_0.25")
        out.append((solver, schedule or "pow_0.25"))
    return out


def run_row(model, tokens, x_u8, solver, schedule, steps, a, sampler) -> tuple[dict, np.ndarray]:
    t0 = time.perf_counter()
    recon = []
    with torch.inference_mode():
        for i in range(0, tokens.shape[0], a.batch_size):
            recon.append(model.decode(tokens[i:i + a.batch_size], seed=a.seed + i, steps=steps, solver=solver,
                                      schedule=schedule, **sampler).cpu())
    seconds = time.perf_counter() - t0
    r_u8 = to_uint8(torch.cat(recon))
    kw = dict(steps=steps, cfg=sampler["cfg"], cfg_interval=sampler["cfg_interval"], solver=solver, schedule=schedule)
    return {"solver": solver, "schedule": schedule, "steps": steps,
            "psnr": round(float(np.mean(psnr(x_u8, r_u8))), 3), "ssim": round(float(np.mean(ssim(x_u8, r_u8))), 4),
            "decoder_calls": fm_sampler.decoder_calls(**kw),
            "passes_per_image": fm_sampler.decoder_calls(**kw, batched_cfg=False), "decode_s": round(seconds, 3)}, r_u8


def add_reference_psnr(rows: list[dict], recons: list[np.ndarray], top: int) -> None:
    """Each row's PSNR against the official sampler's reconstruction at ``top`` steps (how closely fewer steps or
    another solver reproduce the official output; inf where identical), when that row was measured."""
    ref = [u for r, u in zip(rows, recons) if (r["solver"], r["schedule"]) == OFFICIAL and r["steps"] == top]
    for r, u in zip(rows, recons):
        v = float(np.mean(psnr(ref[0], u))) if ref else None
        r["psnr_vs_official_top"] = v if v is None else (round(v, 3) if np.isfinite(v) else "inf")


def reach(rows: list[dict], variants, target: float) -> dict[str, int | None]:
    """Per variant: the fewest steps whose PSNR is at least ``target`` (None: none of the measured ones)."""
    out = {}
    for solver, schedule in variants:
        ok = [r["steps"] for r in rows if (r["solver"], r["schedule"]) == (solver, schedule) and r["psnr"] >= target]
        out[f"{solver}:{schedule}"] = min(ok) if ok else None
    return out


def print_table(rows: list[dict]) -> None:
    print("| solver | schedule | steps | PSNR | SSIM | PSNR vs official top | decoder calls | passes / image | "
          "decode s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = r.get("psnr_vs_official_top")
        ref = "-" if ref is None else ref if isinstance(ref, str) else f"{ref:.2f}"
        print(f"| {r['solver']} | {r['schedule']} | {r['steps']} | {r['psnr']:.3f} | {r['ssim']:.4f} | {ref} | "
              f"{r['decoder_calls']} | {r['passes_per_image']} | {r['decode_s']:.2f} |")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True, help="a FlowMo model folder or name (tokcli.load)")
    ap.add_argument("--images", default="data/heldout", help="image folder [data/heldout]")
    ap.add_argument("--steps", default="4,8,12,25", help="comma list of step counts [4,8,12,25]")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"solver:schedule list [{DEFAULT_VARIANTS}]")
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale [the folder's decode default]")
    ap.add_argument("--cfg-interval", default=None, help='EDM sigma interval "[lo, hi]" or "all" [the folder\'s]')
    ap.add_argument("--seed", type=int, default=None, help="image i gets seed + i [the folder's decode seed]")
    ap.add_argument("-n", type=int, default=None, help="use only the first n images")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None,
                    help="result file [benchmarks/results/flowmo_steps_<model>-<date>.json]")
    a = ap.parse_args(argv)
    try:
        a.step_list = [int(s) for s in a.steps.split(",") if s.strip()]
        a.variant_list = parse_variants(a.variants)
        for s in a.step_list:
            fm_sampler.check_options(steps=s)
    except (ValueError, TokError) as e:
        ap.error(str(e))
    if not a.step_list or not a.variant_list or a.batch_size < 1:
        ap.error("--steps, --variants and --batch-size must be non-empty / positive")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = tokcli.load(a.model, device=a.device).eval()
    if getattr(model, "family", None) != "flowmo":
        raise SystemExit(f"{a.model} is a {getattr(model, 'family', '?')} model, not FlowMo")
    d = model.decode_defaults
    sampler = {"cfg": d.get("cfg", 1.5) if a.cfg is None else a.cfg,
               "cfg_interval": d.get("cfg_interval", [0.17, 1.02]) if a.cfg_interval is None else
               (a.cfg_interval if a.cfg_interval == "all" else json.loads(a.cfg_interval))}
    fm_sampler.check_options(**sampler)
    a.seed = int(d.get("seed", 0) if a.seed is None else a.seed)
    x = load_images(a.images, model.image_size, a.n)
    with torch.inference_mode():
        tokens = torch.cat([model.encode(x[i:i + a.batch_size].to(model.device))
                            for i in range(0, x.shape[0], a.batch_size)])
    x_u8 = to_uint8(x)
    rows, recons = [], []
    for solver, schedule in a.variant_list:
        for steps in a.step_list:
            row, r_u8 = run_row(model, tokens, x_u8, solver, schedule, steps, a, sampler)
            rows.append(row)
            recons.append(r_u8)
            print(json.dumps(row), file=sys.stderr, flush=True)
    top = max(a.step_list)
    add_reference_psnr(rows, recons, top)
    ref = [r["psnr"] for r in rows if (r["solver"], r["schedule"]) == OFFICIAL and r["steps"] == top]
    reached = reach(rows, a.variant_list, ref[0]) if ref else {}
    path = Path(str(a.model).rstrip("/"))
    name = (path.parent.name if path.name == "model" else path.name) if path.exists() else str(a.model)
    env = {"model": str(a.model), "images": a.images, "n_images": int(x.shape[0]), "image_size": model.image_size,
           "seed": a.seed, **sampler, "device": a.device, "threads": torch.get_num_threads(),
           "torch": torch.__version__,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/flowmo_steps.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"# {a.model}: {env['n_images']} images of {model.image_size} px, cfg {sampler['cfg']} in "
          f"{sampler['cfg_interval']}, seed {a.seed}")
    print_table(rows)
    if ref:
        print(f"\nfewest steps reaching the official sampler's {top}-step PSNR ({ref[0]:.3f} dB): "
              + ", ".join(f"{k} {v if v is not None else f'> {top}'}" for k, v in reached.items()))
    out = a.json or HERE / "results" / f"flowmo_steps_{name}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows, "official_top_psnr": ref[0] if ref else None,
                               "steps_to_reach_official_top": reached}, indent=2) + "\n")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
