"""Registry entries for WeTok: the demo model shipped in tokcli/weights/ and the official releases
(GrayShine/WeTok).

Architectures come from the official inference configs (configs/WeToK/Inference/*.yaml); metrics are the paper's
(Tables 3 and 4, 256x256, ImageNet-val 50k). The GeneralDomain file paths are inferred from the official scripts
and are not confirmed on the Hub; `tok convert` reports a clear error if a path does not exist. This module must stay
free of heavy imports: `tok models` reads it.
"""

from tokcli.core.entry import ModelEntry

_PAPER = "arXiv:2508.05599"
_REPO = "GrayShine/WeTok"


def _args(ch_mult, z=32, g=4, gd=False):
    return {"ch": 256, "ch_mult": list(ch_mult), "num_res_blocks": 4, "z_channels": z, "groups": g,
            "codebook_size": 256, "generative_decoder": gd, "image_size": 256}


REGISTRY = [
    ModelEntry(
        name="wetok-tiny", family="wetok", shipped=True, license="other",
        description="demo WeTok (ds8, 2 groups x 8 bits) trained by tok on CPU on 32 openly licensed photos",
        notes="see tokcli/weights/wetok-tiny/README.md for data, training and measured quality; licence: other "
              "(trained on CC-BY, CC-BY-SA, GPL-2+, CC0 and public-domain photos, listed in the card)",
    ),
    ModelEntry(
        name="wetok-16x", family="wetok", model_args=_args([1, 1, 2, 2, 4]),
        description="WeTok ImageNet, downsample 16, 16x16x4 tokens of 2^8 (2^32 joint codebook)",
        hub_repo=_REPO, hub_filename="ImageNet/downsample16/WeTok.ckpt",
        hub_revision="85fc6eb084d458b8d4fa3a32d541379e95b2bf87", license="apache-2.0", paper=_PAPER,
        paper_metrics={"rFID": 0.61, "PSNR": 24.50, "dataset": "ImageNet-val 50k @256"},
    ),
    ModelEntry(
        name="wetok-8x", family="wetok", model_args=_args([1, 2, 2, 4]),
        description="WeTok ImageNet, downsample 8, 32x32x4 tokens of 2^8",
        hub_repo=_REPO, hub_filename="ImageNet/downsample8/WeTok.ckpt", license="apache-2.0", paper=_PAPER,
        paper_metrics={"rFID": 0.19, "PSNR": 29.69, "dataset": "ImageNet-val 50k @256"},
    ),
    ModelEntry(
        name="wetok-general-cr24", family="wetok", model_args=_args([1, 2, 2, 4], z=64, g=8),
        description="WeTok general-domain, compression ratio 24 (ds8, 32x32x8 tokens of 2^8)",
        hub_repo=_REPO, hub_filename="GeneralDomain/compratio24/WeTok.ckpt", license="apache-2.0", paper=_PAPER,
        paper_metrics={"rFID": 0.12, "PSNR": 32.06, "dataset": "ImageNet-val 50k @256 (zero-shot)"},
        notes="path inferred from the official scripts; the paper reports a GD stage, the config does not "
              "(the converter detects a generative decoder from the checkpoint's conv_in shape)",
    ),
    ModelEntry(
        name="wetok-general-cr48", family="wetok", model_args=_args([1, 2, 2, 4]),
        description="WeTok general-domain, compression ratio 48 (ds8, 32x32x4 tokens of 2^8)",
        hub_repo=_REPO, hub_filename="GeneralDomain/compratio48/WeTok.ckpt", license="apache-2.0", paper=_PAPER,
        paper_metrics={"rFID": 0.20, "PSNR": 29.63, "dataset": "ImageNet-val 50k @256 (zero-shot)"},
        notes="path inferred from the official scripts; generative decoder detected from the checkpoint",
    ),
    ModelEntry(
        name="wetok-general-cr192", family="wetok", model_args=_args([1, 1, 2, 2, 4]),
        description="WeTok general-domain, compression ratio 192 (ds16, 16x16x4 tokens of 2^8)",
        hub_repo=_REPO, hub_filename="GeneralDomain/compratio192/WeTok.ckpt", license="apache-2.0", paper=_PAPER,
        paper_metrics={"rFID": 0.60, "PSNR": 24.77, "dataset": "ImageNet-val 50k @256 (zero-shot)"},
        notes="path inferred from the official scripts",
    ),
    ModelEntry(
        name="wetok-general-cr768", family="wetok", model_args=_args([1, 1, 2, 2, 4, 8], gd=True),
        description="WeTok general-domain, compression ratio 768 (ds32, 8x8x4 tokens), generative decoder",
        hub_repo=_REPO, hub_filename="GeneralDomain/compratio768/WeTok.ckpt", license="apache-2.0", paper=_PAPER,
        paper_metrics={"rFID": 3.49, "PSNR": 20.77, "dataset": "ImageNet-val 50k @256 (zero-shot)"},
        notes="path inferred from the official scripts; stochastic decoder (seeded by --seed)",
    ),
]
