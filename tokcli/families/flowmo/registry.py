"""Registry entries for FlowMo: the two official post-trained tokenizers (Hugging Face ``ksarge/FlowMo``: one
``torch.save`` file each, ``flowmo_lo.pth`` / ``flowmo_hi.pth``, no config file on the Hub).

``model_args`` hold the official README's command-line overrides on top of ``flowmo/configs/base.yaml`` (256 px,
patch 4, 256 latent positions); the converter reads every layer size from the weights and refuses a file whose
weights contradict them (e.g. another ``context_dim``), and ``--config config.yaml`` is checked against them.
Metrics are the paper's (arXiv:2503.11056, Table 1: ImageNet-1K val, 256x256). This module must stay free of heavy
imports: `tok models` reads it.
"""

from tokcli.core.entry import ModelEntry

_PAPER = "arXiv:2503.11056"
_REPO = "ksarge/FlowMo"
_BASE = {"image_size": 256, "patch_size": 4, "code_length": 256}


def _entry(name: str, filename: str, context_dim: int, fg: int, tokens: str, bpp: float, metrics: dict):
    return ModelEntry(
        name=name, family="flowmo",
        model_args={**_BASE, "context_dim": context_dim, "codebook_size_for_entropy": fg},
        description=f"FlowMo-{name.split('-')[1].capitalize()}: 256 positions x {context_dim} bits "
                    f"({256 * context_dim} bits, {bpp} bpp), stored as {256 * context_dim // fg} ids of {fg} bits; "
                    f"rectified-flow decoder (25 Euler steps + CFG)",
        hub_repo=_REPO, hub_filename=filename, license="apache-2.0", paper=_PAPER,
        paper_metrics={**metrics, "BPP": bpp, "paper tokens": tokens, "dataset": "ImageNet-val 50k @256"},
        notes=f"tok convert {name} fetches {filename} from huggingface.co/{_REPO} (EMA and raw weights; only "
              f"the EMA is kept); local copy: tok convert PATH/{filename} --as {name}",
    )


REGISTRY = [
    ModelEntry(
        name="flowmo-tiny", family="flowmo", shipped=True, license="other",
        description="demo FlowMo (MMDiT encoder 2 blocks + rectified-flow decoder 4 blocks of width 128, 64 "
                    "positions x 6 bits at 32 px) trained by tok on CPU on 32 openly licensed photos",
        notes="see tokcli/weights/flowmo-tiny/README.md for data, training and measured quality; licence: "
              "other (trained on CC-BY, CC-BY-SA, GPL-2+, CC0 and public-domain photos, listed in the card)",
    ),
    _entry("flowmo-lo", "flowmo_lo.pth", 18, 9, "256 x 2^18", 0.0703,
           {"rFID": 0.95, "PSNR": 22.07, "SSIM": 0.649, "LPIPS": 0.113}),
    _entry("flowmo-hi", "flowmo_hi.pth", 56, 14, "1024 x 2^14", 0.219,
           {"rFID": 0.56, "PSNR": 24.93, "SSIM": 0.785, "LPIPS": 0.073}),
]
