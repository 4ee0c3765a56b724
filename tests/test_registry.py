"""Name resolution: registry names, local-dir:, hf-hub: through a hand-made Hugging Face cache, $TOK_REGISTRY,
and `tok convert NAME` from the HF cache (offline) through the same code path users run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import PARITY, run_tok
from tokcli.core import registry
from tokcli.errors import MissingWeightsError, TokError, TokUsageError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hf_repo(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Lay out files exactly as huggingface_hub's cache does (refs/main -> snapshots/<commit>/...)."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    snap = base / "snapshots" / COMMIT
    for rel, src in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snap / rel)
    return snap


def test_default_and_local_dir(tiny_model):
    assert registry.DEFAULT_MODEL == "wetok-tiny"
    f = registry.resolve(f"local-dir:{tiny_model}")
    assert f.path == tiny_model and f.family == "wetok"
    assert registry.resolve(str(tiny_model)).config == f.config
    with pytest.raises(TokUsageError, match="hf-hub:org/thing"):
        registry.resolve("org/thing")
    with pytest.raises(TokUsageError, match="did you mean"):
        registry.resolve("wetok-16")
    with pytest.raises(TokError, match="no such folder"):
        registry.resolve("local-dir:/nonexistent/x")


def test_hf_hub_from_cache_offline(tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    fake_hf_repo(cache, "someorg/tiny", {n: tiny_model / n for n in ("config.json", "model.safetensors", "README.md")})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    f = registry.resolve("hf-hub:someorg/tiny")
    assert f.sha256 == registry.resolve(str(tiny_model)).sha256 and f.verify()
    with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE"):
        registry.resolve("hf-hub:someorg/absent")
    with pytest.raises(TokUsageError):
        registry.resolve("hf-hub:not-a-repo-id")


def test_load_api_contract(tiny_model):
    import torch

    import tokcli

    tok = tokcli.load(str(tiny_model), device="cpu")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t = tok.encode(x)
    assert t.shape == (2, 16, 16, 2) and t.dtype == torch.long and int(t.max()) < 256
    y = tok.decode(t)
    assert y.shape == x.shape and float(y.abs().max()) <= 1.0
    assert tok.name == "tiny" and len(tok.sha256) == 64


@pytest.mark.skipif(not (PARITY / "wetok" / "WeTok.ckpt").is_file(), reason="parity fixtures not present")
def test_convert_registry_name_from_hf_cache(tmp_path):
    """`tok convert NAME` finds the official file in the HF cache (offline) and installs the folder in the tok
    cache; the installed model then encodes the parity inputs to exactly the official indices."""
    cache = tmp_path / "hf"
    fake_hf_repo(cache, "official/wetok-small", {"ImageNet/small/WeTok.ckpt": PARITY / "wetok" / "WeTok.ckpt"})
    entry = {"name": "wetok-parity", "family": "wetok", "description": "parity fixture",
             "model_args": {"ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1, "z_channels": 16, "groups": 2,
                            "codebook_size": 256, "generative_decoder": False, "image_size": 64},
             "hub_repo": "official/wetok-small", "hub_filename": "ImageNet/small/WeTok.ckpt"}
    reg = tmp_path / "reg.json"
    reg.write_text(json.dumps([entry]))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOK_REGISTRY": str(reg),
           "TOK_CACHE": str(tmp_path / "tokcache")}
    p = run_tok("models", "wetok-parity", "--json", env=env)
    assert json.loads(p.stdout)[0]["available"] is False
    p = run_tok("convert", "wetok-parity", env=env)
    assert p.returncode == 0, p.stderr.decode()
    out = json.loads(p.stdout)
    assert out["path"] == str(tmp_path / "tokcache" / "models" / "wetok-parity")
    assert out["provenance"]["source"] == "hf-hub:official/wetok-small/ImageNet/small/WeTok.ckpt"
    p = run_tok("models", "wetok-parity", "--json", env=env)
    assert json.loads(p.stdout)[0]["available"] is True
    # a second convert refuses to overwrite
    p = run_tok("convert", "wetok-parity", env=env)
    assert p.returncode == 1 and "already exists" in p.stderr.decode()
    # the installed model, used by name, reproduces the official indices
    from PIL import Image

    inputs = np.load(PARITY / "wetok" / "inputs.npy")
    exp = np.load(PARITY / "wetok" / "expected.npz")
    imgs = tmp_path / "in"
    imgs.mkdir()
    for i, a in enumerate(inputs):
        Image.fromarray(a).save(imgs / f"{i}.png")
    p = run_tok("encode", imgs, "-m", "wetok-parity", "-o", tmp_path / "c.npz", env=env)
    assert p.returncode == 0, p.stderr.decode()
    from tokcli.core.tokens import read_token_file

    tf = read_token_file(tmp_path / "c.npz")
    assert np.array_equal(tf.array.reshape(2, -1, 2), exp["indices"])


@pytest.mark.skipif(not (PARITY / "wetok" / "WeTok.ckpt").is_file(), reason="parity fixtures not present")
def test_convert_file_usage_errors(tmp_path):
    ck = PARITY / "wetok" / "WeTok.ckpt"
    p = run_tok("convert", ck, "-o", tmp_path / "m")
    assert p.returncode == 2 and "--family" in p.stderr.decode()
    p = run_tok("convert", ck, "--family", "wetok", "--config", PARITY / "wetok" / "config.yaml",
                "-o", tmp_path / "m")
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["provenance"]["ema_tensors"] > 0
    p = run_tok("convert", tmp_path / "nope.ckpt", "--family", "wetok", "--config", "x.yaml", "-o", tmp_path / "q")
    assert p.returncode == 1 and "no such file" in p.stderr.decode()
