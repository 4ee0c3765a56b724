"""FlowMo's decoder sampler: Euler steps of the rectified-flow ODE from noise (t = 1) to the image (t = 0).

Convention (official code): x_t = (1 - t) x + t z, the decoder predicts v = z - x, a step is z <- z - dt v.

- ``schedule``: ``"pow_P"`` (official default ``pow_0.25``: t_k = (k / n) ** (1 / P), large steps near t = 1) or
  ``"linear"`` (t_k = k / n, every dt = 1 / n). Grids are float32, built the way the official code builds them, so
  the same steps give the same times to the last bit.
- ``cfg`` > 1 guides only the steps whose t lies in the guidance interval, given in EDM noise levels sigma
  (official ``(.17, 1.02)``) and mapped to t = sigma / (1 + sigma); ``cfg_interval="all"`` guides every step; cfg 1
  is the unguided sampler (no unconditional pass at all). A guided step runs the conditional and the unconditional
  inputs as **one** batched decoder call (the official code makes two), then v = v_u + cfg (v_c - v_u).
- The null condition is the whole ``[code, 1]`` times 0 (mask channel included), as in training's latent dropout.
"""

from __future__ import annotations

import ast
from typing import Callable, Sequence

import torch

from tokcli.errors import TokError, TokUsageError

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULES = ("pow_<P>", "linear")


def time_grid(steps: int, schedule: str = "pow_0.25") -> tuple[torch.Tensor, torch.Tensor]:
    """(ts, dts): the ``steps`` times a step starts at and its length, float32, as the official ``rf_sample``."""
    steps = check_steps(steps)
    if schedule == "linear":
        ts = torch.arange(1, steps + 1).flip(0) / steps
        return ts, torch.ones_like(ts) * (1.0 / steps)
    p = _pow_exponent(schedule)
    grid = torch.arange(0, steps + 1).flip(0) ** (1 / p) / steps ** (1 / p)
    return grid[:-1], grid[:-1] - grid[1:]


def _pow_exponent(schedule) -> float:
    if isinstance(schedule, str) and schedule.startswith("pow_"):
        try:
            p = float(schedule[4:])
        except ValueError:
            p = 0.0
        if p > 0 and p == p and p != float("inf"):
            return p
    raise TokError(f"unknown FlowMo sampler schedule {schedule!r} (use pow_P with P > 0, e.g. pow_0.25, or linear)")


def check_options(steps=25, cfg=1.5, schedule="pow_0.25", cfg_interval=None) -> None:
    """Every sampler keyword's value, checked before any image is read or written (a usage error: exit 2)."""
    try:
        check_steps(steps)
        check_cfg(cfg)
        if schedule != "linear":
            _pow_exponent(schedule)
        guidance_interval(cfg_interval)
    except TokError as e:
        raise TokUsageError(str(e)) from None


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TokError(f"FlowMo sampling steps must be a positive integer, got {steps!r}")
    return steps


def check_cfg(cfg) -> float:
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not (cfg == cfg and abs(cfg) != float("inf")):
        raise TokError(f"FlowMo cfg must be a finite number, got {cfg!r}")
    return float(cfg)


def guidance_interval(cfg_interval) -> tuple[float, float] | None:
    """An EDM sigma interval ([lo, hi], or the official string "(.17,1.02)") -> t bounds; ``"all"`` (or None, the
    official config's null) guides every step. (``decode(cfg_interval=None)`` means "the folder's default", as
    every sampler keyword; say ``"all"`` there.)"""
    if cfg_interval is None or cfg_interval == "all":
        return None
    raw = cfg_interval
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raw = None
    ok = isinstance(raw, (list, tuple)) and len(raw) == 2 and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0 for s in raw)
    if not ok:
        raise TokError(f"FlowMo cfg_interval must be two noise levels [lo, hi] >= 0 (EDM sigma) or \"all\", got "
                       f"{cfg_interval!r}")
    lo, hi = (float(s) for s in raw)
    return lo / (1 + lo), hi / (1 + hi)


def guided_steps(ts: torch.Tensor, cfg: float, interval: tuple[float, float] | None) -> list[bool]:
    """Which steps run CFG (compared on the float32 t as a Python float, as the official code)."""
    if cfg == 1.0:
        return [False] * len(ts)
    return [interval is None or interval[0] <= float(t) <= interval[1] for t in ts]


def make_noise(seeds: Sequence[int], shape: Sequence[int], device, dtype=torch.float32) -> torch.Tensor:
    """One N(0, 1) draw of ``shape`` per seed, each from its own CPU generator (so image i's noise depends only on
    its seed: not on the batch, the device or the other images), stacked to [len(seeds), *shape]."""
    draws = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(s))
        draws.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    return torch.stack(draws).to(device=device, dtype=dtype)


def sample(velocity: Velocity, z: torch.Tensor, cond: torch.Tensor, *, steps: int, cfg: float = 1.0,
           schedule: str = "pow_0.25", cfg_interval=None, batched_cfg: bool = True,
           trajectory: list | None = None) -> torch.Tensor:
    """Euler-integrate from the noise ``z`` [B, 3, H, W] at t = 1 to t = 0; returns the raw (unclipped) sample.

    velocity(z, t [B], cond) -> v; cond [B, L, C + 1] is ``[code, 1]``. ``batched_cfg=False`` runs the official
    two calls per guided step (for comparisons). ``trajectory``: a list that receives z after every step."""
    cfg = check_cfg(cfg)
    ts, dts = time_grid(steps, schedule)
    guided = guided_steps(ts, cfg, guidance_interval(cfg_interval))
    null = cond * 0
    b = z.shape[0]
    for t, dt, g in zip(ts, dts, guided):
        tb = t.to(z.device).expand(b)
        if not g:
            v = velocity(z, tb, cond)
        elif batched_cfg:
            vc, vu = velocity(torch.cat((z, z)), torch.cat((tb, tb)), torch.cat((cond, null))).chunk(2)
            v = vu + cfg * (vc - vu)
        else:
            vc, vu = velocity(z, tb, cond), velocity(z, tb, null)
            v = vu + cfg * (vc - vu)
        z = z - dt.to(z.device) * v
        if trajectory is not None:
            trajectory.append(z)
    return z
