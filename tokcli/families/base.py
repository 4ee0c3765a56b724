"""The Tokenizer contract every family implements (see DESIGN.md).

A Tokenizer is an ``nn.Module`` with:

- ``spec``: a :class:`TokenSpec` describing what ``encode`` returns;
- ``preprocess``: dict with ``image_size`` (int), ``crop`` ("adm_center"), ``value_range`` ([-1, 1]),
  ``multiple_of`` (the spatial size the model needs images to be a multiple of);
- ``encode(x)``: ``x`` float [B, 3, H, W] in [-1, 1] -> tokens (a torch tensor, layout given by ``spec``);
- ``decode(tokens, *, seed=None, noise=None, clamp=True, **sampler)`` -> images [B, 3, H, W] in [-1, 1]
  (``clamp=False`` returns the raw decoder output, as the official code does); the folder's ``decode`` defaults
  are applied by the base class, families implement ``_decode``;
- ``Cls(**model_args)``, ``from_folder`` / ``save_folder`` (:class:`tokcli.core.model.TokModel`);
- training is the family's objective (``families/<name>/objective.py``); reconstruction families keep
  ``forward(x) -> (recon, aux)`` with the quantizer's losses and statistics in ``aux``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from tokcli.core.model import TokModel
from tokcli.errors import TokError, TokUsageError

TOKEN_KINDS = ("indices", "bits", "latents")


@dataclass
class TokenSpec:
    """What one image's tokens look like.

    kind: "indices" (integer codes), "bits" (0/1 per bit) or "latents" (floats).
    shape: per-image token shape at the model's default image size, e.g. (h, w, g).
    codebook_size: number of codes per index (indices), None otherwise.
    bits: bits per token vector (bits), None otherwise.
    latent_dim: channels per latent (latents), None otherwise.
    downsample: spatial reduction factor for 2-D tokenizers (the shape scales with the image); None for 1-D.
    layout: a short human description of the axis order and index convention.
    """

    kind: str
    shape: tuple[int, ...]
    codebook_size: int | None = None
    bits: int | None = None
    latent_dim: int | None = None
    downsample: int | None = None
    layout: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in TOKEN_KINDS:
            raise ValueError(f"token kind must be one of {TOKEN_KINDS}, got {self.kind!r}")
        self.shape = tuple(int(s) for s in self.shape)

    def shape_for(self, height: int, width: int) -> tuple[int, ...]:
        """Per-image token shape for an input of height x width (2-D tokenizers scale with the image)."""
        if self.downsample is None:
            return self.shape
        f = self.downsample
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not a multiple of the downsample factor {f}")
        return (height // f, width // f, *self.shape[2:])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


class Tokenizer(TokModel):
    """Base class of every tokenizer family (see the module docstring for the contract).

    Subclasses implement ``spec``, ``encode`` and ``_decode`` (raw decoder output) and set ``image_size`` /
    ``multiple_of`` (used by the default ``preprocess``); stochastic decoders set ``stochastic_decoder`` and take
    ``seed`` / ``noise``; sampler keywords a family accepts are listed in ``sampler_options``."""

    #: decode() keywords beyond seed / noise / clamp that this family understands (e.g. ("steps", "cfg")).
    sampler_options: tuple[str, ...] = ()
    stochastic_decoder: bool = False
    #: keys of ``spec.extra`` a token file must match to be decoded by this model (what the decoder depends on).
    header_checked_extra: tuple[str, ...] = ()
    #: convolutional families run in the layout :func:`tokcli.core.device.memory_format_for` picks (set at load by
    #: :meth:`set_memory_format`); images and latents enter their networks through :meth:`in_layout`.
    conv_layout: bool = False
    memory_format: str = "contiguous"

    def set_memory_format(self, fmt: str) -> "Tokenizer":
        """Put the 4-D weights and the inputs of the networks in ``fmt`` ("channels_last" / "contiguous")."""
        from tokcli.nn.norm import accurate_group_norms

        self.memory_format = fmt
        if fmt == "channels_last":
            accurate_group_norms(self)  # PyTorch's channels-last GroupNorm is not (tokcli/nn/norm.py)
        return self.to(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)

    #: the sub-networks :meth:`compile_networks` wraps in ``torch.compile`` (dotted attribute paths)
    compile_targets: tuple[str, ...] = ("encoder", "decoder")
    compiled: bool = False

    def compile_networks(self, **options) -> "Tokenizer":
        """``torch.compile`` the encoder and decoder networks (:attr:`compile_targets`) for inference: the first
        call of each shape compiles (seconds to minutes), later ones run the fused kernels. Rounding may differ from
        eager mode; token files record ``compiled``."""
        for path in self.compile_targets:
            parent, _, name = path.rpartition(".")
            owner = self.get_submodule(parent) if parent else self
            net = getattr(owner, name, None)
            if isinstance(net, torch.nn.Module):
                setattr(owner, name, torch.compile(net, **options))
        self.compiled = True
        return self

    def in_layout(self, t: torch.Tensor) -> torch.Tensor:
        """A 4-D image / latent tensor in the model's layout (a no-op when it already is)."""
        if t.dim() != 4:
            return t
        return t.contiguous(memory_format=torch.channels_last if self.memory_format == "channels_last"
                            else torch.contiguous_format)

    # --- the contract -------------------------------------------------------------------------------
    @property
    def spec(self) -> TokenSpec:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        return int(self.model_args["image_size"])

    @property
    def multiple_of(self) -> int:
        """The spatial size the model needs images to be a multiple of (its downsampling, or the image size)."""
        return int(self.spec.downsample or self.image_size)

    @property
    def preprocess(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "crop": "adm_center", "value_range": [-1, 1],
                "multiple_of": self.multiple_of}

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    #: the spec of :meth:`usage_ids` for a continuous model that also has discrete codes (SoftVQ's argmax ids);
    #: None when the tokens are the codes or there are none. ``tok bench usage`` counts these.
    id_spec: TokenSpec | None = None

    def usage_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the discrete codes described by :attr:`id_spec` (families that set it)."""
        raise NotImplementedError(f"{self.family} models have no discrete codes besides their tokens")

    # --- checks shared by the families ---------------------------------------------------------------
    def check_images(self, x: torch.Tensor) -> torch.Tensor:
        """Refuse anything but images [B, 3, H, W] whose sides are multiples of ``multiple_of``; returns ``x`` on the
        model's device and dtype."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise TokError(f"expected images of shape [B, 3, H, W], got {shape}")
        m = self.multiple_of
        if x.shape[2] % m or x.shape[3] % m:
            raise TokError(f"image size {x.shape[2]}x{x.shape[3]} is not a multiple of {m} (what the "
                           f"{self.family} model needs)")
        p = next(self.parameters(), None)
        return self.in_layout(x if p is None else x.to(device=p.device, dtype=p.dtype))

    def token_tensor(self, tokens, shape: Sequence[int | str], *, integer: bool) -> torch.Tensor:
        """Tokens as a batched tensor on the model's device (int64 ids, or float32 latents), with a one-line
        :class:`TokError` when the per-image shape is not ``shape`` (a name, e.g. ``"h"``: any size on that axis).
        An unbatched token tensor (one image) gets its batch axis."""
        t = torch.as_tensor(tokens, device=self.device)
        if integer and (t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool):
            raise TokError(f"{self.family} tokens must be integers, got {t.dtype}")
        t = t.long() if integer else t.float()
        if t.dim() == len(shape):
            t = t.unsqueeze(0)
        if t.dim() != len(shape) + 1 or any(isinstance(s, int) and s != n for s, n in zip(shape, t.shape[1:])):
            raise TokError(f"{self.family} tokens must be [N, {', '.join(map(str, shape))}], got {list(t.shape)}")
        return t

    def _decode(self, tokens: torch.Tensor, *, seed=None, noise=None, **sampler) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def sampler_kwargs(self, sampler: dict[str, Any]) -> dict[str, Any]:
        """The sampler keywords ``_decode`` gets: the folder's ``decode`` defaults for this family's
        ``sampler_options``, overridden by the given ones (``None`` = not given). Keywords the family does not take
        are refused with the list it accepts (:class:`TokUsageError`, a usage error: exit code 2)."""
        sampler = {k: v for k, v in sampler.items() if v is not None}
        unknown = sorted(set(sampler) - set(self.sampler_options))
        if unknown:
            accepted = ", ".join(self.sampler_options) or "none"
            raise TokUsageError(f"the {self.family} decoder takes no sampler option {', '.join(unknown)} "
                                f"(it takes: {accepted})")
        defaults = {k: v for k, v in self.decode_defaults.items() if k in self.sampler_options}
        return {**defaults, **sampler}

    def decode(self, tokens: torch.Tensor, *, seed: int | Sequence[int] | None = None,
               noise: torch.Tensor | None = None, clamp: bool = True, **sampler) -> torch.Tensor:
        """Tokens -> images [B, 3, H, W] in [-1, 1] (``clamp=False``: the raw decoder output).

        The folder's ``decode`` defaults (seed, steps, cfg, ...) apply here, once, for every family; explicit
        arguments win (:meth:`sampler_kwargs`)."""
        sampler = self.sampler_kwargs(sampler)
        if seed is None and self.stochastic_decoder:
            seed = self.decode_defaults.get("seed")
        out = self._decode(tokens, seed=seed, noise=noise, **sampler)
        return out.clamp(-1, 1) if clamp else out

    def reconstruct(self, x: torch.Tensor, *, seed: int | None = None, **sampler) -> torch.Tensor:
        """encode then decode, clamped to [-1, 1]."""
        return self.decode(self.encode(x), seed=seed, **sampler)

    def folder_config(self) -> dict[str, Any]:
        return {"tokens": self.spec.to_dict(), "preprocess": self.preprocess}
