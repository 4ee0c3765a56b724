"""The KL tokenizer: continuous latents from a KL autoencoder (:class:`tokcli.nn.klvae.KLVAE`).

    encode: image in [-1, 1] -> (posterior mean - latent_shift) * latent_scale, channels last [B, h, w, C]
    decode: latents -> decoder -> image

Training (``forward``) samples the posterior and returns the KL term; the trainer adds ``loss.kl_weight`` times it
(LDM convention: summed over the latent, averaged over the batch). ``latent_scale`` is 1 / std of the posterior mean
over the training images, measured at export (``calibrate``), as MAR did for its 0.2325 (no shift).

model_args: ``vae`` (the LDM-style architecture block, see tokcli/nn/klvae.py), ``latent_scale`` (default 1),
``latent_shift`` (default 0), ``image_size`` (the default inference size; any multiple of the downsampling works).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from tokcli.errors import TokError, TokUsageError
from tokcli.families.base import TokenSpec, Tokenizer

FAMILY = "kl"


def normalize_model_args(args: dict[str, Any]) -> dict[str, Any]:
    if "vae" not in args:
        raise TokError("KL model_args need a 'vae' block (the autoencoder architecture)")
    from tokcli.nn.klvae import VAE_CONFIG_KEYS

    vae = {k: v for k, v in dict(args["vae"]).items() if k in VAE_CONFIG_KEYS}
    for k in ("ch", "ch_mult", "num_res_blocks", "embed_dim", "resolution"):
        if k not in vae:
            raise TokError(f"KL model_args 'vae' block lacks {k!r}")
    factor = 2 ** (len(vae["ch_mult"]) - 1)
    size = int(args.get("image_size") or vae["resolution"])
    if size % factor:
        raise TokError(f"image_size {size} is not a multiple of the VAE's downsampling {factor}")
    return {"vae": vae, "latent_scale": float(args.get("latent_scale", 1.0)),
            "latent_shift": float(args.get("latent_shift", 0.0) or 0.0), "image_size": size}


class KL(Tokenizer):
    family = FAMILY
    conv_layout = True  # convolutional networks: either memory layout (tokcli.core.device.memory_format_for)
    compile_targets = ("vae.vae.encoder", "vae.vae.decoder")  # diffusers' AutoencoderKL halves
    # border_pad: decode a latent padded by this many cells (edge values repeated) and crop the image back. A decoder
    # trained on small crops can learn a coloured frame from its zero-padded convolutions (kl-tiny: error x1.8 in
    # the outer 4 px); the padding moves that frame outside the image. 0 = the plain decoder (the default).
    sampler_options = ("border_pad",)

    def __init__(self, **model_args):
        super().__init__()
        from tokcli.nn.klvae import KLVAE

        self.model_args = normalize_model_args(model_args)
        a = self.model_args
        self.vae = KLVAE(a["vae"], latent_scale=a["latent_scale"], latent_shift=a["latent_shift"])
        self.downsample = 2 ** (len(a["vae"]["ch_mult"]) - 1)
        self.latent_dim = int(a["vae"]["embed_dim"])

    @property
    def spec(self) -> TokenSpec:
        a, f = self.model_args, self.downsample
        return TokenSpec(
            kind="latents", shape=(a["image_size"] // f, a["image_size"] // f, self.latent_dim),
            latent_dim=self.latent_dim, downsample=f,
            layout="rows, columns, channels (channels last); (posterior mean - latent_shift) * latent_scale",
            extra={"latent_scale": a["latent_scale"], "latent_shift": a["latent_shift"], "posterior": "mean"})

    def prepare_for_inference(self) -> None:
        """The decoder's upsampling computed at low resolution (:meth:`KLVAE.prepare_for_inference`)."""
        self.vae.prepare_for_inference()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(self.check_images(x)).permute(0, 2, 3, 1).contiguous()

    def _decode(self, tokens: torch.Tensor, *, seed=None, noise=None, border_pad: int = 0) -> torch.Tensor:
        t = self.in_layout(self.token_tensor(tokens, ("h", "w", self.latent_dim), integer=False).permute(0, 3, 1, 2))
        p = int(border_pad)
        if p < 0 or p != border_pad:
            raise TokUsageError(f"border_pad must be a whole number >= 0, got {border_pad!r}")
        if p == 0:
            return self.vae.decode(t)
        y = self.vae.decode(torch.nn.functional.pad(t, (p, p, p, p), mode="replicate"))
        c = p * self.downsample
        return y[..., c:-c, c:-c]

    def forward(self, x: torch.Tensor):
        """Training forward: decode a posterior sample; aux["kl"] = KL(q(z|x) || N(0, I))."""
        from tokcli.nn.klvae import kl_divergence

        mean, std = self.vae.posterior(x)
        z = mean + std * torch.randn_like(mean)
        recon = self.vae.decode(self.vae.scale_latent(z))
        return recon, {"kl": kl_divergence(mean, std), "posterior_std": std.mean().detach()}

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
        """Set ``latent_scale`` to 1 / std of the (unscaled) posterior mean over ``batches`` (no shift, as MAR).
        Returns the updated model_args."""
        vals = [self.vae.posterior(x.to(self.device))[0].double().flatten() for x in batches]
        if not vals:
            raise TokError("no image to calibrate the latent scale on")
        std = float(torch.cat(vals).std())
        self.model_args["latent_scale"] = self.vae.latent_scale = round(1.0 / std, 6)
        self.model_args["latent_shift"] = self.vae.latent_shift = 0.0
        return dict(self.model_args)
