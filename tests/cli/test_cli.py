"""End-to-end CLI behaviour through the real entry point: exit codes, one-line errors, round trips."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_model_folder, run_tok, write_images


def _one_line_error(p):
    err = p.stderr.decode().strip().splitlines()
    assert "Traceback" not in p.stderr.decode()
    assert err and err[-1].startswith("error:") or any(l.startswith("error:") for l in err), p.stderr.decode()
    return [l for l in err if l.startswith("error:")][0]


def test_help_lists_only_working_commands_fast():
    t = time.perf_counter()
    p = run_tok("--help", subprocess=True)  # times the whole process: python start + imports
    dt = time.perf_counter() - t
    assert p.returncode == 0
    out = p.stdout.decode()
    for cmd in ("models", "encode", "decode", "reconstruct", "info", "convert", "train", "bench"):
        assert cmd in out
    # no heavy import on --help: the whole process (python start included) stays well under torch's import time
    assert dt < 5.0


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from tokcli.cli.app import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO).stdout.decode().strip()
    assert out == "False"


def test_models_json():
    p = run_tok("models", "--json", subprocess=True)  # smoke test of the real entry point
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert rows["wetok-16x"]["hub_repo"] == "GrayShine/WeTok"
    assert rows["wetok-16x"]["model_args"]["ch_mult"] == [1, 1, 2, 2, 4]
    assert rows["wetok-general-cr24"]["model_args"]["groups"] == 8
    assert rows["wetok-tiny"]["default"] is True


def test_unknown_model_is_usage_error(images, tmp_path):
    p = run_tok("encode", images, "-m", "wetok-tinyy", "-o", tmp_path / "c.npz")
    assert p.returncode == 2
    assert "did you mean wetok-tiny" in _one_line_error(p)
    p = run_tok("encode", images, "-m", "someorg/somemodel", "-o", tmp_path / "c.npz")
    assert p.returncode == 2
    assert "hf-hub:someorg/somemodel" in _one_line_error(p)
    assert not (tmp_path / "c.npz").exists()


def test_unconverted_release_names_the_file(images, tmp_path):
    p = run_tok("encode", images, "-m", "wetok-16x", "-o", tmp_path / "c.npz",
                env={"TOK_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 1
    msg = _one_line_error(p)
    assert "tok convert wetok-16x" in msg and "ImageNet/downsample16/WeTok.ckpt" in msg


def test_convert_offline_names_file_and_command(tmp_path):
    p = run_tok("convert", "wetok-8x", env={"TOK_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
                                             "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert p.returncode == 1
    msg = _one_line_error(p)
    assert "GrayShine/WeTok:ImageNet/downsample8/WeTok.ckpt" in msg and "hf download" in msg


@pytest.mark.slow  # two real `python -m tokcli` processes (the entry-point smoke test)
def test_encode_decode_equals_reconstruct(tiny_model, images, tmp_path):
    codes = tmp_path / "codes.npz"
    p = run_tok("encode", images, "-m", tiny_model, "-o", codes, "-b", "2", "--device", "cpu",
                subprocess=True)  # a real-process round trip: decode (process) == reconstruct (in-process)
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("decode", codes, "-o", tmp_path / "dec", "-b", "2", subprocess=True)
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("reconstruct", images, "-m", tiny_model, "-o", tmp_path / "rec", "-b", "2")
    assert p.returncode == 0, p.stderr.decode()
    dec = sorted(q.relative_to(tmp_path / "dec") for q in (tmp_path / "dec").rglob("*.png"))
    rec = sorted(q.relative_to(tmp_path / "rec") for q in (tmp_path / "rec").rglob("*.png"))
    assert dec == rec and len(dec) == 5
    assert Path("sub/img1.png") in dec and Path("sub/img3.png") in dec  # tree mirrored, .jpg -> .png
    for rel in dec:
        a = np.asarray(Image.open(tmp_path / "dec" / rel))
        b = np.asarray(Image.open(tmp_path / "rec" / rel))
        assert a.shape == (32, 32, 3)
        assert np.array_equal(a, b)


def test_tokens_independent_of_batch_size_and_run(tiny_model, images, tmp_path):
    from tokcli.core.tokens import read_token_file

    outs = []
    for i, b in enumerate(["1", "8", "8"]):
        p = run_tok("encode", images, "-m", tiny_model, "-o", tmp_path / f"c{i}.npz", "-b", b)
        assert p.returncode == 0, p.stderr.decode()
        outs.append(read_token_file(tmp_path / f"c{i}.npz"))
    assert outs[0].keys == outs[1].keys == outs[2].keys
    assert np.array_equal(outs[0].array, outs[1].array) and np.array_equal(outs[1].array, outs[2].array)
    assert outs[0].array.dtype == np.uint8 and outs[0].array.shape == (5, 16, 16, 2)
    hdr = outs[0].header
    assert hdr["family"] == "wetok" and hdr["model"].startswith("local-dir:")
    assert hdr["tokens"]["codebook_size"] == 256 and len(hdr["model_sha256"]) == 64


def test_decode_rejects_other_model(tiny_model, tiny_model_other, tiny_gd_model, images, tmp_path):
    codes = tmp_path / "codes.npz"
    assert run_tok("encode", images, "-m", tiny_model, "-o", codes).returncode == 0
    p = run_tok("decode", codes, "-m", tiny_model_other, "-o", tmp_path / "x")
    assert p.returncode == 1
    assert "different checkpoint" in _one_line_error(p)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("*.png"))
    p = run_tok("decode", codes, "-m", tiny_model_other, "-o", tmp_path / "y", "--force")
    assert p.returncode == 0


def test_stdin_list_and_stdout_tokens(tiny_model, images, tmp_path):
    lst = "\n".join(str(p) for p in sorted(images.rglob("*.png"))).encode()
    p = run_tok("encode", "-", "-m", tiny_model, "-o", "-", input=lst)
    assert p.returncode == 0, p.stderr.decode()
    (tmp_path / "c.npz").write_bytes(p.stdout)
    p2 = run_tok("info", tmp_path / "c.npz")
    info = json.loads(p2.stdout)
    assert info["count"] == 4 and info["kind"] == "indices"


def test_bad_inputs_one_line_and_skip_errors(tiny_model, images, tmp_path):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (images / "empty.jpg").write_bytes(b"")
    codes = tmp_path / "codes.npz"
    p = run_tok("encode", images, "-m", tiny_model, "-o", codes)
    assert p.returncode == 1
    assert "broken.png" in _one_line_error(p) or "empty.jpg" in _one_line_error(p)
    assert not codes.exists()  # never a half-written output
    p = run_tok("encode", images, "-m", tiny_model, "-o", codes, "--skip-errors")
    assert p.returncode == 1  # failures are reflected in the exit code
    err = p.stderr.decode()
    assert "2 input(s) failed" in err and "broken.png" in err and "empty.jpg" in err
    from tokcli.core.tokens import read_token_file

    assert len(read_token_file(codes).keys) == 5
    p = run_tok("encode", tmp_path / "nope", "-m", tiny_model, "-o", codes)
    assert p.returncode == 1 and "no such file" in _one_line_error(p)
    (tmp_path / "emptydir").mkdir()
    p = run_tok("encode", tmp_path / "emptydir", "-m", tiny_model, "-o", codes)
    assert p.returncode == 1 and "no images" in _one_line_error(p)


def test_decode_rejects_bad_token_files(tiny_model, images, tmp_path):
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04truncated")
    p = run_tok("decode", tmp_path / "t.npz", "-m", tiny_model, "-o", tmp_path / "o")
    assert p.returncode == 1
    _one_line_error(p)
    p = run_tok("decode", tmp_path / "missing.npz", "-m", tiny_model, "-o", tmp_path / "o")
    assert p.returncode == 1
    _one_line_error(p)


def test_ds16_g4_tokens_cost_hwg_bytes(tmp_path):
    """A ds16, g=4, d'=8 model stores exactly h*w*g bytes of tokens per image (no int64 widening)."""
    args = {"ch": 32, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 1, "z_channels": 32, "groups": 4,
            "codebook_size": 256, "generative_decoder": False, "image_size": 256}
    model = make_model_folder(tmp_path / "ds16", args)
    imgs = write_images(tmp_path / "imgs", n=3, size=(260, 300))
    codes = tmp_path / "codes.npz"
    p = run_tok("encode", imgs, "-m", model, "-o", codes)
    assert p.returncode == 0, p.stderr.decode()
    info = json.loads(run_tok("info", codes).stdout)
    assert info["array"] == {"shape": [3, 16, 16, 4], "dtype": "uint8"}
    b = info["bytes"]
    assert b["payload_bytes_per_image"] == 16 * 16 * 4
    assert b["file_bytes"] == (codes.stat().st_size)


def test_bench_psnr_json(tiny_model, images):
    p = run_tok("bench", "psnr", images, "-m", tiny_model, "--json")
    assert p.returncode == 0, p.stderr.decode()
    assert len(p.stdout.decode().strip().splitlines()) == 1  # one JSON line
    res = json.loads(p.stdout)
    m = res["metrics"]
    assert 0 < m["psnr"] < 60 and "ssim" not in m
    assert res["protocol"]["n_images"] == 5 and res["protocol"]["image_size"] == 32
    assert m["bpp"]["tokens"] == pytest.approx(16 * 16 * 2 * 8 / (32 * 32))
    assert m["bpp"]["stored_bytes_per_image"] == 16 * 16 * 2  # uint8 indices, as in the token file
    p = run_tok("bench", "psnr", images, "-m", tiny_model, "--psnr-mode", "nonsense")
    assert p.returncode == 2 and b"--psnr-mode" in p.stderr and b"Traceback" not in p.stderr


def test_sampler_options_reach_the_family(tiny_model, images, tmp_path):
    """--steps / --cfg / --sampler go to model.decode; a family without a sampler refuses them as a usage error
    (exit 2, one line) before writing anything; --precision is recorded in the token header."""
    codes = tmp_path / "codes.npz"
    p = run_tok("encode", images, "-m", tiny_model, "-o", codes, "--precision", "fp32")
    assert p.returncode == 0, p.stderr.decode()
    from tokcli.core.tokens import read_token_file

    assert read_token_file(codes).header["precision"] == "fp32"
    for args in (("decode", codes, "--steps", "4"), ("decode", codes, "--sampler", "order=2"),
                 ("reconstruct", images, "-m", tiny_model, "--cfg", "1.5")):
        out = tmp_path / f"out-{args[0]}-{args[-1]}"
        p = run_tok(*args, "-o", out)
        assert p.returncode == 2, p.stderr.decode()
        msg = _one_line_error(p)
        assert "wetok decoder takes no sampler option" in msg and "it takes: none" in msg
        assert not out.exists() or not any(out.rglob("*.png"))
    p = run_tok("decode", codes, "-o", tmp_path / "o", "--sampler", "no-equals-sign")
    assert p.returncode == 2 and "KEY=VALUE" in _one_line_error(p)


def test_sampler_option_parsing():
    from tokcli.cli.common import sampler_options
    from tokcli.errors import TokUsageError

    assert sampler_options(None, None, None) == {}
    assert sampler_options(8, 2.5, ["order=2", "method=euler", "guide=[1, 2]"]) == \
        {"steps": 8, "cfg": 2.5, "order": 2, "method": "euler", "guide": [1, 2]}
    assert sampler_options(8, None, ["steps=8"]) == {"steps": 8}
    with pytest.raises(TokUsageError, match="contradicts"):
        sampler_options(8, None, ["steps=4"])
