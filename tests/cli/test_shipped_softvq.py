"""The shipped demo SoftVQ-VAE tokcli/weights/softvq-tiny through the CLI, on the shipped sample photos: encode /
decode / reconstruct / bench all, decode(encode(x)) == reconstruct(x) bit for bit, a self-describing header."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_tok

SAMPLES = REPO / "samples"
FOLDER = REPO / "tokcli" / "weights" / "softvq-tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("softvq-tiny")
    for args in (("encode", SAMPLES, "-m", "softvq-tiny", "-o", out / "z.npz"),
                 ("decode", out / "z.npz", "-o", out / "dec"),
                 ("reconstruct", SAMPLES, "-m", "softvq-tiny", "-o", out / "rec")):
        p = run_tok(*args)
        assert p.returncode == 0, p.stderr.decode()
    return out


def test_header_carries_the_latent_statistics_and_layout(files):
    cfg = json.loads((FOLDER / "config.json").read_text())
    a = cfg["model_args"]
    with np.load(files / "z.npz", allow_pickle=False) as z:
        lat = z["latents"]
        header = json.loads(str(z["header"][()]))
    n = len(list(SAMPLES.glob("*.jpg")) + list(SAMPLES.glob("*.png")))
    assert lat.shape == (n, a["num_latent_tokens"], a["codebook_embed_dim"]) and lat.dtype == np.float32
    t = header["tokens"]
    assert t["kind"] == "latents" and t["downsample"] is None and "latent tokens" in t["layout"]
    assert t["extra"]["vq_mean"] == a["vq_mean"] and t["extra"]["vq_std"] == a["vq_std"]
    assert t["extra"]["normalized"] is False and header["latent_dtype"] == "float32"
    # z is a convex mix of unit codewords: every token's norm is at most 1
    assert float(np.linalg.norm(lat, axis=-1).max()) <= 1.0 + 1e-5


def test_decode_of_encode_is_reconstruct(files):
    names = sorted(p.name for p in (files / "rec").iterdir())
    assert names and names == sorted(p.name for p in (files / "dec").iterdir())
    for name in names:
        assert np.array_equal(np.asarray(Image.open(files / "dec" / name)),
                              np.asarray(Image.open(files / "rec" / name))), name


def test_bench_all_on_the_samples():
    """Quality above the mean image (~11 dB on these photos; the card has the measured figures) and argmax-id
    usage per codebook."""
    p = run_tok("bench", "all", SAMPLES, "-m", "softvq-tiny", "--json", "-q")
    assert p.returncode == 0, p.stderr.decode()
    res = json.loads(p.stdout.decode().strip().splitlines()[-1])["metrics"]
    assert res["psnr"] > 14.0 and res["ssim"] > 0.3
    usage = res["usage"]
    assert len(usage["groups"]) == json.loads((FOLDER / "config.json").read_text())["model_args"]["num_codebooks"]
    assert 0 < usage["usage"] <= 1 and "argmax" in usage["counted"]
