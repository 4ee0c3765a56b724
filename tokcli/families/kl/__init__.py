"""KL: a continuous KL autoencoder (diffusers ``AutoencoderKL``, :mod:`tokcli.nn.klvae`) used as a tokenizer of
float latents, and the frozen base that CODA adapts.

model.py, convert.py (a diffusers ``vae/`` folder), objective.py, registry.py. Importing this package registers
the family."""

from tokcli.core.family import Family
from tokcli.core.registry import register_family
from tokcli.families.kl.registry import REGISTRY

FAMILY = register_family(Family(
    name="kl",
    model="tokcli.families.kl.model:KL",
    entries=REGISTRY,
    converters={"checkpoint": "tokcli.families.kl.convert:convert_diffusers"},
    objectives={"reconstruction": "tokcli.families.kl.objective:KLObjective"},
    recipe="tokcli.families.kl.objective:KLLoss",
    description="continuous KL autoencoder latents (diffusers AutoencoderKL)",
))
