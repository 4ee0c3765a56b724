"""WeTok: group-wise lookup-free quantization on a MAGVIT-2 CNN, optionally with the generative decoder.

model.py (the tokenizer), convert.py (official Lightning checkpoints), objective.py (training), registry.py
(the releases). Importing this package registers the family; nothing heavy is imported until a model is built."""

from tokcli.core.family import Family
from tokcli.core.registry import register_family
from tokcli.families.wetok.registry import REGISTRY

FAMILY = register_family(Family(
    name="wetok",
    model="tokcli.families.wetok.model:WeTok",
    entries=REGISTRY,
    converters={"checkpoint": "tokcli.families.wetok.convert:convert_official"},
    objectives={"reconstruction": "tokcli.families.wetok.objective:WeTokObjective"},
    recipe="tokcli.families.wetok.objective:WeTokLoss",
    description="group-wise LFQ + MAGVIT-2 CNN (GrayShine/WeTok)",
))
