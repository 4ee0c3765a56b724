"""A model owns its folder (diffusers' ``ModelMixin`` + ``ConfigMixin`` idea): the config keys are the constructor
arguments, and the base class saves and loads every family's models the same way.

    model = Cls(**model_args)                     # one constructor convention for every family and generator
    model.save_folder(dest, provenance=..., card=...)   # config.json + model.safetensors + README.md, atomically
    model = TokModel.from_folder(path_or_folder, device="cpu")   # the family's class, weights loaded strictly

Subclasses set ``family`` (the name their :class:`~tokcli.core.family.Family` registers) and store their normalised
arguments in ``self.model_args``; tokenizers add ``spec`` / ``preprocess`` (``families/base.py``), generators their
own folder keys (``folder_config``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tokcli.core.checkpoint import ModelFolder, read_model_folder, save_model_folder
from tokcli.errors import TokError


class TokModel(nn.Module):
    family: str = ""

    def __init__(self):
        super().__init__()
        self.model_args: dict[str, Any] = {}
        # Filled by from_folder(); empty for a freshly built model.
        self.name: str = ""
        self.sha256: str = ""
        self.source: str = ""
        self.decode_defaults: dict[str, Any] = {}

    # --- what the folder's config.json holds besides model_args ----------------------------------------------
    def folder_config(self) -> dict[str, Any]:
        """Top-level config keys this model writes next to ``model_args`` (tokenizers: tokens, preprocess)."""
        return {}

    def prepare_for_inference(self) -> None:
        """Called by :meth:`from_folder` before eval (e.g. CODA fuses its LoRA); training never calls it."""

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    # --- the folder ------------------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: ModelFolder | str | os.PathLike, *, device: str | torch.device = "cpu",
                    inference: bool = True) -> "TokModel":
        """Build the folder's model (``Class(**model_args)`` of its family) and load its weights strictly.

        ``inference=True`` (what ``tokcli.load`` does): fused for inference, eval mode, no gradients."""
        from tokcli.core.registry import get_family

        if not isinstance(folder, ModelFolder):
            folder = read_model_folder(folder)
        klass = get_family(folder.family).model_class()
        if not issubclass(klass, cls):
            raise TokError(f"{folder.path} holds a {folder.family} model ({klass.__name__}), not a {cls.__name__}")
        args = folder.config["model_args"]
        if not isinstance(args, Mapping):
            raise TokError(f"{folder.path}/config.json: model_args must be an object")
        model = klass(**dict(args))
        model.load_weights(folder.state_dict(), source=folder.weights_path)
        model.name = folder.name
        model.sha256 = folder.sha256
        model.source = str(folder.path)
        model.decode_defaults = dict(folder.config.get("decode") or {})
        if inference:
            model.prepare_for_inference()
            model.requires_grad_(False)
        return model.to(device).eval() if inference else model.to(device)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], *, source: Any = "the weights") -> None:
        """Strict load with one clear error naming what is missing or unexpected."""
        missing, unexpected = self.load_state_dict(dict(state_dict), strict=False)
        if missing or unexpected:
            raise TokError(f"{source} does not match the {self.family} model described by its config.json "
                           f"(missing {len(missing)} tensors e.g. {missing[:3]}, unexpected {len(unexpected)} e.g. "
                           f"{unexpected[:3]})")

    def save_folder(self, dest: str | os.PathLike, *, name: str | None = None,
                    provenance: Mapping[str, Any] | None = None, card: str | None = None,
                    extra: Mapping[str, Any] | None = None, state_dict: Mapping[str, torch.Tensor] | None = None,
                    overwrite: bool = False) -> ModelFolder:
        """Write this model as a folder (atomically): ``model_args``, :meth:`folder_config`, ``decode_defaults``
        and the weights (``state_dict`` overrides them, e.g. EMA). ``card`` is the model card's markdown body; the
        family's own card sections (``Family.card``) are appended to it."""
        return save_model_folder(
            Path(dest), family=self.family, model_args=self.model_args,
            state_dict=self.state_dict() if state_dict is None else state_dict, name=name or self.name or None,
            decode=self.decode_defaults, provenance=provenance, card=self._card(card), extra=extra,
            overwrite=overwrite, **self.folder_config())

    def _card(self, body: str | None) -> str | None:
        from tokcli.core.registry import families

        fam = families().get(self.family)
        sections = "".join(f"\n## {title}\n\n{text.strip()}\n" for title, text in (fam.card if fam else {}).items())
        if not sections:
            return body
        return (body or f"# {self.name or self.family}\n").rstrip("\n") + "\n" + sections
