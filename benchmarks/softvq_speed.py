"""Encode / decode throughput of tok's SoftVQ-VAE side by side with the official model code, same weights, same process.

    python benchmarks/softvq_speed.py --official-src /tmp/softvq_official                      # S and B, batch 1 and 8
    python benchmarks/softvq_speed.py --official-src /tmp/softvq_official --configs s --batch-sizes 1 --rounds 3
    python benchmarks/softvq_speed.py --official-src /tmp/softvq_official --device cuda --rounds 20

``--official-src`` is a work tree of github.com/Hhhhhhao/continuous_tokenizer (HEAD 7cc3e96), kept OUTSIDE this
repository, e.g. ``mkdir -p /tmp/softvq_official && git --git-dir=<clone>/.git archive --prefix=modelling/
HEAD:modelling | tar -x -C /tmp/softvq_official`` (a full ``archive HEAD`` of that repo stops at a missing image blob;
the ``modelling/`` tree is all this script needs). It needs ``einops``, ``peft`` and ``scipy`` besides timm
(``pip install einops peft scipy``).

Architectures (the released configs, see the SoftVQ notes): 256 px, patch 16 (256 image tokens), 64 latent tokens of
d = 32, 4 codebooks of 8192, tau 0.07, L2-normalised codebook; encoder and decoder are timm DINOv2 ViTs:
``s`` = ViT-S / ViT-S (the paper's 46M ablation size; no S checkpoint is released), ``b`` = ViT-B / ViT-B
(``softvq-b-64``), ``bl`` = ViT-B / ViT-L (``softvq-bl-64``; optional, slow on a CPU).

What happens per configuration:

1. The official package ``modelling`` is registered from its folder by path (a namespace module whose ``__path__`` is
   ``<src>/modelling``; the code uses absolute ``modelling.*`` imports, so single files cannot be loaded alone) and
   ``modelling.tokenizer.SoftVQModel`` is built with seeded random weights. Workarounds, all in this script only:
   ``enc_pretrained=False`` (the released configs say true, which makes timm download DINOv2 weights that a checkpoint
   then overwrites) and ``repa=False`` (as released); nothing in the official inference path calls ``.cuda()``.
   Importing it re-registers timm's ``vit_*`` names with the official ``VisionTransformer`` copy (explicit
   softmax(QK^T)V attention, ``fused_attn=False``; flash-attn is used there only for non-fp32 inputs); tok builds
   timm's own class directly, so it is unaffected. ``codebook_show_usage`` stays at its ``ModelArgs`` default, on
   (the released checkpoints carry its ``codebook_used`` buffer); the official quantizer then runs ``torch.unique``
   over that buffer on every call, eval included.
2. The LayerScale gammas (1e-5 at init, which would make every block nearly the identity and the parity check
   weak) are redrawn uniform in [--gamma-min, --gamma-max]; the model is written with the official
   ``save_pretrained`` (``config.json`` + ``model.safetensors``) to a temporary folder, converted with tok's converter
   (``tokcli.families.softvq.convert.convert_official``) and loaded with ``tokcli.load``.
3. Parity on one seeded batch: max |diff| of z_hat (the quantizer input), of the soft latents z and of the raw
   reconstructions (each side decodes its own z). Above ``--tol`` the configuration is not timed and the script
   exits with status 1.
4. Timing: encode = images -> z (official ``encode``; tok ``encode``), decode = z -> raw image (official ``decode``;
   tok ``decode(clamp=False)``), under ``torch.inference_mode``. After ``--warmup`` untimed calls each, ``--rounds``
   rounds each call tok encode, official encode, tok decode, official decode in that order, so background load hits
   both sides alike. Reported: median seconds, images/s, the spread (min, max, IQR / median) of each side, and
   ``ratio = official median / tok median`` (> 1: tok is faster), with the range of the per-round ratios.

Prints a table and writes ``benchmarks/results/softvq_speed_<machine>-<date>.json`` (``--json`` to change it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import platform
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import machine_name  # noqa: E402

import tokcli  # noqa: E402
from tokcli.families.softvq.convert import convert_official  # noqa: E402

DINO = {"s": "vit_small_patch14_dinov2.lvd142m", "b": "vit_base_patch14_dinov2.lvd142m",
        "l": "vit_large_patch14_dinov2.lvd142m"}
COMMON = dict(image_size=256, enc_patch_size=16, dec_patch_size=16, num_latent_tokens=64, codebook_embed_dim=32,
              codebook_size=8192, num_codebooks=4, tau=0.07, codebook_l2_norm=True)
CONFIGS = {
    "s": dict(encoder_model=DINO["s"], decoder_model=DINO["s"], **COMMON),   # paper Table 3 S (46M), not released
    "b": dict(encoder_model=DINO["b"], decoder_model=DINO["b"], **COMMON),   # softvq-b-64
    "bl": dict(encoder_model=DINO["b"], decoder_model=DINO["l"], **COMMON),  # softvq-bl-64
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_official(src: Path):
    """``modelling.tokenizer`` of an official work tree, registered by path (see the module docstring)."""
    pkg_dir = src / "modelling"
    if not (pkg_dir / "tokenizer.py").is_file() or not (pkg_dir / "quantizers" / "softvq.py").is_file():
        raise SystemExit(f"--official-src: {pkg_dir}/tokenizer.py not found (expected a work tree of "
                         f"Hhhhhhao/continuous_tokenizer)")
    pkg = types.ModuleType("modelling")
    pkg.__path__ = [str(pkg_dir)]
    sys.modules["modelling"] = pkg
    with warnings.catch_warnings():  # "Overwriting vit_* in registry" for every timm name it re-registers
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module("modelling.tokenizer")
        except ImportError as e:
            raise SystemExit(f"cannot import the official code ({e}); it needs einops, peft, scipy, timm") from None


def build_pair(tk, cfg: dict, device: torch.device, gamma: tuple[float, float], tmp: Path, seed: int):
    """(official SoftVQModel, tok SoftVQ) with the same seeded random weights, both in eval mode on ``device``."""
    torch.manual_seed(seed)
    args = tk.ModelArgs(enc_type="vit", dec_type="vit", enc_pretrained=False, dec_pretrained=False, repa=False,
                        **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = tk.SoftVQModel(args).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in official.named_parameters():
            if name.endswith((".ls1.gamma", ".ls2.gamma")):
                p.copy_(torch.empty(p.shape).uniform_(*gamma, generator=g))
    official.save_pretrained(tmp / "official")
    convert_official(tmp / "official", None, tmp / "tok", name="softvq-speed-bench")
    ours = tokcli.load(str(tmp / "tok"), device=str(device))
    return official.to(device).eval(), ours.eval()


def attention_paths(official, ours) -> dict:
    def fused(m):
        flags = {bool(getattr(mod, "fused_attn", False)) for n, mod in m.named_modules() if n.endswith(".attn")}
        return flags.pop() if len(flags) == 1 else sorted(flags)

    return {"tok_fused_attn": fused(ours), "official_fused_attn": fused(official)}


def parity(official, ours, x: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Max |diff| of z_hat, z and the raw reconstructions; returns (row, official z, tok z)."""
    z_off, _, info = official.encode(x)
    z_tok = ours.encode(x)
    zhat_tok = ours.encode_hat(x)
    r_off, r_tok = official.decode(z_off), ours.decode(z_tok, clamp=False)
    row = {"zhat_maxdiff": (info[6].float() - zhat_tok.float()).abs().max().item(),
           "z_maxdiff": (z_off.float() - z_tok.float()).abs().max().item(),
           "recon_maxdiff": (r_off.float() - r_tok.float()).abs().max().item(),
           "recon_meandiff": (r_off.float() - r_tok.float()).abs().mean().item(),
           "z_maxabs": z_tok.abs().max().item(), "recon_maxabs": r_tok.abs().max().item()}
    return row, z_off, z_tok


def time_rounds(fns: dict, device: torch.device, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called in the dict's order every round (interleaved), after ``warmup``
    untimed calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]], batch: int) -> dict:
    """Medians, images/s, spreads and official/tok ratios of the ``time_rounds`` lists."""
    row = {}
    for key, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [med, med, med]
        row |= {f"{key}_s": med, f"{key}_img_s": batch / med, f"{key}_min_s": min(ts), f"{key}_max_s": max(ts),
                f"{key}_iqr_rel": (q[2] - q[0]) / med, f"{key}_all_s": [round(t, 5) for t in ts]}
    for part in ("encode", "decode"):
        per_round = [o / t for o, t in zip(times[f"official_{part}"], times[f"tok_{part}"])]
        row[f"{part}_ratio"] = row[f"official_{part}_s"] / row[f"tok_{part}_s"]
        row[f"{part}_ratio_rounds_min"], row[f"{part}_ratio_rounds_max"] = min(per_round), max(per_round)
    return row


def bench_config(name: str, tk, device: torch.device, batches: list[int], a) -> list[dict]:
    cfg = CONFIGS[name]
    rows = []
    with tempfile.TemporaryDirectory(prefix="softvq-speed-") as tmp:
        official, ours = build_pair(tk, cfg, device, (a.gamma_min, a.gamma_max), Path(tmp), a.seed)
    base = {"config": name, "encoder": cfg["encoder_model"], "decoder": cfg["decoder_model"],
            "tokens": cfg["num_latent_tokens"], "d": cfg["codebook_embed_dim"],
            "params_M": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2),
            "official_params_M": round(sum(p.numel() for p in official.parameters()) / 1e6, 2),
            **attention_paths(official, ours)}
    for b in batches:
        g = torch.Generator().manual_seed(a.seed + 2)
        x = (torch.rand(b, 3, cfg["image_size"], cfg["image_size"], generator=g) * 2 - 1).to(device)
        row = {**base, "batch": b}
        with torch.inference_mode():
            p, z_off, z_tok = parity(official, ours, x)
            row |= p
            row["parity_ok"] = max(p["zhat_maxdiff"], p["z_maxdiff"], p["recon_maxdiff"]) <= a.tol
            if not row["parity_ok"]:
                print(f"ERROR {name} batch {b}: outputs differ by more than --tol {a.tol}: {p}", file=sys.stderr)
            else:
                fns = {"tok_encode": lambda: ours.encode(x), "official_encode": lambda: official.encode(x),
                       "tok_decode": lambda: ours.decode(z_tok, clamp=False),
                       "official_decode": lambda: official.decode(z_off)}
                row |= summarize(time_rounds(fns, device, a.warmup, a.rounds), b)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all_s")}), file=sys.stderr, flush=True)
    del official, ours
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def _table(cols: list[str], lines: list[list]) -> None:
    table = [cols] + [[_fmt(v) for v in line] for line in lines]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    for i, t in enumerate(table):
        print("  ".join(v.rjust(w) for v, w in zip(t, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_tables(rows: list[dict]) -> None:
    """Speed (one line per configuration, batch and part), then parity."""
    lines = []
    for r in rows:
        for part in ("encode", "decode") if "tok_encode_s" in r else ():
            t, o = f"tok_{part}", f"official_{part}"
            lines.append([r["config"], r["batch"], part, r[f"{t}_img_s"], r[f"{o}_img_s"], r[f"{part}_ratio"],
                          f"{r[f'{part}_ratio_rounds_min']:.2f}-{r[f'{part}_ratio_rounds_max']:.2f}",
                          f"{r[f'{t}_min_s']:.3g}-{r[f'{t}_max_s']:.3g}", r[f"{t}_iqr_rel"],
                          f"{r[f'{o}_min_s']:.3g}-{r[f'{o}_max_s']:.3g}", r[f"{o}_iqr_rel"]])
    if lines:
        _table(["config", "batch", "part", "tok img/s", "official img/s", "ratio", "ratio/round", "tok s min-max",
                "tok IQR/med", "official s min-max", "official IQR/med"], lines)
        print("(img/s from the median of the rounds; ratio = official median s / tok median s, > 1: tok faster; "
              "ratio/round: range of the per-round ratios)\n")
    _table(["config", "batch", "params_M", "zhat_maxdiff", "z_maxdiff", "recon_maxdiff", "recon_maxabs", "parity_ok"],
           [[r["config"], r["batch"], r["params_M"], r["zhat_maxdiff"], r["z_maxdiff"], r["recon_maxdiff"],
             r["recon_maxabs"], r["parity_ok"]] for r in rows])


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official-src", type=Path, required=True,
                    help="work tree of github.com/Hhhhhhao/continuous_tokenizer (outside this repo)")
    ap.add_argument("--configs", default="s,b", help=f"comma list from {', '.join(CONFIGS)}")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds (medians of these)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each function first")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA for both (default: exact fp32)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max |diff| allowed before timing")
    ap.add_argument("--gamma-min", type=float, default=0.1, help="LayerScale gammas are redrawn in [min, max]")
    ap.add_argument("--gamma-max", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None,
                    help="result file [benchmarks/results/softvq_speed_<machine>-<date>.json]")
    a = ap.parse_args(argv)
    a.names = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [n for n in a.names if n not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {', '.join(CONFIGS)}")
    a.batches = [int(s) for s in a.batch_sizes.split(",") if s.strip()]
    if a.rounds < 1 or not a.batches:
        ap.error("--rounds and --batch-sizes must be positive")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        torch.backends.cudnn.allow_tf32 = a.tf32
    tk = load_official(a.official_src.expanduser().resolve())
    machine = machine_name(a.device)
    env = {"machine": machine, "torch": torch.__version__, "timm": importlib.import_module("timm").__version__,
           "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "tf32": a.tf32, "rounds": a.rounds, "warmup": a.warmup,
           "gamma": [a.gamma_min, a.gamma_max], "tol": a.tol, "official_src": str(a.official_src),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/softvq_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows = []
    for n in a.names:
        rows += bench_config(n, tk, device, a.batches, a)
    print(f"# {json.dumps({k: env[k] for k in ('machine', 'device', 'torch', 'timm', 'threads', 'tf32', 'rounds')})}")
    print_tables(rows)
    out = a.json or HERE / "results" / f"softvq_speed_{machine}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")
    print(f"\nwritten: {out}")
    ok = all(r["parity_ok"] for r in rows)
    if not ok:
        print("ERROR: tok and the official code disagree beyond --tol (see above); those rows are not timed",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
