"""Llama blocks as LlamaGen and its descendants (Open-MAGVIT2's and WeTok's GPT) build them; written here from the
architecture, with the official module names (``attention.wqkv`` / ``attention.wo``, ``feed_forward.w1/w2/w3``,
``attention_norm`` / ``ffn_norm``) so an official state dict maps onto them by prefix alone.

    h   = x + Attn(RMSNorm(x))          RMSNorm: x rsqrt(mean(x^2) + eps) w, the statistic in fp32, no bias
    out = h + FFN(RMSNorm(h))           FFN = w2(SiLU(w1 x) * w3 x), hidden = find_multiple(int(8 dim / 3), 256)

Attention: one fused ``wqkv`` whose output rows are [q (H hd) | k (Hkv hd) | v (Hkv hd)] (head h of q = rows
h hd .. (h + 1) hd - 1), RoPE on q and k, ``F.scaled_dot_product_attention`` with scale 1 / sqrt(hd) (causal),
grouped-query heads repeated, ``wo``; no biases anywhere.

2-D RoPE (``rope_2d``): head_dim / 4 frequencies f_m = base^(-2m / (hd / 2)); pairs 0 .. hd/4 - 1 of a head rotate
by row f_m and the next hd/4 pairs by column f_m, each pair being the adjacent elements (2j, 2j + 1)
(``tokcli.nn.rope``'s interleaved pairs). The table has ``cls_rows`` all-zero rows first (cos = sin = 0: q and k
are *zeroed* at the class tokens, as LlamaGen builds it), then the grid in raster order.

KV cache (:class:`KVCache`): a plain object passed to :meth:`Block.forward` (not a module, so no cache tensor ever
enters a state dict); the first call on an empty cache attends causally, later single-token calls attend to
everything cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokcli.nn.rope import apply_rope, rope_tables
from tokcli.nn.norm import RMSNorm

__all__ = ["RMSNorm", "find_multiple", "ffn_hidden", "rope_2d", "KVCache", "Attention", "FeedForward", "Block"]


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """The SwiGLU hidden size: int(2 * 4 dim / 3), times ``ffn_dim_multiplier`` (int), rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


def rope_2d(grid: int, head_dim: int, base: float = 10000.0, cls_rows: int = 1,
            device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [cls_rows + grid^2, head_dim / 2] float32: ``cls_rows`` zero rows, then grid (r, c) at row
    cls_rows + r grid + c (see the module docstring)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head_dim divisible by 4, got {head_dim}")
    r, c = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij")
    pos = torch.stack([r, c], dim=-1).reshape(-1, 2)
    cos, sin = rope_tables(pos, [head_dim // 2, head_dim // 2], base)
    zeros = torch.zeros(cls_rows, head_dim // 2, device=cos.device)
    return torch.cat([zeros, cos]), torch.cat([zeros, sin])


class KVCache:
    """Keys and values [B, Hkv, capacity, hd] of one attention layer, filled left to right."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, *, dtype=torch.float32, device=None):
        self.k = torch.zeros(batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        if self.length + n > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {self.length} + {n} > {self.k.shape[2]}")
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.length += n
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, *, attn_dropout_p: float = 0.0,
                 resid_dropout_p: float = 0.0):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"dim {dim} is not a multiple of n_head {n_head}")
        self.dim, self.n_head = dim, n_head
        self.n_kv_head = n_kv_head or n_head
        if n_head % self.n_kv_head:
            raise ValueError(f"n_head {n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        self.head_dim = dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """x [B, L, dim]; RoPE tables [L, hd / 2] for these L positions."""
        b, n, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rope(q.view(b, n, self.n_head, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, n, self.n_kv_head, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, n, self.n_kv_head, self.head_dim).transpose(1, 2)
        start, mask = 0, None
        if cache is not None:
            start = cache.length
            k, v = cache.append(k, v)
        if start and n > 1:  # a block of new queries after a filled cache: query i sees keys <= start + i
            mask = torch.arange(start + n, device=x.device)[None] <= (start + torch.arange(n, device=x.device))[:, None]
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0 and n > 1,
                                             dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, n, self.dim)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, *, ffn_dropout_p: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, dim: int, n_head: int, hidden: int, *, n_kv_head: int | None = None, norm_eps: float = 1e-5,
                 attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.0, ffn_dropout_p: float = 0.0):
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head, attn_dropout_p=attn_dropout_p,
                                   resid_dropout_p=resid_dropout_p)
        self.feed_forward = FeedForward(dim, hidden, ffn_dropout_p=ffn_dropout_p)
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return h + self.feed_forward(self.ffn_norm(h))
