"""Registry entries for SoftVQ-VAE's SiT-XL generators: the released ``SoftVQVAE/sit-xl_softvq-*`` repos on the
Hugging Face Hub (``PyTorchModelHubMixin`` folders: ``config.json`` + fp32 ``model.safetensors``, 28 blocks of 1152,
16 heads, about 675M parameters). Each samples the normalised latents of the SoftVQ tokenizer of the same suffix,
whose registry name is ``TOKENIZERS[name]``. gFID: the paper's (arXiv:2412.10958, Tab. 1 at 256 px / Tab. 2 at 512),
SiT-XL with CFG on that tokenizer's latents, the figures tok's ``softvq-*`` entries list; none for
``sit-xl_softvq-l-32-512`` (its figure is in an appendix we do not have). Torch-free: `tok models` reads it.
"""

from tokcli.core.entry import ModelEntry

_PAPER = "arXiv:2412.10958"
_ORG = "SoftVQVAE"
# generator suffix -> (tokens L, resolution, gFID with CFG or None)
_RELEASES = {
    "softvq-b-64": (64, 256, 1.78), "softvq-b-32": (32, 256, 2.51), "softvq-bl-64": (64, 256, 1.88),
    "softvq-bl-32": (32, 256, 2.44), "softvq-l-64": (64, 256, 1.86), "softvq-l-32": (32, 256, 2.44),
    "softvq-bl-64-512": (64, 512, 2.21), "softvq-l-32-512": (32, 512, None),
}


def _entry(tok: str, tokens: int, res: int, gfid: float | None) -> ModelEntry:
    name = f"sit-xl_{tok}"
    dim = 2048 // tokens  # the SoftVQ releases keep L x d = 2048 floats
    metrics = {**({"gFID (cfg)": gfid} if gfid is not None else {}), "dataset": f"ImageNet 50k samples @{res}",
               "sampler": "SDE, 250 steps, cfg 1.75 on t in [0, 0.7]"}
    return ModelEntry(
        name=name, family="sit",
        model_args={"input_size": tokens, "in_channels": dim, "hidden_size": 1152, "depth": 28, "num_heads": 16},
        description=f"SiT-XL class-conditional generator of {tok}'s {tokens} latent tokens ({res} px ImageNet)",
        hub_repo=f"{_ORG}/{name}", hub_filename="model.safetensors",
        extra_hub_files=({"repo": f"{_ORG}/{name}", "filename": "config.json", "role": "config"},),
        license="apache-2.0", paper=_PAPER, paper_metrics=metrics,
        notes=f"tok convert {name} fetches config.json + model.safetensors (2.7 GB) from huggingface.co/{_ORG}/{name};"
              f" tok generate decodes through {tok} (tok convert {tok})",
    )


DEMO = ModelEntry(
    name="sit-softvq-tiny", family="sit", shipped=True, license="other",
    description="demo SiT (4 blocks of width 192) of softvq-tiny's 32 x 16 latents, trained by tok on CPU on "
                "random crops of 32 openly licensed photos (unconditional: class 0)",
    notes="see tokcli/weights/sit-softvq-tiny/README.md; decodes through the shipped softvq-tiny; licence: other "
          "(trained on the latents of CC-BY, CC-BY-SA, GPL-2+, CC0 and public-domain photos)",
)
REGISTRY = [DEMO] + [_entry(tok, *v) for tok, v in _RELEASES.items()]
TOKENIZERS = {f"sit-xl_{tok}": tok for tok in _RELEASES} | {DEMO.name: "softvq-tiny"}
