"""A family declares itself once: ``FAMILY = register_family(Family(...))`` in its package ``__init__``.

Everything that varies between families is named here as plain data or as ``"module:attribute"`` strings that are
imported on first use, so that reading the registry (`tok models`) imports no torch and a family's package can be
removed without touching any other file. ``core`` never imports a family: families push themselves in
(:func:`tokcli.core.registry.register_family`) when the discovery hook that the package top installs imports them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from tokcli.core.entry import ModelEntry
from tokcli.errors import TokError, TokUsageError

KINDS = ("tokenizer", "generator")


def load_object(ref: str) -> Any:
    """``"package.module:attr"`` -> the object (the module is imported now)."""
    mod, _, attr = ref.partition(":")
    if not mod or not attr:
        raise ValueError(f"{ref!r} is not of the form 'module:attribute'")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Family:
    """One family of models (a tokenizer family, or a kind of generator).

    name:        the ``family`` written in every model folder's config.json and token-file header.
    model:       ``"module:Class"`` of the model; ``Class(**model_args)`` builds it (config keys = constructor args).
    entries:     registry entries (plain data).
    converters:  ``kind -> "module:function"``; ``"checkpoint"`` is what ``tok convert`` calls with
                 ``(source, config, dest, *, name, model_args, provenance, overwrite, files=...)``.
    objectives:  ``name -> "module:Class"`` training objectives (the trainer's Objective protocol); the
                 first is the default, a recipe picks another with ``model.objective``.
    recipe:      ``"module:Class"`` of the family's ``[loss]`` recipe section (a dataclass extending the shared one),
                 or None for the shared section alone.
    card:        extra model-card sections (title -> markdown) written into every folder this family exports.
    kind:        ``"tokenizer"`` or ``"generator"``.
    """

    name: str
    model: str
    entries: tuple[ModelEntry, ...] = ()
    converters: Mapping[str, str] = field(default_factory=dict)
    objectives: Mapping[str, str] = field(default_factory=dict)
    recipe: str | None = None
    card: Mapping[str, str] = field(default_factory=dict)
    kind: str = "tokenizer"
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"family {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "entries", tuple(self.entries))
        for e in self.entries:
            if e.family != self.name:
                raise ValueError(f"family {self.name}: registry entry {e.name} says family {e.family!r}")

    def model_class(self):
        return load_object(self.model)

    def converter(self, kind: str = "checkpoint"):
        try:
            return load_object(self.converters[kind])
        except KeyError:
            raise TokUsageError(f"the {self.name} family has no {kind!r} converter"
                                + (f" (it has: {', '.join(self.converters)})" if self.converters else "")) from None

    def objective(self, name: str | None = None):
        if not self.objectives:
            raise TokUsageError(f"the {self.name} family has no training objective")
        key = name or next(iter(self.objectives))
        try:
            return load_object(self.objectives[key])
        except KeyError:
            raise TokUsageError(f"the {self.name} family has no objective {key!r} "
                                f"(it has: {', '.join(self.objectives)})") from None

    def recipe_section(self):
        return load_object(self.recipe) if self.recipe else None

    def build(self, model_args: Mapping[str, Any] | None = None):
        """A randomly initialised model from JSON ``model_args``."""
        if model_args is not None and not isinstance(model_args, Mapping):
            raise TokError(f"{self.name} model_args must be a table, got {type(model_args).__name__}")
        return self.model_class()(**dict(model_args or {}))
