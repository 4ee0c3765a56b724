"""The shipped demo generators through `tok generate` on CPU: each names a shipped tokenizer by registry name and
sha256, writes decodable PNGs and a token file, the same seed gives the same samples for batch 1 and 3 (the same ids;
latents and PNGs to fp32 rounding), and `tok decode` of the token file gives the generated PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_tok

WEIGHTS = REPO / "tokcli" / "weights"
# name -> a fast sampler setting (the folders' defaults are the full ones)
GENERATORS = {"sit-softvq-tiny": ("--steps", "8"), "wetok-ar-tiny": (), "maskgit-coda-tiny": ("--steps", "4")}
SHIPPED = [g for g in GENERATORS if (WEIGHTS / g / "model.safetensors").is_file()]


def _pngs(folder):
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def _tokens(path):
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["header"][()]))
        return z[header["tokens"]["kind"]].copy(), header


@pytest.fixture(scope="module", params=SHIPPED)
def runs(request, tmp_path_factory):
    name, out = request.param, tmp_path_factory.mktemp(request.param)
    for b in ("1", "3"):
        p = run_tok("generate", "-m", name, "--class", "0", "-n", "3", "--seed", "5", "-b", b, *GENERATORS[name],
                    "-o", out / b, "--tokens-out", out / f"{b}.npz", "--device", "cpu", "-q")
        assert p.returncode == 0, p.stderr.decode()
    p = run_tok("decode", out / "3.npz", "-o", out / "dec", "-q")
    assert p.returncode == 0, p.stderr.decode()
    return name, out


def test_the_tokenizer_is_a_shipped_model_with_its_sha(runs):
    name, _ = runs
    ref = json.loads((WEIGHTS / name / "config.json").read_text())["tokenizer"]
    tok_cfg = json.loads((WEIGHTS / ref["name"] / "config.json").read_text())
    assert ref["sha256"] == tok_cfg["provenance"]["weights_sha256"]


def test_same_seed_same_samples_for_batch_1_and_3(runs):
    name, out = runs
    (t1, h1), (t3, h3) = _tokens(out / "1.npz"), _tokens(out / "3.npz")
    assert t1.shape[0] == 3 and h1["tokens"] == h3["tokens"]
    img1, img3 = _pngs(out / "1"), _pngs(out / "3")
    assert len(img1) == 3 and sorted(img1) == sorted(img3)
    if t1.dtype.kind == "f":  # continuous latents: fp32 GEMM blocking differs with the batch, nothing else
        np.testing.assert_allclose(t1, t3, rtol=0, atol=1e-5)
    else:  # ids: the very same samples
        assert np.array_equal(t1, t3)
    # decoded by the tokenizer in batches of 1 and 3: its conv / GEMM rounding may move a pixel by one level
    assert max(int(np.abs(img1[k].astype(int) - img3[k]).max()) for k in img1) <= 1


def test_the_token_file_decodes_to_the_generated_pngs(runs):
    _, out = runs
    gen, dec = _pngs(out / "3"), _pngs(out / "dec")
    assert len(dec) == len(gen) == 3
    # decode names PNGs by the token file's keys; pair them in sample order
    for a, b in zip(sorted(gen), sorted(dec)):
        assert int(np.abs(gen[a].astype(int) - dec[b]).max()) <= 1, (a, b)
    assert all(img.std() > 1.0 for img in gen.values())  # not a flat image
