"""tok bench of stored tokens: `tok bench usage codes/` (tokens alone) and `tok bench ... IMAGES --tokens codes/`
give the numbers of the image bench of the images the tokens were encoded from, and refuse mismatched inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_tok

SIZE = "64"  # the shipped wetok-tiny at 64 px: 8x8x2 tokens, fast on one CPU thread
SAMPLES = ("astronaut.jpg", "coffee.jpg", "rocket.jpg")


def _ok(p) -> dict:
    assert p.returncode == 0, p.stderr.decode()
    lines = p.stdout.decode().strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def _one_line_error(p, code: int, *needles: str) -> str:
    err = p.stderr.decode()
    lines = err.strip().splitlines()
    assert p.returncode == code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert p.stdout == b""
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> dict[str, Path]:
    """3 sample images, their token set (shards of 2: a batch spans a shard border) and one token file."""
    root = tmp_path_factory.mktemp("bench_tokens")
    imgs = root / "imgs"
    imgs.mkdir()
    for name in SAMPLES:
        shutil.copy(REPO / "samples" / name, imgs / name)
    p = run_tok("encode", imgs, "-o", f"{root / 'set'}/", "--shard-size", "2", "--image-size", SIZE, "-q")
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("encode", imgs, "-o", root / "codes.npz", "--image-size", SIZE, "-q")
    assert p.returncode == 0, p.stderr.decode()
    return {"root": root, "imgs": imgs, "set": root / "set", "npz": root / "codes.npz"}


def test_usage_of_stored_tokens_equals_usage_of_the_images(encoded, tmp_path):
    imgs, tset, npz = encoded["imgs"], encoded["set"], encoded["npz"]
    assert len(list(tset.glob("part-*.npz"))) == 2
    ref = _ok(run_tok("bench", "usage", imgs, "--size", SIZE, "--json", "-q"))
    out = tmp_path / "u.json"
    from_set = _ok(run_tok("bench", "usage", tset, "--json", "-q", "-o", out))
    from_file = _ok(run_tok("bench", "usage", npz, "--json", "-q", "-m", "wetok-tiny"))
    for res in (from_set, from_file):
        assert res["metrics"] == ref["metrics"]
        assert res["metrics"]["usage"]["usage"] == ref["metrics"]["usage"]["usage"]
        assert res["metrics"]["usage"]["perplexity"] == ref["metrics"]["usage"]["perplexity"]
        assert [g["perplexity"] for g in res["metrics"]["usage"]["groups"]] == \
               [g["perplexity"] for g in ref["metrics"]["usage"]["groups"]]
        assert res["model"] == ref["model"] and res["per_image"] == ref["per_image"]
        p, q = res["protocol"], ref["protocol"]
        assert (p["n_images"], p["image_size"], p["tok_version"], p["precision"]) == \
               (q["n_images"], q["image_size"], q["tok_version"], q["precision"]) == (3, 64, q["tok_version"], "fp32")
        assert p["data"]["keys_sha256"] == q["data"]["keys_sha256"]
    manifest_sha = hashlib.sha256((tset / "manifest.json").read_bytes()).hexdigest()
    assert from_set["protocol"]["source"] == {"tokens": str(tset), "sha256": manifest_sha}
    assert from_file["protocol"]["source"] == {"tokens": str(npz),
                                               "sha256": hashlib.sha256(npz.read_bytes()).hexdigest()}
    assert "tokens" not in ref["protocol"]
    # --n: the set's first N, as the image bench's first N (sorted) images
    two = _ok(run_tok("bench", "usage", tset, "--n", "2", "--json", "-q"))
    assert two["metrics"] == _ok(run_tok("bench", "usage", imgs, "--size", SIZE, "--n", "2", "--json", "-q"))["metrics"]
    assert two["protocol"]["n_images"] == 2
    p = run_tok("bench", "report", out, "-o", tmp_path / "r.md")
    assert p.returncode == 0 and (tmp_path / "r.md").is_file(), p.stderr.decode()


def test_tokens_option_equals_the_bench_of_the_images(encoded, tmp_path):
    imgs, tset = encoded["imgs"], encoded["set"]
    env = {"TORCH_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}  # lpips / rfid skipped alike
    ref = _ok(run_tok("bench", "all", imgs, "--size", SIZE, "--json", "-q", "-b", "2", env=env))
    rec = tmp_path / "rec"
    res = _ok(run_tok("bench", "all", imgs, "--tokens", tset, "--json", "-q", "-b", "2", "--save-recon", rec,
                      env=env))
    assert res["metrics"]["psnr"] == pytest.approx(ref["metrics"]["psnr"], abs=1e-9)
    assert res["metrics"]["ssim"] == pytest.approx(ref["metrics"]["ssim"], abs=1e-9)
    assert res["metrics"] == ref["metrics"] and res["per_image"] == ref["per_image"]
    assert set(res["skipped"]) == set(ref["skipped"]) == {"lpips", "rfid"}
    assert res["protocol"]["tokens"] == str(tset) and res["protocol"]["tokens_shards"] == 2
    assert res["protocol"]["tokens_sha256"] == hashlib.sha256((tset / "manifest.json").read_bytes()).hexdigest()
    same = {k: v for k, v in res["protocol"].items() if not k.startswith("tokens") and k != "seconds"}
    assert same == {k: v for k, v in ref["protocol"].items() if k != "seconds"}
    assert sorted(p.name for p in rec.glob("*.png")) == ["astronaut.png", "coffee.png", "rocket.png"]
    # a single token file, batches of 1, the first 2 images only (DATA may then hold more images)
    one = _ok(run_tok("bench", "psnr", imgs, "--tokens", encoded["npz"], "--n", "2", "-b", "1", "--json", "-q"))
    ref2 = _ok(run_tok("bench", "psnr", imgs, "--size", SIZE, "--n", "2", "-b", "1", "--json", "-q"))
    assert one["metrics"]["psnr"] == pytest.approx(ref2["metrics"]["psnr"], abs=1e-9)
    assert one["per_image"] == ref2["per_image"] and one["protocol"]["n_images"] == 2


def test_stochastic_decoder_seeded_by_position_in_the_set(tiny_gd_model, images, tmp_path):
    """A generative decoder draws image i's noise from seed + i (its index in the set), as the image bench does."""
    model = f"local-dir:{tiny_gd_model}"
    p = run_tok("encode", images, "-m", model, "-o", f"{tmp_path / 'set'}/", "--shard-size", "2", "-q")
    assert p.returncode == 0, p.stderr.decode()
    ref = _ok(run_tok("bench", "psnr", images, "-m", model, "--seed", "3", "-b", "3", "--json", "-q"))
    res = _ok(run_tok("bench", "psnr", images, "--tokens", tmp_path / "set", "--seed", "3", "-b", "3", "--json",
                      "-q"))
    assert res["per_image"] == ref["per_image"]
    assert res["metrics"]["psnr"] == pytest.approx(ref["metrics"]["psnr"], abs=1e-9)


def test_mismatched_inputs_are_refused_with_one_line(encoded, tiny_model, tmp_path):
    imgs, tset = encoded["imgs"], encoded["set"]
    more = tmp_path / "more"
    shutil.copytree(imgs, more)
    shutil.copy(REPO / "samples" / "china.jpg", more / "china.jpg")
    _one_line_error(run_tok("bench", "psnr", more, "--tokens", tset, "-q"), 2, "4 images", "--n")
    fewer = tmp_path / "fewer"
    shutil.copytree(imgs, fewer)
    (fewer / "rocket.jpg").unlink()
    _one_line_error(run_tok("bench", "psnr", fewer, "--tokens", tset, "-q"), 2, "2 images")
    _one_line_error(run_tok("bench", "psnr", fewer, "--tokens", tset, "--n", "3", "-q"), 2, "'rocket.jpg'",
                    "no image")
    renamed = tmp_path / "renamed"
    shutil.copytree(imgs, renamed)
    (renamed / "rocket.jpg").rename(renamed / "zz.jpg")
    _one_line_error(run_tok("bench", "ssim", renamed, "--tokens", tset, "-q"), 2, "'rocket.jpg'")
    # tokens as DATA: only usage measures them alone
    _one_line_error(run_tok("bench", "psnr", tset, "-q"), 2, "--tokens")
    _one_line_error(run_tok("bench", "usage", tset, "--save-recon", tmp_path / "r", "-q"), 2, "--save-recon")
    _one_line_error(run_tok("bench", "usage", tset, "--size", "32", "-q"), 2, "64px")
    _one_line_error(run_tok("bench", "psnr", imgs, "--tokens", tset, "--size", "32", "-q"), 2, "64px")
    # tokens of another model
    _one_line_error(run_tok("bench", "psnr", imgs, "--tokens", tset, "-m", f"local-dir:{tiny_model}", "-q"), 1,
                    "does not match")
    # one process only
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    _one_line_error(run_tok("bench", "psnr", imgs, "--tokens", tset, "-q", env=env), 2, "torchrun")
    _one_line_error(run_tok("bench", "usage", tset, "-q", env=env), 2, "torchrun")
