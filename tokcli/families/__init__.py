"""Family lookup: a family is a module exposing ``FAMILY``, ``build(model_args) -> Tokenizer`` and
``convert_checkpoint(...)`` (official checkpoint -> model folder; not named ``convert``, which the ``convert``
submodule would shadow once imported). Families never import each other."""

from __future__ import annotations

import importlib
from types import ModuleType

from tokcli.errors import TokError

_FAMILIES = {
    "coda": "tokcli.families.coda",
    "kl": "tokcli.families.kl",
    "wetok": "tokcli.families.wetok",
}


def lazy_attributes(package: str, table: dict[str, str], aliases: dict[str, str] | None = None):
    """A module ``__getattr__`` for a family package: attribute -> submodule, imported on first use, so that reading
    the registry (`tok models`) never imports torch. ``aliases`` maps a public name to the submodule's name."""
    aliases = aliases or {}

    def __getattr__(name):
        if name not in table:
            raise AttributeError(name)
        mod = importlib.import_module(f"{package}.{table[name]}")
        return getattr(mod, aliases.get(name, name))

    return __getattr__


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> ModuleType:
    try:
        mod = _FAMILIES[name]
    except KeyError:
        raise TokError(f"unknown tokenizer family {name!r} (known: {', '.join(family_names())})") from None
    return importlib.import_module(mod)


def build_from_folder(folder, device: str = "cpu"):
    """Instantiate the family's model from a ModelFolder and load its weights strictly."""
    fam = get_family(folder.family)
    model = fam.build(folder.config["model_args"])
    sd = folder.state_dict()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise TokError(f"weights in {folder.weights_path} do not match the {folder.family} model described by its "
                       f"config.json (missing {len(missing)} tensors e.g. {missing[:3]}, unexpected {len(unexpected)} "
                       f"e.g. {unexpected[:3]})")
    model.name = folder.name
    model.sha256 = folder.sha256
    model.source = str(folder.path)
    model.decode_defaults = dict(folder.config.get("decode", {}))
    if hasattr(model, "prepare_for_inference"):  # e.g. fuse LoRA adapters
        model.prepare_for_inference()
    return model.to(device).eval()


def registry_entries():
    """All families' built-in registry entries (ModelEntry objects)."""
    out = []
    for mod in _FAMILIES.values():
        out.extend(importlib.import_module(mod + ".registry").REGISTRY)
    return out
