"""CODA family end to end on the official parity fixture: `tok convert` of the official files -> model folder ->
tokcli.load -> encode gives exactly the official ids, decode the official reconstruction; the CLI on top."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import CODA_PARITY, assert_decode_equals_reconstruct, requires_coda_parity, run_tok

CODA = CODA_PARITY
pytestmark = requires_coda_parity


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dest = tmp_path_factory.mktemp("coda") / "coda-fixture"
    p = run_tok("convert", CODA / "vae_ema.pth", "--family", "coda", "--config", CODA / "config.json", "-o", dest)
    assert p.returncode == 0, p.stderr.decode()
    return dest


def test_converted_folder_encodes_and_decodes_like_the_official_code(converted, coda_expected):
    import torch

    import tokcli

    tok = tokcli.load(f"local-dir:{converted}", device="cpu")
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["family"] == "coda" and cfg["tokens"]["shape"] == [680] and cfg["tokens"]["codebook_size"] == 64
    prov = cfg["provenance"]
    assert prov["quantizer"].endswith("quantizer_ema.pth") and prov["base_vae"].endswith("base_vae.safetensors")
    x = torch.from_numpy(coda_expected["pixel_values"])
    ids = tok.encode(x)
    assert ids.shape == (2, 680) and torch.equal(ids, torch.from_numpy(coda_expected["level_indices"]))
    recon = tok.decode(torch.from_numpy(coda_expected["level_indices"]), clamp=False)
    assert np.abs(recon.numpy() - coda_expected["recon"]).max() < 1e-4  # README tolerance
    clamped = tok.decode(ids)
    assert float(clamped.max()) <= 1 and float(clamped.min()) >= -1


def test_cli_round_trip_and_token_file(converted, coda_expected, tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    u8 = np.load(CODA / "inputs.npy", allow_pickle=False)
    for i, im in enumerate(u8):
        Image.fromarray(im).save(imgs / f"im{i}.png")
    codes = tmp_path / "codes.npz"
    p = run_tok("encode", imgs, "-m", converted, "-o", codes, "--device", "cpu")
    assert p.returncode == 0, p.stderr.decode()
    with np.load(codes, allow_pickle=False) as z:
        idx = z["indices"]
        header = json.loads(str(z["header"][()]))
    assert np.array_equal(idx.astype(np.int64), coda_expected["level_indices"])  # 64x64 PNGs: no crop or resize
    assert idx.dtype == np.uint8 and header["family"] == "coda"  # codebook 64 -> one byte per token
    assert_decode_equals_reconstruct(codes, imgs, converted, tmp_path, 2)  # and other sizes are refused


def test_convert_refuses_raw_files_and_missing_siblings(tmp_path):
    p = run_tok("convert", CODA / "vae.pth", "--family", "coda", "--config", CODA / "config.json", "-o",
                tmp_path / "x")
    assert p.returncode == 1 and b"non-EMA" in p.stderr
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(CODA / "vae_ema.pth", lone / "vae_ema.pth")
    p = run_tok("convert", lone / "vae_ema.pth", "--family", "coda", "--config", CODA / "config.json", "-o",
                tmp_path / "y")
    assert p.returncode == 1 and b"quantizer_ema.pth" in p.stderr and not (tmp_path / "y").exists()


def test_release_name_says_how_to_get_the_files(tmp_path):
    env = {"TOK_CACHE": str(tmp_path / "cache")}
    for args in (("convert", "coda-mar"), ("reconstruct", CODA / "inputs.npy", "-m", "coda-mar", "-o", tmp_path / "r")):
        p = run_tok(*args, env=env)
        assert p.returncode == 1, p.stderr.decode()
        assert b"vae_ema.pth" in p.stderr and b"--as coda-mar" in p.stderr and b"Traceback" not in p.stderr
