"""Registry entries for MaskGIT generators: the shipped demo ``maskgit-coda-tiny`` only. No MaskGIT was released
for CODA or FlowMo (the papers report CODA + MaskGIT-L and FlowMo + MaskGIT but ship no generator); ours are trained
with ``tok train`` (e.g. ``recipes/maskgit-coda-tiny-cpu.toml``) and loaded from their folders. Torch-free:
`tok models` reads it.
"""

from tokcli.core.entry import ModelEntry

REGISTRY = (
    ModelEntry(
        name="maskgit-coda-tiny", family="maskgit", shipped=True, license="other",
        description="demo MaskGIT (4 bidirectional blocks of width 128) of coda-tiny's 680 multi-scale ids, "
                    "trained by tok on CPU on random crops of 32 openly licensed photos (unconditional: class 0)",
        notes="see tokcli/weights/maskgit-coda-tiny/README.md; decodes through the shipped coda-tiny; licence: "
              "other (trained on the ids of CC-BY, CC-BY-SA, GPL-2+, CC0 and public-domain photos)",
    ),
)
