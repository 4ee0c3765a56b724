"""MaskGIT over the ids of any ``indices`` tokenizer (Chang et al. 2022, arXiv:2202.04200): our design, since none
was released for the tokenizers here (CODA's levels, WeTok's grid of groups, FlowMo's LFQ sub-tokens).

model.py (the bidirectional transformer and the Generator contract), sampler.py (iterative confidence-based
unmasking with Gumbel noise, cosine schedule, CFG), objective.py (``tok train``: BERT-style masked cross-entropy on
a token file, cosine mask ratio, label dropout), registry.py (no entries: nothing was released). Importing this
package registers the family."""

from tokcli.core.family import Family
from tokcli.core.registry import register_family
from tokcli.gen.maskgit.registry import REGISTRY

FAMILY = register_family(Family(
    name="maskgit",
    model="tokcli.gen.maskgit.model:MaskGIT",
    entries=REGISTRY,
    objectives={"masked_ce": "tokcli.gen.maskgit.objective:MaskGITObjective"},
    recipe="tokcli.gen.maskgit.objective:MaskGITLoss",
    kind="generator",
    description="class-conditional masked token generator (MaskGIT: bidirectional transformer, iterative "
                "unmasking) over any tokenizer's ids",
))
