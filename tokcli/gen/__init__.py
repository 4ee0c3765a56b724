"""Generators: the second kind of model (``Family(kind="generator")``), built on the same spine as the tokenizers
(model folder, registry entries, converter, ``TokModel``). A generator samples the tokens of a tokenizer named in
its folder; ``tok generate`` decodes them through that tokenizer.

    base.py       the Generator contract (``sample``, ``tokens_for``, the folder's ``tokenizer`` / ``sample`` keys)
    generate.py   the library side of ``tok generate`` (classes x n, per-sample seeds, PNGs, token file)
    sit/          SiT on SoftVQ's 1-D latents (flow matching; Euler ODE / Euler-Maruyama SDE samplers)
    wetok_ar/     WeTok's factorised AR (Llama blocks, k sub-token heads, KV-cache sampling)

Shared blocks live in tokcli/nn/ (llama.py, embed.py, norm.py), as for the tokenizers.

Importing a package here registers its family, as for ``tokcli/families``; :func:`load_all` imports them all (the
package top's discovery hook calls it after the tokenizer families)."""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    for m in pkgutil.iter_modules(__path__):
        if m.ispkg:
            importlib.import_module(f"{__name__}.{m.name}")
