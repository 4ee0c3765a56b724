"""tok: one interface to the image tokenizers of 2025.

    import tokcli
    tok = tokcli.load("wetok-tiny", device="cpu")     # registry name, local-dir:PATH, hf-hub:org/repo, or a folder
    codes = tok.encode(x)                               # x: float [B, 3, H, W] in [-1, 1]
    images = tok.decode(codes)                          # [B, 3, H, W] in [-1, 1]
    gen = tokcli.load_generator("local-dir:GEN")         # a generator folder (tokcli/gen): gen.sample(labels)

Heavy libraries (torch, diffusers, ...) are imported only when a model is loaded.
"""

from __future__ import annotations

from tokcli.core import registry as _registry
from tokcli.version import __version__

__all__ = ["__version__", "load", "load_generator", "list_models"]


def _discover_families() -> None:
    from tokcli.families import load_all
    from tokcli.gen import load_all as load_generators

    load_all()
    load_generators()


# core/ is passive: the family packages push themselves into the registry when discovery runs (first use).
_registry.add_discovery(_discover_families)


def _load_kind(name_or_path: str | None, device: str, kind: str, memory_format: str | None = None,
               compile: bool = False):
    """The ready model of ``name_or_path``, refused with one line when its family is not of ``kind``; a
    convolutional tokenizer in the memory layout :func:`tokcli.core.device.memory_format_for` picks."""
    from tokcli.core.device import memory_format_for, resolve_device
    from tokcli.core.model import TokModel
    from tokcli.errors import TokUsageError

    folder = _registry.resolve(name_or_path)
    fam = _registry.get_family(folder.family)
    if fam.kind != kind:
        how = "tokcli.load_generator / `tok generate -m`" if fam.kind == "generator" else "tokcli.load / `tok decode -m`"
        raise TokUsageError(f"{name_or_path or folder.path} is a {fam.kind} ({folder.family}), not a {kind}: "
                            f"load it with {how}")
    dev = resolve_device(device)
    fmt = memory_format_for(dev, memory_format)  # an unknown one is refused before the weights are read
    model = TokModel.from_folder(folder, device=str(dev))
    if getattr(model, "conv_layout", False):
        model.set_memory_format(fmt)
    if compile:
        if not hasattr(model, "compile_networks"):
            raise TokUsageError(f"--compile is for tokenizers; {folder.family} models are not compiled")
        model.compile_networks()
    return model


def load(name_or_path: str | None = None, device: str = "auto", memory_format: str | None = None,
         compile: bool = False):
    """Resolve a model name or path (None = the shipped default model) to a model folder and return the ready
    (eval-mode, no-grad) tokenizer. A generator folder is refused (:func:`load_generator` loads those).
    ``memory_format`` ("auto", "channels_last", "contiguous"; default ``$TOK_MEMORY_FORMAT`` or "auto"): the layout
    of a convolutional tokenizer (WeTok, KL, CODA); "auto" is the one measured fastest on the device type.
    ``compile``: ``torch.compile`` the encoder / decoder (opt-in; benchmarks/README.md has its cost)."""
    return _load_kind(name_or_path, device, "tokenizer", memory_format, compile)


def load_generator(name_or_path: str, device: str = "auto"):
    """Resolve a generator name or path like :func:`load` and return the ready generator
    (:class:`tokcli.gen.base.Generator`); a tokenizer folder is refused."""
    return _load_kind(name_or_path, device, "generator")


def list_models(filter: str = "") -> list[str]:
    """Registry names (fnmatch ``filter``, e.g. ``"wetok-*"``)."""
    return _registry.list_models(filter)
