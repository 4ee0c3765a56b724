"""SoftVQ-VAE (Chen et al. 2024, arXiv:2412.10958; official code Hhhhhhao/continuous_tokenizer): 32 or 64
continuous one-dimensional tokens per image from a ViT encoder with learned latent tokens, a soft vector quantizer
and a ViT decoder (tokcli/nn/vit.py, tokcli/quant/softvq.py).

model.py (the tokenizer), convert.py (an official ``SoftVQVAE/*`` folder -> model folder), registry.py (the eight
releases). Importing this package registers the family."""

from tokcli.core.family import Family
from tokcli.core.registry import register_family
from tokcli.families.softvq.registry import REGISTRY

FAMILY = register_family(Family(
    name="softvq",
    model="tokcli.families.softvq.model:SoftVQ",
    entries=REGISTRY,
    converters={"checkpoint": "tokcli.families.softvq.convert:convert_official"},
    objectives={"reconstruction": "tokcli.families.softvq.objective:SoftVQObjective"},
    recipe="tokcli.families.softvq.objective:SoftVQLoss",
    description="1-D continuous tokens: ViT encoder + soft vector quantizer + ViT decoder (SoftVQ-VAE)",
))
