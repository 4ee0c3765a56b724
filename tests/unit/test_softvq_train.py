"""Training SoftVQ-VAE with `tok train`: the official objective (L2, entropy, representation alignment through a
training-only projector), export without the projector, exact resume, and the one-line error of a missing teacher
(tiny ViTs on tiny synthetic images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_tok
from safetensors.torch import load_file
from test_train import _assert_same, _assert_same_state, _tensors, make_blobs, read_metrics

import tokcli

ARGS = {"encoder_model": "vit_small_patch14_dinov2", "decoder_model": "vit_small_patch14_dinov2",
        "encoder_depth": 1, "decoder_depth": 1, "image_size": 32, "enc_patch_size": 8, "dec_patch_size": 8,
        "num_latent_tokens": 8, "codebook_embed_dim": 8, "codebook_size": 32, "num_codebooks": 2}


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write_recipe(path: Path, root: Path, **over) -> Path:
    raw = {
        "model": {"family": "softvq", "name": "softvq-test", "model_args": dict(ARGS)},
        "data": {"roots": [str(root)], "crop_size": 32, "random_resize": [1.0, 1.5], "batch_size": 4},
        "loss": {"perceptual": "none", "gan_weight": 0.0, "l1_weight": 0.0, "l2_weight": 1.0,
                 "entropy_weight": 0.01, "repa_weight": 0.1, "repa_teacher": "kl-tiny", "repa_proj_dim": 16},
        "optim": {"lr": 1e-3, "betas": [0.9, 0.95], "max_steps": 6, "grad_clip": 1.0, "lr_schedule": "cosine",
                  "warmup_steps": 2, "ema_decay": 0.9},
        "run": {"seed": 0, "log_every": 1, "ckpt_every": 3, "device": "cpu"},
    }
    for sec, vals in over.items():
        raw[sec].update(vals)
    text = "\n".join(f"[{sec}]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in vals.items()) + "\n"
                     for sec, vals in raw.items())
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blobs(tmp_path_factory.mktemp("blobs"), n=6, size=40)


@pytest.fixture(scope="module")
def straight(blobs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("softvq")
    recipe = write_recipe(tmp / "softvq-test.toml", blobs)
    run = tmp / "straight"
    p = run_tok("train", str(recipe), "-o", str(run))
    assert p.returncode == 0, p.stderr.decode()
    return recipe, run


def test_train_exports_a_folder_that_loads_and_encodes(straight, blobs):
    _, run = straight
    rows = read_metrics(run)
    assert rows and {"l2", "entropy", "repa"} <= set(rows[-1])
    assert -1.0 <= rows[-1]["repa"] / 0.1 <= 1.0
    weights = load_file(str(run / "model" / "model.safetensors"))
    assert not any(k.startswith("repa_projector.") for k in weights)  # training-only: not exported
    ckpt = load_file(str(run / "checkpoints" / "step-0000006" / "model.safetensors"))
    assert any(k.startswith("repa_projector.") for k in ckpt)  # ... but checkpointed for resume
    card = (run / "model" / "README.md").read_text(encoding="utf-8")
    assert "REPA" in card and "kl-tiny" in card and "entropy" in card
    model = tokcli.load(str(run / "model"), device="cpu")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 8, 8) and z.dtype == torch.float32
    assert model.decode(z).shape == (2, 3, 32, 32)


def test_exact_resume(straight, tmp_path):
    recipe, run = straight
    split = tmp_path / "split"
    p = run_tok("train", str(recipe), "-o", str(split), "--max-steps", "3")
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("train", str(recipe), "--resume", str(split))
    assert p.returncode == 0, p.stderr.decode()
    _assert_same(_tensors(run / "model" / "model.safetensors"), _tensors(split / "model" / "model.safetensors"),
                 "exported model")
    for name in ("model", "ema"):
        _assert_same(_tensors(run / f"checkpoints/step-0000006/{name}.safetensors"),
                     _tensors(split / f"checkpoints/step-0000006/{name}.safetensors"), name)
    _assert_same_state(torch.load(run / "checkpoints/step-0000006/state.pt", weights_only=True),
                       torch.load(split / "checkpoints/step-0000006/state.pt", weights_only=True))


def test_missing_dinov2_teacher_is_one_line(blobs, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.toml", blobs, loss={"repa_teacher": "vit_small_patch14_dinov2"})
    empty = tmp_path / "hf"
    empty.mkdir()
    p = run_tok("train", str(recipe), "-o", str(tmp_path / "run"),
                env={"HF_HUB_CACHE": str(empty), "HF_HUB_OFFLINE": "1"})
    err = p.stderr.decode().strip()
    assert p.returncode != 0 and len(err.splitlines()) == 1, err
    assert "hf download timm/vit_small_patch14_dinov2.lvd142m model.safetensors" in err and "TOK_DOWNLOAD=1" in err
    assert not (tmp_path / "run" / "model").exists()


def test_no_teacher_needed_without_alignment(blobs, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", blobs, loss={"repa_weight": 0.0,
                                                             "repa_teacher": "vit_small_patch14_dinov2"},
                          optim={"max_steps": 2})
    p = run_tok("train", str(recipe), "-o", str(tmp_path / "run"), env={"HF_HUB_CACHE": str(tmp_path)})
    assert p.returncode == 0, p.stderr.decode()
    assert "repa" not in read_metrics(tmp_path / "run")[-1]
