"""Codebook usage, perplexity and bits per pixel.

Usage is the fraction of the ``codebook_size`` codes that occur at least once; perplexity is exp(H) of the
empirical code distribution (H in nats), so it runs from 1 (one code) to codebook_size (all codes equally often).
For group-wise quantizers (WeTok: [N, h, w, g] indices, each in its own 2^d' codebook) the figures are given
per group and pooled over groups, the pooled one being what the WeTok paper reports as "codebook usage".

Bits per pixel:
- ``token_bpp``: the information the tokens carry, log2(codebook_size) per index, 1 per bit, the stored width
  per latent value, over the pixels of the image;
- ``file_bpp``: the bytes of the token file actually written (keys, header and container included) x 8 over
  the pixels of all images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tokcli.metrics.base import Batch, Metric


def _stats(counts: np.ndarray) -> dict[str, Any]:
    total = int(counts.sum())
    used = int((counts > 0).sum())
    if total:
        p = counts[counts > 0] / total
        entropy = float(-(p * np.log(p)).sum())
    else:
        entropy = 0.0
    return {
        "tokens": total,
        "used": used,
        "usage": used / len(counts),
        "entropy_bits": entropy / math.log(2),
        "perplexity": math.exp(entropy),
    }


class UsageCounter:
    """Accumulates code histograms batch by batch (for sets too large to hold at once).

    ``group_axis``: the axis of ``indices`` that holds groups with separate codebooks (WeTok: -1), or None
    when all indices share one codebook.
    """

    def __init__(self, codebook_size: int, group_axis: int | None = None):
        if codebook_size <= 0:
            raise ValueError("codebook_size must be positive")
        self.codebook_size = int(codebook_size)
        self.group_axis = group_axis
        self.counts: np.ndarray | None = None  # [groups, codebook_size] int64

    def update(self, indices) -> None:
        idx = np.asarray(indices)
        if idx.dtype.kind not in "ui":
            raise TypeError(f"indices must be integers, got {idx.dtype}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), found "
                             f"{int(idx.min())}..{int(idx.max())}")
        flat = idx.reshape(1, -1) if self.group_axis is None else np.moveaxis(idx, self.group_axis, 0)
        flat = flat.reshape(flat.shape[0], -1).astype(np.int64)
        g, k = flat.shape
        # One bincount for all groups: offset group j's codes by j * codebook_size.
        offsets = (np.arange(g, dtype=np.int64) * self.codebook_size)[:, None]
        counts = np.bincount((flat + offsets).ravel(), minlength=g * self.codebook_size)
        counts = counts.reshape(g, self.codebook_size)
        if self.counts is None:
            self.counts = counts
        elif self.counts.shape != counts.shape:
            raise ValueError(f"got {g} groups, earlier batches had {self.counts.shape[0]}")
        else:
            self.counts += counts

    def result(self) -> dict[str, Any]:
        counts = self.counts if self.counts is not None else np.zeros((1, self.codebook_size), np.int64)
        out = {"codebook_size": self.codebook_size, **_stats(counts.sum(axis=0))}
        if self.group_axis is not None:
            out["groups"] = [_stats(c) for c in counts]
        return out


def codebook_usage(indices, codebook_size: int, *, group_axis: int | None = None) -> dict[str, Any]:
    """Usage and perplexity of ``indices`` (any shape): pooled figures at the top level (codebook_size,
    tokens, used, usage, entropy_bits, perplexity), plus a per-group list under "groups" when
    ``group_axis`` is given."""
    counter = UsageCounter(codebook_size, group_axis)
    counter.update(indices)
    return counter.result()


def token_bits_per_image(kind: str, shape, *, codebook_size: int | None = None,
                         latent_bits: int = 16) -> float:
    """Bits the tokens of one image carry: indices log2(codebook_size) each; bits 1 each (``shape`` is the
    unpacked shape); latents ``latent_bits`` per value (16 for float16, 32 for float32)."""
    n = math.prod(int(s) for s in shape)
    if kind == "indices":
        if not codebook_size:
            raise ValueError("indices need a codebook_size")
        return n * math.log2(codebook_size)
    if kind == "bits":
        return float(n)
    if kind == "latents":
        return float(n * latent_bits)
    raise ValueError(f"unknown token kind {kind!r}")


def bits_per_pixel(total_bits: float, n_images: int, height: int, width: int) -> float:
    """total_bits / (n_images * height * width)."""
    pixels = n_images * height * width
    if pixels <= 0:
        raise ValueError("bits per pixel needs at least one pixel")
    return float(total_bits) / pixels


def bpp_report(token_file, height: int, width: int, *, file_bytes: int | None = None) -> dict[str, float]:
    """``token_bpp`` (and ``file_bpp`` when ``file_bytes`` is given) for a tokens.TokenFile whose images
    were ``height`` x ``width``."""
    spec = token_file.spec
    latent_bits = token_file.array.dtype.itemsize * 8 if token_file.kind == "latents" else 16
    per_image = token_bits_per_image(token_file.kind, token_file.shape, codebook_size=spec.get("codebook_size"),
                                     latent_bits=latent_bits)
    out = {"token_bits_per_image": per_image, "token_bpp": bits_per_pixel(per_image, 1, height, width)}
    if file_bytes is not None and len(token_file):
        out["file_bpp"] = bits_per_pixel(8 * file_bytes, len(token_file), height, width)
    return out


# ------------------------------------------------------------------------------------------- bench metric objects

JOINT_MAX = 1 << 20  # joint-code usage is counted when the joint codebook has at most this many entries


def spec_groups(spec) -> int | None:
    """The number of separately quantized groups the token spec declares (``extra["groups"]``, the last token axis:
    WeTok's [h, w, g]), or None when it declares none: then every index is one draw from one codebook (a 1-D CODA
    spec [680] is one group, whatever the rank of its token tensor)."""
    groups = (getattr(spec, "extra", None) or {}).get("groups")
    return None if groups is None else int(groups)


class Usage(Metric):
    """Codebook usage and perplexity of an ``indices`` token spec: pooled, per group (when the spec declares
    groups), and of the joint code (group j is digit j, base codebook_size) where that codebook is countable."""

    name = "usage"

    def __init__(self, spec) -> None:
        if spec.kind != "indices":
            raise ValueError(f"codebook usage needs index tokens, not {spec.kind!r}")
        self.groups = spec_groups(spec)
        self.codebook_size = int(spec.codebook_size)
        self.codes = UsageCounter(self.codebook_size, group_axis=-1 if self.groups is not None else None)
        g = self.groups or 1
        self.joint = UsageCounter(self.codebook_size ** g) if 1 < g and self.codebook_size ** g <= JOINT_MAX else None

    def update(self, batch: Batch) -> None:
        tokens = np.asarray(batch.tokens)
        if self.groups is not None and tokens.shape[-1] != self.groups:
            raise ValueError(f"the token spec declares {self.groups} groups on the last axis, tokens have shape "
                             f"{tokens.shape}")
        self.codes.update(tokens)
        if self.joint is not None:
            base = self.codebook_size ** np.arange(tokens.shape[-1], dtype=np.int64)
            self.joint.update((tokens.astype(np.int64) * base).sum(axis=-1))

    def state(self):
        return self.codes.counts, (self.joint.counts if self.joint is not None else None)

    def merge(self, parts: list) -> None:
        for pos, counter in ((0, self.codes), (1, self.joint)):
            if counter is not None:
                counts = [p[pos] for p in parts if p[pos] is not None]
                counter.counts = sum(counts[1:], counts[0]) if counts else None

    def result(self) -> dict:
        return {"usage": {**self.codes.result(), "joint": self.joint.result() if self.joint is not None else None}}


class DerivedUsage(Usage):
    """:class:`Usage` of codes computed from each batch by ``codes(batch) -> array`` laid out as ``spec`` says: a
    continuous model's discrete side (SoftVQ's argmax ids, whose tokens are soft latents). ``counted`` says what."""

    def __init__(self, spec, codes, counted: str) -> None:
        super().__init__(spec)
        self.codes_of, self.counted = codes, counted

    def update(self, batch: Batch) -> None:
        from dataclasses import replace

        super().update(replace(batch, tokens=np.asarray(self.codes_of(batch))))

    def result(self) -> dict:
        out = super().result()
        out["usage"]["counted"] = self.counted
        return out


class Bpp(Metric):
    """Bits per pixel of the tokens (``token_bits_per_image``; latents at 16 bits) at the evaluation ``size``, as the
    token file stores them (indices: the smallest unsigned dtype for the codebook), and the compression ratio
    against 8-bit RGB pixels."""

    name = "bpp"

    def __init__(self, spec, size: int) -> None:
        self.spec, self.size = spec, int(size)
        self.tokens_shape: tuple | None = None

    def update(self, batch: Batch) -> None:
        self.tokens_shape = tuple(batch.tokens.shape[1:])

    def state(self):
        return self.tokens_shape

    def merge(self, parts: list) -> None:
        self.tokens_shape = next((t for t in parts if t is not None), None)

    def result(self) -> dict:
        if self.tokens_shape is None:
            return {}
        spec, size = self.spec, self.size
        n_tok = math.prod(self.tokens_shape)
        bits = token_bits_per_image(spec.kind, self.tokens_shape, codebook_size=spec.codebook_size)
        stored = None
        if spec.kind == "indices":
            from tokcli.core.tokens import index_dtype

            stored = n_tok * np.dtype(index_dtype(spec.codebook_size - 1)).itemsize
        return {"bpp": {"tokens": bits_per_pixel(bits, 1, size, size), "tokens_per_image": n_tok,
                        "stored_bytes_per_image": stored,
                        "stored_bpp": bits_per_pixel(stored * 8, 1, size, size) if stored else None,
                        "compression_ratio": 24 * size * size / bits}}
