"""CODA (LeapLabTHU/CODA): a frozen continuous KL VAE with conv LoRA adapters, followed by the multi-scale
attention quantizer (:mod:`tokcli.quant.msrq`).

model.py (the tokenizer; ``init_model`` builds it around a trained KL folder), vae.py (the official VAE naming and
files), convert.py (official files -> model folder), objective.py, registry.py. Importing this package registers
the family."""

from tokcli.core.family import Family
from tokcli.core.registry import register_family
from tokcli.families.coda.registry import REGISTRY

FAMILY = register_family(Family(
    name="coda",
    model="tokcli.families.coda.model:Coda",
    entries=REGISTRY,
    converters={"checkpoint": "tokcli.families.coda.convert:convert_official"},
    objectives={"reconstruction": "tokcli.families.coda.objective:CodaObjective"},
    recipe="tokcli.families.coda.objective:CodaLoss",
    description="multi-scale residual quantizer with attention assignment on a LoRA-adapted KL VAE",
))
