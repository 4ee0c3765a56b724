"""Registry entries for WeTok's AR generators: none yet. The official README announces the LlamaGen-B / L / XL
checkpoints (released 2025-08-31; XL: gFID 2.31), but neither it nor any script names where they live (the scripts
say ``/path/to/your/llamagen-xl/ckpt``) and the Hub repo ``GrayShine/WeTok`` lists only the tokenizers, so an entry
(a ``hub_repo`` / ``hub_filename``) cannot be written. Convert a downloaded checkpoint with
``tok convert WeTok_AR.ckpt --family wetok_ar --config config.yaml -o DIR``. Torch-free: `tok models` reads it.
"""

REGISTRY: tuple = ()
