"""`tok generate` with WeTok's AR generator converted from the official parity fixture (../shared/parity/wetok-ar):
it decodes through the WeTok tokenizer the conversion wrote beside it, the same seed gives the same tokens and
images for batch 1 and 3, the per-sub-token options reach the sampler, and bad options are one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import PARITY, run_tok

AR = PARITY / "wetok-ar"
pytestmark = pytest.mark.skipif(not (AR / "WeTok_AR.ckpt").is_file(),
                                reason=f"WeTok AR parity fixture not found at {AR} (set TOK_PARITY_DIR)")


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-ar")
    p = run_tok("convert", AR / "WeTok_AR.ckpt", "--family", "wetok_ar", "--config", AR / "config.yaml",
                "-o", root / "first")
    assert p.returncode == 0, p.stderr.decode()
    shutil.move(root / "first", root / "moved")  # the tokenizer inside the folder moves with it
    return root / "moved"


def _pngs(folder) -> dict[str, np.ndarray]:
    from PIL import Image

    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def _run(gen, out, *args):
    p = run_tok("generate", "-m", gen, "-o", out, "--tokens-out", f"{out}.npz", "--device", "cpu", "-q", *args)
    assert p.returncode == 0, p.stderr.decode()
    with np.load(f"{out}.npz", allow_pickle=False) as z:
        return z["indices"].copy(), z["labels"].copy(), json.loads(str(z["header"]))


def test_same_seed_same_tokens_for_batch_1_and_3(gen, tmp_path):
    runs = {b: _run(gen, tmp_path / b, "--class", "3,8,0", "-n", "1", "--seed", "7", "-b", b) for b in ("1", "3")}
    (t1, l1, h1), (t3, l3, _) = runs["1"], runs["3"]
    assert list(l1) == list(l3) == [3, 8, 0]
    assert t1.shape == (3, 4, 4, 4) and np.array_equal(t1, t3)
    assert h1["family"] == "wetok" and h1["generator"]["family"] == "wetok_ar"
    assert h1["generator"]["sampler"]["cfg"] == [1.75, 1.8, 2.0, 2.0]
    a, b = _pngs(tmp_path / "1"), _pngs(tmp_path / "3")
    assert sorted(a) == ["class0000/00000.png", "class0003/00000.png", "class0008/00000.png"]
    assert all(a[k].shape == (16, 16, 3) and np.array_equal(a[k], b[k]) for k in a)
    d = run_tok("decode", f"{tmp_path / '1'}.npz", "-o", tmp_path / "dec", "--device", "cpu", "-q")
    assert d.returncode == 0, d.stderr.decode()
    dec = _pngs(tmp_path / "dec")
    assert all(np.array_equal(dec[k], a[k]) for k in a)


def test_per_subtoken_options_reach_the_sampler(gen, tmp_path):
    import tokcli

    g = tokcli.load_generator(gen, device="cpu")
    want = g.tokens_for(g.sample([5, 5], seed=[2, 3], top_k=1, cfg=[2.0, 1.5, 1.0, 3.0]), tokcli.load(
        g.tokenizer_name, device="cpu"))
    got, _, header = _run(gen, tmp_path / "g", "--class", "5", "-n", "2", "--seed", "2", "--top-k", "1",
                          "--cfg", "2,1.5,1,3", "--temperature", "0.9", "--top-p", "1,0.8,1,1")
    assert np.array_equal(got, want.numpy())  # greedy: temperature / top-p change nothing
    assert header["generator"]["sampler"] == {"cfg": [2.0, 1.5, 1.0, 3.0], "temperature": 0.9, "top_k": 1,
                                              "top_p": [1.0, 0.8, 1.0, 1.0]}


@pytest.mark.parametrize("args, needle", [
    (("--top-k", "1.5"), "--top-k takes a number or a comma list"),
    (("--temperature", "0"), "temperature must be a number > 0"),
    (("--cfg", "1,2"), "cfg takes one value or 4 (one per sub-token)"),
    (("--top-p", "1.5"), "top_p must be in (0, 1]"),
    (("--steps", "5"), "takes no sampler option steps"),
    (("--sampler", "ode"), "takes no sampler option sampler"),
])
def test_bad_options_are_one_line(gen, tmp_path, args, needle):
    p = run_tok("generate", "-m", gen, "--class", "1", *args, "-o", tmp_path / "out", "--device", "cpu", "-q")
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err and not (tmp_path / "out").exists()
