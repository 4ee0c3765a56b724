"""A throw-away family that lives outside tokcli/: registered through $TOK_FAMILIES=toyfam, it shows that a new
family is one package built from shared blocks (tokcli.quant.vq, the shared reconstruction objective) with no edit
to any file in tokcli/."""

from tokcli.core.entry import ModelEntry
from tokcli.core.family import Family
from tokcli.core.registry import register_family

FAMILY = register_family(Family(
    name="toyfam",
    model="toyfam.model:Toy",
    entries=(ModelEntry(name="toy-untrained", family="toyfam", description="throw-away test family",
                        notes="train one with tests/plugins/toy.toml"),),
    objectives={"reconstruction": "toyfam.objective:ToyObjective"},
    recipe="toyfam.objective:ToyLoss",
    card={"About": "A throw-away family from the test suite."},
    description="4x4 patches, nearest-neighbour VQ",
))
