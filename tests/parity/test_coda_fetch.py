"""`tok convert coda-mar` / `tok convert coda-flux`: every file of the release comes from the Hugging Face cache
(a hand-made one here, HF_HUB_OFFLINE=1) under the real repo and file names; a missing file gives one error line that
names every missing file, its repo and the `hf download` commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CODA_PARITY, requires_coda_parity, run_tok
from test_coda_flux import (ATTN_DIM, CODEBOOK, LORA_MODULES, RANK, SCALE, SCALES, SHIFT, TINY_DIFFUSERS_CONFIG, images,
                            reference, write_tiny_flux_release)
from tokcli.errors import MissingWeightsError

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def fake_hf_repo(cache: Path, repo: str, files: dict[str, Path | bytes]) -> Path:
    """Lay files out as huggingface_hub's cache does: models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(COMMIT)
    snap = base / "snapshots" / COMMIT
    for rel, src in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            (snap / rel).write_bytes(src)
        else:
            shutil.copy(src, snap / rel)
    return snap


def _env(tmp_path: Path, cache: Path, registry: list[dict] | None = None) -> dict[str, str]:
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOK_CACHE": str(tmp_path / "tokcache")}
    if registry is not None:
        (tmp_path / "reg.json").write_text(json.dumps(registry))
        env["TOK_REGISTRY"] = str(tmp_path / "reg.json")
    return env


def _override(name: str, model_args: dict) -> dict:
    """The built-in entry (same Hub repos and files) with the architecture of the small test files."""
    from tokcli.core.registry import get_entry

    d = get_entry(name).to_dict()
    d["model_args"] = model_args
    return d


def _one_line_error(p) -> str:
    err = p.stderr.decode()
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_fetch_release_finds_every_file_in_the_hf_cache(tmp_path, monkeypatch):
    from tokcli.convert import fetch_official, fetch_release
    from tokcli.core.registry import get_entry

    cache = tmp_path / "hf"
    fake_hf_repo(cache, "shuidi0020/CODA", {f"{d}/{n}": n.encode() for d in ("mar_v16384", "flux_v65536")
                                            for n in ("vae_ema.pth", "quantizer_ema.pth")})
    fake_hf_repo(cache, "jadechoghari/mar", {"kl16.safetensors": b"kl16"})
    fake_hf_repo(cache, "black-forest-labs/FLUX.1-schnell",
                 {"vae/config.json": b"{}", "vae/diffusion_pytorch_model.safetensors": b"w"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mar = fetch_release(get_entry("coda-mar"))
    assert set(mar) == {"checkpoint", "quantizer", "base_vae"}
    assert mar["checkpoint"].read_bytes() == b"vae_ema.pth" and mar["quantizer"].parent.name == "mar_v16384"
    assert "models--jadechoghari--mar" in str(mar["base_vae"]) and mar["base_vae"].name == "kl16.safetensors"
    flux = fetch_release(get_entry("coda-flux"))
    assert set(flux) == {"checkpoint", "quantizer", "base_vae", "base_vae_config"}
    assert flux["base_vae"].parent == flux["base_vae_config"].parent  # one diffusers vae/ folder
    assert "models--black-forest-labs--FLUX.1-schnell" in str(flux["base_vae"])
    assert flux["checkpoint"].read_bytes() == b"vae_ema.pth" and flux["checkpoint"].parent.name == "flux_v65536"
    assert fetch_official(get_entry("coda-flux")) == flux["checkpoint"]  # the one-file API still works


def test_missing_files_are_named_in_one_line(tmp_path, monkeypatch):
    from tokcli.convert import fetch_release
    from tokcli.core.registry import get_entry

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as e:
        fetch_release(get_entry("coda-mar"))
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and "3 files" in msg
    for spec in ("shuidi0020/CODA:mar_v16384/vae_ema.pth", "shuidi0020/CODA:mar_v16384/quantizer_ema.pth",
                 "jadechoghari/mar:kl16.safetensors"):
        assert spec in msg
    assert "`hf download shuidi0020/CODA mar_v16384/vae_ema.pth mar_v16384/quantizer_ema.pth`" in msg
    assert "`hf download jadechoghari/mar kl16.safetensors`" in msg and "--as coda-mar" in msg

    # coda-flux with the CODA files in the cache but not the FLUX.1 VAE: only those two are named, via the CLI
    fake_hf_repo(cache, "shuidi0020/CODA", {"flux_v65536/vae_ema.pth": b"v", "flux_v65536/quantizer_ema.pth": b"q"})
    p = run_tok("convert", "coda-flux", env=_env(tmp_path, cache))
    assert p.returncode == 1
    msg = _one_line_error(p)
    assert "black-forest-labs/FLUX.1-schnell:vae/config.json" in msg
    assert "black-forest-labs/FLUX.1-schnell:vae/diffusion_pytorch_model.safetensors" in msg
    assert ("`hf download black-forest-labs/FLUX.1-schnell vae/config.json vae/diffusion_pytorch_model.safetensors`"
            in msg)
    assert "shuidi0020/CODA:flux_v65536" not in msg and "2 files" in msg
    assert not (tmp_path / "tokcache" / "models" / "coda-flux").exists()


def test_unconverted_release_names_all_its_files(tmp_path):
    from tokcli.core import registry
    from tokcli.errors import MissingWeightsError as MWE

    with pytest.MonkeyPatch.context() as m:
        m.setenv("TOK_CACHE", str(tmp_path / "empty"))
        with pytest.raises(MWE) as e:
            registry.resolve("coda-flux")
    msg = str(e.value)
    assert "tok convert coda-flux" in msg and "black-forest-labs/FLUX.1-schnell:vae/config.json" in msg
    assert "FOLDER/vae/diffusion_pytorch_model.safetensors" in msg and "--as coda-flux" in msg


@requires_coda_parity
def test_convert_coda_mar_from_hf_cache(tmp_path, coda_config, coda_expected):
    """The MAR parity files under the release names (mar_v16384/vae_ema.pth, quantizer_ema.pth, kl16.safetensors in
    jadechoghari/mar); the registry entry keeps its Hub files and takes the fixture's architecture."""
    import tokcli

    cache = tmp_path / "hf"
    fake_hf_repo(cache, "shuidi0020/CODA", {"mar_v16384/vae_ema.pth": CODA_PARITY / "vae_ema.pth",
                                            "mar_v16384/quantizer_ema.pth": CODA_PARITY / "quantizer_ema.pth"})
    fake_hf_repo(cache, "jadechoghari/mar", {"kl16.safetensors": CODA_PARITY / "base_vae.safetensors"})
    p = run_tok("convert", "coda-mar", env=_env(tmp_path, cache, [_override("coda-mar", coda_config)]))
    assert p.returncode == 0, p.stderr.decode()
    out = json.loads(p.stdout)
    assert out["path"] == str(tmp_path / "tokcache" / "models" / "coda-mar")
    prov = out["provenance"]
    assert prov["source"] == "hf-hub:shuidi0020/CODA/mar_v16384/vae_ema.pth"
    assert prov["hub_files"] == {"quantizer": "hf-hub:shuidi0020/CODA/mar_v16384/quantizer_ema.pth",
                                 "base_vae": "hf-hub:jadechoghari/mar/kl16.safetensors"}
    assert prov["base_vae_license"] == "mit" and prov["checkpoint_format"] == "ldm"
    tok = tokcli.load(f"local-dir:{out['path']}", device="cpu")
    ids = tok.encode(torch.from_numpy(coda_expected["pixel_values"]))
    assert torch.equal(ids, torch.from_numpy(coda_expected["level_indices"]))


def test_convert_coda_flux_from_hf_cache(tmp_path):
    """A tiny coda-flux release under the real names (shuidi0020/CODA flux_v65536/, FLUX.1-schnell vae/); the
    converted model equals the independent reference; the card records the schnell base and its licence."""
    import tokcli
    from tokcli.nn.klvae import vae_block_from_diffusers_config

    files = write_tiny_flux_release(tmp_path / "release", seed=3)
    cache = tmp_path / "hf"
    fake_hf_repo(cache, "shuidi0020/CODA", {"flux_v65536/vae_ema.pth": files["vae_ema"],
                                            "flux_v65536/quantizer_ema.pth": files["quantizer"]})
    fake_hf_repo(cache, "black-forest-labs/FLUX.1-schnell", {f"vae/{n}": files["vae_dir"] / n for n in
                                                             ("config.json", "diffusion_pytorch_model.safetensors")})
    args = {"vae": vae_block_from_diffusers_config(TINY_DIFFUSERS_CONFIG)[0], "vae_latent_channels": 16,
            "patch_size_list": SCALES, "codebook_size": CODEBOOK, "vq_attn_dim": ATTN_DIM, "vq_norm_type": "rms_norm",
            "vq_commitment_beta": 0.05, "decoder_lora_rank": RANK, "decoder_lora_module_list": LORA_MODULES,
            "latent_scale": SCALE, "latent_shift": SHIFT, "image_size": 32}
    p = run_tok("convert", "coda-flux", env=_env(tmp_path, cache, [_override("coda-flux", args)]))
    assert p.returncode == 0, p.stderr.decode()
    out = json.loads(p.stdout)
    prov = out["provenance"]
    assert prov["base_vae_license"] == "apache-2.0" and "FLUX.1-schnell" in prov["base_vae_origin"]
    assert prov["hub_files"]["base_vae"] == "hf-hub:black-forest-labs/FLUX.1-schnell/vae/diffusion_pytorch_model" \
                                            ".safetensors"
    card = (Path(out["path"]) / "README.md").read_text()
    assert "FLUX.1-schnell VAE" in card and "apache-2.0" in card
    tok = tokcli.load(f"local-dir:{out['path']}", device="cpu")
    x = images(seed=4)
    ref = reference(files, x)
    with torch.no_grad():
        ids = tok.encode(x)
        recon = tok.decode(ids, clamp=False)
    assert torch.equal(ids, ref["ids"])
    assert np.abs((recon - ref["recon"]).numpy()).max() < 1e-4
