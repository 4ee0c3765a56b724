"""FID: our Inception against pytorch-fid's (same random weights, no download), the Fréchet distance against
pytorch-fid / closed forms / an eigenvalue reference, streaming statistics, stats files and weight lookup.

The real FID weights are not available here, so the network tests use one random state dict loaded into both
implementations: they prove the architecture, the key names, the resize and the normalisation, not the weights.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokcli.metrics.fid as fid
from tokcli.errors import TokError
from tokcli.metrics.fid import FeatureStats, FIDInception, features_from_uint8, frechet_distance

pytorch_fid = pytest.importorskip("pytorch_fid")
from pytorch_fid import inception as pf_inception  # noqa: E402
from pytorch_fid.fid_score import calculate_frechet_distance as pf_frechet  # noqa: E402


# --------------------------------------------------------------------------------------------- random weights


def random_fid_state_dict(seed: int = 0) -> dict:
    """A state dict in the FID Inception layout with every tensor random, BatchNorm running stats included
    (a freshly initialised BN is the identity-like mean 0 / var 1, which would hide a mis-wired BN)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in FIDInception().state_dict().items()}
    sd = {}
    for k, (shape, dtype) in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(int(torch.randint(1, 1000, (), generator=g)), dtype=dtype)
        elif k.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif k.endswith("bn.weight"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("bn.bias") or k.endswith("running_mean"):
            sd[k] = torch.randn(shape, generator=g) * 0.2
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) * 1.5 + 0.5
        else:  # fc
            sd[k] = torch.randn(shape, generator=g) * 0.02
    return sd


@pytest.fixture(scope="module")
def state_dict() -> dict:
    return random_fid_state_dict(0)


@pytest.fixture(scope="module")
def pf_model(state_dict):
    """pytorch-fid's InceptionV3 (pool3, resize, [0,1] -> [-1,1]) with the random weights, nothing downloaded."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: state_dict)
        model = pf_inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    return model.eval()


@pytest.fixture(scope="module")
def ours(state_dict) -> FIDInception:
    return FIDInception.from_state_dict(state_dict)


def pf_features(model, x01: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x01)[0].flatten(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------------------------- network


def test_state_dict_keys_equal_pytorch_fid(state_dict):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: state_dict)
        theirs = pf_inception.fid_inception_v3().state_dict()
    mine = FIDInception().state_dict()
    assert set(mine) == set(theirs)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    model = FIDInception()
    model.load_state_dict(theirs, strict=True)  # pytorch-fid's model state loads strictly into ours


@pytest.mark.parametrize("size", [(64, 80), (320, 352)], ids=["upsample", "downsample"])
def test_features_match_pytorch_fid(ours, pf_model, size):
    """Same weights, same images: pytorch-fid sees [0, 1] (it resizes, then 2x-1), we see 2x-1 (and resize)."""
    g = torch.Generator().manual_seed(size[0])
    x01 = torch.rand(3, 3, *size, generator=g)
    theirs = pf_features(pf_model, x01)
    with torch.no_grad():
        mine = ours(2 * x01 - 1)
    assert mine.shape == (3, 2048) and mine.dtype == torch.float32
    assert rel_err(mine, theirs) < 1e-4
    # the features depend on the image (otherwise the comparison would prove little)
    spread = (theirs - theirs.mean(0)).abs().max()
    assert spread > 1e-3 * theirs.abs().max()


def test_parity_is_sensitive_to_the_tf_specific_pooling(ours, pf_model, state_dict, monkeypatch):
    """The tolerance above would catch torchvision's pooling: zero-padded averages or an average pool in Mixed_7c."""
    g = torch.Generator().manual_seed(1)
    x01 = torch.rand(2, 3, 64, 64, generator=g)
    theirs = pf_features(pf_model, x01)

    avg_7c = FIDInception.from_state_dict(state_dict)
    avg_7c.Mixed_7c._pool = fid._tf_avg_pool
    with torch.no_grad():
        assert rel_err(avg_7c(2 * x01 - 1), theirs) > 1e-2
    monkeypatch.setattr(fid, "_tf_avg_pool",
                        lambda x: F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=True))
    with torch.no_grad():
        assert rel_err(ours(2 * x01 - 1), theirs) > 1e-3  # zero-padded averages in Mixed_5b..6e


def test_resize_has_no_antialias(ours, pf_model):
    """A downscale distinguishes antialias=True from pytorch-fid's plain bilinear."""
    g = torch.Generator().manual_seed(2)
    x01 = torch.rand(2, 3, 330, 300, generator=g)
    theirs = pf_features(pf_model, x01)
    x = 2 * x01 - 1
    with torch.no_grad():
        aa = ours.pool3(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True))
    assert rel_err(aa, theirs) > 1e-3


def test_uint8_path_matches_pytorch_fid(ours, pf_model):
    """features_from_uint8 does what pytorch-fid does to an image file (x/255, resize, 2x-1), in batches."""
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (3, 72, 96, 3), dtype=np.uint8)
    feats = features_from_uint8(ours, u8, batch_size=2)
    theirs = pf_features(pf_model, torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(255)).double().numpy()
    assert feats.dtype == np.float64 and feats.shape == (3, 2048)
    np.testing.assert_allclose(feats, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
    with pytest.raises(TypeError):
        features_from_uint8(ours, u8.astype(np.float32))


def test_from_state_dict_rejects_other_weights(state_dict):
    bad = dict(state_dict)
    bad.pop("Mixed_7c.branch_pool.conv.weight")
    with pytest.raises(TokError, match="not the FID Inception"):
        FIDInception.from_state_dict(bad, source="x.pth")
    bad = dict(state_dict, **{"fc.weight": torch.zeros(1000, 2048)})
    with pytest.raises(TokError, match="not the FID Inception"):
        FIDInception.from_state_dict(bad, source="x.pth")


# --------------------------------------------------------------------------------------------- Fréchet distance


def gaussian_stats(rng, n: int, d: int, shift: float = 0.0):
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + shift
    return a.mean(0), np.cov(a, rowvar=False)


@pytest.mark.parametrize("n,d", [(300, 16), (200, 64), (20, 64)], ids=["full", "full64", "rank-deficient"])
def test_frechet_equals_pytorch_fid(n, d):
    rng = np.random.default_rng(n + d)
    mu1, s1 = gaussian_stats(rng, n, d)
    mu2, s2 = gaussian_stats(rng, n, d, shift=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm(disp=) inside pytorch-fid
        theirs = pf_frechet(mu1, s1, mu2, s2)
        mine = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(mine, float)
    assert mine == pytest.approx(theirs, rel=1e-6)


def test_frechet_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(5)
    d = 40
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_equals_eigenvalue_reference():
    """Tr (S1 S2)^½ = Σ sqrt(eig(S1^½ S2 S1^½)) for SPD matrices: an independent way to the same number."""
    from scipy import linalg

    rng = np.random.default_rng(6)
    mu1, s1 = gaussian_stats(rng, 400, 32)
    mu2, s2 = gaussian_stats(rng, 400, 32, shift=-0.2)
    r = linalg.sqrtm(s1).real
    tr = np.sqrt(np.clip(linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_refuses_mismatched_dims():
    with pytest.raises(TokError, match="do not match"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))


# --------------------------------------------------------------------------------------------- statistics


def test_merge_of_uneven_splits_equals_all_at_once():
    rng = np.random.default_rng(7)
    x = rng.normal(loc=0.4, size=(103, 24))
    whole = FeatureStats(dim=24).update(x)
    parts = [FeatureStats(dim=24).update(x[:10]), FeatureStats(dim=24).update(torch.from_numpy(x[10:60])),
             FeatureStats(dim=24).update(x[60:])]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.n == whole.n == 103
    np.testing.assert_allclose(merged.sum.numpy(), whole.sum.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.outer.numpy(), whole.outer.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(whole.mean(), np.mean(x, axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(whole.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_stats_need_two_images_and_right_dim():
    s = FeatureStats(dim=8).update(np.ones((1, 8)))
    with pytest.raises(TokError, match="at least 2"):
        s.cov()
    with pytest.raises(ValueError):
        s.update(np.ones((2, 9)))
    with pytest.raises(TokError):
        s.merge(FeatureStats(dim=9))


def test_all_reduce_without_process_group_is_a_no_op():
    s = FeatureStats(dim=4).update(np.arange(8.0).reshape(2, 4))
    before = s.outer.clone()
    assert s.all_reduce() is s and s.n == 2 and torch.equal(s.outer, before)


def test_all_reduce_in_a_one_process_group(tmp_path):
    import torch.distributed as dist

    s = FeatureStats(dim=4).update(np.arange(12.0).reshape(3, 4))
    ref = FeatureStats(dim=4).update(np.arange(12.0).reshape(3, 4))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        s.all_reduce()
    finally:
        dist.destroy_process_group()
    assert s.n == 3 and torch.equal(s.sum, ref.sum) and torch.equal(s.outer, ref.outer)


def test_npz_round_trip_is_exact_and_atomic(tmp_path):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 12))
    s = FeatureStats(dim=12).update(x)
    out = s.to_npz(tmp_path / "ref.npz")
    assert sorted(os.listdir(tmp_path)) == ["ref.npz"]  # no temporary left behind
    with np.load(out, allow_pickle=False) as z:
        assert {"mu", "sigma"} <= set(z.files)
        assert z["mu"].dtype == np.float64 and z["sigma"].shape == (12, 12)
    back = FeatureStats.from_npz(out)
    assert back.n == 50 and back.has_sums
    assert np.array_equal(back.mean(), s.mean()) and np.array_equal(back.cov(), s.cov())
    back.merge(FeatureStats(dim=12).update(x))  # sums survive, so files merge exactly
    np.testing.assert_allclose(back.cov(), np.cov(np.concatenate([x, x]), rowvar=False), rtol=1e-10, atol=1e-12)


def test_reads_pytorch_fid_style_file(tmp_path):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(30, 6))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    np.savez_compressed(tmp_path / "pf.npz", mu=mu, sigma=sigma)  # what `pytorch_fid --save-stats` writes
    s = FeatureStats.from_npz(tmp_path / "pf.npz")
    assert not s.has_sums and s.n is None
    assert np.array_equal(s.mean(), mu) and np.array_equal(s.cov(), sigma)
    m, c = fid.load_stats(tmp_path / "pf.npz")
    assert frechet_distance(m, c, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(TokError, match="only mu/sigma"):
        s.update(x)


def test_refuses_pickles_and_bad_files(tmp_path):
    obj = tmp_path / "obj.npz"
    np.savez(obj, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(TokError, match="pickled"):
        FeatureStats.from_npz(obj)
    pkl = tmp_path / "stats.pkl"
    pkl.write_bytes(pickle.dumps({"mu": np.zeros(2), "sigma": np.eye(2)}))
    with pytest.raises(TokError, match="pickled"):
        FeatureStats.from_npz(pkl)
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(3))
    with pytest.raises(TokError, match="no mu"):
        FeatureStats.from_npz(tmp_path / "nomu.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(TokError, match="shape"):
        FeatureStats.from_npz(tmp_path / "shape.npz")
    np.savez(tmp_path / "nan.npz", mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    with pytest.raises(TokError, match="non-finite"):
        FeatureStats.from_npz(tmp_path / "nan.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(TokError, match="not an npz"):
        FeatureStats.from_npz(tmp_path / "plain.npy")
    with pytest.raises(TokError, match="does not exist"):
        FeatureStats.from_npz(tmp_path / "absent.npz")


# --------------------------------------------------------------------------------------------- weight lookup


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TOK_OFFLINE", raising=False)
    assert fid.weights_folder() == home / "hub" / "checkpoints"
    return home


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, state_dict):
    path = tmp_path_factory.mktemp("weights") / "w.pth"
    torch.save(state_dict, path)
    return path


def _record_fetch(monkeypatch, effect=None) -> list:
    """Replace tok's one download function; ``effect(url, dest)`` runs in its place (default: fail the test)."""
    from tokcli.core import pretrained

    calls = []

    def fetch(url, dest, **kw):
        calls.append(url)
        if effect is None:
            pytest.fail(f"download attempted: {url}")
        return effect(url, dest)

    monkeypatch.setattr(pretrained, "fetch_url", fetch)
    return calls


def test_missing_weights_are_not_downloaded_unless_asked(torch_home, monkeypatch):
    folder = torch_home / "hub" / "checkpoints"
    calls = _record_fetch(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TOK_DOWNLOAD", raising=False)
    with pytest.raises(TokError) as e:
        fid.load_fid_inception()
    msg = str(e.value)
    assert fid.WEIGHTS_FILE in msg and str(folder) in msg and "--inception-weights" in msg and "\n" not in msg
    assert "--download" in msg and fid.WEIGHTS_URL in msg
    assert calls == []


def test_missing_weights_offline_is_one_clear_error(torch_home, monkeypatch):
    folder = torch_home / "hub" / "checkpoints"
    calls = _record_fetch(monkeypatch)
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "TOK_OFFLINE": "1"}):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(TokError) as e:
            fid.load_fid_inception(download=True)
        msg = str(e.value)
        assert fid.WEIGHTS_FILE in msg and str(folder) in msg and "--inception-weights" in msg
        assert "is set, so it is not downloaded" in msg and "\n" not in msg
        assert calls == []  # no download attempt when offline, even when asked


def test_failed_download_is_one_clear_error(torch_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def no_network(url, dest):
        raise OSError("network unreachable")

    calls = _record_fetch(monkeypatch, no_network)
    with pytest.raises(TokError, match="failed") as e:
        fid.load_fid_inception(download=True)
    assert calls == [fid.WEIGHTS_URL] and fid.WEIGHTS_FILE in str(e.value) and "\n" not in str(e.value)


def test_download_lands_in_the_hub_folder(torch_home, monkeypatch, state_dict):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def fake_download(url, dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        torch.save(state_dict, dest)
        return hashlib.sha256(open(dest, "rb").read()).hexdigest()

    _record_fetch(monkeypatch, fake_download)
    model, sha = fid.load_fid_inception(download=True)
    path = torch_home / "hub" / "checkpoints" / fid.WEIGHTS_FILE
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not model.training


@pytest.mark.parametrize("name", [fid.WEIGHTS_FILE, fid.WEIGHTS_FILE_FIDELITY])
def test_cached_weights_are_found(torch_home, weights_file, state_dict, name):
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    os.link(weights_file, folder / name)
    model, sha = fid.load_fid_inception()
    assert sha == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())


def test_explicit_weights_path(torch_home, weights_file, tmp_path):
    model, sha = fid.load_fid_inception(weights=str(weights_file))
    assert sha == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    with pytest.raises(TokError, match="--inception-weights"):
        fid.load_fid_inception(weights=str(tmp_path / "nope.pth"))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(TokError, match="cannot read"):
        fid.load_fid_inception(weights=str(broken))
