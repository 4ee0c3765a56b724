"""SiT's samplers on 1-D latents: the Euler ODE and the Euler-Maruyama SDE of the official ``modelling/samplers.py``
(SoftVQ-VAE release), with classifier-free guidance on an interval; written here from their maths.

- Time runs from 1 (noise) to 0 (data). ODE grid ``linspace(1, 0, S + 1)``; SDE grid ``linspace(1, 0.04, S)`` then
  0, the last step (0.04 -> 0) deterministic. S model calls either way. The state is float64, the model runs in its
  own dtype (inputs cast, outputs cast back).
- ODE: x <- x + (t_next - t) v. SDE (diffusion 2t): drift d = v - t score(v, x, t), x <- x + d dt + sqrt(2t)
  sqrt(|dt|) eps, eps ~ N(0, 1) in float64; the last step x <- x + d dt.
- Score from the velocity per ``path_type``: ``linear`` (alpha = 1 - t, sigma = t) gives (-(1 - t) v - x) / t;
  ``cosine`` (alpha = cos(pi t / 2), sigma = sin(pi t / 2)) gives -(2 / pi) cot(pi t / 2) v - x. The ODE ignores it.
- CFG at a step iff ``cfg != 1`` and ``low <= t <= high`` (t the step's start time, both bounds inclusive; the
  official code guides only for cfg > 1): one model call on ``[x; x]`` with labels ``[y; null]``, and
  v = u + cfg (c - u). The batch is doubled once (the official script doubles it a second time; same samples).
  The SDE guides the drift, which is the same thing (the drift is affine in v with weights that sum to 1).
- Noise: sample i draws its initial latent (float32 [L, d]) and then one float64 [L, d] per stochastic step from its
  own CPU generator seeded with ``seeds[i]``: independent of the batch and the device. ``noise`` replays a run:
  a tensor [N, L, d] (the initial latents) or ``{"z": [N, L, d], "steps": [S - 1, N, L, d]}`` (SDE draws too).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

from tokcli.errors import TokUsageError

SAMPLERS = ("ode", "sde")
PATH_TYPES = ("linear", "cosine")
SDE_LAST_T = 0.04


def time_grid(sampler: str, steps: int) -> torch.Tensor:
    """The float64 grid of ``steps + 1`` times from 1 to 0 (see the module docstring)."""
    if sampler == "ode":
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return torch.cat([torch.linspace(1.0, SDE_LAST_T, steps, dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64)])


def is_guided(t: float, cfg: float, interval: Sequence[float]) -> bool:
    return cfg != 1.0 and float(interval[0]) <= t <= float(interval[1])


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float, path_type: str) -> torch.Tensor:
    if path_type == "linear":
        return (-(1.0 - t) * v - x) / t
    ratio = -(2.0 / math.pi) / math.tan(math.pi * t / 2.0)  # alpha / alpha' ; the variance is 1
    return ratio * v - x


class Velocity:
    """The model as the samplers call it: float64 state -> float64 velocity, CFG applied (one doubled call)."""

    def __init__(self, model, labels: torch.Tensor, cfg: float, interval: Sequence[float],
                 on_call: Callable[[torch.Tensor, torch.Tensor], None] | None = None):
        self.model, self.y, self.cfg, self.interval, self.on_call = model, labels, float(cfg), interval, on_call
        self.null = model.null_class
        self.calls = 0
        self.dtype = next(model.parameters()).dtype

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        guided = is_guided(t, self.cfg, self.interval)
        xin, y = x, self.y
        if guided:
            xin = torch.cat([x, x])
            y = torch.cat([self.y, torch.full_like(self.y, self.null)])
        tt = torch.full((xin.shape[0],), t, dtype=torch.float64, device=x.device)
        out = self.model(xin.to(self.dtype), tt.to(self.dtype), y)
        self.calls += 1
        if self.on_call is not None:
            self.on_call(out, y)
        v = out.to(torch.float64)
        if guided:
            c, u = v.chunk(2)
            v = u + self.cfg * (c - u)
        return v


def euler_ode(velocity: Velocity, z: torch.Tensor, steps: int,
              on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    ts = time_grid("ode", steps).tolist()
    x = z.to(torch.float64)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        x = x + (t_next - t) * velocity(x, t)
        if on_step is not None:
            on_step(i, x)
    return x


def euler_maruyama(velocity: Velocity, z: torch.Tensor, steps: int, path_type: str,
                   step_noise: Callable[[int], torch.Tensor],
                   on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """``step_noise(i)`` -> the float64 N(0, 1) draw of stochastic step i (shape of the state)."""
    ts = time_grid("sde", steps).tolist()
    x = z.to(torch.float64)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t
        v = velocity(x, t)
        drift = v - 0.5 * (2.0 * t) * score_from_velocity(v, x, t, path_type)
        if i < steps - 1:
            x = x + drift * dt + math.sqrt(2.0 * t) * (step_noise(i) * math.sqrt(abs(dt)))
        else:
            x = x + dt * drift
        if on_step is not None:
            on_step(i, x)
    return x


def check_options(model, sampler: str, steps: int, cfg: float, guidance_interval, path_type: str) -> tuple:
    """The options, checked (one TokUsageError each): (sampler, steps, cfg, (low, high), path_type)."""
    if sampler not in SAMPLERS:
        raise TokUsageError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if path_type not in PATH_TYPES:
        raise TokUsageError(f"path_type must be one of {', '.join(PATH_TYPES)}, got {path_type!r}")
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise TokUsageError(f"cfg must be a number >= 0, got {cfg!r}")
    try:
        low, high = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
        raise TokUsageError(f"guidance_interval must be two numbers LOW,HIGH, got {guidance_interval!r}") from None
    if not (0.0 <= low <= high <= 1.0):
        raise TokUsageError(f"guidance_interval must satisfy 0 <= LOW <= HIGH <= 1, got {low},{high}")
    if cfg != 1.0 and model.null_class is None:
        raise TokUsageError(f"{model.name or 'this SiT'} has no null class (class_dropout_prob 0): use cfg 1")
    return sampler, int(steps), float(cfg), (low, high), path_type


def _noise_parts(noise: Any, n: int, shape: tuple[int, int], steps: int, sampler: str):
    """(initial latents or None, step draws or None) from ``noise`` (see the module docstring)."""
    if noise is None:
        return None, None
    z, st = (noise.get("z"), noise.get("steps")) if isinstance(noise, Mapping) else (noise, None)
    if z is not None:
        z = torch.as_tensor(z)
        if tuple(z.shape) != (n, *shape):
            raise TokUsageError(f"noise z must be [{n}, {shape[0]}, {shape[1]}], got {list(z.shape)}")
    if st is not None:
        st = torch.as_tensor(st)
        want = (steps - 1, n, *shape)
        if sampler != "sde":
            raise TokUsageError("step noise is for the sde sampler only")
        if tuple(st.shape) != want:
            raise TokUsageError(f"noise steps must be {list(want)}, got {list(st.shape)}")
    return z, st


def sample_latents(model, labels: torch.Tensor, *, seeds: list[int], noise: Any = None, sampler: str = "sde",
                   steps: int = 250, cfg: float = 1.75, guidance_interval=(0.0, 0.7), path_type: str = "cosine",
                   on_step=None, on_call=None) -> torch.Tensor:
    """Normalised latents [N, L, d] (float64) for ``labels`` [N] (see the module docstring)."""
    sampler, steps, cfg, interval, path_type = check_options(model, sampler, steps, cfg, guidance_interval, path_type)
    n, shape, dev = len(labels), model.latent_shape, labels.device
    z, st = _noise_parts(noise, n, shape, steps, sampler)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if z is None:
        z = torch.stack([torch.randn(shape, generator=g) for g in gens])
    velocity = Velocity(model, labels, cfg, interval, on_call)
    z = z.to(dev)
    if sampler == "ode":
        return euler_ode(velocity, z, steps, on_step)

    def step_noise(i: int) -> torch.Tensor:
        if st is not None:
            return st[i].to(device=dev, dtype=torch.float64)
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in gens]).to(dev)

    return euler_maruyama(velocity, z, steps, path_type, step_noise, on_step)
