"""`tok bench throughput`: encode / decode / reconstruct images per second, peak memory, and how far from the machine's
limit (achieved FLOP/s against the measured fp32 conv / matmul peaks, :mod:`tokcli.bench.limits`)."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from tokcli.bench.common import model_record
from tokcli.errors import TokUsageError
from tokcli.version import __version__


def _timer(dev, warmup: int, iters: int):
    import torch

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn):
        for _ in range(warmup):
            fn()
        sync()
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    return timed


def _limit_fields(row: dict, flops: dict[str, float], peaks: dict | None) -> None:
    """GFLOP per image, achieved GFLOP/s and the share of the conv peak, per direction."""
    for d in ("encode", "decode", "reconstruct"):
        f = flops["encode"] + flops["decode"] if d == "reconstruct" else flops[d]
        row[f"{d}_gflop_per_image"] = f / 1e9
        row[f"{d}_gflop_s"] = f * row[f"{d}_img_s"] / 1e9
        if peaks:
            row[f"{d}_of_conv_peak"] = f * row[f"{d}_img_s"] / peaks["conv_flop_s"]


def throughput(model: str | None = None, *, batch_sizes=(1, 8), size: int | None = None, device: str = "auto",
               precision: str = "fp32", warmup: int = 2, iters: int = 5, quiet: bool = False,
               memory_format: str | None = None, compile: bool = False, peaks: bool = True) -> dict[str, Any]:
    """encode / decode / reconstruct images per second (median of ``iters`` timed repeats after ``warmup``), peak
    memory, model FLOPs per image and, with ``peaks``, the share of the device's measured fp32 conv peak, on random
    images in [-1, 1]. ``memory_format`` / ``compile`` as in :func:`tokcli.load`."""
    import resource

    import torch

    import tokcli
    from tokcli import pipeline
    from tokcli.bench.limits import count_flops, measure_peaks
    from tokcli.core.device import autocast, resolve_device, set_precision

    set_precision(precision)
    dev = resolve_device(device)
    tok = tokcli.load(model, device=str(dev), memory_format=memory_format)
    size = pipeline.image_size_for(tok, size)
    timed = _timer(dev, warmup, iters)
    g = torch.Generator().manual_seed(0)
    one = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(dev)
    arch = {"family": tok.family, "model_args": tok.model_args, "size": size}
    with torch.inference_mode(), autocast(dev):
        flops = {"encode": count_flops({**arch, "fn": "encode"}, lambda: tok.encode(one))}
        first = tok.encode(one)
        flops["decode"] = count_flops({**arch, "fn": "decode"}, lambda: tok.decode(first))
    if compile:  # after counting: the counter sees eager operators, not compiled kernels
        tok.compile_networks()
    limit = measure_peaks(str(dev)) if peaks else None
    rows = []
    for b in batch_sizes:
        if b <= 0:
            raise TokUsageError("batch sizes must be positive")
        x = (torch.rand(b, 3, size, size, generator=g) * 2 - 1).to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode(), autocast(dev):
            codes = tok.encode(x)
            t_enc = timed(lambda: tok.encode(x))
            t_dec = timed(lambda: tok.decode(codes))
            t_rec = timed(lambda: tok.decode(tok.encode(x)))
        row = {"batch": b, "encode_img_s": b / t_enc, "decode_img_s": b / t_dec, "reconstruct_img_s": b / t_rec,
               "encode_s": t_enc, "decode_s": t_dec, "reconstruct_s": t_rec}
        _limit_fields(row, flops, limit)
        if dev.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        else:  # the process's peak resident set so far (Linux reports KiB)
            row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        rows.append(row)
        if not quiet:
            print(f"batch {b}: encode {row['encode_img_s']:.2f} img/s, decode {row['decode_img_s']:.2f} img/s, "
                  f"reconstruct {row['reconstruct_img_s']:.2f} img/s", file=sys.stderr)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {
        "model": model_record(tok),
        "protocol": {"image_size": size, "input": "uniform random images in [-1, 1]", "warmup": warmup,
                     "iters": iters, "statistic": "median", "precision": precision, "device": dev_name,
                     "memory_format": getattr(tok, "memory_format", None), "compile": bool(compile),
                     "flops": "torch.utils.flop_counter (2 per multiply-add of convolutions and matrix products), "
                              "counted once per architecture and size at batch 1",
                     "torch": torch.__version__, "tok_version": __version__},
        "flops_per_image": flops,
        "limits": limit,
        "results": rows,
    }
