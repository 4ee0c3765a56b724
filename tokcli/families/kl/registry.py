"""Registry entries for the KL family (continuous latents). This module must stay free of heavy imports."""

from tokcli.core.registry import ModelEntry

REGISTRY: list[ModelEntry] = []
