"""tok: one interface to the image tokenizers of 2025.

    import tokcli
    tok = tokcli.load("wetok-tiny", device="cpu")     # registry name, local-dir:PATH, hf-hub:org/repo, or a folder
    codes = tok.encode(x)                               # x: float [B, 3, H, W] in [-1, 1]
    images = tok.decode(codes)                          # [B, 3, H, W] in [-1, 1]

Heavy libraries (torch, diffusers, ...) are imported only when a model is loaded.
"""

from __future__ import annotations

from tokcli.core import registry as _registry
from tokcli.version import __version__

__all__ = ["__version__", "load", "list_models"]


def _discover_families() -> None:
    from tokcli.families import load_all

    load_all()


# core/ is passive: the family packages push themselves into the registry when discovery runs (first use).
_registry.add_discovery(_discover_families)


def load(name_or_path: str | None = None, device: str = "auto"):
    """Resolve a model name or path (None = the shipped default model) to a model folder and return the ready
    (eval-mode, no-grad) model."""
    from tokcli.core.device import resolve_device
    from tokcli.core.model import TokModel

    folder = _registry.resolve(name_or_path)
    return TokModel.from_folder(folder, device=str(resolve_device(device)))


def list_models(filter: str = "") -> list[str]:
    """Registry names (fnmatch ``filter``, e.g. ``"wetok-*"``)."""
    return _registry.list_models(filter)
