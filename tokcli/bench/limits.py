"""How far a model runs from the machine's limit: model FLOPs (counted once per architecture and size) and the
measured fp32 matmul / convolution peaks of the device, for `tok bench throughput`.

FLOPs are PyTorch's own count (``torch.utils.flop_counter``: 2 per multiply-add of convolutions and matrix products;
normalisations and activations are not counted, so a model that spends its time there shows a low ratio, which is
the point). The peaks are the best of a few large, well-shaped problems timed on this device in this process: a
square matrix product and 3x3 convolutions in both memory layouts. "Share of the conv peak" = achieved FLOP/s /
the best convolution FLOP/s measured; a CNN tokenizer cannot beat it by much, so it is one number per model and
device that says how much speed is left.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any, Callable

_FLOPS: dict[str, float] = {}


def count_flops(key: Any, fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` (run once under the counter), cached under ``key`` (e.g. the architecture, the
    image size and the direction), so every batch size reuses one count."""
    from torch.utils.flop_counter import FlopCounterMode

    k = json.dumps(key, sort_keys=True, default=str)
    if k not in _FLOPS:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        _FLOPS[k] = float(counter.get_total_flops())
    return _FLOPS[k]


def _best_rate(fn: Callable[[], Any], flops: float, sync: Callable[[], None], repeats: int, min_s: float) -> float:
    fn()
    sync()
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync()
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        best = max(best, n * flops / dt)
    return best


@functools.lru_cache(maxsize=4)
def measure_peaks(device: str = "cpu", repeats: int = 3, min_s: float = 0.3) -> dict[str, Any]:
    """The best fp32 FLOP/s of a square matrix product and of 3x3 convolutions (contiguous and channels-last,
    the fastest counted) on ``device``, TF32 off on CUDA. Cached per process."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    old_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        n = 8192 if cuda else 2048
        a = torch.randn(n, n, device=dev, generator=g)
        b = torch.randn(n, n, device=dev, generator=g)
        matmul = _best_rate(lambda: a @ b, 2.0 * n ** 3, sync, repeats, min_s)
        convs = {}
        shapes = [(8, 256, 64, 64), (8, 512, 32, 32)] if cuda else [(2, 256, 32, 32), (2, 128, 64, 64)]
        with torch.inference_mode():
            for bs, c, h, w in shapes:
                x = torch.randn(bs, c, h, w, device=dev, generator=g)
                k = torch.randn(c, c, 3, 3, device=dev, generator=g)
                flops = 2.0 * bs * c * c * 9 * h * w
                for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
                    xf, kf = x.contiguous(memory_format=fmt), k.contiguous(memory_format=fmt)
                    convs[f"{c}ch_{h}px_{layout}"] = _best_rate(lambda: F.conv2d(xf, kf, padding=1), flops, sync,
                                                                repeats, min_s)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32
    name = torch.cuda.get_device_name(dev) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "dtype": "float32", "matmul_flop_s": matmul, "conv_flop_s": max(convs.values()),
            "conv_by_shape": convs, "matmul_size": n,
            "how": "best of repeated timed calls of a square fp32 matmul and 3x3 fp32 convolutions (TF32 off)"}
