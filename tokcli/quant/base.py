"""What every quantizer's ``forward`` returns, and the batch statistics that must see the global batch under DDP.

    out = quantizer(z)
    out.quantized        the quantized tensor fed to the decoder (straight-through or soft-assignment gradient)
    out.ids              the code ids (a tensor, or one tensor per level for multi-scale quantizers)
    out.losses           name -> scalar loss term, unweighted (the objective weights them)
    out.stats            name -> scalar statistic for logging (detached or not; never a loss by itself)

Every quantizer also has ``decode_ids(ids)``: ids -> the quantized tensor (what the decoder takes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class QuantOut:
    quantized: torch.Tensor
    ids: Any  # torch.Tensor, or a list of per-level tensors
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_mean(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """``x.mean(dim)`` over the samples of every rank (DDP), with gradients.

    Batch statistics such as the codebook entropy (entropy of the batch-mean code distribution) are not a mean of
    per-rank values: each rank must see the probabilities averaged over the global batch. Under an initialised
    process group with more than one rank, the per-rank sums are all-reduced with
    ``torch.distributed.nn.functional.all_reduce`` (differentiable: the backward all-reduces the gradient), and
    divided by the global count (ranks may hold different batch sizes). Single process: exactly ``x.mean(dim)``."""
    if _world() == 1:
        return x.mean(dim)
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    count = torch.tensor(float(torch.Size([x.shape[d] for d in dims]).numel()), device=x.device)
    dist.all_reduce(count)
    return all_reduce(x.sum(dim)) / count
