"""The FlowMo tokenizer (Sargent et al. 2025, arXiv:2503.11056; official code kylesargent/FlowMo): an MMDiT encoder
turns the image into ``code_length`` latent positions of ``context_dim`` sign bits (LFQ), and an MMDiT decoder is a
rectified-flow model that samples the image from noise conditioned on those bits (tokcli/nn/mmdit.py,
tokcli/quant/lfq_groups.py, sampler.py).

    encode: image [B, 3, H, W] in [-1, 1] -> patchify -> encoder (latent input: zeros, no timestep)
            -> latent stream [B, L, C] -> sign -> ids [B, L * fh] (fh = C / fg sub-tokens of fg bits per position)
    decode: ids -> +-1 code [B, L, C] -> cond = [code, 1] -> Euler (or Heun: ``solver``) sampler from z0 ~ N(0, I)
            (sampler.py)

Tokens are the official LFQ ids (``kind="indices"``, codebook 2**fg), one-dimensional: they do not scale with the
image, so a model works at its trained ``image_size`` only. The decoder is stochastic: image i of a decode gets the
noise of seed ``seed + i`` (a CPU generator, so the same on every device and for any batch size), or ``noise=`` z0
as given.

model_args: ``image_size`` (256), ``patch_size`` (4), ``code_length`` (L, 256), ``context_dim`` (C, 18),
``codebook_size_for_entropy`` (fg, 9; the official name), per tower ``enc_`` / ``dec_`` ``hidden_size``,
``num_heads``, ``depth`` and ``axes_dim`` (RoPE split; default [hd/8, 7hd/16, 7hd/16]), ``mlp_ratio`` (4),
``theta`` (10000), ``mup_attention`` (true: SDPA scale 8 / head_dim, as every released config).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch

from tokcli.core.model_args import complete, integer
from tokcli.errors import TokError
from tokcli.families.base import TokenSpec, Tokenizer
from tokcli.families.flowmo import sampler as fm_sampler

FAMILY = "flowmo"
DEFAULTS: dict[str, Any] = {
    "image_size": 256, "patch_size": 4, "code_length": 256, "context_dim": 18, "codebook_size_for_entropy": 9,
    "enc_hidden_size": 768, "enc_num_heads": 12, "enc_depth": 8, "enc_axes_dim": None,
    "dec_hidden_size": 1152, "dec_num_heads": 12, "dec_depth": 16, "dec_axes_dim": None,
    "mlp_ratio": 4.0, "theta": 10000.0, "mup_attention": True,
}
_INTS = ("image_size", "patch_size", "code_length", "context_dim", "codebook_size_for_entropy", "enc_hidden_size",
         "enc_num_heads", "enc_depth", "dec_hidden_size", "dec_num_heads", "dec_depth")
# the official base.yaml's eval.sampling, in tok's decode keywords
DECODE_DEFAULTS: dict[str, Any] = {"seed": 0, "steps": 25, "cfg": 1.5, "schedule": "pow_0.25",
                                   "cfg_interval": [0.17, 1.02]}
BIT_LAYOUT = "flowmo-strided-lsb"


def _axes(a: dict, side: str) -> list[int]:
    from tokcli.nn.rope import axes_for_head_dim

    hidden, heads = a[f"{side}_hidden_size"], a[f"{side}_num_heads"]
    if hidden % heads:
        raise TokError(f"FlowMo {side}_hidden_size {hidden} is not a multiple of {side}_num_heads {heads}")
    axes = a[f"{side}_axes_dim"]
    if axes is None:
        try:
            return axes_for_head_dim(hidden // heads)
        except ValueError as e:
            raise TokError(f"FlowMo {side} tower: {e}") from None
    if not isinstance(axes, (list, tuple)) or len(axes) != 3 or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 2 or d % 2 for d in axes):
        raise TokError(f"FlowMo {side}_axes_dim must be three positive even integers, got {axes!r}")
    if sum(axes) != hidden // heads:
        raise TokError(f"FlowMo {side}_axes_dim {list(axes)} does not sum to the head size {hidden // heads}")
    return [int(d) for d in axes]


def normalize_model_args(args: dict[str, Any]) -> dict[str, Any]:
    """Checked, complete model_args (defaults filled in, RoPE splits resolved)."""
    a = complete("FlowMo", args, (), DEFAULTS)
    for k in _INTS:
        a[k] = integer("FlowMo", k, a[k])
    for k in ("mlp_ratio", "theta"):
        if isinstance(a[k], bool) or not isinstance(a[k], (int, float)) or not (0 < a[k] < math.inf):
            raise TokError(f"FlowMo model_args {k} must be a positive number, got {a[k]!r}")
        a[k] = float(a[k])
    a["mup_attention"] = bool(a["mup_attention"])
    if a["image_size"] % a["patch_size"]:
        raise TokError(f"FlowMo image_size {a['image_size']} is not a multiple of patch_size {a['patch_size']}")
    fg = a["codebook_size_for_entropy"]
    if a["context_dim"] % fg or fg > 62:
        raise TokError(f"FlowMo context_dim {a['context_dim']} must be a multiple of codebook_size_for_entropy "
                       f"{fg} (at most 62 bits per id)")
    for side in ("enc", "dec"):
        a[f"{side}_axes_dim"] = _axes(a, side)
    return a


class FlowMo(Tokenizer):
    family = FAMILY
    stochastic_decoder = True
    sampler_options = ("steps", "cfg", "schedule", "cfg_interval", "solver")
    header_checked_extra = ("code_length", "context_dim", "fg", "fh", "bit_layout")

    def __init__(self, **model_args):
        super().__init__()
        from tokcli.nn.mmdit import MMDiT
        from tokcli.quant.lfq_groups import StridedLFQ

        self.model_args = a = normalize_model_args(model_args)
        p, c = a["patch_size"], a["context_dim"]
        towers = {}
        for side, ctx_in in (("enc", c), ("dec", c + 1)):
            hidden, heads = a[f"{side}_hidden_size"], a[f"{side}_num_heads"]
            towers[side] = MMDiT(in_channels=3 * p * p, context_dim=ctx_in, hidden=hidden, num_heads=heads,
                                 depth=a[f"{side}_depth"], axes_dim=a[f"{side}_axes_dim"], mlp_ratio=a["mlp_ratio"],
                                 theta=a["theta"], attn_scale=8.0 / (hidden // heads) if a["mup_attention"] else None)
        self.encoder, self.decoder = towers["enc"], towers["dec"]
        self.quantizer = StridedLFQ(c, a["codebook_size_for_entropy"])
        self.decode_defaults = dict(DECODE_DEFAULTS)

    # --- the contract -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.model_args["code_length"] * self.quantizer.fh

    @property
    def spec(self) -> TokenSpec:
        from tokcli.quant.lfq_groups import LAYOUT

        a, q = self.model_args, self.quantizer
        return TokenSpec(
            kind="indices", shape=(self.num_tokens,), codebook_size=q.codebook_size, downsample=None,
            layout=LAYOUT,
            extra={"code_length": a["code_length"], "context_dim": a["context_dim"], "fg": q.fg, "fh": q.fh,
                   "bit_layout": BIT_LAYOUT, "bits_per_image": a["code_length"] * a["context_dim"]})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the official LFQ ids [B, code_length * fh] int64."""
        return self.quantizer.ids(self.encode_latent(x))

    def _decode(self, tokens, *, seed: int | Sequence[int] | None = None, noise: torch.Tensor | None = None,
                steps: int = 25, cfg: float = 1.5, schedule: str = "pow_0.25", cfg_interval=(0.17, 1.02),
                solver: str = "euler") -> torch.Tensor:
        """ids [B, code_length * fh] -> the raw sample [B, 3, H, W] (the base class clips it, as official)."""
        cond = self.condition(self.codes_from_ids(tokens))
        z0 = self.initial_noise(cond.shape[0], seed, noise)
        return fm_sampler.sample(self.velocity, z0, cond, steps=steps, cfg=cfg, schedule=schedule,
                                 cfg_interval=cfg_interval, solver=solver)

    def sampler_kwargs(self, sampler: dict[str, Any]) -> dict[str, Any]:
        """The base class's keywords, with their values checked too (before any image is read or written)."""
        kw = super().sampler_kwargs(sampler)
        fm_sampler.check_options(**kw)
        return kw

    # --- the parts ------------------------------------------------------------------------------------
    def _positions(self, h: int, w: int) -> torch.Tensor:
        from tokcli.nn.rope import image_latent_positions

        p = self.model_args["patch_size"]
        return image_latent_positions(h // p, w // p, self.model_args["code_length"], device=self.device)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the encoder's latent stream [B, code_length, context_dim] (before the sign)."""
        from tokcli.nn.mmdit import patchify

        x = self.check_images(x)
        s = self.image_size
        if x.shape[2] != s or x.shape[3] != s:
            raise TokError(f"this FlowMo model takes only {s}x{s} images, got {x.shape[2]}x{x.shape[3]}")
        a = self.model_args
        txt = x.new_zeros(x.shape[0], a["code_length"], a["context_dim"])
        _, code = self.encoder(patchify(x, a["patch_size"]), txt, self._positions(s, s))
        return code

    def codes_from_ids(self, tokens) -> torch.Tensor:
        """ids [B, code_length * fh] (or one image's) -> exact +-1 codes [B, code_length, context_dim]."""
        t = self.token_tensor(tokens, (self.num_tokens,), integer=True)
        try:
            return self.quantizer.decode_ids(t, dtype=self.decoder.img_in.weight.dtype)
        except ValueError as e:
            raise TokError(f"invalid flowmo tokens: {e}") from None

    @staticmethod
    def condition(code: torch.Tensor) -> torch.Tensor:
        """The decoder's latent input ``[code, 1]`` (the mask channel last); CFG's null is this times 0."""
        return torch.cat((code, torch.ones_like(code[..., :1])), dim=-1)

    def velocity(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One decoder call: noisy image z [B, 3, H, W], t [B] in [0, 1], cond [B, L, C + 1] -> v [B, 3, H, W]."""
        from tokcli.nn.mmdit import patchify, unpatchify

        p, (h, w) = self.model_args["patch_size"], z.shape[2:]
        v, _ = self.decoder(patchify(z, p), cond, self._positions(h, w), t)
        return unpatchify(v, p, h, w)

    # --- training -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, keep: torch.Tensor | None = None,
                freeze_encoder: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        """Training pass (stage 1A): images x, times t [B], noise [B, 3, H, W], ``keep`` [B] (0 drops the whole
        condition for CFG, 1 keeps it) -> (v at x_t = (1 - t) x + t noise, aux). aux: the quantizer's
        ``entropy_aux`` / ``commitment`` (training mode; zeros when the encoder is frozen) and statistics, and
        ``x_t``. ``freeze_encoder``: no gradient into the encoder (its output is still quantized)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_encoder):
            pre = self.encode_latent(x)
        was = self.quantizer.training
        self.quantizer.train(was and not freeze_encoder)
        q = self.quantizer(pre)
        self.quantizer.train(was)
        cond = self.condition(q.quantized)
        if keep is not None:
            cond = cond * keep.to(cond.dtype)[:, None, None]
        tt = t.to(x.dtype)[:, None, None, None]
        x_t = (1 - tt) * x + tt * noise
        return self.velocity(x_t, t.to(x.dtype), cond), {**q.losses, **q.stats, "x_t": x_t}

    def initial_noise(self, n: int, seed=None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z0 [n, 3, S, S]: ``noise`` as given, else seed + i per image (an int) or one seed per image; None: the
        global RNG."""
        s, dtype = self.image_size, self.decoder.img_in.weight.dtype
        if noise is not None:
            noise = torch.as_tensor(noise)
            if tuple(noise.shape) != (n, 3, s, s):
                raise TokError(f"noise must have shape {[n, 3, s, s]}, got {list(noise.shape)}")
            return noise.to(device=self.device, dtype=dtype)
        if seed is None:
            return torch.randn((n, 3, s, s), device=self.device, dtype=dtype)
        seeds = [int(seed) + i for i in range(n)] if isinstance(seed, numbers.Integral) else [int(x) for x in seed]
        if len(seeds) != n:
            raise TokError(f"{len(seeds)} seeds for a batch of {n} images")
        return fm_sampler.make_noise(seeds, (3, s, s), self.device, dtype)
