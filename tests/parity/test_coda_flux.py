"""coda-flux: the CODA VAE in the diffusers checkpoint format (FLUX.1 VAE), end to end on small files written in the
official formats (a diffusers vae/ folder with fp16 weights, vae_ema.pth = diffusers base keys + CODA LoRA keys,
quantizer_ema.pth, config.json in the official key names), checked against an independent reference computation:
plain diffusers AutoencoderKL with the LoRA fused by hand and the documented quantizer algorithm written out here.

The helpers (``write_tiny_flux_release``, ``reference``) are also used by tests/test_coda_fetch.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_tok
from tokcli.errors import TokError

# the FLUX.1 vae/config.json (black-forest-labs/FLUX.1-schnell and -dev, diffusers 0.30 export)
FLUX_DIFFUSERS_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True,
    "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 2,
    "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False,
}
# a FLUX-style VAE small enough for 2 CPU cores: 2 levels (downsampling 2), 16 latent channels, no quant convs
TINY_DIFFUSERS_CONFIG = dict(FLUX_DIFFUSERS_CONFIG, block_out_channels=[32, 64], layers_per_block=1, sample_size=64,
                             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
SCALE, SHIFT = 0.3611, 0.1159
RANK, ATTN_DIM, CODEBOOK = 4, 8, 256
SCALES = [1, 2, 3, 4, 6, 9, 12, 16]  # latent 16 x 16 -> 32 x 32 images
LORA_MODULES = ["conv1", "conv2"]
# config.json with the official config-module key names (like the MAR parity set's); no 'vae' block, as the official
# FLUX config (the VAE comes from the diffusers vae/ folder)
OFFICIAL_CONFIG = {
    "vae_latent_channels": 16, "patch_size_list": SCALES, "codebook_size": CODEBOOK, "vq_attn_dim": ATTN_DIM,
    "vq_norm_type": "rms_norm", "vq_commitment_beta": 0.05, "entropy_loss_weight": 0.05, "decoder_lora_rank": RANK,
    "decoder_lora_module_list": LORA_MODULES, "dataset_cfg": {"resolution": 32}, "latent_scale": SCALE,
    "latent_shift": SHIFT,
}


def _plain_vae(cfg: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})


def official_lora_convs(vae, module_list) -> list[str]:
    """The official rule, written out on a plain diffusers model: every Conv2d whose name contains a list item."""
    return [n for n, m in vae.named_modules() if isinstance(m, torch.nn.Conv2d) and any(s in n for s in module_list)]


def write_tiny_flux_release(root: Path, seed: int = 0) -> dict[str, Path]:
    """Official-format files of a tiny random coda-flux release under ``root``:
    vae/{config.json, diffusion_pytorch_model.safetensors (fp16)}, vae_ema.pth, quantizer_ema.pth, config.json."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = _plain_vae(TINY_DIFFUSERS_CONFIG)
    base = {}
    for k, v in vae.state_dict().items():
        if v.ndim == 1:  # norms and biases: not the trivial init, so that any misplaced tensor shows
            v = v + 0.1 * torch.randn(v.shape, generator=g)
        base[k] = v.to(torch.float16)
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text(json.dumps(TINY_DIFFUSERS_CONFIG))
    save_file(base, str(root / "vae" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    ema = {k: v.float() for k, v in base.items()}  # the official fp32 training run holds the upcast base
    for conv in official_lora_convs(vae, LORA_MODULES):
        w = ema[conv + ".weight"]
        ema[conv + ".lora_layer.down.weight"] = 0.1 * torch.randn(RANK, w.shape[1], *w.shape[2:], generator=g)
        ema[conv + ".lora_layer.up.weight"] = 0.05 * torch.randn(w.shape[0], RANK, 1, 1, generator=g)
    torch.save(ema, root / "vae_ema.pth")
    d, a = 16, ATTN_DIM
    quant = {"codebooks.weight": torch.randn(CODEBOOK, d, generator=g)}  # the official CODAQuantizer keys
    for proj, (rows, w, b) in {"to_q": (a, 0.5, 0.1), "to_k": (a, 0.5, 0.1), "to_v": (d, 0.1, 0.01)}.items():
        quant[f"attn.{proj}.weight"] = w * torch.randn(rows, d, generator=g)
        quant[f"attn.{proj}.bias"] = b * torch.randn(rows, generator=g)
    for norm in ("norm_q", "norm_k"):
        quant[f"attn.{norm}.weight"] = 1 + 0.1 * torch.randn(a, generator=g)
    torch.save(quant, root / "quantizer_ema.pth")
    (root / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    return {"root": root, "vae_ema": root / "vae_ema.pth", "quantizer": root / "quantizer_ema.pth",
            "config": root / "config.json", "vae_dir": root / "vae"}


def _rms(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def reference_quantize(latent: torch.Tensor, q: dict, scales: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The CODA quantizer as documented (parity README): shared codebook, attention assignment, area-downsampled
    residual, value-table codes, bicubic upsampling. Returns (ids [N, T], f_hat)."""
    n, d, h, w = latent.shape
    keys = _rms(F.linear(q["codebooks.weight"], q["attn.to_k.weight"], q["attn.to_k.bias"]), q["attn.norm_k.weight"])
    values = F.linear(q["codebooks.weight"], q["attn.to_v.weight"], q["attn.to_v.bias"])
    residual, f_hat, ids = latent.clone(), torch.zeros_like(latent), []
    for pn in scales:
        r = F.interpolate(residual, (pn, pn), mode="area").flatten(2).transpose(1, 2)
        qq = _rms(F.linear(r, q["attn.to_q.weight"], q["attn.to_q.bias"]), q["attn.norm_q.weight"])
        idx = (qq @ keys.t() / math.sqrt(keys.shape[1])).argmax(-1)
        z = values[idx].transpose(1, 2).reshape(n, d, pn, pn)
        up = z if pn == h else F.interpolate(z, (h, w), mode="bicubic", align_corners=False)
        f_hat, residual = f_hat + up, residual - up
        ids.append(idx)
    return torch.cat(ids, 1), f_hat


@torch.no_grad()
def reference(files: dict[str, Path], x: torch.Tensor, *, lora: bool = True) -> dict[str, torch.Tensor]:
    """Independent reference: diffusers AutoencoderKL.from_pretrained(vae/), the vae_ema.pth tensors with every LoRA
    fused by hand (W + up @ down), latent = (posterior mean - shift) * scale, the quantizer above, decode."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(files["vae_dir"]), torch_dtype=torch.float32).eval()
    ema = torch.load(files["vae_ema"], map_location="cpu", weights_only=True)
    sd = vae.state_dict()
    base_keys = {k for k in ema if ".lora_layer." not in k}
    assert base_keys == set(sd)  # diffusers keys unchanged in the official file
    sd = {k: ema[k] for k in sd}
    if lora:
        for conv in {k.split(".lora_layer.")[0] for k in ema if ".lora_layer." in k}:
            down, up = ema[conv + ".lora_layer.down.weight"], ema[conv + ".lora_layer.up.weight"]
            w = sd[conv + ".weight"]
            sd[conv + ".weight"] = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    vae.load_state_dict(sd, strict=True)
    quant = torch.load(files["quantizer"], map_location="cpu", weights_only=True)
    latent = (vae.encode(x).latent_dist.mean - SHIFT) * SCALE
    ids, f_hat = reference_quantize(latent, quant, SCALES)
    recon = vae.decode(f_hat / SCALE + SHIFT).sample
    return {"latent": latent, "ids": ids, "recon": recon}


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return F.interpolate(small, (size, size), mode="bilinear", align_corners=False) * 2 - 1


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_flux_release(tmp_path_factory.mktemp("coda-flux") / "release")


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("out") / "coda-flux-tiny"
    p = run_tok("convert", release["vae_ema"], "--family", "coda", "--config", release["config"], "-o", dest)
    assert p.returncode == 0, p.stderr.decode()
    return dest


# ---------------------------------------------------------------------------------------------- (a) full size


def test_full_size_lora_counts_match_the_official_builder():
    """48 LoRA convs / 5,816,320 LoRA parameters on the FLUX.1 VAE, 66 / 6,021,120 on MAR (research notes sec. 5)."""
    from tokcli.core.registry import get_entry
    from tokcli.families.coda.model import normalize_model_args
    from tokcli.families.coda.vae import CodaVAE
    from tokcli.nn.klvae import vae_block_from_diffusers_config

    flux = get_entry("coda-flux").model_args
    block, scale, shift = vae_block_from_diffusers_config(FLUX_DIFFUSERS_CONFIG)
    assert flux["vae"] == block and (flux["latent_scale"], flux["latent_shift"]) == (scale, shift) == (SCALE, SHIFT)
    args = normalize_model_args(flux)
    assert args["image_size"] == 256 and sum(p * p for p in args["patch_size_list"]) == 2240
    for name, rank, layers, params in (("coda-flux", 32, 48, 5_816_320), ("coda-mar", 32, 66, 6_021_120)):
        a = get_entry(name).model_args
        torch.manual_seed(0)
        vae = CodaVAE(a["vae"], latent_scale=a["latent_scale"], latent_shift=a["latent_shift"])
        targets = vae.add_lora(a["decoder_lora_rank"], a["decoder_lora_module_list"])
        assert a["decoder_lora_rank"] == rank and len(targets) == len(vae.lora_targets) == layers, name
        assert sum(p.numel() for p in vae.lora_parameters()) == params, name
        if name == "coda-flux":  # diffusers names; the res-block convs only (no samplers, shortcuts, conv_in/out)
            assert vae.checkpoint_format == "diffusers" and set(targets) == set(vae.lora_targets)
            assert all(t.rsplit(".", 1)[1] in ("conv1", "conv2") and ".resnets." in t for t in targets)
            assert sum(p.numel() for p in vae.base_state_dict().values()) == 83_819_683
        else:
            assert vae.checkpoint_format == "ldm" and "encoder.down.0.downsample.conv" in targets


# ------------------------------------------------------------------------------------- (b) official files


def test_lora_rule_on_the_tiny_model(release):
    from tokcli.families.coda.vae import CodaVAE

    vae = CodaVAE.from_official(release["config"], release["vae_ema"], release["vae_dir"])
    ema = torch.load(release["vae_ema"], map_location="cpu", weights_only=True)
    in_file = {k.split(".lora_layer.")[0] for k in ema if ".lora_layer." in k}
    assert set(vae.lora_modules) == set(vae.lora_targets) == in_file and len(in_file) == 20
    assert vae.vae_cfg["type"] == "AutoencoderKL" and not vae.vae_cfg["use_quant_conv"]
    assert (vae.latent_scale, vae.latent_shift) == (SCALE, SHIFT)


def test_convert_and_load_match_the_reference(release, converted):
    import tokcli

    x = images()
    ref = reference(release, x)
    base = reference(release, x, lora=False)
    assert float((ref["latent"] - base["latent"]).abs().max()) > 1e-2  # the LoRA matters: the test can see it

    tok = tokcli.load(f"local-dir:{converted}", device="cpu")
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["family"] == "coda" and cfg["tokens"]["shape"] == [sum(p * p for p in SCALES)]
    assert cfg["model_args"]["vae"]["type"] == "AutoencoderKL" and cfg["model_args"]["image_size"] == 32
    prov = cfg["provenance"]
    assert prov["checkpoint_format"] == "diffusers" and prov["base_vae"].endswith("vae")
    assert prov["base_vae_weights"].endswith("diffusion_pytorch_model.safetensors")
    assert prov["base_vae_license"].startswith("unknown")  # a local vae/ folder: its origin is not known
    card = (converted / "README.md").read_text()
    assert "licence of the base VAE" in card and "FLUX.1 [dev] Non-Commercial" in card
    with torch.no_grad():
        latent = tok.encode_latent(x)
        ids = tok.encode(x)
        recon = tok.decode(ref["ids"], clamp=False)
    assert float((latent - ref["latent"]).abs().max()) < 1e-5
    assert torch.equal(ids, ref["ids"])
    assert float((recon - ref["recon"]).abs().max()) < 1e-4


# ------------------------------------------------------------------------------------------ (c) negatives


def test_raw_vae_and_missing_base_are_refused(release, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for n in ("vae_ema.pth", "quantizer_ema.pth"):
        shutil.copy(release["root"] / n, raw / n)
    shutil.copy(release["vae_ema"], raw / "vae.pth")
    p = run_tok("convert", raw / "vae.pth", "--family", "coda", "--config", release["config"], "-o", tmp_path / "x")
    assert p.returncode == 1 and b"non-EMA" in p.stderr and b"Traceback" not in p.stderr
    # no vae/ folder beside vae_ema.pth: the error names the places looked at and the FLUX.1 VAE to get
    p = run_tok("convert", raw / "vae_ema.pth", "--family", "coda", "--config", release["config"], "-o",
                tmp_path / "y")
    err = p.stderr.decode()
    assert p.returncode == 1 and "base VAE is missing" in err and str(raw / "vae") in err, err
    assert "FLUX.1-schnell" in err and str(raw / "flux_vae") in err and not (tmp_path / "y").exists()


def test_flux_vae_folder_found_by_other_names(release, tmp_path):
    """flux_vae/ beside vae_ema.pth (the official README's name), or the config's pretrained_vae_path."""
    from tokcli.families.coda.convert import _find_base

    d = tmp_path / "r"
    d.mkdir()
    shutil.copytree(release["vae_dir"], d / "flux_vae")
    assert _find_base(d / "vae_ema.pth", None, {}, "diffusers") == d / "flux_vae"
    shutil.copytree(release["vae_dir"], tmp_path / "elsewhere" / "vae")
    (tmp_path / "cfg").mkdir()
    cfg = tmp_path / "cfg" / "config.json"
    assert _find_base(d / "vae_ema.pth", cfg, {"pretrained_vae_path": "../elsewhere"}, None) == \
        tmp_path / "cfg" / "../elsewhere"


def test_wrong_rank_format_and_architecture_are_refused(release, tmp_path):
    from tokcli.convert import convert
    from tokcli.families.coda.vae import CodaVAE

    bad = dict(OFFICIAL_CONFIG, decoder_lora_rank=8)
    with pytest.raises(TokError, match=r"LoRA rank \[4\], config says 8"):
        CodaVAE.from_official(bad, release["vae_ema"], release["vae_dir"])
    # diffusers-named files under a config that says MAR
    mar = dict(OFFICIAL_CONFIG, vae=dict(json.loads(json.dumps(_tiny_block())), type="MARAutoencoderKL"))
    with pytest.raises(TokError, match="diffusers key names"):
        CodaVAE.from_official(mar, release["vae_ema"], release["vae_dir"])
    # the full-size coda-flux architecture does not fit the tiny base VAE: refused before anything is built
    with pytest.raises(TokError, match="does not match the config's 'vae' block"):
        convert(str(release["vae_ema"]), as_model="coda-flux", output=str(tmp_path / "z"))
    assert not (tmp_path / "z").exists()
    # an unknown VAE type
    with pytest.raises(TokError, match="unknown CODA VAE type"):
        CodaVAE(dict(_tiny_block(), type="FluxVAE"))


def _tiny_block() -> dict:
    from tokcli.nn.klvae import vae_block_from_diffusers_config

    return vae_block_from_diffusers_config(TINY_DIFFUSERS_CONFIG)[0]


def test_registry_entry_and_licence_notes():
    from tokcli.core.registry import get_entry

    e = get_entry("coda-flux")
    files = e.release_files()
    assert [(f.repo, f.filename, f.role) for f in files] == [
        ("shuidi0020/CODA", "flux_v65536/vae_ema.pth", "checkpoint"),
        ("shuidi0020/CODA", "flux_v65536/quantizer_ema.pth", "quantizer"),
        ("black-forest-labs/FLUX.1-schnell", "vae/config.json", "base_vae_config"),
        ("black-forest-labs/FLUX.1-schnell", "vae/diffusion_pytorch_model.safetensors", "base_vae")]
    assert e.paper_metrics["rFID"] == 0.43 and e.paper_metrics["PSNR"] == 25.9 and e.paper_metrics["SSIM"] == 0.771
    assert e.model_args["codebook_size"] == 65536 and e.model_args["decoder_lora_module_list"] == LORA_MODULES
    assert "FLUX.1-dev" in e.notes and "Non-Commercial" in e.notes and "Apache-2.0" in e.notes
    from tokcli.families.coda.convert import base_vae_origin

    hub = Path("/x/hub/models--black-forest-labs--FLUX.1-dev/snapshots/abc/vae/diffusion_pytorch_model.safetensors")
    assert "Non-Commercial" in base_vae_origin(hub)[1]
    assert base_vae_origin(Path(str(hub).replace("1-dev", "1-schnell")))[1] == "apache-2.0"


def test_fp16_base_is_read_as_float32(release):
    from tokcli.families.coda.vae import read_base_vae

    sd, weights = read_base_vae(release["vae_dir"])
    assert weights.name == "diffusion_pytorch_model.safetensors"
    assert all(v.dtype == torch.float32 for v in sd.values())
    ema = torch.load(release["vae_ema"], map_location="cpu", weights_only=True)
    assert all(torch.equal(sd[k], ema[k]) for k in sd)
    assert np.isfinite(sum(float(v.abs().sum()) for v in sd.values()))


def test_flux_base_in_the_original_ldm_naming(release, tmp_path):
    """FLUX.1's original-format ae.safetensors (LDM-style names, 1x1-conv attention) gives the same base VAE."""
    import re

    from safetensors.torch import save_file

    from tokcli.families.coda.vae import CodaVAE, diffusers_to_ldm_module, read_base_vae

    sd, _ = read_base_vae(release["vae_dir"])
    ldm = {}
    for k, v in sd.items():
        mod, param = k.rsplit(".", 1)
        name = f"{diffusers_to_ldm_module(mod, 2)}.{param}"
        ldm[name] = v.reshape(*v.shape, 1, 1) if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", name) else v
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "decoder.up.1.upsample.conv.weight" in ldm
    save_file(ldm, str(tmp_path / "ae.safetensors"))
    a = CodaVAE.from_official(dict(OFFICIAL_CONFIG, vae=_tiny_block()), release["vae_ema"], tmp_path / "ae.safetensors")
    b = CodaVAE.from_official(release["config"], release["vae_ema"], release["vae_dir"])
    sa, sb = a.vae.state_dict(), b.vae.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
