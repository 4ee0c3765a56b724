"""`tok bench throughput`: encode / decode / reconstruct images per second and peak memory."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from tokcli.bench.common import model_record
from tokcli.errors import TokUsageError
from tokcli.version import __version__


def throughput(model: str | None = None, *, batch_sizes=(1, 8), size: int | None = None, device: str = "auto",
               precision: str = "fp32", warmup: int = 2, iters: int = 5, quiet: bool = False) -> dict[str, Any]:
    """encode / decode / reconstruct images per second (median of ``iters`` timed repeats after ``warmup``) and
    peak memory, on random images in [-1, 1]."""
    import resource

    import torch

    import tokcli
    from tokcli.core.device import autocast, resolve_device, set_precision

    set_precision(precision)
    dev = resolve_device(device)
    tok = tokcli.load(model, device=str(dev))
    from tokcli import pipeline

    size = pipeline.image_size_for(tok, size)

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

    rows = []
    for b in batch_sizes:
        if b <= 0:
            raise TokUsageError("batch sizes must be positive")
        g = torch.Generator().manual_seed(0)
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
                     "torch": torch.__version__, "tok_version": __version__},
        "results": rows,
    }
