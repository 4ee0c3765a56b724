"""Sampling speed of tok's generators: SiT against the official SoftVQ code, the WeTok AR with and without its KV
cache, MaskGIT against its step count. One process, random weights, CPU or CUDA.

    python benchmarks/gen_speed.py --official-src /tmp/softvq_official                  # all three parts
    python benchmarks/gen_speed.py --official-src /tmp/softvq_official --parts sit --sit-configs tiny --rounds 3
    python benchmarks/gen_speed.py --parts ar,maskgit --rounds 3 --threads 2
    python benchmarks/gen_speed.py --official-src /tmp/softvq_official --device cuda --rounds 10

Part ``sit``: tok vs the official SoftVQ SiT
--------------------------------------------
``--official-src`` is a work tree of github.com/Hhhhhhao/continuous_tokenizer kept OUTSIDE this repository (as for
``softvq_speed.py``; only ``modelling/sit.py`` and ``modelling/samplers.py`` are imported, by path, at run time; they
need timm and huggingface_hub). Per configuration:

1. The official ``modelling.sit.SiT`` (a ``PyTorchModelHubMixin``) is built with the released config keys
   (``vae_1d=True``, ``patch_size=1``, ``use_cfg=True``, ``decoder_hidden_size = hidden_size``) and every trainable
   tensor is re-drawn from a seeded generator as the parity fixture ``softvq-sit`` did (matrices N(0, 1/fan_in),
   adaLN matrices N(0, 0.36/fan_in), biases N(0, 0.05^2), adaLN biases N(0, 0.2^2), label table N(0, 0.8^2); the fixed
   sin-cos ``pos_embed`` is kept): with the official adaLN-Zero init every gate is 0 and every block the identity.
   It is saved with its own ``save_pretrained`` (config.json + model.safetensors, the released layout), converted
   with tok's SiT converter (``tokcli.gen.sit.convert.convert_official``) and loaded with ``tokcli.load_generator``.
2. Both sides sample from the same stored initial noise z [n, L, d] (``torch.randn`` from ``--seed``) with the
   official **Euler ODE** sampler setting of the README's generation command: ``--steps`` (250), CFG ``--cfg`` (1.75)
   on t in ``--guidance-interval`` (0, 0.7; the sampler tests the step's start time, both bounds inclusive, and
   guides only for cfg > 1), fp32 model, float64 state, no autocast (the official script's default
   ``--mixed-precision fp16`` autocast is a CUDA setting; both sides run fp32 here).
   - official: what ``inference/generate_sit.py`` does around the sampler: z2 = [z; z], y2 = [y; 1000], then
     ``samplers.euler_sampler(model, z2, y2, num_steps, heun=False, cfg_scale, guidance_low, guidance_high)``,
     ``.float().chunk(2)[0]`` (the rows kept);
   - tok: ``generator.sample(y, noise=z, sampler="ode", steps, cfg, guidance_interval)``.
   Before timing, max |diff| of the two results must be <= ``--tol`` (else that configuration is not timed and the
   script exits 1).
3. **Where the official code doubles the CFG batch twice.** ``generate_sit.py`` concatenates the batch with itself
   *before* calling the sampler (``z = torch.cat([z, z], 0)``; ``y = torch.cat([y, y_null], 0)`` with a null label
   1000 for every row), and ``euler_sampler`` doubles it again inside its step loop at every guided step
   (``model_input = torch.cat([x_cur] * 2, dim=0)``, ``y_cur = torch.cat([y, y_null], dim=0)``, where its own
   ``y_null`` has ``y.size(0)`` = 2n rows). So a guided step is one model call on 4n rows
   ([z; z; z; z] with labels [y; null; null; null]) and an unguided step one call on 2n rows ([z; z] with [y; null]);
   the sampler returns 2n rows, rows n..2n-1 being null-label samples that the script throws away. Half of the work
   never reaches an image. tok doubles once: 2n rows on a guided step, n rows otherwise. Network passes per image
   (batch rows per kept image, summed over the calls) at S steps of which G are guided: official 4 G + 2 (S - G),
   tok 2 G + (S - G); at the README's 250 steps with the interval [0, 0.7], G = 175: **850 vs 425**. The quotient is
   exactly 2 for any S and interval (whenever cfg > 1), so a run at fewer steps has the same work ratio; only the
   per-call overhead share changes. Both counts are measured with a forward hook on each model during the parity
   run, not assumed.
4. Timing interleaves tok sample / official sample for ``--rounds`` rounds after ``--warmup`` untimed calls each:
   medians, images/s, the spread and ``ratio = official median s / tok median s`` (> 1: tok faster) with the range
   of the per-round ratios.

Configurations: ``tiny`` = the parity fixture's sizes (L 16, d 8, width 64, 2 blocks, 4 heads); ``mid`` = the
released SiT-XL **width** (1152, 16 heads, MLP 4608) on ``softvq-b-64``'s latents (L 64, d 32) but **2 blocks**
instead of 28, so that 250 steps fit a CPU. ``xl`` (28 blocks, 675M) is there for a GPU.

Part ``ar``: WeTok AR with vs without the KV cache
--------------------------------------------------
tok's sampler (``tokcli.gen.wetok_ar.sampler.sample_tokens``) always uses KV caches (the spatial one across
positions, a fresh intra one per position). tok has no no-cache path, so the baseline is written here: at every
position n it reruns the model's teacher-forced ``spatial`` forward over the whole prefix (class token + the n
positions drawn so far) and keeps the last context, and for every sub-token i it reruns the teacher-forced
``intra`` forward over that position's sub-token sequence and keeps head i; CFG doubles the batch once
([y; null]) and mixes u + cfg (c - u), as the sampler does. Both decode greedily (``top_k = 1``, argmax), so they
must give the same tokens: checked first (else not timed, exit 1). Reported per block size (``--ar-lengths``, N =
positions, a square): positions/s and sub-tokens/s of both, the speed-up cached / uncached, and the spatial rows
each one computes (N vs N (N + 1) / 2 per CFG row). The model: ``--ar-config`` (random weights re-drawn from a
seeded generator; the official init zeroes the heads).

Part ``maskgit``: time per image against steps
----------------------------------------------
``tokcli.gen.maskgit.sampler.sample_tokens`` at ``--maskgit-steps`` (4, 8, 16, 32; the official default is 8) with
CFG ``--maskgit-cfg`` (one doubled forward pass per step); the step counts are interleaved in every round.
Configurations: ``tiny`` (8 x 8 ids of 256, width 128 x 2 blocks) and ``mid`` (16 x 16 ids of 1024 and width 768 /
12 heads as the official MaskGIT on ImageNet 256, but 2 blocks instead of 24). Reported: seconds and ms per step
per image, passes per image.

Prints tables and writes ``benchmarks/results/gen_speed_<machine>-<date>.json`` (``--json`` to change it; with
``--merge`` the rows are added to those already in the file: ``runs`` lists each invocation's environment and
command, and every row's ``run`` is its index there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
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
from softvq_speed import _sync, _table  # noqa: E402

import tokcli  # noqa: E402

PARTS = ("sit", "ar", "maskgit")
NULL = 1000  # the null label the official sampler and script hard-code (num_classes 1000 here)

SIT_CONFIGS = {
    "tiny": dict(input_size=16, in_channels=8, hidden_size=64, depth=2, num_heads=4),
    "mid": dict(input_size=64, in_channels=32, hidden_size=1152, depth=2, num_heads=16),
    "xl": dict(input_size=64, in_channels=32, hidden_size=1152, depth=28, num_heads=16),
}
AR_CONFIGS = {
    "small": dict(spatial_n_layer=4, factorized_n_layer=2, factorized_bits=[8, 8, 8, 8], n_head=4, dim=256,
                  class_num=1000),
    "b": dict(spatial_n_layer=12, factorized_n_layer=2, factorized_bits=[8, 8, 8, 8], n_head=12, dim=768,
              class_num=1000),
}
MASKGIT_CONFIGS = {
    "tiny": dict(token_shape=[8, 8], codebook_size=256, num_classes=1000, hidden_size=128, depth=2, num_heads=4),
    "mid": dict(token_shape=[16, 16], codebook_size=1024, num_classes=1000, hidden_size=768, depth=2, num_heads=12),
}


def spread(ts: list[float], per: float = 1.0) -> dict:
    """Median seconds, min, max and IQR / median of one function's round times; ``per``: items per call."""
    med = statistics.median(ts)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [med, med, med]
    return {"s": med, "per_s": per / med, "min_s": min(ts), "max_s": max(ts), "iqr_rel": (q[2] - q[0]) / med,
            "all_s": [round(t, 5) for t in ts]}


def time_interleaved(fns: dict, device: torch.device, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called in the dict's order every round, after ``warmup`` calls each."""
    with torch.inference_mode():
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


def ratio_stats(num: list[float], den: list[float]) -> dict:
    per_round = [a / b for a, b in zip(num, den)]
    return {"ratio": statistics.median(num) / statistics.median(den), "ratio_rounds_min": min(per_round),
            "ratio_rounds_max": max(per_round)}


def count_rows(model, store: list) -> object:
    """A forward pre-hook that records the batch size of every call (the first positional input)."""
    return model.register_forward_pre_hook(lambda m, args: store.append(int(args[0].shape[0])))


# --- part 1: SiT -------------------------------------------------------------------------------------------------
def load_official_sit(src: Path):
    """(``modelling.sit``, ``modelling.samplers``) of an official work tree, registered by path."""
    pkg_dir = src / "modelling"
    if not (pkg_dir / "sit.py").is_file() or not (pkg_dir / "samplers.py").is_file():
        raise SystemExit(f"--official-src: {pkg_dir}/sit.py or samplers.py not found (expected a work tree of "
                         f"Hhhhhhao/continuous_tokenizer)")
    if "modelling" not in sys.modules:
        pkg = types.ModuleType("modelling")
        pkg.__path__ = [str(pkg_dir)]
        sys.modules["modelling"] = pkg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module("modelling.sit"), importlib.import_module("modelling.samplers")
        except ImportError as e:
            raise SystemExit(f"cannot import the official SiT ({e}); it needs timm and huggingface_hub") from None


def build_sit_pair(sit_mod, cfg: dict, device: torch.device, tmp: Path, seed: int):
    """(official SiT, tok SiT generator) with the same seeded random weights (see the module docstring)."""
    torch.manual_seed(seed)
    official = sit_mod.SiT(input_size=cfg["input_size"], patch_size=1, in_channels=cfg["in_channels"],
                           hidden_size=cfg["hidden_size"], decoder_hidden_size=cfg["hidden_size"],
                           depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=4.0, class_dropout_prob=0.1,
                           num_classes=1000, use_cfg=True, vae_1d=True, qk_norm=False, path_type="edm").eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in official.named_parameters():
            if not p.requires_grad:  # pos_embed: the fixed sin-cos table, kept as released
                continue
            ada = "adaLN_modulation" in name
            if "embedding_table" in name:
                std = 0.8
            elif p.dim() >= 2:
                std = (0.36 if ada else 1.0) ** 0.5 / p.shape[1] ** 0.5
            else:
                std = 0.2 if ada else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * std)
    official.save_pretrained(tmp / "official")
    from tokcli.gen.sit.convert import convert_official

    convert_official(tmp / "official", None, tmp / "tok", name="sit-speed-bench")
    ours = tokcli.load_generator(str(tmp / "tok"), device=str(device))
    return official.to(device).eval(), ours


class SiTSides:
    def __init__(self, samplers, official, ours, z, y, a):
        self.samplers, self.official, self.ours, self.z, self.y, self.a = samplers, official, ours, z, y, a

    def official_sample(self) -> torch.Tensor:
        """As ``generate_sit.py`` (ODE mode): the script's doubling, the official sampler, the kept half."""
        n = len(self.y)
        z2 = torch.cat([self.z, self.z], 0)
        y2 = torch.cat([self.y, torch.full((n,), NULL, dtype=self.y.dtype, device=self.y.device)], 0)
        lo, hi = self.a.interval
        out = self.samplers.euler_sampler(model=self.official, latents=z2, y=y2, num_steps=self.a.steps, heun=False,
                                          cfg_scale=self.a.cfg, guidance_low=lo, guidance_high=hi,
                                          path_type="cosine")
        return out.to(torch.float32).chunk(2, dim=0)[0]

    def tok_sample(self) -> torch.Tensor:
        return self.ours.sample(self.y, noise=self.z, sampler="ode", steps=self.a.steps, cfg=self.a.cfg,
                                guidance_interval=list(self.a.interval), path_type="cosine")


def bench_sit(name: str, mods, device: torch.device, a) -> list[dict]:
    sit_mod, samplers = mods
    cfg = SIT_CONFIGS[name]
    with tempfile.TemporaryDirectory(prefix="gen-speed-sit-") as tmp:
        official, ours = build_sit_pair(sit_mod, cfg, device, Path(tmp), a.seed)
    from tokcli.gen.sit.sampler import is_guided, time_grid

    ts = time_grid("ode", a.steps).tolist()[:-1]
    guided = sum(is_guided(t, a.cfg, a.interval) and a.cfg > 1 for t in ts)
    base = {"part": "sit", "config": name, **cfg, "steps": a.steps, "cfg": a.cfg, "guidance_interval": a.interval,
            "sampler": "ode (euler)", "guided_steps": guided,
            "params_M": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2),
            "official_params_M": round(sum(p.numel() for p in official.parameters()) / 1e6, 2),
            "expected_passes_per_image": {"official": 4 * guided + 2 * (a.steps - guided),
                                          "tok": 2 * guided + (a.steps - guided)}}
    rows = []
    for b in a.sit_batches:
        g = torch.Generator().manual_seed(a.seed + 2)
        z = torch.randn(b, cfg["input_size"], cfg["in_channels"], generator=g).to(device)
        y = torch.randint(0, 1000, (b,), generator=g).to(device)
        sides = SiTSides(samplers, official, ours, z, y, a)
        row = {**base, "batch": b}
        off_rows, tok_rows = [], []
        hooks = [count_rows(official, off_rows), count_rows(ours, tok_rows)]
        with torch.inference_mode():
            s_o, s_t = sides.official_sample(), sides.tok_sample()
        for h in hooks:
            h.remove()
        diff = (s_o.double() - s_t.double()).abs()
        row |= {"maxdiff": diff.max().item(), "meandiff": diff.mean().item(), "maxabs": s_t.abs().max().item(),
                "official_calls": len(off_rows), "tok_calls": len(tok_rows),
                "official_passes_per_image": sum(off_rows) / b, "tok_passes_per_image": sum(tok_rows) / b,
                "official_max_call_rows": max(off_rows), "tok_max_call_rows": max(tok_rows)}
        row["parity_ok"] = bool(row["maxdiff"] <= a.tol)
        if not row["parity_ok"]:
            print(f"ERROR sit {name} batch {b}: max |diff| {row['maxdiff']:.3g} > --tol {a.tol}", file=sys.stderr)
        else:
            t = time_interleaved({"tok": sides.tok_sample, "official": sides.official_sample}, device, a.warmup,
                                 a.rounds)
            for k in ("tok", "official"):
                row |= {f"{k}_{m}": v for m, v in spread(t[k], b).items()}
                row[f"{k}_img_s"] = row.pop(f"{k}_per_s")
            row |= ratio_stats(t["official"], t["tok"])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("all_s")}), file=sys.stderr, flush=True)
    return rows


# --- part 2: WeTok AR ---------------------------------------------------------------------------------------------
def build_ar(cfg: dict, length: int, device: torch.device, seed: int):
    from tokcli.gen.wetok_ar.model import WeTokAR

    torch.manual_seed(seed)
    m = WeTokAR(block_size=length, **cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the official init zeroes the heads: re-draw everything
        for p in m.parameters():
            std = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * std + (p.dim() == 1))
    return m.to(device).eval()


def ar_no_cache(model, labels: torch.Tensor, cfg: float) -> torch.Tensor:
    """Greedy sub-tokens [B, N, k] without any cache: the teacher-forced forwards rerun on the whole prefix."""
    guided = cfg != 1.0
    y = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    B, N, k = len(labels), model.model_args["block_size"], model.k
    out = torch.zeros(B, N, k, dtype=torch.long, device=labels.device)
    both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
    for n in range(N):
        # spatial() drops its last input position, so position n here is only a placeholder: h[:, n] is the
        # context of position n from the class token and positions 0..n-1
        h = model.spatial([both(out[:, :n + 1, i]) for i in range(k)], y)[:, n:n + 1]
        for i in range(k):
            logits = model.intra(h, [both(out[:, n:n + 1, j]) for j in range(k)])[i][:, 0]  # slots > i: causal
            if guided:
                c, u = logits.chunk(2)
                logits = u + (c - u) * cfg
            out[:, n, i] = logits.float().argmax(-1)
    return out


def bench_ar(length: int, device: torch.device, a) -> dict:
    from tokcli.gen.wetok_ar.sampler import sample_tokens

    if math.isqrt(length) ** 2 != length:
        raise SystemExit(f"--ar-lengths: {length} is not a square (a grid x grid image)")
    cfg = AR_CONFIGS[a.ar_config]
    model = build_ar(cfg, length, device, a.seed)
    g = torch.Generator().manual_seed(a.seed + 2)
    labels = torch.randint(0, cfg["class_num"], (a.ar_batch,), generator=g).to(device)
    seeds = list(range(a.ar_batch))

    def cached():
        return sample_tokens(model, labels, seeds=seeds, cfg=a.ar_cfg, top_k=1)

    def uncached():
        return ar_no_cache(model, labels, a.ar_cfg)

    row = {"part": "ar", "config": a.ar_config, **cfg, "block_size": length, "batch": a.ar_batch, "cfg": a.ar_cfg,
           "greedy": True, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "cfg_rows": 2 if a.ar_cfg != 1.0 else 1, "spatial_rows_cached": length,
           "spatial_rows_uncached": length * (length + 1) // 2}
    with torch.inference_mode():
        t_c, t_u = cached(), uncached()
    same = t_c == t_u
    row |= {"tokens_equal": bool(same.all()), "tokens_equal_share": same.float().mean().item()}
    if not row["tokens_equal"]:
        first = same.reshape(a.ar_batch, -1).all(0).logical_not().nonzero()
        row["first_mismatch_subtoken"] = int(first[0]) if len(first) else None
        print(f"ERROR ar N={length}: cached and uncached greedy tokens differ ({row['tokens_equal_share']:.4f} "
              f"equal)", file=sys.stderr)
    else:
        t = time_interleaved({"cached": cached, "uncached": uncached}, device, a.warmup, a.rounds)
        pos = a.ar_batch * length
        for k in ("cached", "uncached"):
            row |= {f"{k}_{m}": v for m, v in spread(t[k], pos).items()}
            row[f"{k}_pos_s"] = row.pop(f"{k}_per_s")
            row[f"{k}_subtok_s"] = row[f"{k}_pos_s"] * model.k
        r = ratio_stats(t["uncached"], t["cached"])
        row |= {"speedup": r["ratio"], "speedup_rounds_min": r["ratio_rounds_min"],
                "speedup_rounds_max": r["ratio_rounds_max"]}
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("all_s")}), file=sys.stderr, flush=True)
    del model
    return row


# --- part 3: MaskGIT ----------------------------------------------------------------------------------------------
def bench_maskgit(name: str, device: torch.device, a) -> dict:
    from tokcli.gen.maskgit.model import MaskGIT
    from tokcli.gen.maskgit.sampler import sample_tokens

    cfg = MASKGIT_CONFIGS[name]
    torch.manual_seed(a.seed)
    model = MaskGIT(**cfg)
    g = torch.Generator().manual_seed(a.seed + 1)
    with torch.no_grad():  # a random head (timm's init would leave the logits nearly flat)
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g) * 2 / cfg["hidden_size"] ** 0.5)
    model = model.to(device).eval()
    labels = torch.randint(0, cfg["num_classes"], (a.maskgit_batch,), generator=g).to(device)
    seeds = list(range(a.maskgit_batch))
    fns = {s: (lambda s=s: sample_tokens(model, labels, seeds=seeds, steps=s, cfg=a.maskgit_cfg))
           for s in a.maskgit_steps}
    calls: list = []
    h = count_rows(model, calls)
    with torch.inference_mode():
        ids = fns[a.maskgit_steps[0]]()
    h.remove()
    ok = bool((ids >= 0).all() and (ids < cfg["codebook_size"]).all())
    row = {"part": "maskgit", "config": name, **cfg, "tokens": model.seq_len, "batch": a.maskgit_batch,
           "cfg": a.maskgit_cfg, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "ids_valid": ok, "passes_per_step_per_image": sum(calls) / len(calls) / a.maskgit_batch}
    t = time_interleaved(fns, device, a.warmup, a.rounds)
    row["steps"] = {}
    for s in a.maskgit_steps:
        st = spread(t[s], a.maskgit_batch)
        row["steps"][str(s)] = {**st, "s_per_image": st["s"] / a.maskgit_batch,
                                "ms_per_step_per_image": 1e3 * st["s"] / a.maskgit_batch / s,
                                "passes_per_image": s * row["passes_per_step_per_image"]}
    print(json.dumps({k: v for k, v in row.items() if k != "steps"}), file=sys.stderr, flush=True)
    del model
    return row


# --- output ---------------------------------------------------------------------------------------------------------
def print_tables(sit: list[dict], ar: list[dict], mg: list[dict]) -> None:
    if sit:
        print("## SiT: tok vs official (Euler ODE)\n")
        _table(["config", "batch", "steps", "cfg", "max diff", "max |x|", "tok img/s", "official img/s", "ratio",
                "ratio/round", "tok IQR/med", "off IQR/med", "passes/img tok", "passes/img off", "parity"],
               [[r["config"], r["batch"], r["steps"], r["cfg"], r["maxdiff"], r["maxabs"], r.get("tok_img_s"),
                 r.get("official_img_s"), r.get("ratio"),
                 f"{r['ratio_rounds_min']:.2f}-{r['ratio_rounds_max']:.2f}" if "ratio" in r else "",
                 r.get("tok_iqr_rel"), r.get("official_iqr_rel"), r["tok_passes_per_image"],
                 r["official_passes_per_image"], r["parity_ok"]] for r in sit])
        print("(ratio = official median s / tok median s, > 1: tok faster; passes/img: batch rows per kept image, "
              "summed over the model calls, counted with a forward hook)\n")
    if ar:
        print("## WeTok AR: KV cache vs recomputing the prefix (greedy)\n")
        _table(["config", "N", "k", "batch", "cfg", "tokens equal", "cached pos/s", "uncached pos/s", "speed-up",
                "speed-up/round", "cached IQR/med", "uncached IQR/med"],
               [[r["config"], r["block_size"], len(r["factorized_bits"]), r["batch"], r["cfg"], r["tokens_equal"],
                 r.get("cached_pos_s"), r.get("uncached_pos_s"), r.get("speedup"),
                 f"{r['speedup_rounds_min']:.2f}-{r['speedup_rounds_max']:.2f}" if "speedup" in r else "",
                 r.get("cached_iqr_rel"), r.get("uncached_iqr_rel")] for r in ar])
        print("(pos/s: grid positions per second, each k sub-tokens; speed-up = uncached median s / cached median s)\n")
    if mg:
        print("## MaskGIT: time per image vs steps\n")
        lines = []
        for r in mg:
            for s, v in r["steps"].items():
                lines.append([r["config"], r["tokens"], r["params_M"], r["batch"], r["cfg"], s, v["passes_per_image"],
                              v["s_per_image"], v["ms_per_step_per_image"], f"{v['min_s']:.3g}-{v['max_s']:.3g}",
                              v["iqr_rel"]])
        _table(["config", "tokens", "params_M", "batch", "cfg", "steps", "passes/img", "s/img", "ms/step/img",
                "s min-max", "IQR/med"], lines)
        print()


def _floats(text: str, n: int | None = None) -> list[float]:
    vals = [float(s) for s in text.split(",") if s.strip()]
    if n is not None and len(vals) != n:
        raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
    return vals


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="sit,ar,maskgit", help=f"comma list from {', '.join(PARTS)}")
    ap.add_argument("--official-src", type=Path, default=None,
                    help="work tree of github.com/Hhhhhhao/continuous_tokenizer (outside this repo); part sit")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds (medians of these)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each function first")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (default: exact fp32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None,
                    help="result file [benchmarks/results/gen_speed_<machine>-<date>.json]")
    ap.add_argument("--merge", action="store_true",
                    help="add this run's rows to the result file instead of replacing it (several short runs)")
    g = ap.add_argument_group("sit")
    g.add_argument("--sit-configs", default="tiny,mid", help=f"comma list from {', '.join(SIT_CONFIGS)}")
    g.add_argument("--sit-batch-sizes", default="1", help="images per sample call (comma list)")
    g.add_argument("--steps", type=int, default=250, help="Euler ODE steps (the official README: 250)")
    g.add_argument("--cfg", type=float, default=1.75, help="CFG scale (the official README: 1.75)")
    g.add_argument("--guidance-interval", default="0,0.7", help="LOW,HIGH (the official README: 0, 0.7)")
    g.add_argument("--tol", type=float, default=1e-4, help="max |diff| of the samples allowed before timing")
    g = ap.add_argument_group("ar")
    g.add_argument("--ar-config", default="small", choices=list(AR_CONFIGS))
    g.add_argument("--ar-lengths", default="64,256", help="block sizes N (squares), comma list")
    g.add_argument("--ar-batch", type=int, default=1)
    g.add_argument("--ar-cfg", type=float, default=1.75, help="CFG on every sub-token (1: no doubling)")
    g = ap.add_argument_group("maskgit")
    g.add_argument("--maskgit-configs", default="tiny,mid", help=f"comma list from {', '.join(MASKGIT_CONFIGS)}")
    g.add_argument("--maskgit-steps", default="4,8,16,32")
    g.add_argument("--maskgit-batch", type=int, default=1)
    g.add_argument("--maskgit-cfg", type=float, default=2.0, help="CFG scale (tok's default for a guided model)")
    a = ap.parse_args(argv)
    a.parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    if not a.parts or any(p not in PARTS for p in a.parts):
        ap.error(f"--parts: choose from {', '.join(PARTS)}")
    a.sit_names = [c.strip() for c in a.sit_configs.split(",") if c.strip()]
    a.mg_names = [c.strip() for c in a.maskgit_configs.split(",") if c.strip()]
    for names, table, opt in ((a.sit_names, SIT_CONFIGS, "--sit-configs"), (a.mg_names, MASKGIT_CONFIGS,
                                                                             "--maskgit-configs")):
        bad = [n for n in names if n not in table]
        if bad:
            ap.error(f"{opt}: unknown {bad}; choose from {', '.join(table)}")
    try:
        a.interval = tuple(_floats(a.guidance_interval, 2))
        a.sit_batches = [int(s) for s in a.sit_batch_sizes.split(",") if s.strip()]
        a.ar_lengths = [int(s) for s in a.ar_lengths.split(",") if s.strip()]
        a.maskgit_steps = [int(s) for s in a.maskgit_steps.split(",") if s.strip()]
    except (ValueError, argparse.ArgumentTypeError) as e:
        ap.error(str(e))
    if min([a.rounds, a.steps, a.ar_batch, a.maskgit_batch, *a.sit_batches, *a.ar_lengths, *a.maskgit_steps]) < 1:
        ap.error("--rounds, --steps, batch sizes, lengths and step counts must be positive")
    if "sit" in a.parts and a.official_src is None:
        ap.error("part sit needs --official-src (a work tree of Hhhhhhao/continuous_tokenizer)")
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
    machine = machine_name(a.device)
    env = {"machine": machine, "torch": torch.__version__, "timm": importlib.import_module("timm").__version__,
           "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "tf32": a.tf32, "rounds": a.rounds, "warmup": a.warmup,
           "parts": a.parts, "official_src": str(a.official_src) if a.official_src else None,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/gen_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    sit, ar, mg = [], [], []
    if "sit" in a.parts:
        mods = load_official_sit(a.official_src.expanduser().resolve())
        for n in a.sit_names:
            sit += bench_sit(n, mods, device, a)
    if "ar" in a.parts:
        ar = [bench_ar(n, device, a) for n in a.ar_lengths]
    if "maskgit" in a.parts:
        mg = [bench_maskgit(n, device, a) for n in a.mg_names]
    print(f"# {json.dumps({k: env[k] for k in ('machine', 'device', 'torch', 'threads', 'tf32', 'rounds')})}")
    print_tables(sit, ar, mg)
    out = a.json or HERE / "results" / f"gen_speed_{machine}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"runs": [], "sit": [], "ar": [], "maskgit": []}
    if a.merge and out.is_file():  # keep the rows of earlier runs (each row's "run" indexes "runs")
        old = json.loads(out.read_text())
        data = {k: list(old.get(k, [])) for k in data}
    for r in sit + ar + mg:
        r["run"] = len(data["runs"])
    data["runs"].append(env)
    data["sit"] += sit
    data["ar"] += ar
    data["maskgit"] += mg
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwritten: {out}")
    ok = all(r["parity_ok"] for r in sit) and all(r["tokens_equal"] for r in ar) and all(r["ids_valid"] for r in mg)
    if not ok:
        print("ERROR: a parity check failed (see above); those rows are not timed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
