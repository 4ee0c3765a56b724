"""The metric objects of `tok bench`: one small object per measurement, fed batch by batch.

A :class:`Metric` sees every reconstructed :class:`Batch` once (``update``), so memory does not grow with the number
of images beyond what the metric itself keeps (per-image values, code counts, float64 feature sums). Under torchrun
each rank scores its own shard; ``state()`` is what a rank sends (picklable, small), ``merge(parts)`` combines the
states of every rank *exactly* (per-image values back in input order, counts summed, sums added), and ``sync()`` does
both through :func:`tokcli.core.distributed.gather_objects` (a metric with large sums may all-reduce them instead).
After that ``result()`` gives the metric's entries of the result's ``metrics`` record, ``per_image()`` its per-image
lists, ``protocol()`` its entries of the ``protocol`` record (how it was measured: reference, N, size, feature
extractor, versions, weight hashes) and ``notes()`` warnings for the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np


@dataclass
class Batch:
    """One batch of reconstructions, as `tok bench` scores it.

    keys: the images' keys; index: their positions in the whole input list (the order results are reported in);
    orig: the originals after the crop, uint8 [B, H, W, 3]; recon: the decoder output, float torch [B, 3, H, W] in
    [-1, 1]; tokens: the tokens, numpy [B, *token shape].
    """

    keys: list
    index: list
    orig: np.ndarray
    recon: Any
    tokens: np.ndarray

    @cached_property
    def recon_u8(self) -> np.ndarray:
        """The reconstructions rounded to uint8 [B, H, W, 3] (the protocol's images)."""
        from tokcli.core.images import to_uint8

        return to_uint8(self.recon)

    @cached_property
    def recon_float(self) -> np.ndarray:
        """The decoder output as float64 numpy [B, H, W, 3] (the legacy modes act before any uint8 exists)."""
        return self.recon.detach().float().permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)


class Metric:
    """Base class: ``update(batch)`` per batch; ``state`` / ``merge`` / ``sync`` across ranks; then ``result``,
    ``per_image``, ``protocol`` and ``notes`` (each a dict or list, empty by default)."""

    name = "metric"

    def update(self, batch: Batch) -> None:
        raise NotImplementedError

    def state(self) -> Any:
        """What this rank contributes to the merge (picklable)."""
        raise NotImplementedError

    def merge(self, parts: list) -> None:
        """Replace this metric's state by the exact combination of ``parts`` (``state()`` of every rank, in rank
        order; this rank's own among them)."""
        raise NotImplementedError

    def sync(self) -> None:
        """Combine the states of all ranks (a no-op in one process)."""
        from tokcli.core.distributed import gather_objects

        self.merge(gather_objects(self.state()))

    def result(self) -> dict[str, Any]:
        return {}

    def per_image(self) -> dict[str, list]:
        return {}

    def protocol(self) -> dict[str, Any]:
        return {}

    def notes(self) -> list[str]:
        return []


class PerImageMetric(Metric):
    """A metric that keeps one value per image, with the image's input position, for per-image lists in input
    order whichever rank scored them. Subclasses call ``add(batch, values)`` from ``update``."""

    def __init__(self) -> None:
        self.index: list[int] = []
        self.values: list = []

    def add(self, batch: Batch, values) -> None:
        values = list(values)
        if len(values) != len(batch.index):
            raise ValueError(f"{self.name}: {len(values)} values for {len(batch.index)} images")
        self.index += list(batch.index)
        self.values += values

    def state(self) -> tuple[list, list]:
        return self.index, self.values

    def merge(self, parts: list) -> None:
        index = [i for part in parts for i in part[0]]
        values = [v for part in parts for v in part[1]]
        order = np.argsort(index, kind="stable")
        self.index = [index[i] for i in order]
        self.values = [values[i] for i in order]

    def mean(self) -> float:
        return float(np.mean(self.values))

    def per_image(self) -> dict[str, list]:
        return {self.name: list(self.values)}
