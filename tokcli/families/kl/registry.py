"""Registry entries for the KL family (continuous latents). This module must stay free of heavy imports."""

from tokcli.core.entry import ModelEntry

REGISTRY = [
    ModelEntry(
        name="kl-tiny", family="kl", shipped=True, license="other",
        description="demo continuous KL VAE (downsample 8, 16 channels) trained by tok on CPU on 32 openly "
                    "licensed photos; the frozen base of coda-tiny",
        notes="see tokcli/weights/kl-tiny/README.md for data, training and measured quality; licence: "
              "other (trained on CC-BY, CC-BY-SA, GPL-2+, CC0 and public-domain photos, listed in the card)",
    ),
]
