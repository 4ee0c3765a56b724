"""Training FlowMo (stage 1A) with `tok train` on tiny towers and tiny synthetic images: the flow, entropy and
commitment terms are logged, the block weights keep their initial norms, the export decodes, resume is exact, and
FlowMo-only recipe keys are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_tok
from safetensors.torch import load_file
from test_train import _assert_same, make_blobs, read_metrics

ARGS = {"image_size": 16, "patch_size": 4, "code_length": 4, "context_dim": 6, "codebook_size_for_entropy": 3,
        "enc_hidden_size": 32, "enc_num_heads": 1, "enc_depth": 1, "dec_hidden_size": 64, "dec_num_heads": 2,
        "dec_depth": 1}


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write_recipe(path: Path, root: Path, **over) -> Path:
    raw = {
        "model": {"family": "flowmo", "name": "flowmo-test", "model_args": dict(ARGS)},
        "data": {"roots": [str(root)], "crop_size": 16, "batch_size": 4},
        "loss": {"perceptual": "none"},
        "optim": {"lr": 1e-3, "betas": [0.9, 0.95], "max_steps": 4, "ema_decay": 0.9},
        "run": {"seed": 0, "log_every": 1, "ckpt_every": 2, "device": "cpu"},
    }
    for sec, vals in over.items():
        raw[sec].update(vals)
    path.write_text("\n".join(f"[{sec}]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in vals.items()) + "\n"
                              for sec, vals in raw.items()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blobs(tmp_path_factory.mktemp("blobs"), n=6, size=24)


def test_train_resume_and_export(blobs, tmp_path):
    import tokcli
    from tokcli.families.flowmo.objective import norm_fixed_weights

    recipe = write_recipe(tmp_path / "flowmo-test.toml", blobs)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_tok("train", recipe, "-o", straight, "-q").returncode == 0
    p = run_tok("train", recipe, "-o", split, "--max-steps", "2", "-q")
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("train", recipe, "--resume", split, "-q")
    assert p.returncode == 0, p.stderr.decode()
    _assert_same(load_file(str(straight / "model" / "model.safetensors")),
                 load_file(str(split / "model" / "model.safetensors")), "exported model")
    rows = read_metrics(straight)
    assert {"flow", "entropy", "commitment"} <= set(rows[-1]) and len(rows) == 4
    # every block Linear weight is back at its step-0 norm after each step
    raw = load_file(str(straight / "checkpoints" / "step-0000004" / "model.safetensors"))
    state = torch.load(straight / "checkpoints" / "step-0000004" / "state.pt", weights_only=True)
    norms = state["objective"]["initial_norms"]
    m = tokcli.load(f"local-dir:{straight / 'model'}", device="cpu")
    assert set(norms) == set(norm_fixed_weights(m)) and len(norms) == 2 * 2 * 5
    for k, n in norms.items():
        assert torch.linalg.norm(raw[k]).item() == pytest.approx(n.item(), rel=1e-5), k
    with torch.inference_mode():
        out = m.reconstruct(torch.zeros(1, 3, 16, 16), seed=0, steps=2)
    assert out.shape == (1, 3, 16, 16) and bool(torch.isfinite(out).all())


def test_flowmo_recipe_keys_are_checked(blobs, tmp_path):
    recipe = write_recipe(tmp_path / "bad.toml", blobs, loss={"gan_weight": 0.1, "t_schedule": "cosine"})
    p = run_tok("train", recipe, "-o", tmp_path / "run", "-q")
    err = p.stderr.decode()
    assert p.returncode != 0 and "Traceback" not in err and "gan_weight" in err, err


def test_encoder_freezes_after_the_given_step(blobs, tmp_path):
    recipe = write_recipe(tmp_path / "freeze.toml", blobs, loss={"perceptual": "none", "freeze_encoder_after": 2})
    run = tmp_path / "run"
    assert run_tok("train", recipe, "-o", run, "-q").returncode == 0
    a, b = (load_file(str(run / "checkpoints" / f"step-000000{s}" / "model.safetensors")) for s in (2, 4))
    enc = [k for k in a if k.startswith("encoder.")]
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in enc)  # renormalised, not trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("decoder.")) > 1e-4
    assert "entropy" not in read_metrics(run)[-1] and "entropy" in read_metrics(run)[0]


def test_a_decoder_narrower_than_a_patch_is_refused(blobs, tmp_path):
    # patch 4 -> 48 values per patch; a width-32 decoder could never remove the noise from its samples
    narrow = {**ARGS, "dec_hidden_size": 32, "dec_num_heads": 1}
    recipe = write_recipe(tmp_path / "narrow.toml", blobs, model={"model_args": narrow})
    p = run_tok("train", recipe, "-o", tmp_path / "run", "-q")
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err, err
    assert "dec_hidden_size 32 is below a patch's 3 x 4^2 = 48 values" in err, err
    assert not (tmp_path / "run").exists()
