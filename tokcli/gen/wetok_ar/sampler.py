"""KV-cache sampling of WeTok's factorised AR generator: the maths of the official ``gpt.py::sample_WeTok`` /
``sample_from_logits`` / ``top_k_top_p_filtering``, written here from it.

- The batch is ``[cond rows; null rows]`` (labels ``[y; class_num]``) when any sub-token is guided (``cfg_i != 1``),
  else the cond rows alone: doubled once. (The official code doubles iff cfg_0 > 1 and guides sub-token i iff
  cfg_i > 1; it fails for mixed settings and ignores cfg < 1, which here extrapolates towards the null class.)
- Step 0 feeds the class token (spatial KV slot 0); step n >= 1 feeds the summed embedding of position n - 1's
  sub-tokens at slot n (RoPE row n). N = block_size steps; the output of step n is the context h_n of position n.
- At every step the intra caches start empty; for i = 0..k-1 the intra transformer takes h_n (i = 0) or
  ``emb_{i-1}`` of the sub-token just drawn (RoPE row i) and ``head.{i}`` gives the logits of sub-token i, then
  - CFG per sub-token: u + (c - u) cfg_i (the cond logits as they are when cfg_i = 1);
  - ``/ temperature_i``, then top-k_i (if > 0: keep logits >= the k-th largest), then top-p_i (if < 1: drop the
    sorted entries whose cumulative probability exceeds p, shifted by one so the first crossing entry and the top-1
    stay), softmax: the official order;
  - the token is drawn and fed to both halves.
- Drawing: sample j owns a CPU generator seeded with ``seeds[j]`` that draws its float64 uniforms [N, k] up front;
  a token is the inverse CDF of the probabilities at its uniform (the first index whose normalised cumulative sum
  exceeds u, never a filtered-out token). So a result depends on neither the batch nor the device. ``top_k = 1`` is
  greedy (the argmax whatever the uniform). The official code draws with ``torch.multinomial`` from the global RNG;
  its seeded runs are replayed from their recorded tokens instead.
- ``noise`` replays a run: a float tensor [B, N, k] of uniforms in [0, 1), or an integer tensor [B, N, k] of
  tokens to force (the probabilities are still computed and reported to ``on_subtoken``).
Per-sub-token settings take one value for every sub-token or a list of k.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from tokcli.errors import TokUsageError
from tokcli.nn.llama import KVCache


def per_subtoken(name: str, value: Any, k: int) -> list:
    """One value per sub-token: a scalar repeated k times or a list of k (one TokUsageError otherwise)."""
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(vals) == 1:
        vals = vals * k
    if len(vals) != k:
        raise TokUsageError(f"{name} takes one value or {k} (one per sub-token), got {len(vals)}: {value!r}")
    return vals


def _numbers(name: str, vals: list, ok: Callable[[float], bool], what: str) -> list[float]:
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise TokUsageError(f"{name} must be {what}, got {v!r}")
    return [float(v) for v in vals]


def check_options(model, cfg, temperature, top_k, top_p) -> tuple[list[float], list[float], list[int], list[float]]:
    """(cfg, temperature, top_k, top_p), one entry per sub-token, checked (one TokUsageError each)."""
    k = model.k
    cfg = _numbers("cfg", per_subtoken("cfg", cfg, k), lambda v: v >= 0, "a number >= 0")
    temp = _numbers("temperature", per_subtoken("temperature", temperature, k), lambda v: v > 0,
                    "a number > 0 (top_k 1 is greedy)")
    top_p = _numbers("top_p", per_subtoken("top_p", top_p, k), lambda v: 0 < v <= 1, "in (0, 1]")
    ks = per_subtoken("top_k", top_k, k)
    for v in ks:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 0:
            raise TokUsageError(f"top_k must be an integer >= 0 (0 = off), got {v!r}")
    if any(c != 1.0 for c in cfg) and model.null_class is None:
        raise TokUsageError(f"{model.name or 'this generator'} has no null class (class_dropout_prob 0): use cfg 1")
    return cfg, temp, [int(v) for v in ks], top_p


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[R, V] -> the logits the official sampler takes the softmax of (-inf where filtered)."""
    x = logits / temperature
    neg = float("-inf")
    if top_k > 0:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, neg)
    if top_p < 1.0:
        srt, idx = torch.sort(x, dim=-1, descending=True)
        drop = torch.softmax(srt, dim=-1).cumsum(dim=-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), neg)
    return x


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: [R, V] probabilities, [R] uniforms -> [R] tokens (see the module docstring)."""
    cdf = probs.double().cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:]
    u = u.double().to(cdf.device)[:, None].contiguous()
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


def _replay(noise: Any, seeds: Sequence[int], shape: tuple[int, int, int], vocab: Sequence[int]):
    """(uniforms [B, N, k] float64 on the CPU or None, forced tokens [B, N, k] or None)."""
    if noise is None:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return torch.stack([torch.rand(shape[1:], generator=g, dtype=torch.float64) for g in gens]), None
    t = torch.as_tensor(noise)
    if tuple(t.shape) != shape:
        raise TokUsageError(f"noise must be [{', '.join(map(str, shape))}] (uniforms or tokens per sample, "
                            f"position and sub-token), got {list(t.shape)}")
    if t.dtype.is_floating_point:
        if bool(((t < 0) | (t >= 1)).any()):
            raise TokUsageError("noise uniforms must lie in [0, 1)")
        return t.double().cpu(), None
    bad = [i for i, v in enumerate(vocab) if bool(((t[..., i] < 0) | (t[..., i] >= v)).any())]
    if bad:
        raise TokUsageError(f"forced sub-token {bad[0]} is outside 0..{vocab[bad[0]] - 1}")
    return None, t.long()


def _through(blocks, x: torch.Tensor, cos, sin, caches: list[KVCache]) -> torch.Tensor:
    for block, cache in zip(blocks, caches):
        x = block(x, cos, sin, cache)
    return x


def _caches(model, rows: int, capacity: int, blocks, ref: torch.Tensor) -> list[KVCache]:
    a = model.model_args
    heads, hd = a["n_kv_head"] or a["n_head"], a["dim"] // a["n_head"]
    return [KVCache(rows, heads, capacity, hd, dtype=ref.dtype, device=ref.device) for _ in blocks]


def sample_tokens(model, labels: torch.Tensor, *, seeds: Sequence[int], noise: Any = None, cfg=1.0,
                  temperature=1.0, top_k=0, top_p=1.0, on_context: Callable | None = None,
                  on_subtoken: Callable | None = None, draw_fn: Callable | None = None) -> torch.Tensor:
    """Sub-tokens [B, N, k] (int64) for ``labels`` [B] (see the module docstring). ``on_context(n, h)`` sees the
    spatial output of step n (all rows); ``on_subtoken(n, i, record)`` the cond / uncond / guided logits, the
    probabilities and the tokens. ``draw_fn(probs [B, V], uniforms [B]) -> tokens [B]`` replaces the inverse-CDF
    draw (e.g. ``torch.multinomial`` with one generator for the batch: the official RNG stream)."""
    cfg, temp, topk, topp = check_options(model, cfg, temperature, top_k, top_p)
    B, N, k = len(labels), model.model_args["block_size"], model.k
    uniforms, forced = _replay(noise, seeds, (B, N, k), model.vocab_sizes)
    guided = any(c != 1.0 for c in cfg)
    y = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    dev, rows = labels.device, len(y)
    out = torch.zeros(B, N, k, dtype=torch.long, device=dev)
    x = model.class_embedding(y)
    spatial = _caches(model, rows, N, model.spatial_blocks, x)
    both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
    for n in range(N):
        if n:
            prev = both(out[:, n - 1])
            x = model.embed([prev[:, i:i + 1] for i in range(k)])
        h = _through(model.spatial_blocks, model.token_drop(x), *model.rope(slice(n, n + 1), dev), spatial)
        if on_context is not None:
            on_context(n, h)
        intra, slot = _caches(model, rows, k, model.factorized_blocks, h), h
        for i in range(k):
            if i:
                slot = model.emb(i - 1)(both(out[:, n, i - 1:i]))
            ctx = _through(model.factorized_blocks, slot, *model.rope(slice(i, i + 1), dev), intra)
            logits = model.head[i](model.norm(ctx))[:, 0]
            cond, uncond = logits.chunk(2) if guided else (logits, None)
            mixed = cond if uncond is None or cfg[i] == 1.0 else uncond + (cond - uncond) * cfg[i]
            probs = torch.softmax(filter_logits(mixed.float(), temp[i], topk[i], topp[i]), dim=-1)
            tok = forced[:, n, i].to(dev) if forced is not None else (draw_fn or draw)(probs, uniforms[:, n, i])
            out[:, n, i] = tok.to(dev)
            if on_subtoken is not None:
                on_subtoken(n, i, {"cond": cond, "uncond": uncond, "cfg": mixed, "probs": probs, "tokens": tok})
    return out
