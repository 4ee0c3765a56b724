"""Encode / decode throughput of tok's FlowMo side by side with the official model code, same weights, same process.

    python benchmarks/flowmo_speed.py --official-src /tmp/flowmo_official                     # tiny and mid, batch 1, 4
    python benchmarks/flowmo_speed.py --official-src /tmp/flowmo_official --configs tiny --rounds 3 --threads 2
    python benchmarks/flowmo_speed.py --official-src /tmp/flowmo_official --device cuda --rounds 20

``--official-src`` is a work tree of github.com/kylesargent/FlowMo (commit d15029f, as the parity fixture), kept
OUTSIDE this repository, e.g. ``mkdir -p /tmp/flowmo_official && git --git-dir=<clone>/.git archive HEAD | tar -x -C
/tmp/flowmo_official``. It needs ``mup``, ``einops`` and ``omegaconf`` (``pip install mup==1.0.0 einops omegaconf``).

Configurations (random weights; ``--steps``, ``--cfg`` default to the official 25 steps, CFG 1.5 in the interval
(.17, 1.02), schedule pow_0.25):

- ``tiny``: the parity fixture's sizes (32 px, patch 4, 16 x 6 bits, fg 3, encoder width 4 x 1 block, decoder width 2
  x 2 blocks; the official ``DIT_ZOO["dit_b_4"]`` entry patched to hidden 128, 2 heads before the build, exactly as
  the fixture generator did; restored afterwards).
- ``mid``: the released FlowMo-Lo widths (encoder hidden 768, decoder hidden 1152, 12 heads, RoPE [8, 28, 28] /
  [12, 42, 42], context_dim 18, fg 9, unpatched zoo) with **fewer blocks and a smaller image** so it fits a CPU: 64 px
  (256 image tokens), code_length 64, 1 encoder block, 2 decoder blocks (the released model: 256 px, 256 positions,
  8 + 16 blocks).

What happens per configuration:

1. The official ``flowmo.models.FlowMo`` is built from ``<src>/flowmo/configs/base.yaml`` merged with the overrides,
   with ``torch.compiler.set_stance("force_eager")`` (the official code decorates encode / decode with
   ``torch.compile``; eager is what the fixture ran) and μP base shapes set as the official ``build_model`` does (base
   and delta models on the meta device; no ``.cuda()``). Every tensor of the seeded official init gets seeded noise
   (the official init zeroes the AdaLN gates, which would make every block the identity), the state dict is saved as
   the official ``.pth`` (``model_ema_state_dict``) with the merged ``config.yaml``, converted with tok's converter
   (``tokcli.families.flowmo.convert.convert_official``) and loaded with ``tokcli.load``.
2. Parity on one seeded batch, before any timing: max |diff| of the encoder latent, equality of the LFQ ids, and max
   |diff| of the raw decoder sample given the same z0 (official ``rf_sample`` vs tok ``decode(noise=z0,
   clamp=False)``). Above ``--tol`` (or any id differs) the configuration is not timed and the script exits 1.
3. Timing under ``torch.inference_mode``: encode = images -> ids (official ``encode`` + ``_quantize``; tok
   ``encode``), decode = ids/code -> raw image (official ``rf_sample`` on ``[code, 1]`` with the null code; tok
   ``decode(noise=z0, clamp=False)`` from the ids, which also rebuilds the code). After ``--warmup`` untimed calls each,
   every one of ``--rounds`` rounds calls tok encode, official encode, tok decode, official decode in that order, so
   background load hits both sides alike. Reported: median seconds, images/s, the spread (min, max, IQR / median),
   ``ratio = official median / tok median`` (> 1: tok faster) with the range of the per-round ratios, and the decoder
   calls: tok's (a guided step is one call on a doubled batch), the official code's, and the network passes per image
   (the official count: a guided step is 2; the same for both sides).

Prints a table and writes ``benchmarks/results/flowmo_speed_<machine>-<date>.json`` (``--json`` to change it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import machine_name  # noqa: E402
from softvq_speed import _table, summarize, time_rounds  # noqa: E402

import tokcli  # noqa: E402
from tokcli.families.flowmo import sampler as fm_sampler  # noqa: E402
from tokcli.families.flowmo.convert import convert_official  # noqa: E402

CONFIGS = {
    "tiny": {"overrides": ["data.image_size=32", "model.patch_size=4", "model.mup_width=2", "model.enc_mup_width=4",
                           "model.enc_depth=1", "model.dec_depth=2", "model.code_length=16", "model.context_dim=6",
                           "model.codebook_size_for_entropy=3"],
             "zoo_patch": {"hidden_size": 128, "num_heads": 2}},
    "mid": {"overrides": ["data.image_size=64", "model.patch_size=4", "model.mup_width=6", "model.enc_mup_width=4",
                          "model.enc_depth=1", "model.dec_depth=2", "model.code_length=64", "model.context_dim=18",
                          "model.codebook_size_for_entropy=9"],
            "zoo_patch": None},
}
INTERVAL = "(.17,1.02)"


def load_official(src: Path):
    """``flowmo.models`` of an official work tree (imported by package path), compile switched to eager."""
    if not (src / "flowmo" / "models.py").is_file() or not (src / "flowmo" / "configs" / "base.yaml").is_file():
        raise SystemExit(f"--official-src: {src}/flowmo/models.py not found (expected a work tree of "
                         f"kylesargent/FlowMo)")
    torch.compiler.set_stance("force_eager")
    sys.path.insert(0, str(src))
    try:
        from flowmo import models  # type: ignore
    except ImportError as e:
        raise SystemExit(f"cannot import the official code ({e}); it needs mup, einops, omegaconf") from None
    return models


def official_config(src: Path, name: str, steps: int, cfg: float):
    from omegaconf import OmegaConf

    base = OmegaConf.load(src / "flowmo" / "configs" / "base.yaml")
    sampling = [f"eval.sampling.sample_steps={steps}", f"eval.sampling.cfg={cfg}",
                f"eval.sampling.cfg_interval='{INTERVAL}'"]
    return OmegaConf.merge(base, OmegaConf.from_dotlist(CONFIGS[name]["overrides"] + sampling))


def build_official(models, config, zoo_patch, seed: int):
    """The official FlowMo with μP base shapes (as ``build_model``, minus ``.cuda()``) and seeded noisy weights."""
    from mup import MuReadout, set_base_shapes

    saved = dict(models.DIT_ZOO["dit_b_4"])
    models.DIT_ZOO["dit_b_4"].update(zoo_patch or {})
    try:
        models.MUP_ENABLED = bool(config.model.enable_mup)
        torch.manual_seed(seed)
        model = models.FlowMo(width=config.model.mup_width, config=config)
        w = config.model.mup_width
        with torch.device("meta"):
            base = models.FlowMo(width=w, config=config)
            delta = models.FlowMo(width=w * 4 if w == 1 else 1, config=config)
        set_base_shapes(model, base, delta=delta)
    finally:
        models.DIT_ZOO["dit_b_4"].clear()
        models.DIT_ZOO["dit_b_4"].update(saved)
    mults = {float(m.width_mult()) for m in model.modules() if isinstance(m, MuReadout)}
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.scale"):
                p.copy_(torch.empty(p.shape).uniform_(1.0, 3.0, generator=g))
            elif p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[1] ** 0.5))
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), sorted(mults)


def build_pair(models, src: Path, name: str, device: torch.device, a, tmp: Path):
    from omegaconf import OmegaConf

    config = official_config(src, name, a.steps, a.cfg)
    official, mults = build_official(models, config, CONFIGS[name]["zoo_patch"], a.seed)
    sd = {k: v.detach().clone().contiguous() for k, v in official.state_dict().items()}
    torch.save({"total_steps": 0, "model_ema_state_dict": sd, "model_state_dict": sd}, tmp / "flowmo.pth")
    OmegaConf.save(config, tmp / "config.yaml")
    convert_official(tmp / "flowmo.pth", tmp / "config.yaml", tmp / "tok", name=f"flowmo-speed-{name}")
    ours = tokcli.load(str(tmp / "tok"), device=str(device))
    return official.to(device).eval(), ours.eval(), config, mults


class OfficialSide:
    """The official encode (+ LFQ) and ``rf_sample`` decode, as ``FlowMo.reconstruct`` calls them, minus autocast."""

    def __init__(self, models, model, config):
        self.models, self.model, self.s = models, model, config.eval.sampling

    def encode(self, x):
        pre = self.model.encode(x)[0]
        code, ids, _ = self.model._quantize(pre)
        return pre, code, ids

    def decode(self, code, z0):
        cond = torch.cat([code, torch.ones_like(code[..., :1])], dim=-1)
        null = cond * 0.0 if self.s.cfg != 1.0 else None
        return self.models.rf_sample(self.model, z0, cond, null_code=null, sample_steps=self.s.sample_steps,
                                     cfg=self.s.cfg, schedule=self.s.schedule)[-1]


def parity(off: OfficialSide, ours, x, z0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    pre_o, code_o, ids_o = off.encode(x)
    pre_t, ids_t = ours.encode_latent(x), ours.encode(x)
    s_o, s_t = off.decode(code_o, z0), ours.decode(ids_t, noise=z0, clamp=False)
    row = {"latent_maxdiff": (pre_o.float() - pre_t.float()).abs().max().item(),
           "ids_equal": bool(torch.equal(ids_o.reshape(-1).cpu(), ids_t.reshape(-1).cpu())),
           "sample_maxdiff": (s_o.float() - s_t.float()).abs().max().item(),
           "sample_meandiff": (s_o.float() - s_t.float()).abs().mean().item(),
           "sample_maxabs": s_t.abs().max().item(), "latent_min_abs": pre_t.abs().min().item()}
    return row, code_o, ids_t


def cost(a) -> dict:
    kw = dict(steps=a.steps, cfg=a.cfg, cfg_interval=INTERVAL, solver="euler", schedule="pow_0.25")
    return {"tok_decoder_calls": fm_sampler.decoder_calls(**kw),
            "official_decoder_calls": fm_sampler.decoder_calls(**kw, batched_cfg=False),
            "passes_per_image": fm_sampler.decoder_calls(**kw, batched_cfg=False)}


def bench_config(name: str, models, src: Path, device: torch.device, a) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="flowmo-speed-") as tmp:
        official, ours, config, mults = build_pair(models, src, name, device, a, Path(tmp))
    off = OfficialSide(models, official, config)
    m = ours.model_args
    base = {"config": name, "image_size": m["image_size"], "code_length": m["code_length"],
            "context_dim": m["context_dim"], "enc": f"{m['enc_hidden_size']}x{m['enc_depth']}",
            "dec": f"{m['dec_hidden_size']}x{m['dec_depth']}", "steps": a.steps, "cfg": a.cfg,
            "cfg_interval": INTERVAL, "schedule": "pow_0.25", "mup_width_mults": mults,
            "params_M": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2),
            "official_params_M": round(sum(p.numel() for p in official.parameters()) / 1e6, 2), **cost(a)}
    rows = []
    s = m["image_size"]
    for b in a.batches:
        g = torch.Generator().manual_seed(a.seed + 2)
        x = (torch.rand(b, 3, s, s, generator=g) * 2 - 1).to(device)
        z0 = fm_sampler.make_noise([a.seed + 3 + i for i in range(b)], (3, s, s), device)
        row = {**base, "batch": b}
        with torch.inference_mode():
            p, code_o, ids_t = parity(off, ours, x, z0)
            row |= p
            row["parity_ok"] = p["ids_equal"] and max(p["latent_maxdiff"], p["sample_maxdiff"]) <= a.tol
            if not row["parity_ok"]:
                print(f"ERROR {name} batch {b}: outputs differ beyond --tol {a.tol}: {p}", file=sys.stderr)
            else:
                fns = {"tok_encode": lambda: ours.encode(x), "official_encode": lambda: off.encode(x),
                       "tok_decode": lambda: ours.decode(ids_t, noise=z0, clamp=False),
                       "official_decode": lambda: off.decode(code_o, z0)}
                row |= summarize(time_rounds(fns, device, a.warmup, a.rounds), b)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all_s")}), file=sys.stderr, flush=True)
    del official, ours
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_tables(rows: list[dict]) -> None:
    lines = []
    for r in rows:
        for part in ("encode", "decode") if "tok_encode_s" in r else ():
            t, o = f"tok_{part}", f"official_{part}"
            calls = (f"{r['tok_decoder_calls']} / {r['official_decoder_calls']} ({r['passes_per_image']})"
                     if part == "decode" else "1 / 1")
            lines.append([r["config"], r["batch"], part, r[f"{t}_img_s"], r[f"{o}_img_s"], r[f"{part}_ratio"],
                          f"{r[f'{part}_ratio_rounds_min']:.2f}-{r[f'{part}_ratio_rounds_max']:.2f}",
                          f"{r[f'{t}_min_s']:.3g}-{r[f'{t}_max_s']:.3g}", r[f"{t}_iqr_rel"],
                          f"{r[f'{o}_min_s']:.3g}-{r[f'{o}_max_s']:.3g}", r[f"{o}_iqr_rel"], calls])
    if lines:
        _table(["config", "batch", "part", "tok img/s", "official img/s", "ratio", "ratio/round", "tok s min-max",
                "tok IQR/med", "official s min-max", "official IQR/med", "calls tok / off (passes/img)"], lines)
        print("(img/s from the median of the rounds; ratio = official median s / tok median s, > 1: tok faster; "
              "calls: decoder calls per decode, tok's guided steps are one call on 2x batch; passes/img: the "
              "official count, guided step = 2)\n")
    _table(["config", "batch", "params_M", "latent_maxdiff", "ids_equal", "sample_maxdiff", "sample_maxabs",
            "parity_ok"],
           [[r["config"], r["batch"], r["params_M"], r["latent_maxdiff"], r["ids_equal"], r["sample_maxdiff"],
             r["sample_maxabs"], r["parity_ok"]] for r in rows])


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official-src", type=Path, required=True,
                    help="work tree of github.com/kylesargent/FlowMo (outside this repo)")
    ap.add_argument("--configs", default="tiny,mid", help=f"comma list from {', '.join(CONFIGS)}")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=25, help="sampler steps (official 25)")
    ap.add_argument("--cfg", type=float, default=1.5, help="CFG scale (official 1.5), in the interval (.17, 1.02)")
    ap.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds (medians of these)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each function first")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA for both (default: exact fp32)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max |diff| allowed before timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None,
                    help="result file [benchmarks/results/flowmo_speed_<machine>-<date>.json]")
    a = ap.parse_args(argv)
    a.names = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [n for n in a.names if n not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {', '.join(CONFIGS)}")
    a.batches = [int(s) for s in a.batch_sizes.split(",") if s.strip()]
    if a.rounds < 1 or a.steps < 1 or not a.batches or min(a.batches) < 1:
        ap.error("--rounds, --steps and --batch-sizes must be positive")
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
    src = a.official_src.expanduser().resolve()
    models = load_official(src)
    machine = machine_name(a.device)
    env = {"machine": machine, "torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "tf32": a.tf32, "rounds": a.rounds, "warmup": a.warmup,
           "tol": a.tol, "official_src": str(src), "official_commit": "d15029f", "compile": "force_eager",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/flowmo_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows = []
    for n in a.names:
        rows += bench_config(n, models, src, device, a)
    print(f"# {json.dumps({k: env[k] for k in ('machine', 'device', 'torch', 'threads', 'tf32', 'rounds')})}")
    print_tables(rows)
    out = a.json or HERE / "results" / f"flowmo_speed_{machine}-{dt.date.today().isoformat()}.json"
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
