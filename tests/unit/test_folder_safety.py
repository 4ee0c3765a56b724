"""A model folder is a file from anywhere: its config is checked against the weights' header before anything is
allocated (absurd model_args, truncated weights), and the weights' sha256 against the config's record (tampered
weights), with the hash cached in the tok cache so big files are hashed once."""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch

import tokcli
from conftest import REPO, run_tok, write_images
from tokcli.core import checkpoint
from tokcli.core.model import TokModel
from tokcli.errors import TokError

SHIPPED = REPO / "tokcli" / "weights"
WETOK_TINY = SHIPPED / "wetok-tiny"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test gets its own tok cache (the verified-hash cache lives there)."""
    monkeypatch.setenv("TOK_CACHE", str(tmp_path / "tok-cache"))
    monkeypatch.delenv("TOK_TRUST_WEIGHTS", raising=False)


def _copy(dest: Path, **model_args) -> Path:
    shutil.copytree(WETOK_TINY, dest)
    if model_args:
        cfg = json.loads((dest / "config.json").read_text())
        cfg["model_args"].update(model_args)
        (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def _tamper(folder: Path) -> None:
    """Change one tensor of the weights; config.json (and its recorded sha256) stays as it was."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    key = sorted(sd)[0]
    sd[key] = sd[key] + 0.5
    save_file(sd, str(folder / "model.safetensors"), metadata={"tok_format": "1", "family": "wetok"})


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- item 2: absurd configs are refused before anything big is built ----------------------------------------

@pytest.mark.parametrize("args", [{"ch": 16384}, {"num_res_blocks": 10 ** 6}, {"ch_mult": [1] * 100000}],
                         ids=["ch", "num_res_blocks", "ch_mult"])
def test_absurd_model_args_are_refused_fast_and_small(tmp_path, args):
    folder = _copy(tmp_path / "m", **args)
    rss, t0 = _maxrss_mib(), time.perf_counter()
    with pytest.raises(TokError) as e:
        TokModel.from_folder(folder)
    took, grew = time.perf_counter() - t0, _maxrss_mib() - rss
    msg = str(e.value)
    assert "\n" not in msg and "config.json" in msg and "does not match the weights" in msg, msg
    assert took < 3.0, f"refused after {took:.1f} s"
    assert grew < 512, f"peak memory grew by {grew:.0f} MiB"


def test_mismatched_shapes_and_bad_args_are_one_line(tmp_path):
    folder = _copy(tmp_path / "m", z_channels=24, groups=3)  # same names, other shapes, not bigger
    with pytest.raises(TokError, match=r"tensor \S+ is F32 \[.*\] but the wetok model its config.json describes"):
        TokModel.from_folder(folder)
    folder = _copy(tmp_path / "m2", bogus=1)
    with pytest.raises(TokError, match=r"m2/config.json: unknown wetok model_args \['bogus'\]"):
        TokModel.from_folder(folder)


def test_truncated_weights_are_one_clear_line(tmp_path):
    folder = _copy(tmp_path / "m")
    w = folder / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(TokError, match=r"model.safetensors is truncated or damaged: its header describes "
                                       rf"{len(data)} bytes but the file has {len(data) // 2}"):
        TokModel.from_folder(folder)
    w.write_bytes(data[:5])
    with pytest.raises(TokError, match="not a safetensors file or is truncated"):
        TokModel.from_folder(folder)


@pytest.mark.parametrize("name", ["wetok-tiny", "kl-tiny", "coda-tiny", "softvq-tiny", "flowmo-tiny"])
def test_shipped_models_load_exactly_as_before(name):
    """The checked path loads the same tensors as a plain build + strict load, and the model works."""
    from safetensors.torch import load_file

    from tokcli.core.registry import get_family, resolve

    folder = resolve(name)
    plain = get_family(folder.family).model_class()(**folder.config["model_args"])
    plain.load_state_dict(load_file(str(folder.weights_path)), strict=True)
    plain.prepare_for_inference()
    plain.eval()
    tok = tokcli.load(name, device="cpu")
    if tok.conv_layout:  # the layout tokcli.load picked for this device (channels-last on CPU)
        plain.set_memory_format(tok.memory_format)
    a, b = plain.state_dict(), tok.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert tok.sha256 == checkpoint.sha256_file(folder.weights_path) == folder.sha256
    if name == "wetok-tiny":
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        assert torch.equal(tok.decode(tok.encode(x)), plain.decode(plain.encode(x)))


# --- item 3: tampered weights, the sha256 that is recorded, the hash cache ---------------------------------

def test_tampered_weights_are_refused(tmp_path):
    folder = _copy(tmp_path / "m")
    claim = json.loads((folder / "config.json").read_text())["provenance"]["weights_sha256"]
    _tamper(folder)
    actual = checkpoint.sha256_file(folder / "model.safetensors")
    with pytest.raises(TokError) as e:
        tokcli.load(str(folder), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and str(folder / "model.safetensors") in msg and claim in msg and actual in msg


def test_tok_decode_refuses_tampered_weights(tmp_path):
    imgs = write_images(tmp_path / "imgs", n=1, size=(32, 32))
    codes = tmp_path / "codes.npz"
    assert run_tok("encode", imgs, "-o", codes, "-q", "--image-size", "32").returncode == 0
    folder = _copy(tmp_path / "m")
    _tamper(folder)
    p = run_tok("decode", codes, "-m", folder, "-o", tmp_path / "out", "-q")
    err = p.stderr.decode()
    assert p.returncode == 1 and err.startswith("error: ") and err.count("\n") == 1 and "sha256" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_trusted_weights_never_record_the_config_claim(tmp_path, monkeypatch):
    from tokcli.core.tokens import read_token_file

    folder = _copy(tmp_path / "m")
    claim = json.loads((folder / "config.json").read_text())["provenance"]["weights_sha256"]
    _tamper(folder)
    monkeypatch.setenv("TOK_TRUST_WEIGHTS", "1")
    tok = tokcli.load(str(folder), device="cpu")
    assert tok.sha256 == ""  # unverified (nothing hashed), not the claim
    imgs = write_images(tmp_path / "imgs", n=1, size=(32, 32))
    p = run_tok("encode", imgs, "-m", folder, "-o", tmp_path / "c.npz", "-q", "--image-size", "32")
    assert p.returncode == 0, p.stderr.decode()
    assert read_token_file(str(tmp_path / "c.npz")).header["model_sha256"] != claim
    monkeypatch.delenv("TOK_TRUST_WEIGHTS")
    with pytest.raises(TokError):  # hashes it (and caches the hash) ...
        tokcli.load(str(folder), device="cpu")
    monkeypatch.setenv("TOK_TRUST_WEIGHTS", "1")  # ... so a trusted load now records what was loaded
    assert tokcli.load(str(folder), device="cpu").sha256 == checkpoint.sha256_file(folder / "model.safetensors")


def test_the_hash_cache_avoids_rehashing(tmp_path, monkeypatch):
    folder = _copy(tmp_path / "m")
    calls = []
    real = checkpoint.sha256_file

    def counting(path, *a, **k):
        calls.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(checkpoint, "sha256_file", counting)
    first = tokcli.load(str(folder), device="cpu")
    second = tokcli.load(f"local-dir:{folder}", device="cpu")
    assert len(calls) == 1 and first.sha256 == second.sha256 == real(folder / "model.safetensors")
    cache = Path(os.environ["TOK_CACHE"]) / checkpoint.VERIFIED_NAME
    assert str((folder / "model.safetensors").resolve()) in json.loads(cache.read_text())["files"]
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # changed: hashed again
    tokcli.load(str(folder), device="cpu")
    assert len(calls) == 2
    cache.write_text("{not json")  # a corrupt cache is ignored (and rewritten)
    tokcli.load(str(folder), device="cpu")
    assert len(calls) == 3 and json.loads(cache.read_text())["version"] == 1
