"""`tok bench stats`: FID Inception statistics of a folder, for ``--ref-stats``."""

from __future__ import annotations

from pathlib import Path

from tokcli.bench.common import gather_errors, input_positions
from tokcli.errors import TokError
from tokcli.version import __version__


def folder_stats(items, out: str | Path, *, size: int = 256, inception_weights: str | None = None,
                 device: str = "auto", batch_size: int = 50, workers: int = 0, skip_errors: bool = False,
                 quiet: bool = False, download: bool = False):
    """Inception statistics of a folder (ADM centre crop to ``size``) written as an ADM-style ``mu``/``sigma``
    npz at ``out`` (plus the exact sums and a protocol record). Under torchrun each rank takes every world-th image
    and the float64 sums are all-reduced; rank 0 writes. ``download``: fetch missing Inception weights (only when
    asked; tokcli/core/pretrained.py). Returns (summary for the CLI, per-input errors)."""
    from tqdm import tqdm

    from tokcli.core.device import resolve_device
    from tokcli.core.distributed import process_group
    from tokcli.core.images import iter_batches
    from tokcli.metrics import fid

    items = list(items)
    positions = input_positions(items)
    with process_group(resolve_device(device)) as (rank, world, dev):
        net, sha = fid.load_fid_inception(inception_weights, device=dev, download=download)
        stats = fid.FeatureStats(device=dev)
        errors: list = []
        shard = items[rank::world]
        bar = tqdm(total=len(shard), desc="stats", unit="img", disable=quiet or rank != 0, leave=False)
        for keys, imgs in iter_batches(shard, size, batch_size, skip_errors=skip_errors, errors=errors,
                                       workers=workers):
            stats.update(fid.features_from_uint8(net, imgs, batch_size=batch_size, device=dev))
            bar.update(len(keys))
        bar.close()
        if world > 1:
            stats.all_reduce()
            errors = gather_errors(errors, positions)
        if stats.n < 2:
            raise TokError(f"statistics need at least 2 images, got {stats.n}")
        if rank == 0:
            stats.to_npz(out, meta={"image_size": size, "crop": "adm_center", "weights_sha256": sha,
                                    "n": int(stats.n), "tok_version": __version__})
    return {"output": str(out), "n_images": int(stats.n), "image_size": size, "weights_sha256": sha,
            "world_size": world, "n_failed": len(errors)}, errors
