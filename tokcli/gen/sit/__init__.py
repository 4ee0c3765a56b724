"""SiT on SoftVQ-VAE's 1-D latents (Ma et al. 2024, arXiv:2401.08740; the SoftVQ-VAE release's generators).

model.py (the network and the Generator contract), sampler.py (Euler ODE / Euler-Maruyama SDE with interval CFG),
convert.py (an official ``SoftVQVAE/sit-xl_*`` folder -> generator folder), objective.py (``tok train``: flow
matching on a token file of latents, linear path, label dropout), registry.py (the releases). Importing this package
registers the family."""

from tokcli.core.family import Family
from tokcli.core.registry import register_family
from tokcli.gen.sit.registry import REGISTRY

FAMILY = register_family(Family(
    name="sit",
    model="tokcli.gen.sit.model:SiT",
    entries=REGISTRY,
    converters={"checkpoint": "tokcli.gen.sit.convert:convert_official"},
    objectives={"flow": "tokcli.gen.sit.objective:SiTFlowObjective"},
    recipe="tokcli.gen.sit.objective:SiTFlowLoss",
    kind="generator",
    description="class-conditional flow-matching generator (SiT) on normalised 1-D latents (SoftVQ-VAE)",
))
