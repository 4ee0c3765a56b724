"""Official CODA checkpoint files -> a tok model folder.

An official release is three parts: the base VAE, the LoRA-injected VAE ``vae_ema.pth`` and the quantizer
``quantizer_ema.pth`` (shuidi0020/CODA, ``mar_v16384/`` or ``flux_v65536/``), all read with
``torch.load(weights_only=True)`` / safetensors. The base VAE is

- coda-mar: ``kl16.safetensors`` (flat LDM names, jadechoghari/mar);
- coda-flux: the FLUX.1 VAE as a diffusers ``vae/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
  16-bit, read as float32) -- FLUX.1-schnell's by default (Apache-2.0), FLUX.1-dev's (non-commercial licence) when
  the user has it.

``tok convert PATH/vae_ema.pth --family coda --config config.json -o DIR`` (or ``--as coda-mar`` / ``--as
coda-flux`` instead of the config) takes the VAE file and finds its siblings: ``quantizer_ema.pth`` in the same
folder; the base VAE at the config's ``pretrained_vae_path`` (relative to the config's folder, or to vae_ema.pth's),
else beside ``vae_ema.pth`` as a ``vae/`` / ``flux_vae/`` diffusers folder or a flat file ``kl16.safetensors`` /
``base_vae.safetensors`` / ``ae.safetensors`` (FLUX.1's original format: LDM-style names, mapped like MAR's). The
official FLUX config has no ``vae`` block: it comes from the base folder's ``config.json``. ``tok convert NAME``
fetches the files from the Hub (tokcli/convert.py) and passes their paths as ``files`` (role -> path). The EMA files
are what the official evaluation uses; the raw ``vae.pth`` / ``quantizer.pth`` are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from tokcli.core.atomic import check_overwrite
from tokcli.core.checkpoint import ModelFolder, sha256_file
from tokcli.errors import TokError

CONVERTER = "tokcli.families.coda.convert"
OFFICIAL_REPO = "https://github.com/LeapLabTHU/CODA"
# flat files in LDM naming: MAR's kl16, the parity fixture's, and FLUX.1's original-format ae.safetensors
BASE_NAMES = ("kl16.safetensors", "base_vae.safetensors", "ae.safetensors")
BASE_FOLDERS = ("vae", "flux_vae")  # diffusers folders (coda-flux; flux_vae/ is the official README's name)
SCHNELL_LICENSE = "apache-2.0"
DEV_LICENSE = "FLUX.1 [dev] Non-Commercial License (gated on the Hub)"


def _is_base(p: Path) -> bool:
    from tokcli.nn.klvae import read_diffusers_vae

    return p.is_file() or read_diffusers_vae(p, required=False) is not None


def _find_base(vae_path: Path, config_path: Path | None, cfg: Mapping[str, Any], fmt: str | None) -> Path:
    """The base VAE beside vae_ema.pth (see the module docstring); ``fmt`` (the checkpoint format, when known)
    decides whether flat files or diffusers folders are tried first."""
    tried: list[Path] = []
    rel = cfg.get("pretrained_vae_path")
    if rel:
        tried += [d / rel for d in ([config_path.parent] if config_path is not None else []) + [vae_path.parent]]
    files = [vae_path.parent / n for n in BASE_NAMES]
    folders = [vae_path.parent / n for n in BASE_FOLDERS]
    tried += folders + files if fmt == "diffusers" else files + folders
    tried = list(dict.fromkeys(tried))
    for p in tried:
        if _is_base(p):
            return p
    want = {"ldm": "the MAR VAE kl16.safetensors from huggingface.co/jadechoghari/mar",
            "diffusers": "the FLUX.1 VAE: the vae/ folder (config.json + diffusion_pytorch_model.safetensors) of "
                         "huggingface.co/black-forest-labs/FLUX.1-schnell"}
    what = want.get(fmt or "", f"{want['ldm']}, or {want['diffusers']}")
    raise TokError(f"the base VAE is missing: looked for {', '.join(str(p) for p in tried)} ({what})")


def base_vae_origin(base: Path) -> tuple[str, str]:
    """(which base VAE, its licence), told from its path (the Hugging Face cache path names the repo). A FLUX.1 VAE
    of unknown origin gets a licence note rather than a guess: schnell's and dev's VAEs are interchangeable here but
    licensed differently."""
    s = str(base.absolute()).lower().replace("--", "/")
    if "flux.1-schnell" in s or "flux1-schnell" in s:
        return "FLUX.1-schnell VAE (black-forest-labs/FLUX.1-schnell)", SCHNELL_LICENSE
    if "flux.1-dev" in s or "flux1-dev" in s:
        return "FLUX.1-dev VAE (black-forest-labs/FLUX.1-dev)", DEV_LICENSE
    if base.name == "kl16.safetensors" or "jadechoghari/mar" in s:
        return "MAR KL-16 VAE (jadechoghari/mar, kl16.safetensors)", "mit"
    from tokcli.nn.klvae import read_diffusers_vae

    found = read_diffusers_vae(base, required=False)
    if found is not None and (found.latent_scale, found.latent_shift) == (0.3611, 0.1159):  # FLUX.1's
        return (f"a FLUX.1 VAE (diffusers folder {base.name}; origin not recorded in its path)",
                f"unknown: FLUX.1-schnell's VAE is {SCHNELL_LICENSE}, FLUX.1-dev's is under the {DEV_LICENSE}; check "
                f"where this copy came from")
    return f"base VAE {base.name} (origin not recorded in its path)", "unknown"


def _base_weight_file(base: Path) -> Path:
    from tokcli.nn.klvae import read_diffusers_vae

    found = read_diffusers_vae(base, required=False)
    return base if found is None else found.weights_path


def _read_config(cpath: Path | None) -> dict[str, Any]:
    if cpath is None:
        return {}
    try:
        return json.loads(cpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokError(f"cannot read the CODA config {cpath} ({e})") from None


def _locate(vae_path: Path, cpath: Path | None, cfg: Mapping[str, Any], source_args: Mapping[str, Any],
            files: Mapping[str, Path]) -> tuple[Path, Path]:
    """(quantizer file, base VAE) of a release, after refusing the wrong files (the quantizer given as the VAE, the
    raw non-EMA VAE)."""
    from tokcli.families.coda.vae import checkpoint_format

    if "quantizer" in vae_path.name:
        raise TokError(f"{vae_path.name} is the quantizer; give the VAE file vae_ema.pth (the quantizer is found "
                       f"beside it)")
    if "ema" not in vae_path.name.lower():
        raise TokError(f"{vae_path.name} looks like the raw (non-EMA) CODA VAE; convert vae_ema.pth, the weights "
                       f"the official evaluation uses")
    qpath = files.get("quantizer") or vae_path.parent / "quantizer_ema.pth"
    if not qpath.is_file():
        raise TokError(f"the quantizer is missing: expected {qpath} beside {vae_path.name}")
    fmt = checkpoint_format(source_args["vae"]) if "vae" in source_args else None
    base = files.get("base_vae") or _find_base(vae_path, cpath, cfg, fmt)
    if not _is_base(base):
        raise TokError(f"the base VAE is missing: {base}")
    return qpath, base


def _load_quantizer(model, qpath: Path) -> None:
    import torch

    try:
        qsd = torch.load(qpath, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or non-weights file
        raise TokError(f"cannot read {qpath} ({type(e).__name__}: {e})") from None
    res = model.quantize.load_state_dict(qsd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise TokError(f"{qpath.name} does not fit the quantizer of the config: missing {res.missing_keys[:3]}, "
                       f"unexpected {res.unexpected_keys[:3]}")


def _card(title: str, model, vae_path: Path, qpath: Path, base: Path, origin: str, base_license: str) -> str:
    args, spec = model.model_args, model.spec
    shift = f" - {args['latent_shift']}" if args["latent_shift"] else ""
    return (f"# {title}\n\nCODA tokenizer converted from the official files of [{OFFICIAL_REPO}]"
            f"({OFFICIAL_REPO}) by `{CONVERTER}`.\n\n- VAE: `{vae_path.name}` on base `{base.name}`; quantizer: "
            f"`{qpath.name}`\n- base VAE: {origin}; licence of the base VAE: {base_license}\n"
            f"- tokens at {args['image_size']}x{args['image_size']}: {spec.shape[0]} indices of "
            f"{spec.codebook_size} over scales {args['patch_size_list']}\n- latent: (posterior mean{shift}) * "
            f"{args['latent_scale']}\n- layout: {spec.layout}\n\n"
            f"The converted weights combine the CODA files with the base VAE: the base VAE's licence applies to "
            f"them as well.\n\nPaper: CODA: Repurposing Continuous VAEs for Discrete Tokenization. "
            f"Load it with `tokcli.load(\"local-dir:PATH\")`.\n")


def convert_official(ckpt_path: str | os.PathLike, config_path: str | os.PathLike | None, dest: str | os.PathLike,
                     *, name: str | None = None, model_args: dict[str, Any] | None = None,
                     provenance: dict[str, Any] | None = None, overwrite: bool = False,
                     files: Mapping[str, str | os.PathLike] | None = None) -> ModelFolder:
    """Convert ``vae_ema.pth`` (+ ``quantizer_ema.pth`` and the base VAE) into a model folder.

    ``files`` (role -> path, from ``tok convert NAME``) gives the ``quantizer`` and ``base_vae`` explicitly, e.g.
    from different Hugging Face cache snapshots; otherwise they are looked for beside ``ckpt_path``."""
    from tokcli.families.coda.model import Coda, normalize_model_args
    from tokcli.families.coda.vae import CodaVAE, checkpoint_format, complete_vae_config

    vae_path = Path(ckpt_path)
    dest = check_overwrite(dest, overwrite)
    cpath = Path(config_path) if config_path is not None else None
    cfg = _read_config(cpath)
    source_args = dict(model_args) if model_args is not None else dict(cfg)
    qpath, base = _locate(vae_path, cpath, cfg, source_args, {k: Path(v) for k, v in (files or {}).items()})
    args = normalize_model_args(complete_vae_config(source_args, base))
    model = Coda(**args)
    model.vae = CodaVAE.from_official(args, vae_path, base)
    _load_quantizer(model, qpath)
    origin, base_license = base_vae_origin(base)
    weights = _base_weight_file(base)
    prov: dict[str, Any] = {
        "source": str(vae_path), "source_sha256": sha256_file(vae_path),
        "quantizer": str(qpath), "quantizer_sha256": sha256_file(qpath),
        "base_vae": str(base), "base_vae_weights": str(weights), "base_vae_sha256": sha256_file(weights),
        "base_vae_origin": origin, "base_vae_license": base_license,
        "checkpoint_format": checkpoint_format(args["vae"]),
        "source_config": str(cpath) if cpath else None, "converter": CONVERTER, "official_repo": OFFICIAL_REPO,
        "weights": "EMA files (vae_ema.pth, quantizer_ema.pth) on the frozen base VAE, as the official evaluation",
        "encode": "posterior mean (the official code samples the posterior; see the family docstring)",
        **(provenance or {}),
    }
    card = _card(name or dest.name, model, vae_path, qpath, base, origin, base_license)
    return model.save_folder(dest, name=name or dest.name, provenance=prov, card=card, overwrite=overwrite)
