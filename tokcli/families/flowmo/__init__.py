"""FlowMo (Sargent et al. 2025, arXiv:2503.11056; official code kylesargent/FlowMo): a transformer diffusion
autoencoder. An MMDiT encoder gives 256 latent positions of sign bits (LFQ); the decoder, an MMDiT rectified-flow
model, samples the image from noise conditioned on them (tokcli/nn/mmdit.py, tokcli/quant/lfq_groups.py).

model.py (the tokenizer), sampler.py (Euler over the pow / linear grids, batched CFG in the guidance interval),
convert.py (an official ``.pth`` + config.yaml -> model folder), objective.py (stage-1A training), post.py (stage-1B
post-training: ``model.objective = "post"``), registry.py (FlowMo-Lo, FlowMo-Hi).
Importing this package registers the family."""

from tokcli.core.family import Family
from tokcli.core.registry import register_family
from tokcli.families.flowmo.registry import REGISTRY

FAMILY = register_family(Family(
    name="flowmo",
    model="tokcli.families.flowmo.model:FlowMo",
    entries=REGISTRY,
    converters={"checkpoint": "tokcli.families.flowmo.convert:convert_official"},
    objectives={"flow": "tokcli.families.flowmo.objective:FlowMoObjective",
                "post": "tokcli.families.flowmo.post:FlowMoPostObjective"},
    recipe="tokcli.families.flowmo.post:FlowMoPostLoss",
    description="1-D sign-bit tokens: MMDiT encoder + LFQ + rectified-flow MMDiT decoder (FlowMo)",
))
