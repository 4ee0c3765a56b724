"""The KL family (continuous latents), CODA trained on top of it with `tok train`, and the trainer's optimiser and
schedule options (tiny models on tiny synthetic images)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from conftest import TINY_ARGS, make_model_folder
from test_train import make_blobs, read_metrics

import tokcli
from tokcli.errors import TokError, TokUsageError
from tokcli.train.recipe import recipe_from_dict

# The smallest KL VAE diffusers accepts with GroupNorm(32): widths 32/64, downsampling 2, 4 latent channels.
KL_VAE = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "decoder_attn_resolutions": [],
          "resolution": 16, "z_channels": 4, "embed_dim": 4, "double_z": True}
SCALES = [1, 2, 4, 8]  # latent 8 x 8 -> 16 px images, 85 tokens


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blobs(tmp_path_factory.mktemp("blobs"), n=6, size=40)


def kl_recipe(root: Path, **over):
    raw = {
        "model": {"family": "kl", "name": "kl-test", "model_args": {"vae": dict(KL_VAE), "image_size": 16}},
        "data": {"roots": [str(root)], "crop_size": 16, "random_resize": [1.0, 2.0], "batch_size": 4},
        "loss": {"perceptual": "none", "gan_weight": 0.0, "l2_weight": 1.0, "kl_weight": 1e-4},
        "optim": {"lr": 2e-3, "max_steps": 12, "ema_decay": 0.0},
        "run": {"seed": 0, "log_every": 1, "ckpt_every": 1000, "device": "cpu"},
    }
    for sec, vals in over.items():
        raw[sec].update(vals)
    return recipe_from_dict(raw, source="kl-test.toml")


def coda_recipe(root: Path, base: Path, **over):
    raw = {
        "model": {"family": "coda", "name": "coda-test", "init_from": str(base), "model_args": {
            "patch_size_list": SCALES, "codebook_size": 32, "vq_attn_dim": 8, "vq_norm_type": "rms_norm",
            "vq_commitment_beta": 0.05, "decoder_lora_rank": 2,
            "decoder_lora_module_list": ["conv1", "conv2", "upsample", "downsample"]}},
        "data": {"roots": [str(root)], "crop_size": 16, "random_resize": [1.0, 2.0], "batch_size": 4},
        "loss": {"perceptual": "none", "gan_weight": 0.0, "l1_weight": 0.2, "l2_weight": 1.0, "vq_weight": 1.0,
                 "entropy_weight": 0.05},
        "optim": {"optimizer": "adamw", "lr": 5e-3, "betas": [0.5, 0.9], "weight_decay": 0.005,
                  "lr_schedule": "cosine", "max_steps": 6, "ema_decay": 0.9, "grad_clip": 10.0},
        "run": {"seed": 0, "log_every": 1, "ckpt_every": 3, "device": "cpu"},
    }
    for sec, vals in over.items():
        raw[sec].update(vals)
    return recipe_from_dict(raw, source="coda-test.toml")


@pytest.fixture(scope="module")
def kl_run(blobs, tmp_path_factory):
    from tokcli.train.trainer import train

    run = tmp_path_factory.mktemp("kl") / "run"
    return run, train(kl_recipe(blobs), output_dir=run, progress=False)


@pytest.fixture(scope="module")
def coda_run(blobs, kl_run, tmp_path_factory):
    from tokcli.train.trainer import train

    run = tmp_path_factory.mktemp("coda") / "run"
    return run, train(coda_recipe(blobs, Path(kl_run[1]["model_dir"])), output_dir=run, progress=False)


# ---------------------------------------------------------------------------------------------------- KL family
def test_kl_training_and_latent_scale_calibration(kl_run, blobs):
    run, res = kl_run
    m = read_metrics(run)
    assert len(m) == 12 and all(r["kl"] > 0 for r in m)
    assert np.mean([r["l1"] for r in m[-3:]]) < m[0]["l1"]
    model = tokcli.load(f"local-dir:{res['model_dir']}")
    # the exported latent scale makes the posterior mean unit-variance on the first training batches
    from tokcli.train.data import TrainData

    data = TrainData(kl_recipe(blobs).data, seed=0)
    x = torch.cat([data.batch(i) for i in range(16)])
    with torch.no_grad():
        lat = model.vae.encode(x)
    assert model.model_args["latent_scale"] != 1.0
    assert float(lat.double().std()) == pytest.approx(1.0, abs=1e-3)
    assert model.spec.extra["latent_scale"] == model.model_args["latent_scale"]


def test_kl_encode_decode_values(kl_run, blobs, tmp_path):
    model = tokcli.load(f"local-dir:{kl_run[1]['model_dir']}")
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        tok = model.encode(x)
        mean, _ = model.vae.posterior(x)
        assert tok.shape == (2, 8, 12, 4)
        torch.testing.assert_close(tok, (mean * model.model_args["latent_scale"]).permute(0, 2, 3, 1),
                                   rtol=0, atol=0)
        y = model.decode(tok)
        ref = model.vae.vae.decoder(model.vae.vae.post_quant_conv(mean)).clamp(-1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TokError, match=r"\[N, .+, 4\]"):
        model.decode(torch.zeros(1, 4, 8, 8))


def test_kl_convert_from_diffusers_folder(tmp_path):
    from diffusers import AutoencoderKL

    from tokcli.convert import convert
    from tokcli.nn.klvae import diffusers_vae_kwargs, vae_block_from_diffusers_config

    torch.manual_seed(0)
    kw = diffusers_vae_kwargs(KL_VAE, 0.5, 0.1)
    ref = AutoencoderKL(**kw).eval()
    ref.save_pretrained(tmp_path / "vae")
    block, scale, shift = vae_block_from_diffusers_config(json.loads((tmp_path / "vae" / "config.json").read_text()))
    assert (scale, shift) == (0.5, 0.1)
    assert diffusers_vae_kwargs(block, scale, shift) == kw  # the config round-trips
    folder = convert(str(tmp_path / "vae"), output=str(tmp_path / "m"), family="kl")  # a diffusers vae/ folder
    model = tokcli.load(f"local-dir:{folder.path}")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = (ref.encode(x).latent_dist.mean - 0.1) * 0.5
        torch.testing.assert_close(model.encode(x), want.permute(0, 2, 3, 1), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.decode(model.encode(x)),
                                   ref.decode(want / 0.5 + 0.1).sample.clamp(-1, 1), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- CODA on a KL VAE
def test_coda_trains_lora_and_quantizer_on_a_frozen_vae(coda_run, kl_run):
    run, res = coda_run
    m = read_metrics(run)
    assert len(m) == 6 and all("vq" in r and "entropy" in r for r in m)
    # cosine schedule logged per step: lr(0) = lr, decreasing
    lrs = [r["lr"] for r in m]
    assert lrs[0] == pytest.approx(5e-3) and all(a > b for a, b in zip(lrs, lrs[1:]))
    base = load_file(str(Path(kl_run[1]["model_dir"]) / "model.safetensors"))
    out = load_file(str(Path(res["model_dir"]) / "model.safetensors"))
    # the base VAE is frozen: every base tensor is exported unchanged (under peft's base_layer where wrapped)
    for k, v in base.items():
        key = k if k in out else k.rsplit(".", 1)[0] + ".base_layer." + k.rsplit(".", 1)[1]
        assert torch.equal(out[key], v), key
    lora_b = [k for k in out if ".lora_B." in k]
    assert lora_b and all(out[k].abs().sum() > 0 for k in lora_b)  # B starts at zero: it must have learned
    cfg = json.loads((Path(res["model_dir"]) / "config.json").read_text())
    kl_cfg = json.loads((Path(kl_run[1]["model_dir"]) / "config.json").read_text())
    assert cfg["model_args"]["latent_scale"] == kl_cfg["model_args"]["latent_scale"]
    assert cfg["model_args"]["vae"] == kl_cfg["model_args"]["vae"]
    assert cfg["tokens"]["extra"]["patch_size_list"] == SCALES
    assert cfg["tokens"]["extra"]["latent_scale"] == kl_cfg["model_args"]["latent_scale"]


def test_coda_inference_path_matches_training_path(coda_run):
    """encode (argmax + gather) gives the training forward's ids; decode gives its quantized value's image."""
    model = tokcli.load(f"local-dir:{coda_run[1]['model_dir']}")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        tok = model.encode(x)
        assert tok.shape == (3, sum(p * p for p in SCALES)) and int(tok.max()) < 32
        out = model.quantize(model.encode_latent(x))
        assert torch.equal(model.quantize.flatten_indices(out.ids), tok)
        torch.testing.assert_close(model.decode(tok), model.vae.decode(out.quantized).clamp(-1, 1), rtol=0,
                                   atol=1e-5)  # summation order only


def test_coda_exact_resume_with_adamw_cosine(blobs, kl_run, coda_run, tmp_path):
    from tokcli.train.trainer import train

    run = tmp_path / "resumed"
    recipe = coda_recipe(blobs, Path(kl_run[1]["model_dir"]))
    train(recipe, output_dir=run, max_steps=3, progress=False)
    train(recipe, resume=run, progress=False)
    full = load_file(str(Path(coda_run[0]) / "checkpoints" / "step-0000006" / "model.safetensors"))
    part = load_file(str(run / "checkpoints" / "step-0000006" / "model.safetensors"))
    assert full.keys() == part.keys()
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_init_from_errors(blobs, kl_run, tmp_path):
    from tokcli.train.trainer import train

    with pytest.raises(TokUsageError, match="cannot start from model.init_from"):
        train(kl_recipe(blobs, model={"init_from": kl_run[1]["model_dir"]}), output_dir=tmp_path / "a",
              progress=False)
    wetok = make_model_folder(tmp_path / "wetok", TINY_ARGS)
    with pytest.raises(TokError, match="must be a 'kl' model folder"):
        train(coda_recipe(blobs, wetok), output_dir=tmp_path / "b", progress=False)
    bad = coda_recipe(blobs, Path(kl_run[1]["model_dir"]))
    bad.model.model_args["latent_scale"] = 123.0
    with pytest.raises(TokError, match="contradicts the base VAE"):
        train(bad, output_dir=tmp_path / "c", progress=False)


def test_init_from_a_registry_name(blobs):
    """model.init_from = "kl-tiny" resolves through the registry to the shipped folder; a name that is neither a
    folder nor a registry entry is one clear error."""
    from tokcli.core.registry import get_family, resolve
    from tokcli.families.coda.objective import CodaObjective

    r = coda_recipe(blobs, Path("unused"), model={"init_from": "kl-tiny", "model_args": {
        "patch_size_list": [1, 2], "codebook_size": 8, "vq_attn_dim": 8, "vq_norm_type": "rms_norm",
        "vq_commitment_beta": 0.05, "decoder_lora_rank": 0, "decoder_lora_module_list": []}})
    obj = get_family("coda").objective(r.model.objective)(r)
    assert isinstance(obj, CodaObjective)
    model = obj.build_model(None)
    base = resolve("kl-tiny")
    assert model.model_args["latent_scale"] == base.config["model_args"]["latent_scale"]
    assert model.model_args["vae"] == base.config["model_args"]["vae"]
    r.model.init_from = "no-such-model"
    with pytest.raises(TokUsageError, match="unknown model 'no-such-model'"):
        obj.build_model(None)


def test_lr_schedule_values():
    from tokcli.train.trainer import lr_multiplier

    r = recipe_from_dict({"model": {"family": "kl"}, "data": {"roots": ["x"]},
                          "optim": {"lr": 1.0, "min_lr": 0.1, "lr_schedule": "cosine", "warmup_steps": 10,
                                    "max_steps": 110}})
    assert lr_multiplier(r, 0) == pytest.approx(0.1) and lr_multiplier(r, 9) == pytest.approx(1.0)
    assert lr_multiplier(r, 10) == pytest.approx(1.0)
    assert lr_multiplier(r, 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(r, 110) == pytest.approx(0.1)
    r.optim.lr_schedule = "constant"
    assert lr_multiplier(r, 50) == 1.0
    with pytest.raises(TokUsageError, match="optim.optimizer"):
        recipe_from_dict({"model": {"family": "kl"}, "data": {"roots": ["x"]}, "optim": {"optimizer": "sgd"}})


def test_ema_warmup_forgets_the_initialisation():
    from tokcli.train.ema import EMA

    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    plain, warm = EMA(lin, 0.999), EMA(lin, 0.999, warmup=True)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    for t in range(1500):
        plain.update(lin, t)
        warm.update(lin, t)
    keep = math.prod(min(0.999, (1 + t) / (10 + t)) for t in range(1500))  # share of the initial value left
    assert float(plain.shadow["weight"]) == pytest.approx(1 - 0.999 ** 1500, rel=1e-4)  # 22 % still the init
    assert float(warm.shadow["weight"]) == pytest.approx(1 - keep, rel=1e-5) and keep < 1e-3
    assert warm.decay_at(0) == pytest.approx(0.1) and warm.decay_at(10 ** 6) == 0.999
