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
- ``solver``: ``"euler"`` (the official sampler, the default) or ``"heun"`` (not in the official code): on the same
  grid, the Euler step is a predictor and the velocity at its end point corrects it, z <- z - dt (v(z, t_i) +
  v(z', t_{i+1})) / 2 (second order; Karras et al. 2022, Alg. 1). The last step, to t = 0, stays an Euler step: the
  velocity at t = 0 (v = z - x on a clean image) is not defined by the image, so Heun there would cost a pass for a
  value the model cannot know. Under CFG a step is guided or not as a whole, decided by its start t exactly as for
  Euler, and then *both* of its evaluations are guided (each one batched cond + uncond call): the step integrates
  one ODE, the guided one, instead of mixing two fields inside a step. ``steps`` Heun steps cost ``2 steps - 1``
  evaluations (:func:`decoder_calls` counts them).
"""

from __future__ import annotations

import ast
from typing import Callable, Sequence

import torch

from tokcli.errors import TokError, TokUsageError

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULES = ("pow_<P>", "linear")
SOLVERS = ("euler", "heun")


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


def check_options(steps=25, cfg=1.5, schedule="pow_0.25", cfg_interval=None, solver="euler") -> None:
    """Every sampler keyword's value, checked before any image is read or written (a usage error: exit 2)."""
    try:
        check_steps(steps)
        check_cfg(cfg)
        if schedule != "linear":
            _pow_exponent(schedule)
        guidance_interval(cfg_interval)
        check_solver(solver)
    except TokError as e:
        raise TokUsageError(str(e)) from None


def check_solver(solver) -> str:
    if solver not in SOLVERS:
        raise TokError(f"unknown FlowMo sampler solver {solver!r} (use {' or '.join(SOLVERS)})")
    return solver


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


def decoder_calls(steps: int, cfg: float = 1.5, cfg_interval=(0.17, 1.02), solver: str = "euler",
                  schedule: str = "pow_0.25", *, batched_cfg: bool = True) -> int:
    """Decoder calls of one decode (per batch, so per image too): ``batched_cfg=True`` counts tok's calls (a guided
    evaluation is one call on a doubled batch), ``False`` the network passes per image the way the official code
    counts them (a guided evaluation is two calls). Official 25 steps, cfg 1.5, interval (.17, 1.02): 25 / 31."""
    cfg, solver = check_cfg(cfg), check_solver(solver)
    ts, _ = time_grid(steps, schedule)
    guided = guided_steps(ts, cfg, guidance_interval(cfg_interval))
    per_eval = [1 if (batched_cfg or not g) else 2 for g in guided]
    evals = [1 if (solver == "euler" or i == len(ts) - 1) else 2 for i in range(len(ts))]
    return sum(p * e for p, e in zip(per_eval, evals))


def _guided_velocity(velocity: Velocity, z, tb, cond, null, cfg: float, guided: bool, batched: bool):
    """v at (z, t): the conditional one, or the CFG mix (one batched call, or the official two)."""
    if not guided:
        return velocity(z, tb, cond)
    if batched:
        vc, vu = velocity(torch.cat((z, z)), torch.cat((tb, tb)), torch.cat((cond, null))).chunk(2)
    else:
        vc, vu = velocity(z, tb, cond), velocity(z, tb, null)
    return vu + cfg * (vc - vu)


def sample(velocity: Velocity, z: torch.Tensor, cond: torch.Tensor, *, steps: int, cfg: float = 1.0,
           schedule: str = "pow_0.25", cfg_interval=None, batched_cfg: bool = True, solver: str = "euler",
           trajectory: list | None = None) -> torch.Tensor:
    """Integrate from the noise ``z`` [B, 3, H, W] at t = 1 to t = 0; returns the raw (unclipped) sample.

    velocity(z, t [B], cond) -> v; cond [B, L, C + 1] is ``[code, 1]``. ``batched_cfg=False`` runs the official
    two calls per guided evaluation (for comparisons). ``solver``: ``euler`` (official) or ``heun`` (module
    docstring). ``trajectory``: a list that receives z after every step."""
    cfg, solver = check_cfg(cfg), check_solver(solver)
    ts, dts = time_grid(steps, schedule)
    guided = guided_steps(ts, cfg, guidance_interval(cfg_interval))
    null = cond * 0
    b = z.shape[0]
    for i, (t, dt, g) in enumerate(zip(ts, dts, guided)):
        tb, dtd = t.to(z.device).expand(b), dt.to(z.device)
        v = _guided_velocity(velocity, z, tb, cond, null, cfg, g, batched_cfg)
        if solver == "heun" and i < len(ts) - 1:
            t_next = ts[i + 1].to(z.device).expand(b)
            v_next = _guided_velocity(velocity, z - dtd * v, t_next, cond, null, cfg, g, batched_cfg)
            v = (v + v_next) * 0.5
        z = z - dtd * v
        if trajectory is not None:
            trajectory.append(z)
    return z
