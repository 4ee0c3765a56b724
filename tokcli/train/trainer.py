"""The one trainer: reconstruction + perceptual + GAN + the family's quantizer terms, EMA, exact resume, DDP.

Each step:
  1. generator: for each of grad_accum micro-batches, recon, aux = model(x) and
         loss = l1*|x-x̂| + l2*(x-x̂)^2 + perceptual*LPIPS(x, x̂) + gan*G_adv(D(x̂)) + family terms (entropy, ...)
     backward; then one Adam step (constant lr) and an EMA update of the generator's parameters;
  2. discriminator (when gan_weight > 0 and step >= disc_start): on the same micro-batches, hinge(D(x), D(x̂))
     + lecam * LeCAM; one Adam step.

Checkpoints (``<run>/checkpoints/step-XXXXXXX/``, written to a temporary folder and renamed) hold
``model.safetensors`` (raw weights), ``ema.safetensors``, ``disc.safetensors`` and ``state.pt`` (optimizers,
LeCAM EMAs, every rank's python/numpy/torch/CUDA RNG states, the step; loadable with ``weights_only=True``).
Data batches are a pure function of (seed, micro-batch, rank) (see ``data.py``), so resuming from step k continues
exactly as the uninterrupted run would have, bit for bit on CPU.

At the end the EMA weights (raw weights when ``ema_decay = 0``) are exported as a model folder in ``<run>/model``.
Distributed: launch with ``torchrun``; WORLD_SIZE > 1 turns on DDP (gloo on CPU, nccl on CUDA); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from tokcli.core.atomic import atomic_write_text
from tokcli.core.checkpoint import read_model_folder, save_model_folder
from tokcli.core.device import exact_math, resolve_device
from tokcli.core.distributed import dist_env
from tokcli.errors import TokError, TokUsageError
from tokcli.families import build_from_folder, get_family
from tokcli.losses.family import family_losses
from tokcli.losses.gan import LeCAM, NLayerDiscriminator, generator_loss, hinge_d_loss
from tokcli.losses.perceptual import load_lpips, lpips_distance
from tokcli.train.data import TrainData
from tokcli.train.ema import EMA
from tokcli.train.recipe import Recipe

CKPT_PREFIX = "step-"


def train(recipe: Recipe, *, output_dir: str | os.PathLike | None = None, max_steps: int | None = None,
          resume: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``recipe`` and export the result; see the module docstring. Returns a summary dict:

    output_dir, model_dir, checkpoint (the last one written), start_step, steps, max_steps, final_losses (the last
    step's terms), images_per_s, steps_per_s, seconds, perceptual, world_size, resumed_from.
    """
    r = recipe
    max_steps = int(max_steps or r.optim.max_steps)
    if max_steps < 1:
        raise TokUsageError(f"max_steps must be >= 1, got {max_steps}")
    rank, world, local_rank = dist_env()
    device = resolve_device(r.run.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    exact_math()
    if r.run.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    run_dir, ckpt_in = _resolve_dirs(r, output_dir, resume)
    is_main = rank == 0

    # 1. the perceptual loss first: a missing LPIPS backbone must stop us before any work is done
    perceptual = None
    if r.loss.perceptual != "none" and r.loss.perceptual_weight > 0:
        backbone = "random" if r.loss.perceptual == "lpips-vgg-random" else "pretrained"
        perceptual = load_lpips("vgg", backbone=backbone, device=device)

    # 2. data, model, discriminator, optimizers, EMA
    data = TrainData(r.data, seed=r.run.seed, rank=rank, world_size=world)
    saved = torch.load(ckpt_in / "state.pt", map_location="cpu", weights_only=True) if ckpt_in else None
    _seed_everything(r.run.seed)
    model, model_args = _build_generator(r, saved["model_args"] if saved else None)
    model.to(device)
    family = r.model.family
    extra_losses = family_losses(family)
    use_gan = r.loss.gan_weight > 0
    disc = NLayerDiscriminator(3, r.loss.disc_ndf, r.loss.disc_layers).to(device) if use_gan else None
    lecam = LeCAM(r.loss.lecam_decay)
    betas = tuple(r.optim.betas)
    opt_cls = torch.optim.AdamW if r.optim.optimizer == "adamw" else torch.optim.Adam
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TokUsageError(f"{r.source}: the model has no trainable parameter")
    opt_g = opt_cls(trainable, lr=r.optim.lr, betas=betas, weight_decay=r.optim.weight_decay)
    opt_d = opt_cls(disc.parameters(), lr=r.optim.disc_lr or r.optim.lr, betas=betas,
                    weight_decay=r.optim.weight_decay) if use_gan else None
    ema = EMA(model, r.optim.ema_decay, warmup=r.optim.ema_warmup) if r.optim.ema_decay > 0 else None
    torch.manual_seed(r.run.seed * 7919 + rank)  # per-rank stream for anything random during training
    step = 0
    if saved:
        step = _load_checkpoint(ckpt_in, saved, model, ema, disc, opt_g, opt_d, lecam, rank, world)
        if is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
    start_step = step
    if is_main:
        if not saved:  # a fresh run: no stale log lines from an earlier attempt that never reached a checkpoint
            _truncate_metrics(run_dir / "metrics.jsonl", 0)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.json", json.dumps({"source": r.source, **r.to_dict()}, indent=2) + "\n")

    g_net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    d_net = (DDP(disc, device_ids=[device.index] if device.type == "cuda" else None)
             if world > 1 and use_gan else disc)
    accum = r.optim.grad_accum
    batches = data.batches(start=step * accum)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=r.run.precision == "bf16")
    images_per_step = r.data.batch_size * accum * world

    bar = None
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=step, file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
                   desc=r.name, unit="step")
    t_start = time.perf_counter()
    t_window, n_window = time.perf_counter(), 0
    last: dict[str, float] = {}
    ckpt_out = ckpt_in
    ips = 0.0
    while step < max_steps:
        model.train()
        gan_on = use_gan and step >= r.loss.disc_start
        logs: dict[str, float] = defaultdict(float)

        # ---- generator step -------------------------------------------------------------------------------
        lr_factor = lr_multiplier(r, step)  # a pure function of the step: resuming needs no scheduler state
        for opt, base in ((opt_g, r.optim.lr), (opt_d, r.optim.disc_lr or r.optim.lr)):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = base * lr_factor
        if disc is not None:
            disc.requires_grad_(False)
        opt_g.zero_grad(set_to_none=True)
        pairs = []
        for micro in range(accum):
            x = next(batches).to(device, non_blocking=True)
            sync = micro == accum - 1 or world == 1
            with contextlib.nullcontext() if sync else g_net.no_sync():
                with autocast:
                    recon, aux = g_net(x)
                    terms = _reconstruction_terms(x, recon, r, perceptual)
                    if gan_on:
                        terms["gan_g"] = r.loss.gan_weight * generator_loss(disc(recon))
                    terms.update(extra_losses(model, x, recon, aux, r))
                    loss = sum(terms.values())
                (loss / accum).backward()
            pairs.append((x, recon.detach()))
            logs["loss"] += loss.item() / accum
            for k, v in terms.items():
                logs[k] += float(v.detach()) / accum
            for k, v in aux.items() if not r.stage2 else ():  # quantizer statistics (stage 2: frozen, none)
                if isinstance(v, torch.Tensor) and v.dim() == 0 and k not in terms:
                    logs[k] += float(v.detach()) / accum
        if r.optim.grad_clip:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(opt_g.param_groups[0]["params"],
                                                                     r.optim.grad_clip))
        opt_g.step()
        if ema is not None:
            ema.update(model, step)

        # ---- discriminator step ---------------------------------------------------------------------------
        if gan_on:
            disc.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            for micro, (x, fake) in enumerate(pairs):
                sync = micro == accum - 1 or world == 1
                with contextlib.nullcontext() if sync else d_net.no_sync():
                    with autocast:
                        real_logits, fake_logits = d_net(x), d_net(fake)
                    real_logits, fake_logits = real_logits.float(), fake_logits.float()
                    lecam.update(*_mean_over_ranks(real_logits.mean(), fake_logits.mean(), world))
                    hinge = hinge_d_loss(real_logits, fake_logits)
                    reg = lecam.penalty(real_logits, fake_logits)
                    d_loss = hinge + r.loss.lecam_weight * reg
                    (d_loss / accum).backward()
                logs["d_hinge"] += hinge.item() / accum
                logs["lecam"] += reg.item() / accum
            if r.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(disc.parameters(), r.optim.grad_clip)
            opt_d.step()
        del pairs
        step += 1

        # ---- bookkeeping ----------------------------------------------------------------------------------
        n_window += 1
        last = dict(logs)
        if step % r.run.log_every == 0 or step == max_steps:
            now = time.perf_counter()
            ips = images_per_step * n_window / max(now - t_window, 1e-9)
            t_window, n_window = now, 0
            if is_main:
                _append_jsonl(run_dir / "metrics.jsonl", {"step": step, **{k: round(v, 6) for k, v in last.items()},
                                                          "lr": r.optim.lr * lr_factor,
                                                          "images_per_s": round(ips, 3)})
        if bar is not None:
            bar.set_postfix({"loss": f"{last['loss']:.4f}", **({"l1": f"{last['l1']:.4f}"} if "l1" in last else {}),
                             "img/s": f"{ips:.1f}"}, refresh=False)
            bar.update(1)
        if is_main and r.run.sample_every and step % r.run.sample_every == 0:
            _save_samples(run_dir / "samples" / f"{CKPT_PREFIX}{step:07d}.png", x, recon)
        if step % r.run.ckpt_every == 0 or step == max_steps:
            ckpt_out = _save_checkpoint(run_dir, step, r, model, model_args, ema, disc, opt_g, opt_d, lecam, data,
                                        rank, world)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t_start
    if not last and is_main:  # resumed at max_steps: nothing ran, the log has the last step's losses
        last = _last_logged_losses(run_dir / "metrics.jsonl", step)

    # ---- export -------------------------------------------------------------------------------------------
    model_dir = run_dir / "model"
    if is_main:
        state = ema.averaged_state_dict(model) if ema is not None else model.state_dict()
        export_model, model_args = _calibrate(r, model, model_args, state, data, device)
        _export(model_dir, r, export_model, model_args, state, data, step, last, weights="ema" if ema else "raw")
    result = {
        "output_dir": str(run_dir), "model_dir": str(model_dir), "checkpoint": str(ckpt_out) if ckpt_out else None,
        "start_step": start_step, "steps": step, "max_steps": max_steps, "final_losses": last,
        "images_per_s": round(images_per_step * (step - start_step) / seconds, 3) if step > start_step else 0.0,
        "steps_per_s": round((step - start_step) / seconds, 4) if step > start_step else 0.0,
        "seconds": round(seconds, 2), "perceptual": r.loss.perceptual, "world_size": world,
        "resumed_from": str(ckpt_in) if ckpt_in else None,
    }
    if world > 1:
        dist.barrier()
        # Dropping the DDP wrappers before destroy_process_group avoids an intermittent abort at exit (gloo).
        del g_net, d_net, batches
        gc.collect()
        if own_group:
            dist.destroy_process_group()
    return result


# ------------------------------------------------------------------------------------------------------------
# schedule and losses
# ------------------------------------------------------------------------------------------------------------
def lr_multiplier(r: Recipe, step: int) -> float:
    """lr(step) / lr: linear warm-up over warmup_steps, then constant or cosine down to min_lr at max_steps."""
    o = r.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.lr_schedule == "constant":
        return 1.0
    span = max(o.max_steps - o.warmup_steps, 1)
    t = min(max(step - o.warmup_steps, 0) / span, 1.0)
    floor = o.min_lr / o.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def _reconstruction_terms(x, recon, r: Recipe, perceptual) -> dict[str, torch.Tensor]:
    lo = r.loss
    recon = recon.float()
    terms = {}
    if lo.l1_weight:
        terms["l1"] = lo.l1_weight * (x - recon).abs().mean()
    if lo.l2_weight:
        terms["l2"] = lo.l2_weight * F.mse_loss(recon, x)
    if perceptual is not None:
        terms["perceptual"] = lo.perceptual_weight * lpips_distance(perceptual, x, recon).mean()
    return terms


def _mean_over_ranks(a: torch.Tensor, b: torch.Tensor, world: int) -> tuple[float, float]:
    """Batch-mean logits averaged over ranks, so every rank's LeCAM EMAs stay identical."""
    t = torch.stack([a.detach(), b.detach()]).float()
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return float(t[0]), float(t[1])


# ------------------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------------------
def _build_generator(r: Recipe, saved_args: dict | None):
    """Stage 1: family.build(model_args). Stage 2: the stage-1 folder, extended with a generative decoder, encoder
    frozen. On resume the model is rebuilt from the checkpoint's model_args (its weights come next)."""
    fam = get_family(r.model.family)
    if saved_args is not None:
        model = fam.build(dict(saved_args))
        if r.stage2:
            model.freeze_encoder()
    elif r.stage2:
        folder = read_model_folder(r.model.init_from)
        if folder.family != r.model.family:
            raise TokUsageError(f"{r.source}: model.init_from is a {folder.family} model, the recipe trains "
                                f"{r.model.family}")
        model = build_from_folder(folder).extend_to_generative()
        model.freeze_encoder()
    elif r.model.init_from:
        # a family that adapts a pretrained base (CODA on a KL VAE) builds itself around that folder
        init_model = getattr(fam, "init_model", None)
        if init_model is None:
            raise TokUsageError(f"{r.source}: the {r.model.family} family cannot start from model.init_from "
                                f"(only generative_decoder_stage2 or families that adapt a base model can)")
        model = init_model(dict(r.model.model_args), read_model_folder(r.model.init_from))
    else:
        args = dict(r.model.model_args)
        if r.loss.entropy_mode is not None:
            if args.get("entropy_mode", r.loss.entropy_mode) != r.loss.entropy_mode:
                raise TokUsageError(f"{r.source}: loss.entropy_mode ({r.loss.entropy_mode}) contradicts "
                                    f"model.model_args.entropy_mode ({args['entropy_mode']})")
            args["entropy_mode"] = r.loss.entropy_mode
        model = fam.build(args)
    model_args = dict(getattr(model, "model_args", None) or saved_args or r.model.model_args)
    return model, model_args


# ------------------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    v, internal, gauss = s["python"]
    random.setstate((v, tuple(internal), gauss))
    n = s["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def _resolve_dirs(r: Recipe, output_dir, resume) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from or None)."""
    if resume is None:
        run_dir = Path(output_dir) if output_dir else Path("runs") / r.name
        if _checkpoints(run_dir):
            raise TokUsageError(f"{run_dir} already holds checkpoints: pass --resume {run_dir} to continue that run "
                                f"or choose another --output")
        return run_dir, None
    p = Path(resume)
    if (p / "state.pt").is_file():
        ckpt = p
        default_run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    else:
        found = _checkpoints(p)
        if not found:
            raise TokUsageError(f"--resume {p}: no checkpoint there (expected {p}/checkpoints/{CKPT_PREFIX}XXXXXXX/ "
                                f"or a checkpoint folder holding state.pt)")
        ckpt, default_run = found[-1], p
    return (Path(output_dir) if output_dir else default_run), ckpt


def _save_checkpoint(run_dir: Path, step: int, r: Recipe, model, model_args, ema, disc, opt_g, opt_d, lecam,
                     data: TrainData, rank: int, world: int) -> Path:
    from safetensors.torch import save_file

    rng = _rng_state()
    if world > 1:
        states: list = [None] * world
        dist.all_gather_object(states, rng)
    else:
        states = [rng]
    final = run_dir / "checkpoints" / f"{CKPT_PREFIX}{step:07d}"
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            save_file(_cpu(model.state_dict()), str(tmp / "model.safetensors"))
            if ema is not None:
                save_file(_cpu(ema.state_dict()), str(tmp / "ema.safetensors"))
            if disc is not None:
                save_file(_cpu(disc.state_dict()), str(tmp / "disc.safetensors"))
            torch.save({
                "step": step,
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict() if opt_d is not None else None,
                "lecam": lecam.state_dict(),
                "rng": states,
                "data": {"seed": data.seed, "next_micro_batch": step * r.optim.grad_accum, "num_images": len(data),
                         "world_size": world},
                "model_args": model_args,
                "recipe": r.to_dict(),
            }, tmp / "state.pt")
            if final.exists():  # a re-run of the same step: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if r.run.keep_checkpoints:
            for old in _checkpoints(run_dir)[:-r.run.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return final


def _cpu(sd: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _load_checkpoint(ckpt: Path, saved: dict, model, ema, disc, opt_g, opt_d, lecam, rank: int, world: int) -> int:
    from safetensors.torch import load_file

    dev = next(model.parameters()).device
    model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(dev)), strict=True)
    if ema is not None:
        if not (ckpt / "ema.safetensors").is_file():
            raise TokError(f"{ckpt} has no ema.safetensors but the recipe asks for an EMA (optim.ema_decay)")
        ema.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=str(dev)))
    if disc is not None:
        if not (ckpt / "disc.safetensors").is_file() or saved["opt_d"] is None:
            raise TokError(f"{ckpt} has no discriminator but the recipe has loss.gan_weight > 0")
        disc.load_state_dict(load_file(str(ckpt / "disc.safetensors"), device=str(dev)), strict=True)
        opt_d.load_state_dict(saved["opt_d"])
    opt_g.load_state_dict(saved["opt_g"])
    lecam.load_state_dict(saved["lecam"])
    states = saved["rng"]
    if len(states) != world:
        print(f"warning: {ckpt} was written by {len(states)} rank(s), this run has {world}; data order and random "
              f"streams will differ from an uninterrupted run", file=sys.stderr)
    _set_rng_state(states[rank if rank < len(states) else 0])
    return int(saved["step"])


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _last_logged_losses(path: Path, step: int) -> dict[str, float]:
    if not path.is_file():
        return {}
    rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = [r for r in rows if r.get("step") == step]
    return {k: float(v) for k, v in rows[-1].items() if k not in ("step", "lr", "images_per_s")} if rows else {}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they are about to be redone)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()
            and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _save_samples(dest: Path, x: torch.Tensor, recon: torch.Tensor, n: int = 8) -> None:
    """Top row: inputs; bottom row: reconstructions."""
    from tokcli.core.images import save_png, to_uint8

    a, b = to_uint8(x[:n].float()), to_uint8(recon[:n].detach().float())
    save_png(np.concatenate([np.concatenate(list(a), axis=1), np.concatenate(list(b), axis=1)], axis=0), dest)


# ------------------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------------------
_PERCEPTUAL_TEXT = {
    "lpips-vgg": "LPIPS-VGG (ImageNet VGG16 backbone + the lpips v0.1 linear heads), as in the paper",
    "lpips-vgg-random": "LPIPS-VGG with a RANDOMLY INITIALISED VGG16 backbone (no ImageNet weights were available "
                        "offline); it is a feature-matching loss, not LPIPS",
    "none": "none: no perceptual term (the recipe's explicit choice, e.g. where the ImageNet VGG16 weights that "
            "LPIPS-VGG needs are not available)",
}


def _data_summary(data: TrainData) -> dict[str, Any]:
    """Roots, image count and, when a SOURCES.json sits in a root or its parent, sources and licences."""
    used = {it.path.resolve() for it in data.items}
    licences, sources, files = Counter(), Counter(), []
    for root in data.cfg.roots:
        rp = Path(root).resolve()
        for cand in (rp / "SOURCES.json", rp.parent / "SOURCES.json"):
            if cand.is_file() and cand not in files:
                files.append(cand)
    for f in files:
        try:
            entries = json.loads(f.read_text(encoding="utf-8")).get("images", [])
        except (OSError, ValueError, AttributeError):
            continue
        for e in entries:
            if isinstance(e, dict) and (f.parent / e.get("file", "")).resolve() in used:
                licences[e.get("license", "unknown")] += 1
                sources[e.get("source", "unknown")] += 1
    out: dict[str, Any] = {"roots": list(data.cfg.roots), "num_images": len(data)}
    if files:
        out.update(sources_file=[_display_path(f) for f in files], sources=dict(sources), licenses=dict(licences))
    return out


def _display_path(p: Path) -> str:
    """p relative to the working folder when it is inside it (no machine-specific prefixes in model folders)."""
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(p)


def _calibrate(r: Recipe, model, model_args: dict, state: dict, data: TrainData, device):
    """Families whose model_args depend on the trained weights (a KL VAE's latent scale) measure them here, on the
    exported weights and the first training batches (at most 64 images; deterministic)."""
    if not hasattr(model, "calibrate"):
        return model, model_args
    fam = get_family(r.model.family)
    probe = fam.build(dict(model_args)).to(device)
    probe.load_state_dict(state, strict=True)
    probe.eval()
    n = max(1, 64 // r.data.batch_size)
    batches = data.batches(start=0)
    return probe, probe.calibrate(next(batches) for _ in range(n))


def _export(model_dir: Path, r: Recipe, model, model_args, state, data: TrainData, step: int,
            last: dict[str, float], weights: str) -> None:
    world = dist_env()[1]
    lo, o, d = r.loss, r.optim, r.data
    data_info = _data_summary(data)
    training = {
        "recipe_file": r.source, "recipe": r.to_dict(), "steps": step,
        "global_batch": d.batch_size * o.grad_accum * world, "crop_size": d.crop_size,
        "final_losses": {k: round(v, 6) for k, v in last.items()},
        "perceptual": lo.perceptual, "entropy_mode": model_args.get("entropy_mode", lo.entropy_mode),
        "stage": 2 if r.stage2 else 1, "init_from": r.model.init_from, "weights": weights,
        "ema_decay": o.ema_decay, "data": data_info,
    }
    terms = [f"{lo.l1_weight} x L1"]
    if lo.l2_weight:
        terms.append(f"{lo.l2_weight} x L2")
    if lo.perceptual != "none" and lo.perceptual_weight:
        terms.append(f"{lo.perceptual_weight} x perceptual")
    if lo.gan_weight:
        terms.append(f"{lo.gan_weight} x GAN (PatchGAN ndf {lo.disc_ndf}, {lo.disc_layers} layers, hinge + "
                     f"{lo.lecam_weight} x LeCAM, from step {lo.disc_start})")
    if r.model.family == "kl":
        terms.append(f"{lo.kl_weight} x KL")
    elif r.model.family == "coda":
        terms.append(f"{lo.vq_weight} x quantizer loss + {lo.entropy_weight} x entropy")
    elif not r.stage2:
        terms += [f"{lo.entropy_weight} x entropy ({training['entropy_mode']})",
                  f"{lo.commitment_weight} x commitment"]
    if data_info.get("licenses"):
        lic = ", ".join(f"{k} ({v})" for k, v in sorted(data_info["licenses"].items()))
        src = ", ".join(f"{k} ({v})" for k, v in sorted(data_info["sources"].items()))
        data_line = f"{data_info['num_images']} images from {', '.join(d.roots)}; sources: {src}; licences: {lic}"
    else:
        data_line = f"{data_info['num_images']} images from {', '.join(d.roots)}"
    losses = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
    ema_text = f"EMA (decay {o.ema_decay}{', warm-up (1 + t) / (10 + t)' if o.ema_warmup else ''})"
    optim_text = (f"{'AdamW' if o.optimizer == 'adamw' else 'Adam'} lr {o.lr} betas {tuple(o.betas)} weight decay "
                  f"{o.weight_decay}, {o.lr_schedule} schedule")
    if o.warmup_steps or o.lr_schedule != "constant":
        optim_text += f" (warm-up {o.warmup_steps} steps, min lr {o.min_lr})"
    card = (
        f"# {r.name}\n\nA `{r.model.family}` image tokenizer trained with `tok train` "
        f"({'stage 2, generative decoder' if r.stage2 else 'stage 1'}).\n\n"
        f"## Training data\n\n{data_line}.\nRandom crops of {d.crop_size} px (short side resized to "
        f"{d.random_resize[0]}-{d.random_resize[1]} x the crop size{', horizontal flips' if d.hflip else ''}).\n\n"
        f"## Training\n\n- recipe: `{r.source}`\n- steps: {step}, global batch {training['global_batch']}, "
        f"{optim_text}\n- loss: {' + '.join(terms)}\n"
        f"- perceptual loss: {_PERCEPTUAL_TEXT[lo.perceptual]}\n"
        f"- weights: {ema_text if weights == 'ema' else 'raw (no EMA)'}\n"
        f"- final losses: {losses or 'n/a'}\n\n"
        f"Tokens: `{json.dumps(model.spec.to_dict())}`\n\n"
        f"Load it with `tokcli.load(\"local-dir:PATH_OF_THIS_FOLDER\")`; `config.json` holds the full recipe under "
        f"`training`.\n")
    save_model_folder(
        model_dir, family=r.model.family, name=r.name, model_args=model_args, tokens=model.spec.to_dict(),
        preprocess=model.preprocess, state_dict=state, decode=getattr(model, "decode_defaults", None) or {},
        provenance={"source": "trained with tok train", "recipe": r.source, "license": r.model.license},
        card=card, extra={"training": training}, overwrite=True)
