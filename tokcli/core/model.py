"""A model owns its folder (diffusers' ``ModelMixin`` + ``ConfigMixin`` idea): the config keys are the constructor
arguments, and the base class saves and loads every family's models the same way.

    model = Cls(**model_args)                     # one constructor convention for every family and generator
    model.save_folder(dest, provenance=..., card=...)   # config.json + model.safetensors + README.md, atomically
    model = TokModel.from_folder(path_or_folder, device="cpu")   # the family's class, weights loaded strictly

Subclasses set ``family`` (the name their :class:`~tokcli.core.family.Family` registers) and store their normalised
arguments in ``self.model_args``; tokenizers add ``spec`` / ``preprocess`` (``families/base.py``), generators their
own folder keys (``folder_config``).

Loading trusts the folder only after checking it (a folder is a file from anywhere): the model its ``model_args``
describe is first built on the meta device under a budget (no more tensors, no more elements than the weights file
holds, counted as they are registered), its names and shapes compared with the weights' header, the weights'
sha256 checked (:meth:`~tokcli.core.checkpoint.ModelFolder.checked_sha256`); only then is it built for real and
loaded. A model loaded from a folder path is named by that path (``name``); ``config_name`` keeps the config's.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.nn.modules import module as _module

from tokcli.core.checkpoint import ModelFolder, read_model_folder, save_model_folder
from tokcli.errors import TokError


class TokModel(nn.Module):
    family: str = ""

    def __init__(self):
        super().__init__()
        self.model_args: dict[str, Any] = {}
        # Filled by from_folder(); empty for a freshly built model.
        self.name: str = ""  # what the model was loaded as: registry name, hf-hub:..., or the folder path
        self.config_name: str = ""  # the name in the folder's config.json
        self.ref: str = ""  # how a token file names it: registry name, hf-hub:..., local-dir:ABSOLUTE_PATH
        self.sha256: str = ""  # of the weights actually loaded ("" = not verified, TOK_TRUST_WEIGHTS=1)
        self.source: str = ""
        self.decode_defaults: dict[str, Any] = {}

    # --- what the folder's config.json holds besides model_args ----------------------------------------------
    def folder_config(self) -> dict[str, Any]:
        """Top-level config keys this model writes next to ``model_args`` (tokenizers: tokens, preprocess)."""
        return {}

    def read_folder_config(self, config: Mapping[str, Any]) -> None:
        """Called by :meth:`from_folder` with the folder's config.json: a model whose :meth:`folder_config` writes
        keys it needs back (a generator's ``tokenizer`` and ``sample`` blocks) reads them here."""

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
        """Build the folder's model (``Class(**model_args)`` of its family) and load its weights strictly, after
        the checks of the module docstring.

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
        header = folder.weights_header()
        check_architecture(klass, dict(args), header, folder)
        sha = folder.checked_sha256()
        with registration_budget(header, folder):
            model = _construct(klass, dict(args), folder)
        model.load_weights(folder.state_dict(), source=folder.weights_path)
        model.name = folder.ref or str(folder.path)
        model.config_name = folder.name
        model.ref = folder.ref or "local-dir:" + str(folder.path.resolve())
        model.sha256 = sha
        model.source = str(folder.path)
        model.decode_defaults = dict(folder.config.get("decode") or {})
        model.read_folder_config(folder.config)
        if inference:
            model.prepare_for_inference()
            model.requires_grad_(False)
        return model.to(device).eval() if inference else model.to(device)

    @classmethod
    def from_state(cls, model_args: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                   what: str) -> "TokModel":
        """``cls(**model_args)`` holding ``state`` (a converter's tensors, already renamed): built on the meta
        device (no random init, no copy), the names and shapes compared first (one TokError, ``what: <problems>``),
        then loaded strictly by assignment. Returned in eval mode."""
        with torch.device("meta"):
            model = cls(**model_args)
        problems = state_mismatch(model, state)
        if problems:
            raise TokError(f"{what}: {problems}")
        model.load_state_dict(dict(state), strict=True, assign=True)
        return model.eval()

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
            state_dict=self.state_dict() if state_dict is None else state_dict, name=name or self.config_name or self.name or None,
            decode=self.decode_defaults, provenance=provenance, card=self._card(card), extra=extra,
            overwrite=overwrite, **self.folder_config())

    def _card(self, body: str | None) -> str | None:
        from tokcli.core.registry import families

        fam = families().get(self.family)
        sections = "".join(f"\n## {title}\n\n{text.strip()}\n" for title, text in (fam.card if fam else {}).items())
        if not sections:
            return body
        return (body or f"# {self.name or self.family}\n").rstrip("\n") + "\n" + sections


# --- checking a folder's config against its weights before anything is allocated --------------------------------

class _OverBudget(BaseException):  # not an Exception: a family's own `except Exception` must not eat it
    pass


_DTYPE_KIND = {"BOOL": "bool", "F64": "float", "F32": "float", "F16": "float", "BF16": "float",
               "F8_E4M3": "float", "F8_E5M2": "float"}


def _kind(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        return _DTYPE_KIND.get(dtype, "int")
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "int"


class ConfigMismatch(TokError):
    """A folder's config.json does not describe the model its weights file holds."""


@contextlib.contextmanager
def registration_budget(header: Mapping[str, tuple[str, tuple[int, ...]]], folder: ModelFolder) -> Iterator[None]:
    """Stop a model's construction (raise :class:`ConfigMismatch`) as soon as it registers more tensors or elements
    than the weights file holds (with a margin for non-persistent buffers): absurd ``model_args`` never finish
    building, and on the meta device nothing is allocated on the way."""
    n_elements = sum(math.prod(shape) for _, shape in header.values())
    limits = (2 * len(header) + 64, 2 * n_elements + (1 << 20))
    seen = [0, 0]

    def hook(module, name, tensor):
        if tensor is not None:
            seen[0] += 1
            seen[1] += tensor.numel()
            if seen[0] > limits[0] or seen[1] > limits[1]:
                raise _OverBudget

    handles = [_module.register_module_parameter_registration_hook(hook),
               _module.register_module_buffer_registration_hook(hook)]
    try:
        yield
    except _OverBudget:
        what = f"more than {limits[0]:,} tensors" if seen[0] > limits[0] else f"more than {limits[1]:,} elements"
        raise ConfigMismatch(f"{folder.path / 'config.json'}: its model_args describe a {folder.family} model with "
                             f"{what}, but {folder.weights_path.name} holds {len(header):,} tensors of "
                             f"{n_elements:,} elements: the config does not match the weights") from None
    finally:
        for h in handles:
            h.remove()


def state_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into ``model`` ("2 missing: a, b; 1 of another shape: ..."), or ""."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    shapes = [f"{k} {list(state[k].shape)} in the file vs {list(want[k])} per the config"
              for k in sorted(set(want) & set(state)) if tuple(state[k].shape) != want[k]]
    return "; ".join(f"{len(x)} {label}: {', '.join(x[:4])}{' …' if len(x) > 4 else ''}"
                     for label, x in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
                     if x)


def _construct(klass, args: dict[str, Any], folder: ModelFolder):
    try:
        return klass(**args)
    except (TypeError, ValueError, OverflowError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokError(f"{folder.path / 'config.json'}: model_args do not fit the {folder.family} model "
                       f"({msg})") from None


def check_architecture(klass, args: dict[str, Any], header: Mapping[str, tuple[str, tuple[int, ...]]],
                       folder: ModelFolder) -> None:
    """Build the model on the meta device (no memory) under :func:`registration_budget` and compare its
    state_dict's names, shapes and dtype kinds with the weights' header; one TokError naming the mismatch. A
    family whose constructor cannot run on the meta device is checked by the real build's budget alone."""
    try:
        with registration_budget(header, folder), torch.device("meta"):
            model = klass(**args)
    except ConfigMismatch:
        raise
    except TokError as e:  # the family refused its model_args: say which file
        raise TokError(f"{folder.path / 'config.json'}: {e}") from None
    except Exception:  # noqa: BLE001 - not buildable on meta: the budgeted real build reports real errors
        return
    want = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in header]
    unexpected = [k for k in header if k not in want]
    if missing or unexpected:
        raise ConfigMismatch(f"{folder.weights_path} does not match the {folder.family} model its config.json describes "
                       f"(missing {len(missing)} tensors e.g. {missing[:3]}, unexpected {len(unexpected)} e.g. "
                       f"{unexpected[:3]})")
    for k, (dtype, shape) in want.items():
        fdtype, fshape = header[k]
        if tuple(fshape) != shape or _kind(fdtype) != _kind(dtype):
            raise ConfigMismatch(f"{folder.weights_path}: tensor {k} is {fdtype} {list(fshape)} but the {folder.family} "
                           f"model its config.json describes needs {str(dtype).replace('torch.', '')} {list(shape)}")
