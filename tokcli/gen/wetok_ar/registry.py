"""Registry entries for WeTok's AR generators: the shipped demo ``wetok-ar-tiny`` only. The official README
announces the LlamaGen-B / L / XL checkpoints (released 2025-08-31; XL: gFID 2.31), but neither it nor any script
names where they live (the scripts say ``/path/to/your/llamagen-xl/ckpt``) and the Hub repo ``GrayShine/WeTok``
lists only the tokenizers, so an entry (a ``hub_repo`` / ``hub_filename``) cannot be written. Convert a downloaded
checkpoint with ``tok convert WeTok_AR.ckpt --family wetok_ar --config config.yaml -o DIR``. Torch-free: `tok
models` reads it.
"""

from tokcli.core.entry import ModelEntry

REGISTRY = (
    ModelEntry(
        name="wetok-ar-tiny", family="wetok_ar", shipped=True, license="other",
        description="demo WeTok AR (4 spatial Llama blocks of width 128 + 1 intra block, 2 sub-token heads of 2^8) "
                    "of wetok-tiny's 32 x 32 x 2 ids, trained by tok on CPU on random crops of 32 openly licensed "
                    "photos (unconditional: class 0)",
        notes="see tokcli/weights/wetok-ar-tiny/README.md; decodes through the shipped wetok-tiny; licence: other "
              "(trained on the ids of CC-BY, CC-BY-SA, GPL-2+, CC0 and public-domain photos)",
    ),
)
