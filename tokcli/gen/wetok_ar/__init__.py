"""WeTok's factorised AR generator (zhuangshaobin/WeTok, arXiv:2508.05599: a LlamaGen-style GPT whose positions carry
k GFQ sub-tokens, predicted by an intra-position transformer) over a WeTok tokenizer's group indices.

model.py (the network and the Generator contract), sampler.py (KV-cache sampling with per-sub-token CFG /
temperature / top-k / top-p), convert.py (the official Lightning ``.ckpt`` + GenStage ``config.yaml`` -> generator
folder + the frozen first stage as a WeTok tokenizer folder), objective.py (``tok train``: the official
teacher-forced cross-entropy of every sub-token head on a WeTok token file, label dropout), registry.py (no
entries: the AR checkpoints were announced but their location is unknown). Importing this package registers the
family."""

from tokcli.core.family import Family
from tokcli.core.registry import register_family
from tokcli.gen.wetok_ar.registry import REGISTRY

FAMILY = register_family(Family(
    name="wetok_ar",
    model="tokcli.gen.wetok_ar.model:WeTokAR",
    entries=REGISTRY,
    converters={"checkpoint": "tokcli.gen.wetok_ar.convert:convert_official"},
    objectives={"next_token": "tokcli.gen.wetok_ar.objective:WeTokARObjective"},
    recipe="tokcli.gen.wetok_ar.objective:WeTokARLoss",
    kind="generator",
    description="class-conditional factorised AR generator (Llama GPT over k GFQ sub-tokens) of WeTok tokens",
))
