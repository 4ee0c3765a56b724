"""Registry entries for MaskGIT generators: none. No MaskGIT was released for CODA or FlowMo (the papers report
CODA + MaskGIT-L and FlowMo + MaskGIT but ship no generator); ours are trained with ``tok train`` (e.g.
``recipes/maskgit-coda-tiny-cpu.toml``) and loaded from their folders. Torch-free: `tok models` reads it.
"""

REGISTRY: tuple = ()
