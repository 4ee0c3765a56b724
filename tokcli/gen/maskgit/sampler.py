"""MaskGIT's iterative decoding (Chang et al. 2022, Sec. 3.2; the official ``maskgit/libml/parallel_decode.py``),
written here from the paper and that algorithm.

Start with every one of the T ids masked. At step t = 0 .. steps - 1 (r = (t + 1) / steps):

1. logits of every position from one forward pass; with CFG (``cfg != 1``) the batch is ``[cond rows; null rows]``
   (labels ``[y; num_classes]``), doubled once, and the logits are u + cfg (c - u);
2. an id is drawn at every masked position from softmax(logits) (temperature 1); known ids stay;
3. the last step keeps every drawn id. Otherwise the n_t = ``masked_after(steps, T)[t]`` positions of lowest
   confidence are masked again, confidence = log p(drawn id) + tau (1 - r) g with g ~ Gumbel(0, 1) and tau the
   ``temperature`` (MaskGIT's ``choice_temperature``, 4.5: annealed linearly to 0); already known ids have
   confidence +inf and are never re-masked.

The cosine schedule: n_t = floor(T cos(pi r / 2)), clamped as the official code does to at least 1 and at most
(the ids masked before the step) - 1, so every step reveals at least one id and one stays masked until the last.

Drawing: sample j owns a CPU generator seeded with ``seeds[j]`` that draws its float64 uniforms [2, steps, T] up
front (row 0: the id draws, by inverse CDF; row 1: the Gumbel noise, g = -log(-log u)), so a result depends on
neither the batch nor the device. ``noise`` replays a run: uniforms [B, 2, steps, T] in (0, 1).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from tokcli.errors import TokUsageError


def mask_ratio(r: float) -> float:
    """The cosine schedule gamma(r) = cos(pi r / 2): the fraction of ids still masked after a fraction r of the
    steps (training draws r ~ U(0, 1) and masks ceil(gamma(r) T) ids)."""
    return math.cos(math.pi / 2 * r)


def masked_after(steps: int, length: int) -> list[int]:
    """How many of ``length`` ids are still masked after each of ``steps`` steps (the last: 0)."""
    out, unknown = [], length
    for t in range(steps):
        if t == steps - 1:
            n = 0
        else:
            n = max(1, min(unknown - 1, math.floor(length * mask_ratio((t + 1) / steps))))
        out.append(n)
        unknown = n
    return out


def check_options(model, steps, cfg, temperature) -> tuple[int, float, float]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TokUsageError(f"steps must be a positive integer, got {steps!r}")
    for name, v in (("cfg", cfg), ("temperature", temperature)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise TokUsageError(f"{name} must be a number >= 0, got {v!r}")
    if cfg != 1 and model.null_class is None:
        raise TokUsageError(f"{model.name or 'this generator'} has no null class (class_dropout_prob 0): use cfg 1")
    return int(steps), float(cfg), float(temperature)


def guided_logits(model, ids: torch.Tensor, labels: torch.Tensor, cfg: float) -> torch.Tensor:
    """float32 logits [B, T, V]: the cond logits when ``cfg == 1``, else u + cfg (c - u) from one forward pass of
    the doubled batch ``[cond; null]``."""
    if cfg == 1:
        return model(ids, labels).float()
    both = model(torch.cat([ids, ids]), torch.cat([labels, torch.full_like(labels, model.null_class)])).float()
    cond, uncond = both.chunk(2)
    return uncond + cfg * (cond - uncond)


def _uniforms(noise: Any, seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    if noise is None:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return torch.stack([torch.rand(shape[1:], generator=g, dtype=torch.float64) for g in gens])
    t = torch.as_tensor(noise)
    if tuple(t.shape) != shape or not t.dtype.is_floating_point:
        raise TokUsageError(f"noise must be float uniforms [{', '.join(map(str, shape))}] (sample, draw / Gumbel, "
                            f"step, position), got {t.dtype} {list(t.shape)}")
    if bool(((t <= 0) | (t >= 1)).any()):
        raise TokUsageError("noise uniforms must lie in (0, 1)")
    return t.double().cpu()


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: probabilities [..., V] and uniforms [...] -> ids [...] (the first id whose normalised
    cumulative probability exceeds u)."""
    cdf = probs.double().cumsum(dim=-1)
    cdf = cdf / cdf[..., -1:]
    return torch.searchsorted(cdf, u[..., None].contiguous(), right=True)[..., 0].clamp_max(probs.shape[-1] - 1)


def sample_tokens(model, labels: torch.Tensor, *, seeds: Sequence[int], noise: Any = None, steps: int = 8,
                  cfg: float = 1.0, temperature: float = 4.5) -> torch.Tensor:
    """ids [B, T] (int64) for ``labels`` [B] (see the module docstring)."""
    steps, cfg, temperature = check_options(model, steps, cfg, temperature)
    B, T, dev = len(labels), model.seq_len, labels.device
    u = _uniforms(noise, seeds, (B, 2, steps, T)).to(dev)
    gumbel = -torch.log(-torch.log(u[:, 1]))
    schedule = masked_after(steps, T)
    ids = torch.full((B, T), model.mask_id, dtype=torch.long, device=dev)
    for t in range(steps):
        probs = torch.softmax(guided_logits(model, ids, labels, cfg).double(), dim=-1)
        unknown = ids == model.mask_id
        drawn = torch.where(unknown, draw(probs, u[:, 0, t]), ids)
        if t == steps - 1:
            return drawn
        picked = probs.gather(-1, drawn[..., None])[..., 0].clamp_min(1e-300)
        conf = picked.log() + temperature * (1 - (t + 1) / steps) * gumbel[:, t]
        conf = torch.where(unknown, conf, torch.full_like(conf, math.inf))
        remask = conf.argsort(dim=1, stable=True)[:, :schedule[t]]
        ids = drawn.scatter(1, remask, model.mask_id)
    return ids  # pragma: no cover - the loop returns at its last step
