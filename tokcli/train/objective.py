"""What a training run optimises: the :class:`Objective` a family (or a generator) hands to the loop.

The loop (``loop.py``) knows data, steps, gradient accumulation, AMP, DDP, EMA, the learning-rate schedule,
gradient clipping, checkpoints, metrics and export. Everything else is the objective's:

- **networks**: ``build(model_args)`` fills ``self.networks`` (name -> ``nn.Module``, ``"model"`` first). The
  model is the network that is EMA'd, checkpointed as ``model.safetensors`` and exported; every other network
  (a discriminator, a teacher that trains, ...) is checkpointed as ``<name>.safetensors`` and gets its own
  optimizer (``make_optimizer``). Frozen parts are frozen here (``requires_grad_(False)``): the optimizers and the
  EMA only see parameters that require gradients.
- **phases**: ``phases(step)`` lists the networks that step at ``step``, in order (``["model", "disc"]``). For each
  phase the loop zeroes that network's gradients, calls ``begin_phase`` once, then for every micro-batch
  ``loss(phase, nets, batch, micro, step) -> (loss, {name: float})`` under autocast, backpropagates
  ``loss / grad_accum`` (gradient synchronisation only on the last micro-batch), clips and steps the phase's
  optimizer. ``nets`` are the networks as the loop runs them (DDP-wrapped when distributed; ``self.networks`` are
  the bare modules). Every phase of a step sees the same micro-batches (``batch`` is the same object for a given
  ``micro``), so a later phase can reuse what an earlier one computed (the reconstruction objective's
  discriminator takes the generator phase's reconstructions); ``end_step`` drops such caches.
- **state**: ``state_dict`` / ``load_state_dict`` hold everything besides weights and optimizers that exact resume
  needs (plain Python numbers and tensors: ``state.pt`` is read with ``weights_only=True``), e.g. LeCAM's EMAs.
- **data**: ``data`` names the data module the loop builds from ``[data]`` (``train/data.py``: ``"images"``). The
  loop never looks inside a batch beyond moving its tensors to the device.
- **export**: ``export_model(state, data)`` returns the model to save (after calibrating ``model_args`` on the
  exported weights if the family needs it, as KL's latent scale); ``loss_terms`` / ``card_lines`` /
  ``card_sections`` / ``training_record`` describe the run in the model card and in ``config.json``'s ``training``.

How the objectives still to come fit, unchanged loop:

- **Flow matching (FlowMo-style decoders, a velocity field v(x_t, t | tokens))**: ``networks = {"model": the
  tokenizer with its flow decoder}``; one phase ``"model"``; ``loss`` draws t and noise from the global torch RNG
  (restored on resume, so resume stays exact), forms x_t = (1 - t) x + t eps and returns
  ||v(x_t, t) - (eps - x)||^2 plus the encoder's terms. A second stage that post-trains a k-step sampler is either a
  second objective name (``model.objective = "sampler"``) whose ``build`` starts from ``model.init_from`` and freezes
  the encoder, or an extra network ("student") with its own phase. ``export_model`` writes the sampler's defaults
  (steps, schedule) into the model's ``decode_defaults``.
- **Token-sequence generators (cross-entropy on token files)**: ``data = "tokens"`` (a data module that reads
  ``tok encode`` token files and yields dicts of LongTensors, registered in ``train/data.py``); ``networks =
  {"model": the transformer}``; ``loss`` returns the next-token cross-entropy (``logs = {"ce": ..., "acc": ...}``);
  ``card_sections`` describes the tokenizer the token files came from; ``sample_grid`` may decode a few samples.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from tokcli.errors import TokUsageError
from tokcli.train.recipe import Recipe

#: names a network cannot have (checkpoint files ema.safetensors, state.pt)
RESERVED = frozenset({"ema", "state"})


class Objective:
    """Base class: subclasses implement ``build_networks`` and ``loss``; everything else has a default."""

    #: the data module the loop builds from the [data] section (see ``train/data.py``)
    data: str = "images"

    def __init__(self, recipe: Recipe, *, device: torch.device | str = "cpu", world_size: int = 1):
        self.recipe = recipe
        self.device = torch.device(device)
        self.world_size = int(world_size)
        self.networks: dict[str, nn.Module] = {}

    # --- set-up ---------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load what the objective needs besides its networks (a perceptual network), before any data is read,
        so that a missing file stops the run at once."""

    def make_data(self, rank: int = 0, world_size: int = 1):
        """This rank's data module: the ``data`` kind built from ``[data]`` (``train/data.py``). An objective that
        already read its data in :meth:`prepare` (the generators' token files) hands that over instead."""
        from tokcli.train.data import make_data

        return make_data(self.data, self.recipe, rank=rank, world_size=world_size)

    def build(self, model_args: Mapping[str, Any] | None = None) -> dict[str, nn.Module]:
        """Build ``self.networks`` on ``self.device``. ``model_args``: the model's arguments from a checkpoint
        (resume; the weights are loaded next), or None for a fresh run (from the recipe / ``model.init_from``)."""
        nets = self.build_networks(dict(model_args) if model_args is not None else None)
        if not nets or next(iter(nets)) != "model" or set(nets) & RESERVED:
            raise TypeError(f"{type(self).__name__}.build_networks must return a dict whose first entry is 'model' "
                            f"(and no network named {' or '.join(sorted(RESERVED))}), got {list(nets)}")
        self.networks = {k: v.to(self.device) for k, v in nets.items()}
        return self.networks

    def build_networks(self, model_args: dict | None) -> dict[str, nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def family(self):
        """The recipe's :class:`~tokcli.core.family.Family`."""
        from tokcli.core.registry import get_family

        return get_family(self.recipe.model.family)

    @property
    def model(self) -> nn.Module:
        return self.networks["model"]

    def model_args(self) -> dict[str, Any]:
        """The model's JSON arguments (written into checkpoints and the exported folder)."""
        return dict(getattr(self.model, "model_args", None) or self.recipe.model.model_args)

    def base_lr(self, name: str) -> float:
        """Learning rate of network ``name`` before the schedule: ``optim.lr`` for the model, ``optim.disc_lr``
        (default ``optim.lr``) for every other network."""
        o = self.recipe.optim
        return o.lr if name == "model" else (o.disc_lr or o.lr)

    def make_optimizer(self, name: str, net: nn.Module) -> torch.optim.Optimizer:
        """The optimizer of network ``name`` over its trainable parameters (``[optim]``: Adam or AdamW)."""
        o = self.recipe.optim
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            raise TokUsageError(f"{self.recipe.source}: the {name} network has no trainable parameter")
        cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=self.base_lr(name), betas=tuple(o.betas), weight_decay=o.weight_decay)

    # --- one step ---------------------------------------------------------------------------------------------
    def phases(self, step: int) -> list[str]:
        """Names of the networks that step at ``step``, in order."""
        return ["model"]

    def begin_phase(self, phase: str, step: int) -> None:
        """Called once per phase before its micro-batches (e.g. switch a discriminator's gradients on or off)."""

    def loss(self, phase: str, nets: Mapping[str, nn.Module], batch: Any, micro: int,
             step: int) -> tuple[torch.Tensor, dict[str, float]]:  # pragma: no cover - abstract
        """The loss of micro-batch ``micro`` for ``phase`` and what to log about it (averaged over micro-batches
        by the loop; the loop adds ``loss`` itself for the ``model`` phase)."""
        raise NotImplementedError

    def end_step(self, step: int) -> None:
        """Called after every phase of a step has stepped (drop per-step caches)."""

    def sample_grid(self) -> np.ndarray | None:
        """uint8 [H, W, 3] image of the last step (inputs and outputs), for ``run.sample_every``; None: none."""
        return None

    # --- exact resume -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """``state``: what ``state_dict`` returned (checkpoints written before objectives existed: the whole
        ``state.pt``, whose top-level keys held the same entries)."""

    # --- export -----------------------------------------------------------------------------------------------
    def export_model(self, state: dict[str, torch.Tensor], data) -> nn.Module:
        """The model to write with the weights ``state`` (its ``model_args`` and ``decode_defaults`` are saved).
        Default: the trained model. Families whose ``model_args`` depend on the weights calibrate a copy here."""
        return self.model

    def rebuilt_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A fresh model from ``model_args()`` holding ``state``, in eval mode (for calibration at export)."""
        model = self.family.build(self.model_args()).to(self.device)
        model.load_state_dict(state, strict=True)
        return model.eval()

    def describe(self) -> str:
        """A few words after the card's first line, e.g. ``"stage 1"``."""
        return ""

    def loss_terms(self) -> list[str]:
        """The loss as text, one term each (``["1.0 x L1", "0.1 x entropy (official)"]``)."""
        return []

    def card_lines(self) -> list[str]:
        """Extra ``- key: value`` lines of the card's Training section."""
        return []

    def card_sections(self, model: nn.Module) -> dict[str, str]:
        """Extra card sections (title -> markdown) about the exported model."""
        return {}

    def training_record(self) -> dict[str, Any]:
        """Extra keys of ``config.json``'s ``training`` record."""
        return {}
