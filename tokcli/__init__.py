"""tok: one interface to the image tokenizers of 2025.

    import tokcli
    tok = tokcli.load("wetok-tiny", device="cpu")     # registry name, local-dir:PATH, hf-hub:org/repo, or a folder
    codes = tok.encode(x)                               # x: float [B, 3, H, W] in [-1, 1]
    images = tok.decode(codes)                          # [B, 3, H, W] in [-1, 1]

Heavy libraries (torch, diffusers, ...) are imported only when a model is loaded.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "list_models"]


def load(name_or_path: str | None = None, device: str = "auto"):
    """Resolve a model name or path (None = the shipped default model) to a model folder and return the ready (eval-mode) Tokenizer."""
    from tokcli.core.device import resolve_device
    from tokcli.core.registry import resolve
    from tokcli.families import build_from_folder

    folder = resolve(name_or_path)
    model = build_from_folder(folder, device=str(resolve_device(device)))
    return model.requires_grad_(False)  # inference object; training builds its own (tok train)


def list_models(filter: str = "") -> list[str]:
    """Registry names (fnmatch ``filter``, e.g. ``"wetok-*"``)."""
    from tokcli.core.registry import list_models as _list

    return _list(filter)
