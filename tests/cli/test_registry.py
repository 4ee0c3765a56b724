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
    with pytest.raises(TokError, match="no such file or folder"):
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
    assert tok.config_name == "tiny" and tok.name == str(tiny_model) and len(tok.sha256) == 64


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


def test_family_build_and_folder_round_trip(tmp_path):
    """`Family.build(args)` is `Class(**args)`; `save_folder` writes model_args + folder_config; `from_folder` reads
    it back strictly, into the family's class."""
    import torch

    from conftest import TINY_ARGS
    from tokcli.core.model import TokModel
    from tokcli.families.wetok.model import WeTok

    torch.manual_seed(0)
    model = registry.get_family("wetok").build(TINY_ARGS)
    assert type(model) is WeTok and model.model_args["entropy_mode"] == "official"  # normalised
    assert set(model.folder_config()) == {"tokens", "preprocess"}
    folder = model.save_folder(tmp_path / "m", provenance={"source": "test"})
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_args"] == model.model_args and cfg["tokens"] == model.spec.to_dict()
    assert cfg["preprocess"] == model.preprocess and cfg["decode"] == {} and folder.verify()
    back = TokModel.from_folder(tmp_path / "m")
    assert type(back) is WeTok and not back.training and back.config_name == "m"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    with pytest.raises(TokError, match="already exists"):
        model.save_folder(tmp_path / "m")
    model.save_folder(tmp_path / "m", overwrite=True)


def test_check_overwrite(tmp_path):
    from tokcli.core.atomic import check_overwrite

    assert check_overwrite(tmp_path / "new", False) == tmp_path / "new"
    with pytest.raises(TokError, match=r"already exists \(pass --overwrite to replace it\)"):
        check_overwrite(tmp_path, False)
    assert check_overwrite(str(tmp_path), True) == tmp_path


@pytest.mark.parametrize("name", ["wetok-tiny", "kl-tiny", "coda-tiny", "softvq-tiny", "flowmo-tiny"])
def test_shipped_folders_are_package_data_and_load(name):
    from tokcli.core.model import TokModel

    folder = registry.resolve(name)
    assert folder.path == registry.SHIPPED_DIR / name and folder.path.parent.parent.name == "tokcli"
    model = TokModel.from_folder(folder)
    assert model.family == folder.family and model.folder_config()["tokens"] == folder.config["tokens"]


def test_tokenizer_decode_template_applies_defaults_once():
    """The base class applies the folder's decode defaults and refuses sampler keywords the family does not take."""
    import torch

    from tokcli.families.base import TokenSpec, Tokenizer

    class Toy(Tokenizer):
        family = "toy"
        sampler_options = ("steps", "cfg")
        stochastic_decoder = True

        def __init__(self, **model_args):
            super().__init__()
            self.model_args = {"image_size": 8, **model_args}
            self.w = torch.nn.Parameter(torch.zeros(()))

        @property
        def spec(self):
            return TokenSpec(kind="latents", shape=(1, 1, 1), latent_dim=1, downsample=8)

        def _decode(self, tokens, *, seed, noise, **sampler):
            self.seen = {"seed": seed, **sampler}
            return torch.full((1, 3, 8, 8), 5.0)

    m = Toy()
    m.decode_defaults = {"seed": 3, "steps": 10, "cfg": 1.5}
    assert float(m.decode(torch.zeros(1, 1, 1, 1)).max()) == 1.0  # clamped by the base
    assert m.seen == {"seed": 3, "steps": 10, "cfg": 1.5}
    m.decode(torch.zeros(1, 1, 1, 1), seed=7, steps=2, cfg=None, clamp=False)
    assert m.seen == {"seed": 7, "steps": 2, "cfg": 1.5}
    with pytest.raises(TokUsageError, match="takes no sampler option order.*it takes: steps, cfg"):
        m.decode(torch.zeros(1, 1, 1, 1), order=2)
    assert m.preprocess == {"image_size": 8, "crop": "adm_center", "value_range": [-1, 1], "multiple_of": 8}
