"""Parity of tokcli.families.coda.vae (CODA-MAR KL-VAE + LoRA) with the official-code fixture in <parity>/coda.

Tolerances are the README's suggested ones (see <parity>/coda/README.md, "Reproducibility and tolerances").
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import CODA_PARITY, requires_coda_parity
from tokcli.errors import TokError
from tokcli.families.coda.vae import (CodaVAE, convert_official_vae_state_dict, diffusers_to_ldm_module,
                                      ldm_to_diffusers_module, load_official_vae_file)

FIX = CODA_PARITY
pytestmark = requires_coda_parity

TOL = {
    "pixel_values": 0.0,
    "moments": 1e-3, "posterior_mean": 1e-3, "posterior_mean_base": 1e-3,
    "posterior_std": 1e-5,
    "latent": 2.5e-4, "latent_sampled": 2.5e-4,
    "recon": 1e-4, "recon_sampled": 1e-4,
    "recon_continuous": 3e-4, "recon_continuous_base": 3e-4,
}

README_LORA_CONVS = {
    "encoder.down.0.block.0.conv1", "encoder.down.0.block.0.conv2", "encoder.down.0.downsample.conv",
    "encoder.down.1.block.0.conv1", "encoder.down.1.block.0.conv2", "encoder.down.1.downsample.conv",
    "encoder.down.2.block.0.conv1", "encoder.down.2.block.0.conv2", "encoder.mid.block_1.conv1",
    "encoder.mid.block_1.conv2", "encoder.mid.block_2.conv1", "encoder.mid.block_2.conv2",
    "decoder.mid.block_1.conv1", "decoder.mid.block_1.conv2", "decoder.mid.block_2.conv1",
    "decoder.mid.block_2.conv2", "decoder.up.0.block.0.conv1", "decoder.up.0.block.0.conv2",
    "decoder.up.0.block.1.conv1", "decoder.up.0.block.1.conv2", "decoder.up.1.block.0.conv1",
    "decoder.up.1.block.0.conv2", "decoder.up.1.block.1.conv1", "decoder.up.1.block.1.conv2",
    "decoder.up.1.upsample.conv", "decoder.up.2.block.0.conv1", "decoder.up.2.block.0.conv2",
    "decoder.up.2.block.1.conv1", "decoder.up.2.block.1.conv2", "decoder.up.2.upsample.conv",
}


def _maxdiff(a, b) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def x():
    u8 = torch.from_numpy(np.load(FIX / "inputs.npy"))              # [N, H, W, 3] uint8
    v = u8.float().div(255).permute(0, 3, 1, 2).contiguous()
    return v + v - 1                                                  # official ToTensor + normalize_01_into_pm1


@pytest.fixture(scope="module")
def vae():
    return CodaVAE.from_official(FIX, FIX / "vae_ema.pth", FIX / "base_vae.safetensors")


@pytest.fixture(scope="module")
def base_vae():
    return CodaVAE.from_official(FIX, None, FIX / "base_vae.safetensors")


@pytest.fixture(scope="module")
def outputs(vae, x, coda_expected):
    with torch.inference_mode():
        mean, std = vae.posterior(x)
        return {
            "moments": vae.moments(x), "posterior_mean": mean, "posterior_std": std, "latent": vae.encode(x),
            "latent_sampled": vae.encode_sampled(x, noise=torch.from_numpy(coda_expected["sample_noise"])),
            "recon": vae.decode(torch.from_numpy(coda_expected["f_hat"])),
            "recon_sampled": vae.decode(torch.from_numpy(coda_expected["f_hat_sampled"])),
            "recon_continuous": vae.decode(torch.from_numpy(coda_expected["latent"])),
        }


def test_architecture_from_config(vae, coda_config):
    v = coda_config["vae"]
    dcfg = vae.vae.config
    assert list(dcfg.block_out_channels) == [v["ch"] * m for m in v["ch_mult"]] == [32, 64, 32]
    assert dcfg.layers_per_block == v["num_res_blocks"] and dcfg.latent_channels == v["embed_dim"]
    assert list(dcfg.down_block_types) == ["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    assert list(dcfg.up_block_types) == ["UpDecoderBlock2D"] * 3
    assert vae.latent_scale == coda_config["latent_scale"] == 0.2325 and vae.lora_rank == coda_config["decoder_lora_rank"]


def test_key_mapping_roundtrip(base_vae):
    for name, mod in base_vae.vae.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)):
            assert ldm_to_diffusers_module(diffusers_to_ldm_module(name, 3), 3) == name


def test_strict_loading(vae, base_vae):
    ema = load_official_vae_file(FIX / "vae_ema.pth")
    base = load_official_vae_file(FIX / "base_vae.safetensors")
    lora_keys = [k for k in ema if ".lora_layer." in k]
    assert len(ema) == 226 and len(lora_keys) == 60 and len(base) == 166
    assert set(ema) - set(lora_keys) == set(base)
    # the wrapped convs are exactly the official ones (README list = checkpoint's LoRA keys)
    assert set(vae.lora_modules) == README_LORA_CONVS == {k.split(".lora_layer.")[0] for k in lora_keys}
    # after mapping: no missing, no unexpected key, same shapes, every tensor loaded as is
    for model, sd in ((vae, ema), (base_vae, base)):
        conv = convert_official_vae_state_dict(sd, model.num_levels, model.lora_modules)
        mine = model.vae.state_dict()
        assert set(conv) == set(mine)
        for k, t in conv.items():
            assert torch.equal(mine[k], t), k
    # a checkpoint that does not fit the config is refused (here: LoRA tensors into a model without LoRA)
    with pytest.raises(TokError, match="unexpected"):
        CodaVAE(base_vae.vae_cfg).load_official_state_dict(ema)


def test_encode_matches_official(outputs, x, coda_expected):
    assert _maxdiff(x, coda_expected["pixel_values"]) == 0.0
    for name in ("moments", "posterior_mean", "posterior_std", "latent", "latent_sampled"):
        assert outputs[name].shape == coda_expected[name].shape
        assert _maxdiff(outputs[name], coda_expected[name]) <= TOL[name], name


def test_decode_matches_official(outputs, coda_expected):
    for name in ("recon", "recon_sampled", "recon_continuous"):
        assert outputs[name].shape == coda_expected[name].shape
        assert _maxdiff(outputs[name], coda_expected[name]) <= TOL[name], name


def test_base_vae_and_lora_is_applied(base_vae, outputs, x, coda_expected):
    with torch.inference_mode():
        mean_b = base_vae.posterior(x)[0]
        rc_b = base_vae.decode(torch.from_numpy(coda_expected["latent"]))
    assert _maxdiff(mean_b, coda_expected["posterior_mean_base"]) <= TOL["posterior_mean_base"]
    assert _maxdiff(rc_b, coda_expected["recon_continuous_base"]) <= TOL["recon_continuous_base"]
    # LoRA really changes both encoder and decoder (README: 4.24 and 0.27)
    assert _maxdiff(mean_b, outputs["posterior_mean"]) > 1.0
    assert _maxdiff(rc_b, outputs["recon_continuous"]) > 0.05


def test_end_to_end_ids(outputs, coda_expected, coda_config):
    from tokcli.quant.msrq import MultiScaleAttentionQuantizer

    q = MultiScaleAttentionQuantizer.from_config(coda_config)
    q.load_state_dict(torch.load(FIX / "quantizer_ema.pth", map_location="cpu", weights_only=True), strict=True)
    with torch.inference_mode():
        for suffix in ("", "_sampled"):
            ids = q.encode(outputs["latent" + suffix])
            assert torch.equal(q.flatten_indices(ids), torch.from_numpy(coda_expected["level_indices" + suffix]))


def test_non_ema_file_refused_and_differs(x, coda_expected, outputs):
    with pytest.raises(TokError, match="non-EMA"):
        CodaVAE.from_official(FIX, FIX / "vae.pth", FIX / "base_vae.safetensors")
    raw = CodaVAE.from_official(FIX, FIX / "vae.pth", FIX / "base_vae.safetensors", allow_non_ema=True)
    with torch.inference_mode():
        lat = raw.encode(x)
        rc = raw.decode(torch.from_numpy(coda_expected["latent"]))
    assert _maxdiff(lat, coda_expected["latent"]) > 100 * TOL["latent"]
    assert _maxdiff(rc, outputs["recon_continuous"]) > 100 * TOL["recon_continuous"]


def test_merged_lora_matches(x, coda_expected):
    m = CodaVAE.from_official(FIX, FIX / "vae_ema.pth", FIX / "base_vae.safetensors")
    m.merge_lora()
    with torch.inference_mode():
        assert _maxdiff(m.encode(x), coda_expected["latent"]) <= TOL["latent"]
        assert _maxdiff(m.decode(torch.from_numpy(coda_expected["f_hat"])), coda_expected["recon"]) <= TOL["recon"]


def test_config_mismatch_is_refused(coda_config):
    bad = json.loads(json.dumps(coda_config))
    bad["decoder_lora_rank"] = 8
    with pytest.raises(TokError, match="rank"):
        CodaVAE.from_official(bad, FIX / "vae_ema.pth", FIX / "base_vae.safetensors")
    bad = json.loads(json.dumps(coda_config))
    bad["vae"]["ch_mult"] = [1, 2, 2]
    with pytest.raises(TokError, match="does not match"):
        CodaVAE.from_official(bad, None, FIX / "base_vae.safetensors")
