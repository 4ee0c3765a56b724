"""`tok bench gfid`: the FID and Inception Score of a generator's samples against an independent computation from the
PNGs `tok generate` writes (same seeds, same batches), with the FID Inception weights placed where the real loader
looks for them (random ones, as tests/cli/test_bench.py does); missing weights, bad reference files and bad sample
counts are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_tok
from test_bench import INCEPTION_FILE, torch_home  # noqa: F401  (the fixture: random FID Inception weights)
from test_generate import TOK_ARGS, make_sit_folder

ARGS = ("--class", "1,3", "-n", "3", "--steps", "4", "--seed", "11", "-b", "4", "--device", "cpu", "-q")


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    import torch

    from tokcli.families.softvq.model import SoftVQ

    root = tmp_path_factory.mktemp("gfid")
    torch.manual_seed(0)
    folder = SoftVQ(**TOK_ARGS).save_folder(root / "tok", name="tiny-softvq",
                                            provenance={"source": "random init (test fixture)"})
    return make_sit_folder(root / "gen", f"local-dir:{folder.path}", folder.sha256)


@pytest.fixture
def env(torch_home, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return {"TORCH_HOME": str(torch_home)}


class CheapDistance:
    """Stands in for fid_stats.frechet_distance (a 2048x2048 sqrtm is ~20 s on one core): records its arguments and
    returns ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2)."""

    def __init__(self):
        self.calls = []

    def __call__(self, mu1, sigma1, mu2, sigma2):
        self.calls.append([np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2)])
        d = np.asarray(mu1) - np.asarray(mu2)
        return float(d @ d + np.trace(sigma1) + np.trace(sigma2))


def _one_line(p, code):
    err = p.stderr.decode()
    assert p.returncode == code and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert p.stdout == b""
    return err


def _independent(gen, tmp_path):
    """Features and logits of the PNGs `tok generate` writes for ARGS, in sample order."""
    import torch
    from PIL import Image

    from tokcli.metrics import fid

    p = run_tok("generate", "-m", gen, *ARGS, "-o", tmp_path / "png")
    assert p.returncode == 0, p.stderr.decode()
    keys = [f"class{c:04d}/{i:05d}.png" for c in (1, 3) for i in range(3)]
    imgs = np.stack([np.asarray(Image.open(tmp_path / "png" / k)) for k in keys])
    net, sha = fid.load_fid_inception(None, device=torch.device("cpu"))
    feats = fid.features_from_uint8(net, imgs, batch_size=6, device=torch.device("cpu"))
    return feats, feats @ net.fc.weight.double().numpy().T, sha


def _is_direct(logits, splits):
    """exp(E_x KL(p(y|x) || p(y))) per split (sample j in split j % splits), mean and std over the splits."""
    scores = []
    for k in range(splits):
        z = logits[k::splits]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        py = p.mean(0)
        scores.append(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), axis=1))))
    return np.mean(scores), np.std(scores)


def test_gfid_and_is_equal_direct_computation_from_the_generated_pngs(gen, env, tmp_path, monkeypatch):
    from tokcli.metrics import fid, fid_stats

    feats, logits, sha = _independent(gen, tmp_path)
    rng = np.random.default_rng(0)
    ref_feats = feats.mean(0) + rng.normal(size=(8, 2048)) * feats.std(0)
    adm = tmp_path / "VIRTUAL_adm.npz"  # ADM layout: mu / sigma only
    np.savez(adm, mu=ref_feats.mean(0), sigma=np.cov(ref_feats, rowvar=False))
    own = tmp_path / "own.npz"  # tok bench stats layout: + n / sums / meta
    fid.FeatureStats().update(ref_feats).to_npz(own, meta={"image_size": 32, "weights_sha256": sha})
    results = []
    for ref in (adm, own):
        spy = CheapDistance()
        monkeypatch.setattr(fid_stats, "frechet_distance", spy)
        p = run_tok("bench", "gfid", "-m", gen, *ARGS, "--splits", "3", "--ref-stats", ref, "--json")
        assert p.returncode == 0, p.stderr.decode()
        lines = p.stdout.decode().strip().splitlines()
        assert len(lines) == 1
        r = json.loads(lines[0])
        assert len(spy.calls) == 1
        mu1, s1, mu2, s2 = spy.calls[0]
        # the reference is the file's; the samples' statistics are those of the PNGs' features
        np.testing.assert_allclose(mu1, ref_feats.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s1, np.cov(ref_feats, rowvar=False), rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(mu2, feats.mean(0), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(s2, np.cov(feats, rowvar=False), rtol=1e-7, atol=1e-9)
        assert r["metrics"]["gfid"] == pytest.approx(spy(mu1, s1, feats.mean(0), np.cov(feats, rowvar=False)),
                                                     rel=1e-9)
        results.append(r)
    r = results[0]
    is_mean, is_std = _is_direct(logits, 3)
    assert r["metrics"]["is"] == pytest.approx(is_mean, rel=1e-9) and r["metrics"]["is"] > 1
    assert r["metrics"]["is_std"] == pytest.approx(is_std, rel=1e-6, abs=1e-9)
    assert fid.inception_score(logits, 3) == pytest.approx((is_mean, is_std), rel=1e-9, abs=1e-12)
    assert r["metrics"]["nfe_per_image"] == 4 and r["metrics"]["images_per_s"] > 0  # SiT: one call a step
    pr = r["protocol"]
    assert pr["n_samples"] == 6 and pr["n_classes"] == 2 and pr["per_class"] == [3] and pr["weights_sha256"] == sha
    assert pr["sampler"]["steps"] == 4 and pr["seed"] == 11 and "VIRTUAL_adm.npz" in pr["reference"]
    assert results[1]["metrics"]["is"] == r["metrics"]["is"]


def test_inception_score_formula_on_known_logits():
    from tokcli.metrics import fid

    # two samples in one split: p(y|x) one-hot on different classes -> p(y) uniform on 2 -> IS = 2
    logits = np.full((2, 5), -1e4)
    logits[0, 0] = logits[1, 3] = 0
    assert fid.inception_score(logits, 1) == pytest.approx((2.0, 0.0), abs=1e-9)
    # identical rows: every KL is 0 -> IS = 1
    assert fid.inception_score(np.tile(np.arange(4.0), (6, 1)), 2) == pytest.approx((1.0, 0.0), abs=1e-12)
    z = np.random.default_rng(1).normal(size=(10, 7)) * 3
    assert fid.inception_score(z, 2) == pytest.approx(_is_direct(z, 2), rel=1e-12)


def test_missing_inception_weights_one_line(gen, tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    p = run_tok("bench", "gfid", "-m", gen, *ARGS, "--ref-stats", ref,
                env={"TORCH_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    err = _one_line(p, 1)
    assert INCEPTION_FILE in err and str(tmp_path / "empty") in err


@pytest.mark.parametrize("kind, needle", [
    ("text", "FID statistics file"),  # fid_stats reads a non-archive as "holds pickled objects"; still one line
    ("missing", "does not exist"),
    ("no-sigma", "has no sigma"),
    ("dim", "statistics of 3-d features"),
    ("shape", "expected [D] and [D, D]"),
    ("pickle", "pickled objects"),
])
def test_bad_ref_stats_one_line(gen, env, tmp_path, kind, needle):
    ref = tmp_path / "ref.npz"
    if kind == "text":
        ref.write_text("not numbers")
    elif kind == "no-sigma":
        np.savez(ref, mu=np.zeros(2048))
    elif kind == "dim":
        np.savez(ref, mu=np.zeros(3), sigma=np.eye(3))
    elif kind == "shape":
        np.savez(ref, mu=np.zeros(2048), sigma=np.eye(16))
    elif kind == "pickle":
        np.savez(ref, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    err = _one_line(run_tok("bench", "gfid", "-m", gen, *ARGS, "--ref-stats", ref), 1)
    assert needle in err


@pytest.mark.parametrize("args, needle", [
    (("--class", "1", "-n", "0"), "-n must be at least 1"),
    (("--class", "7"), "class 7 is out of range"),
    (("--num-samples", "0"), "--num-samples must be at least 1"),
    (("--class", "1", "-n", "1"), "FID needs at least 2"),
    (("--class", "1", "-n", "2", "--num-samples", "4"), "not both"),
])
def test_bad_counts_are_usage_errors(gen, env, tmp_path, args, needle):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    err = _one_line(run_tok("bench", "gfid", "-m", gen, *args, "--ref-stats", ref, "--device", "cpu"), 2)
    assert needle in err


def test_ref_stats_required(gen, env):
    assert "--ref-stats is required" in _one_line(run_tok("bench", "gfid", "-m", gen, "--device", "cpu"), 2)
