"""Device policy: ``auto`` picks CUDA when available; strict fp32 maths for reproducible tokens."""

from __future__ import annotations

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


def exact_math() -> None:
    """Turn TF32 off: near-zero latents would otherwise flip sign (and token indices) on Ampere+ GPUs."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
