"""Official CODA checkpoint files -> a tok model folder.

The official release is three files: the base VAE (``kl16.safetensors``, flat LDM names, from jadechoghari/mar),
the LoRA-injected VAE ``vae_ema.pth`` and the quantizer ``quantizer_ema.pth`` (shuidi0020/CODA/mar_v16384), all
read with ``torch.load(weights_only=True)`` / safetensors. ``tok convert PATH/vae_ema.pth --family coda --config
config.json -o DIR`` takes the VAE file and finds its siblings: ``quantizer_ema.pth`` in the same folder, the base
VAE at the config's ``pretrained_vae_path`` (relative to the config's folder) or as ``kl16.safetensors`` /
``base_vae.safetensors`` beside ``vae_ema.pth``. The EMA files are what the official evaluation uses; the raw
``vae.pth`` / ``quantizer.pth`` are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokcli.core.checkpoint import ModelFolder, save_model_folder, sha256_file
from tokcli.errors import TokError

CONVERTER = "tokcli.families.coda.convert"
OFFICIAL_REPO = "https://github.com/LeapLabTHU/CODA"
BASE_NAMES = ("kl16.safetensors", "base_vae.safetensors")


def _find_base(vae_path: Path, config_path: Path | None, cfg: dict) -> Path:
    tried = []
    rel = cfg.get("pretrained_vae_path")
    if rel and config_path is not None:
        tried.append(config_path.parent / rel)
    tried += [vae_path.parent / n for n in BASE_NAMES]
    for p in tried:
        if p.is_file():
            return p
    raise TokError(f"the base VAE is missing: looked for {', '.join(str(p) for p in tried)} (the MAR VAE "
                   f"kl16.safetensors from huggingface.co/jadechoghari/mar)")


def convert_official(ckpt_path: str | os.PathLike, config_path: str | os.PathLike | None, dest: str | os.PathLike,
                     *, name: str | None = None, model_args: dict[str, Any] | None = None,
                     provenance: dict[str, Any] | None = None, overwrite: bool = False) -> ModelFolder:
    """Convert ``vae_ema.pth`` (+ its sibling ``quantizer_ema.pth`` and the base VAE) into a model folder."""
    import torch

    from tokcli.families.coda.model import FAMILY, build, normalize_model_args
    from tokcli.families.coda.vae import CodaMARVAE

    vae_path = Path(ckpt_path)
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise TokError(f"{dest} already exists (pass --overwrite to replace it)")
    cfg: dict[str, Any] = {}
    cpath = Path(config_path) if config_path is not None else None
    if cpath is not None:
        try:
            cfg = json.loads(cpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokError(f"cannot read the CODA config {cpath} ({e})") from None
    args = normalize_model_args(dict(model_args) if model_args is not None else cfg)
    if "quantizer" in vae_path.name:
        raise TokError(f"{vae_path.name} is the quantizer; give the VAE file vae_ema.pth (the quantizer is found "
                       f"beside it)")
    if "ema" not in vae_path.name.lower():
        raise TokError(f"{vae_path.name} looks like the raw (non-EMA) CODA VAE; convert vae_ema.pth, the weights "
                       f"the official evaluation uses")
    qpath = vae_path.parent / "quantizer_ema.pth"
    if not qpath.is_file():
        raise TokError(f"the quantizer is missing: expected {qpath} beside {vae_path.name}")
    base = _find_base(vae_path, cpath, cfg)

    model = build(args)
    model.vae = CodaMARVAE.from_official(args, vae_path, base)
    try:
        qsd = torch.load(qpath, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or non-weights file
        raise TokError(f"cannot read {qpath} ({type(e).__name__}: {e})") from None
    res = model.quantize.load_state_dict(qsd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise TokError(f"{qpath.name} does not fit the quantizer of the config: missing {res.missing_keys[:3]}, "
                       f"unexpected {res.unexpected_keys[:3]}")
    prov: dict[str, Any] = {
        "source": str(vae_path), "source_sha256": sha256_file(vae_path),
        "quantizer": str(qpath), "quantizer_sha256": sha256_file(qpath),
        "base_vae": str(base), "base_vae_sha256": sha256_file(base),
        "source_config": str(cpath) if cpath else None, "converter": CONVERTER, "official_repo": OFFICIAL_REPO,
        "weights": "EMA files (vae_ema.pth, quantizer_ema.pth) on the frozen base VAE, as the official evaluation",
        "encode": "posterior mean (the official code samples the posterior; see the family docstring)",
    }
    prov.update(provenance or {})
    spec = model.spec
    card = (f"# {name or dest.name}\n\nCODA tokenizer converted from the official files of [{OFFICIAL_REPO}]"
            f"({OFFICIAL_REPO}) by `{CONVERTER}`.\n\n- VAE: `{vae_path.name}` on base `{base.name}`; quantizer: "
            f"`{qpath.name}`\n- tokens at {args['image_size']}x{args['image_size']}: {spec.shape[0]} indices of "
            f"{spec.codebook_size} over scales {args['patch_size_list']}\n- layout: {spec.layout}\n\n"
            f"Paper: CODA: Repurposing Continuous VAEs for Discrete Tokenization. "
            f"Load it with `tokcli.load(\"local-dir:PATH\")`.\n")
    return save_model_folder(dest, family=FAMILY, model_args=args, tokens=spec.to_dict(),
                             preprocess=model.preprocess, state_dict=model.state_dict(), name=name or dest.name,
                             provenance=prov, card=card, overwrite=overwrite)
