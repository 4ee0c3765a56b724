"""Device policy: ``auto`` picks CUDA when available; strict fp32 maths for reproducible tokens; ``tf32`` and
``bf16`` (autocast around the model calls of encode / decode / reconstruct) only when asked."""

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


PRECISIONS = ("fp32", "tf32", "bf16")
_BF16 = {"on": False}  # set by set_precision, read by autocast(): a process-wide maths setting, like TF32


def exact_math() -> None:
    """Turn TF32 off: near-zero latents would otherwise flip sign (and token indices) on Ampere+ GPUs."""
    set_precision("fp32")


def set_precision(precision: str = "fp32") -> None:
    """``fp32``: exact float32 maths everywhere (tokens reproduce across machines; the default).
    ``tf32``: TF32 tensor-core convolutions and matmuls on CUDA (PyTorch's own default for cuDNN convolutions, so
    what the official scripts ran): about 7-10x faster on an H100 for the released WeTok models, but about 0.5% of
    tokens differ from the exact ones (benchmarks/README.md). No effect on CPU.
    ``bf16``: ``torch.autocast(dtype=torch.bfloat16)`` around the model calls (:func:`autocast`; CUDA and CPU; the
    official FlowMo ran so), TF32 off for what stays float32. Quantizers compute their ids / soft assignments in
    float32 (:func:`float32_region`); tokens are mostly, not always, the fp32 ones."""
    import torch

    if precision not in PRECISIONS:
        raise TokUsageError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]})")
    tf32 = precision == "tf32"
    _BF16["on"] = precision == "bf16"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    # cuDNN autotuning picks the fastest exact algorithm per shape (2.5x for the released WeTok models at batch 8 on
    # an H100, still fp32); TOK_DETERMINISTIC=1 pins deterministic algorithms instead (slower; the same choice
    # every run, for bit-level reproducibility on one GPU).
    deterministic = os.environ.get("TOK_DETERMINISTIC", "") not in ("", "0")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def precision_in_effect(device) -> str:
    """The precision the current settings give on ``device``: "bf16", "tf32" (CUDA with TF32 on) or "fp32"."""
    import torch

    if _BF16["on"]:
        return "bf16"
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    return "tf32" if torch.device(device).type == "cuda" and tf32 else "fp32"


def autocast(device):
    """bfloat16 autocast on ``device`` when the precision is ``bf16``; otherwise a context that does nothing."""
    import torch

    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=_BF16["on"])


def float32_region(x):
    """``with float32_region(x):`` autocast off on ``x``'s device (a no-op outside autocast): for quantizer maths
    that must stay float32 under ``bf16`` (cast the inputs with ``.float()`` inside)."""
    import torch

    return torch.autocast(device_type=x.device.type, enabled=False)


def as_float32(t):
    """A floating tensor as float32 (autocast outputs are bfloat16); anything else as it is."""
    return t.float() if getattr(t, "is_floating_point", lambda: False)() else t


# --------------------------------------------------------------------------------------------------------
# memory layout of the convolutional families
# --------------------------------------------------------------------------------------------------------
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
#: the layout "auto" picks per device type, from measurements (benchmarks/README.md "Convolutional families"): on
#: this project's CPU, measured quietly and interleaved, channels-last was 0.90-1.05x contiguous for the released
#: WeTok widths and the MAR / FLUX VAEs and 0.83-1.21x on the tiny demo models, never faster in both directions, so
#: "auto" keeps contiguous there; on CUDA no measurement was made yet. Channels-last stays one option away, exact
#: (accurate GroupNorm, same tokens).
AUTO_MEMORY_FORMAT = {"cpu": "contiguous", "cuda": "contiguous"}


def memory_format_for(device, requested: str | None = None) -> str:
    """The layout a convolutional tokenizer runs in on ``device``: ``requested``, else ``$TOK_MEMORY_FORMAT``,
    else ``auto`` (:data:`AUTO_MEMORY_FORMAT`)."""
    import torch

    fmt = (requested or os.environ.get("TOK_MEMORY_FORMAT") or "auto").lower().replace("-", "_")
    if fmt not in MEMORY_FORMATS:
        raise TokUsageError(f"unknown memory format {fmt!r} (use {', '.join(MEMORY_FORMATS)}; TOK_MEMORY_FORMAT)")
    if fmt == "auto":
        fmt = AUTO_MEMORY_FORMAT.get(torch.device(device).type, "contiguous")
    return fmt
