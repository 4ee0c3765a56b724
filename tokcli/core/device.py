"""Device policy: ``auto`` picks CUDA when available; strict fp32 maths for reproducible tokens."""

from __future__ import annotations

import os

from tokcli.errors import TokUsageError


def resolve_device(device: str = "auto"):
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TokUsageError(f"--device {device} was asked for but this torch sees no CUDA device")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise TokUsageError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")


PRECISIONS = ("fp32", "tf32")


def exact_math() -> None:
    """Turn TF32 off: near-zero latents would otherwise flip sign (and token indices) on Ampere+ GPUs."""
    set_precision("fp32")


def set_precision(precision: str = "fp32") -> None:
    """``fp32``: exact float32 maths everywhere (tokens reproduce across machines; the default).
    ``tf32``: TF32 tensor-core convolutions and matmuls on CUDA (PyTorch's own default for cuDNN convolutions, so
    what the official scripts ran): about 7-10x faster on an H100 for the released WeTok models, but about 0.5% of
    tokens differ from the exact ones (benchmarks/README.md). No effect on CPU."""
    import torch

    if precision not in PRECISIONS:
        raise TokUsageError(f"unknown precision {precision!r} (use {' or '.join(PRECISIONS)})")
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    # cuDNN autotuning picks the fastest exact algorithm per shape (2.5x for the released WeTok models at batch 8 on
    # an H100, still fp32); TOK_DETERMINISTIC=1 pins deterministic algorithms instead (slower; the same choice
    # every run, for bit-level reproducibility on one GPU).
    deterministic = os.environ.get("TOK_DETERMINISTIC", "") not in ("", "0")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
