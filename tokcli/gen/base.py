"""The Generator contract (DESIGN.md, "Generator"): a :class:`~tokcli.core.model.TokModel` whose folder names the
tokenizer it samples for and carries its sampling defaults.

config.json, besides ``family`` / ``model_args`` / ``provenance`` (``TokModel.save_folder``):

- ``tokenizer``: ``{"name": registry name or local-dir:PATH, "sha256": the tokenizer weights' sha256 or null}``
  (a relative local-dir PATH is relative to the generator folder: :attr:`Generator.tokenizer_name`);
  ``tok generate`` decodes through that model (resolved like any model name) and refuses other weights;
- ``sample``: the sampler defaults (``steps``, ``cfg``, the family's own knobs) that :meth:`Generator.sample` applies
  under the explicit keywords.

The contract:

- ``forward`` keeps the official module's signature (SiT: ``gen(x_t, t, y) -> v``), so the parity fixtures apply;
- ``sample(labels, *, seed=None, noise=None, **sampler) -> samples``: sample i is drawn from its own CPU generator
  seeded with ``seed + i`` (or ``seed[i]`` for a list), so a result does not depend on the batch size or the device;
  ``noise=`` (the family's noise, e.g. the initial latents) replays a run exactly. Labels out of range, steps < 1
  and unknown sampler keywords are one-line :class:`TokUsageError`;
- ``tokens_for(samples, tokenizer)``: the samples as the tokens that tokenizer's ``decode`` (and a token file) takes;
- ``check_tokenizer(tokenizer)``: one line when a tokenizer's tokens are not what this generator produces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from tokcli.core.model import TokModel
from tokcli.errors import TokError, TokUsageError


def per_sample_seeds(seed: int | Sequence[int] | None, n: int, default: int = 0) -> list[int]:
    """Seed of each of ``n`` samples: ``seed + i`` for an int (``default`` when None), or the given list."""
    if seed is None:
        seed = default
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise TokUsageError(f"{len(seed)} seeds for {n} samples")
        return [int(s) for s in seed]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TokUsageError(f"seed must be an integer, got {seed!r}")
    return [int(seed) + i for i in range(n)]


class Generator(TokModel):
    """Base class of every generator family (see the module docstring).

    Subclasses set ``sampler_options`` (the keywords ``sample`` takes) and ``num_classes``, and implement
    ``_sample(labels, *, seeds, noise, **sampler)`` (labels checked, sampler keywords complete) and ``tokens_for``."""

    #: sample() keywords beyond seed / noise (e.g. ("steps", "cfg", "sampler")).
    sampler_options: tuple[str, ...] = ()
    #: what the generator makes: the token kind of the tokenizers it pairs with ("latents", "indices", ...).
    token_kind: str = "latents"

    def __init__(self):
        super().__init__()
        self.tokenizer_ref: dict[str, Any] = {}
        self.sample_defaults: dict[str, Any] = {}

    # --- the folder ------------------------------------------------------------------------------------------
    def folder_config(self) -> dict[str, Any]:
        return {"tokenizer": dict(self.tokenizer_ref), "sample": dict(self.sample_defaults)}

    def read_folder_config(self, config: Mapping[str, Any]) -> None:
        ref = config.get("tokenizer") or {}
        sample = config.get("sample") or {}
        if not isinstance(ref, Mapping) or not isinstance(sample, Mapping):
            raise TokError(f"generator config of {config.get('name', 'the model')}: 'tokenizer' and 'sample' must "
                           "be JSON objects")
        self.tokenizer_ref = dict(ref)
        self.sample_defaults = {**self.sample_defaults, **dict(sample)}

    @property
    def tokenizer_name(self) -> str | None:
        """The recorded tokenizer name; a relative ``local-dir:PATH`` is resolved against the folder this generator
        was loaded from (a tokenizer kept inside the generator folder moves with it)."""
        name = self.tokenizer_ref.get("name") or None
        if name and name.startswith("local-dir:") and self.source:
            path = Path(name[len("local-dir:"):]).expanduser()
            if not path.is_absolute():
                return "local-dir:" + str(Path(self.source) / path)
        return name

    # --- what subclasses give ------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def null_class(self) -> int | None:
        """The label of the unconditional branch (the label table's last row, there when labels were dropped in
        training: ``class_dropout_prob > 0``), None for a model without one (no CFG)."""
        return self.num_classes if self.model_args["class_dropout_prob"] > 0 else None

    def _sample(self, labels: torch.Tensor, *, seeds: list[int], noise: Any, **sampler) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def tokens_for(self, samples: torch.Tensor, tokenizer) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_tokenizer(self, tokenizer) -> None:
        """One TokError when ``tokenizer`` does not take what this generator makes (subclasses check shapes)."""
        kind = tokenizer.spec.kind
        if kind != self.token_kind:
            raise TokError(f"{tokenizer.name or tokenizer.family} makes {kind} tokens; the {self.family} generator "
                           f"{self.name} samples {self.token_kind}")

    # --- the contract --------------------------------------------------------------------------------------------
    def sampler_kwargs(self, sampler: Mapping[str, Any]) -> dict[str, Any]:
        """The folder's ``sample`` defaults for this family's ``sampler_options``, overridden by the given keywords
        (None = not given); unknown keywords are refused with the list of accepted ones."""
        given = {k: v for k, v in sampler.items() if v is not None}
        unknown = sorted(set(given) - set(self.sampler_options))
        if unknown:
            raise TokUsageError(f"the {self.family} generator takes no sampler option {', '.join(unknown)} "
                                f"(it takes: {', '.join(self.sampler_options) or 'none'})")
        defaults = {k: v for k, v in self.sample_defaults.items() if k in self.sampler_options}
        out = {**defaults, **given}
        steps = out.get("steps")
        if "steps" in self.sampler_options and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise TokUsageError(f"steps must be a positive integer, got {steps!r}")
        self.check_sampler(out)
        return out

    def check_sampler(self, options: Mapping[str, Any]) -> None:
        """One TokUsageError for a sampler option of a bad value (families check their own knobs)."""

    def check_labels(self, labels) -> torch.Tensor:
        """Class ids as int64 [N] on the model's device; one line for an id outside 0..num_classes-1."""
        y = torch.as_tensor(labels)
        if y.dim() == 0:
            y = y.unsqueeze(0)
        if y.numel() == 0:
            raise TokUsageError("no labels: nothing to sample")
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise TokUsageError(f"labels must be a list of class ids, got {y.dtype} of shape {list(y.shape)}")
        bad = y[(y < 0) | (y >= self.num_classes)]
        if bad.numel():
            raise TokUsageError(f"class {int(bad[0])} is out of range: {self.name or 'the generator'} has classes "
                                f"0..{self.num_classes - 1}")
        return y.long().to(self.device)

    def sample(self, labels, *, seed: int | Sequence[int] | None = None, noise: Any = None,
               **sampler) -> torch.Tensor:
        """Samples for ``labels`` (see the module docstring); the folder's ``sample`` defaults apply under the given
        keywords, and ``seed`` defaults to the folder's ``sample.seed`` (else 0)."""
        opts = self.sampler_kwargs(sampler)
        y = self.check_labels(labels)
        seeds = per_sample_seeds(seed, len(y), int(self.sample_defaults.get("seed", 0) or 0))
        with torch.inference_mode():
            return self._sample(y, seeds=seeds, noise=noise, **opts)
