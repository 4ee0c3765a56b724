"""The training loop: one for every family and generator; what is optimised is the recipe's objective
(``tokcli/train/objective.py``: the family's ``Family.objectives``, chosen with ``model.objective``).

Each step, at learning rate ``lr * lr_multiplier(step)`` (a pure function of the step: resuming needs no
scheduler state), the loop takes ``grad_accum`` micro-batches from the data module and, for each phase the
objective lists (``phases(step)``, e.g. model then discriminator), accumulates ``loss / grad_accum`` over the
micro-batches under autocast (``run.precision = "bf16"``; DDP gradient sync on the last micro-batch only),
clips (``optim.grad_clip``) and steps that network's optimizer; after the model's phase the EMA (``optim.ema_decay``)
folds the new weights in.

Checkpoints (``checkpoints.py``) hold every network, the EMA, the optimizers, the objective's state and every
rank's RNG; batches are a pure function of (seed, micro-batch, rank) (``data.py``), so resuming from step k continues
exactly as the uninterrupted run would have, bit for bit on CPU. At the end the EMA weights (raw weights when
``ema_decay = 0``) are exported as a model folder in ``<run>/model`` (``export.py``).

Distributed: launch with ``torchrun``; WORLD_SIZE > 1 turns on DDP (gloo on CPU, nccl on CUDA, through
:func:`tokcli.core.distributed.process_group`); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tokcli.core.atomic import atomic_write_text
from tokcli.core.device import exact_math, resolve_device
from tokcli.core.distributed import process_group
from tokcli.errors import TokError, TokUsageError
from tokcli.train import checkpoints as ck
from tokcli.train.ema import EMA
from tokcli.train.export import export_run
from tokcli.train.objective import Objective
from tokcli.train.recipe import Recipe


@dataclass
class TrainState:
    """What a run holds; ``step`` = number of finished steps."""

    recipe: Recipe
    objective: Objective
    data: Any
    optimizers: dict[str, torch.optim.Optimizer]
    ema: EMA | None
    rank: int = 0
    world: int = 1
    step: int = 0
    nets: dict[str, torch.nn.Module] = field(default_factory=dict)  # as run: DDP-wrapped when distributed


def train(recipe: Recipe, *, output_dir: str | os.PathLike | None = None, max_steps: int | None = None,
          resume: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``recipe`` and export the result; see the module docstring. Returns a summary dict:

    output_dir, model_dir, checkpoint (the last one written), start_step, steps, max_steps, final_losses (the last
    step's terms), images_per_s, steps_per_s, seconds, perceptual, world_size, resumed_from.
    """
    max_steps = int(max_steps or recipe.optim.max_steps)
    if max_steps < 1:
        raise TokUsageError(f"max_steps must be >= 1, got {max_steps}")
    with process_group(resolve_device(recipe.run.device)) as (rank, world, device):
        return _train(recipe, device, rank, world, output_dir, max_steps, resume, progress)


def _train(r: Recipe, device, rank: int, world: int, output_dir, max_steps: int, resume, progress: bool) -> dict:
    exact_math()
    if r.run.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    run_dir, ckpt_in = ck.resolve_dirs(r, output_dir, resume)
    st = _setup(r, device, rank, world, ckpt_in)
    start_step = st.step
    if rank == 0:
        # resume: drop the log lines of steps after the checkpoint (they are redone); a fresh run: any stale lines
        # of an earlier attempt that never reached a checkpoint
        ck.truncate_metrics(run_dir / "metrics.jsonl", st.step)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.json", json.dumps({"source": r.source, **r.to_dict()}, indent=2) + "\n")
    last, ckpt_out, seconds = _run(st, run_dir, max_steps, progress, ckpt_in)
    model_dir = run_dir / "model"
    if rank == 0:
        model = st.objective.model
        state = st.ema.averaged_state_dict(model) if st.ema is not None else model.state_dict()
        export_run(model_dir, st, state, last, weights="ema" if st.ema is not None else "raw")
    done = st.step - start_step
    per_step = r.data.batch_size * r.optim.grad_accum * world
    result = {
        "output_dir": str(run_dir), "model_dir": str(model_dir), "checkpoint": str(ckpt_out) if ckpt_out else None,
        "start_step": start_step, "steps": st.step, "max_steps": max_steps, "final_losses": last,
        "images_per_s": round(per_step * done / seconds, 3) if done else 0.0,
        "steps_per_s": round(done / seconds, 4) if done else 0.0,
        "seconds": round(seconds, 2), "perceptual": r.loss.perceptual, "world_size": world,
        "resumed_from": str(ckpt_in) if ckpt_in else None,
    }
    if world > 1:
        dist.barrier()
        # Dropping the DDP wrappers before the process group goes avoids an intermittent abort at exit (gloo).
        st.nets.clear()
        gc.collect()
    return result


def _setup(r: Recipe, device, rank: int, world: int, ckpt_in: Path | None) -> TrainState:
    """Objective (its resources first: a missing file must stop us before any work is done), data, networks,
    optimizers, EMA, and the checkpoint's state when resuming."""
    from tokcli.core.registry import get_family

    obj: Objective = get_family(r.model.family).objective(r.model.objective)(r, device=device, world_size=world)
    obj.prepare()
    data = obj.make_data(rank, world)
    saved = ck.read_state(ckpt_in) if ckpt_in else None
    ck.seed_everything(r.run.seed)
    obj.build(saved["model_args"] if saved else None)
    optimizers = {name: obj.make_optimizer(name, net) for name, net in obj.networks.items()}
    ema = EMA(obj.model, r.optim.ema_decay, warmup=r.optim.ema_warmup) if r.optim.ema_decay > 0 else None
    torch.manual_seed(r.run.seed * 7919 + rank)  # per-rank stream for anything random during training
    st = TrainState(r, obj, data, optimizers, ema, rank=rank, world=world)
    if saved:
        st.step = ck.load_checkpoint(ckpt_in, saved, st)
    ids = [device.index] if device.type == "cuda" else None
    st.nets = {k: DDP(v, device_ids=ids) if world > 1 else v for k, v in obj.networks.items()}
    return st


def _run(st: TrainState, run_dir: Path, max_steps: int, progress: bool, ckpt_in: Path | None):
    """Steps until ``max_steps``: returns (the last step's logs, the last checkpoint, seconds)."""
    r, is_main = st.recipe, st.rank == 0
    batches = st.data.batches(start=st.step * r.optim.grad_accum)
    autocast = torch.autocast(st.objective.device.type, dtype=torch.bfloat16, enabled=r.run.precision == "bf16")
    per_step = r.data.batch_size * r.optim.grad_accum * st.world
    bar = None
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=st.step, file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
                   desc=r.name, unit="step")
    t_start = t_window = time.perf_counter()
    n_window, ips, last, ckpt_out = 0, None, {}, ckpt_in
    while st.step < max_steps:
        factor = lr_multiplier(r, st.step)
        last = train_step(st, batches, autocast, factor)
        st.step += 1
        n_window += 1
        if st.step % r.run.log_every == 0 or st.step == max_steps:
            now = time.perf_counter()
            ips = per_step * n_window / max(now - t_window, 1e-9)
            t_window, n_window = now, 0
            if is_main:
                row = {"step": st.step, **{k: round(v, 6) for k, v in last.items()}, "lr": r.optim.lr * factor,
                       "images_per_s": round(ips, 3)}
                ck.append_jsonl(run_dir / "metrics.jsonl", row)
        if bar is not None:
            bar.set_postfix(progress_postfix(last, ips), refresh=False)
            bar.update(1)
        if is_main and r.run.sample_every and st.step % r.run.sample_every == 0:
            _save_samples(run_dir / "samples" / f"{ck.CKPT_PREFIX}{st.step:07d}.png", st.objective)
        if st.step % r.run.ckpt_every == 0 or st.step == max_steps:
            ckpt_out = ck.save_checkpoint(run_dir, st)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t_start
    if not last and is_main:  # resumed at max_steps: nothing ran, the log has the last step's losses
        last = ck.last_logged_losses(run_dir / "metrics.jsonl", st.step)
    del batches
    return last, ckpt_out, seconds


def progress_postfix(last: dict[str, float], ips: float | None) -> dict[str, str]:
    """The progress bar's loss and images/s; the rate only once a log window has measured it (never a 0.0
    placeholder, e.g. right after a resume)."""
    out = {"loss": f"{last.get('loss', math.nan):.4f}"}
    if ips is not None:
        out["img/s"] = f"{ips:.1f}"
    return out


def train_step(st: TrainState, batches, autocast, lr_factor: float) -> dict[str, float]:
    """One optimisation step (every phase of the objective); returns the step's logs (micro-batch means)."""
    obj, accum = st.objective, st.recipe.optim.grad_accum
    for name, opt in st.optimizers.items():
        for group in opt.param_groups:
            group["lr"] = obj.base_lr(name) * lr_factor
    for net in obj.networks.values():
        net.train()
    micro_batches = [_to_device(next(batches), obj.device) for _ in range(accum)]
    logs: dict[str, float] = defaultdict(float)
    for phase in obj.phases(st.step):
        if phase not in st.optimizers:
            raise TokError(f"{type(obj).__name__}.phases names {phase!r}, which is not one of its networks "
                           f"({', '.join(st.optimizers)})")
        _run_phase(st, phase, micro_batches, autocast, logs)
        if phase == "model" and st.ema is not None:
            st.ema.update(obj.model, st.step)
    obj.end_step(st.step)
    return dict(logs)


def _run_phase(st: TrainState, phase: str, micro_batches: list, autocast, logs: dict[str, float]) -> None:
    obj, opt, net, accum = st.objective, st.optimizers[phase], st.nets[phase], len(micro_batches)
    opt.zero_grad(set_to_none=True)
    obj.begin_phase(phase, st.step)
    for micro, batch in enumerate(micro_batches):
        sync = micro == accum - 1 or st.world == 1
        with contextlib.nullcontext() if sync else net.no_sync():
            with autocast:
                loss, terms = obj.loss(phase, st.nets, batch, micro, st.step)
            (loss / accum).backward()
        if phase == "model":
            logs["loss"] += loss.item() / accum
        for k, v in terms.items():
            logs[k] += float(v) / accum
    clip = st.recipe.optim.grad_clip
    if clip:
        params = [p for group in opt.param_groups for p in group["params"]]
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        logs["grad_norm" if phase == "model" else f"{phase}_grad_norm"] = norm
    opt.step()


def _to_device(batch, device):
    """Tensors (alone, in dicts, lists or tuples) moved to ``device``; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


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


def _save_samples(dest: Path, obj: Objective) -> None:
    grid = obj.sample_grid()
    if grid is not None:
        from tokcli.core.images import save_png

        save_png(grid, dest)
