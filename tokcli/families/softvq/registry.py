"""Registry entries for SoftVQ-VAE: the demo model shipped in tokcli/weights/ and the eight official releases (Hugging Face ``SoftVQVAE/<name>``, each a
``PyTorchModelHubMixin`` folder: ``config.json`` + fp32 ``model.safetensors``).

The architecture is built from each release's ``config.json`` (never from the name: ``softvq-l-32`` and
``softvq-l-32-512`` are a ViT-B encoder with a ViT-L decoder in their configs and file sizes), with the depth
counted in the checkpoint. ``model_args`` here hold only what the name guarantees (resolution, tokens L, width d);
the converter refuses a release whose config contradicts them. Metrics are the paper's (arXiv:2412.10958): rFID on
ImageNet-val at 256 (Tab. 1) or 512 (Tab. 2; softvq-l-32-512's 0.64 is the official README's, its paper table is in
an appendix we do not have) and SiT-XL gFID with CFG on the same latents. This module must stay free of heavy
imports: `tok models` reads it.
"""

from tokcli.core.entry import ModelEntry

_PAPER = "arXiv:2412.10958"
_ORG = "SoftVQVAE"
_SIZES = {"b": "ViT-B encoder, ViT-B decoder", "bl": "ViT-B encoder, ViT-L decoder",
          "l": "ViT-L encoder, ViT-L decoder"}


def _entry(name: str, size: str, tokens: int, res: int, rfid: float, gfid: float | None, arch: str | None = None):
    dim = 2048 // tokens  # the releases keep L x d = 2048 floats
    arch = arch or _SIZES[size]
    metrics = {"rFID": rfid, **({"gFID (SiT-XL, cfg)": gfid} if gfid is not None else {}),
               "dataset": f"ImageNet-val 50k @{res}"}
    return ModelEntry(
        name=name, family="softvq",
        model_args={"image_size": res, "num_latent_tokens": tokens, "codebook_embed_dim": dim},
        description=f"SoftVQ-VAE {size.upper()}: {tokens} continuous 1-D tokens of {dim} floats at {res} px "
                    f"({arch})",
        hub_repo=f"{_ORG}/{name}", hub_filename="model.safetensors",
        extra_hub_files=({"repo": f"{_ORG}/{name}", "filename": "config.json", "role": "config"},),
        license="apache-2.0", paper=_PAPER,
        paper_metrics=metrics,
        notes=f"tok convert {name} fetches config.json + model.safetensors from huggingface.co/{_ORG}/{name}; "
              f"local copies: tok convert FOLDER/model.safetensors --as {name} (config.json beside it)",
    )


_BL = "ViT-B encoder, ViT-L decoder per its config.json, despite the name"
REGISTRY = [
    ModelEntry(
        name="softvq-tiny", family="softvq", shipped=True, license="other",
        description="demo SoftVQ-VAE (ViT 4 + 4 blocks of width 192, 32 soft tokens x 16 floats at 128 px) trained "
                    "by tok on CPU on 32 openly licensed photos",
        notes="see tokcli/weights/softvq-tiny/README.md for data, training and measured quality; licence: "
              "other (trained on CC-BY, CC-BY-SA, GPL-2+, CC0 and public-domain photos, listed in the card)",
    ),
    _entry("softvq-b-64", "b", 64, 256, 0.88, 1.78),
    _entry("softvq-b-32", "b", 32, 256, 0.89, 2.51),
    _entry("softvq-bl-64", "bl", 64, 256, 0.65, 1.88),
    _entry("softvq-bl-32", "bl", 32, 256, 0.68, 2.44),
    _entry("softvq-l-64", "l", 64, 256, 0.61, 1.86),
    _entry("softvq-l-32", "l", 32, 256, 0.74, 2.44, arch=_BL),
    _entry("softvq-bl-64-512", "bl", 64, 512, 0.71, 2.21),
    _entry("softvq-l-32-512", "l", 32, 512, 0.64, None, arch="ViT-B encoder, ViT-L decoder by its file size; "
                                                            "the converter reads its config.json"),
]
