"""The shipped demo models tokcli/weights/kl-tiny and tokcli/weights/coda-tiny through the CLI, on the shipped
sample photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_tok

SAMPLES = REPO / "samples"


@pytest.fixture(scope="module")
def coda_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("coda-tiny")
    p = run_tok("encode", SAMPLES, "-m", "coda-tiny", "-o", out / "codes.npz")
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("decode", out / "codes.npz", "-o", out / "dec")
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("reconstruct", SAMPLES, "-m", "coda-tiny", "-o", out / "rec")
    assert p.returncode == 0, p.stderr.decode()
    return out


def test_coda_tiny_token_file_is_self_describing(coda_files):
    cfg = json.loads((REPO / "tokcli" / "weights" / "coda-tiny" / "config.json").read_text())
    kl = json.loads((REPO / "tokcli" / "weights" / "kl-tiny" / "config.json").read_text())
    with np.load(coda_files / "codes.npz", allow_pickle=False) as z:
        idx = z["indices"]
        header = json.loads(str(z["header"][()]))
    scales = cfg["model_args"]["patch_size_list"]
    assert idx.shape == (len(list(SAMPLES.glob("*.jpg")) + list(SAMPLES.glob("*.png"))), sum(p * p for p in scales))
    assert idx.dtype == np.uint16 and int(idx.max()) < cfg["model_args"]["codebook_size"]
    extra = header["tokens"]["extra"]
    assert extra["patch_size_list"] == scales
    assert extra["level_offsets"][-1] == sum(p * p for p in scales[:-1])
    # the latent convention of the frozen base VAE travels with the tokens
    assert extra["latent_scale"] == kl["model_args"]["latent_scale"] == cfg["model_args"]["latent_scale"]
    assert extra["latent_shift"] == 0.0 and extra["posterior"] == "mean"
    assert header["preprocess"]["image_size"] == scales[-1] * 8


def test_coda_tiny_decode_of_encode_is_reconstruct(coda_files):
    names = sorted(p.name for p in (coda_files / "rec").iterdir())
    assert names and names == sorted(p.name for p in (coda_files / "dec").iterdir())
    for n in names:
        a = np.asarray(Image.open(coda_files / "dec" / n))
        b = np.asarray(Image.open(coda_files / "rec" / n))
        assert np.array_equal(a, b), n


@pytest.mark.parametrize("model", ["coda-tiny", "kl-tiny"])
def test_shipped_models_bench(model, tmp_path):
    """Quality on the shipped samples: well above a blank image (the card has the measured figures)."""
    p = run_tok("bench", "all", SAMPLES, "-m", model, "--json", "-q")
    assert p.returncode == 0, p.stderr.decode()
    res = json.loads(p.stdout.decode().strip().splitlines()[-1])["metrics"]
    assert res["psnr"] > 18.0 and res["ssim"] > 0.35
    if model == "coda-tiny":
        assert res["usage"]["usage"] > 0.4
