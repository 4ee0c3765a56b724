"""metrics/: PSNR, SSIM (against hand numbers and skimage), codebook usage, bits per pixel."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokcli.core.tokens import TokenFile
from tokcli.metrics.image import mean_psnr, mse, psnr, ssim
from tokcli.metrics.usage import (UsageCounter, bits_per_pixel, bpp_report, codebook_usage,
                                  token_bits_per_image)


def _imgs(n=2, h=32, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_psnr_hand_values():
    a = np.full((2, 8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 1                      # off by one everywhere: MSE 1
    b[1, 0, 0, 0] += 10            # one value off by 10: MSE 100 / 192
    p = psnr(a, b)
    assert p[0] == pytest.approx(20 * math.log10(255), abs=1e-12)
    assert p[0] == pytest.approx(48.1308036, abs=1e-6)
    assert p[1] == pytest.approx(10 * math.log10(255 ** 2 / (100 / 192)), abs=1e-12)
    assert mse(a, b).tolist() == [1.0, 100 / 192]
    assert psnr(a, a).tolist() == [math.inf, math.inf]
    assert psnr(a[0], b[0]).shape == (1,)     # one HWC image
    # uint8 arithmetic must not wrap: 0 vs 255 is the worst case, PSNR 0
    assert psnr(np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8))[0] == 0.0


def test_mean_psnr_caps_infinity():
    assert mean_psnr([math.inf, 40.0]) == 70.0
    assert mean_psnr([30.0, 40.0]) == 35.0
    assert mean_psnr([120.0], cap=100) == 100.0
    assert math.isnan(mean_psnr([]))


def test_psnr_input_checks():
    a = _imgs()
    with pytest.raises(ValueError):
        psnr(a, a[:, :-1])
    with pytest.raises(TypeError):
        psnr(a.astype(np.float32), a.astype(np.float32))


def test_ssim_identical_and_constant_shift():
    a = _imgs()
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)
    # constant images: variances are 0, SSIM reduces to the luminance term (2*u*v + C1) / (u^2 + v^2 + C1)
    x = np.full((1, 16, 16, 3), 100, np.uint8)
    y = np.full((1, 16, 16, 3), 110, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(x, y)[0] == pytest.approx((2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1), abs=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :10], a[:, :10])


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    a = _imgs(2, 48, 40, seed=1)
    noise = np.random.default_rng(2).integers(-30, 31, a.shape)
    b = np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)
    b[1] = np.clip(a[1].astype(int) // 2 + 60, 0, 255)
    ours = ssim(a, b)
    ours_torch = ssim(a, b, device="cpu", chunk=1)   # the torch path (used on GPUs) gives the same numbers
    for i in range(2):
        ref = metrics.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=255, channel_axis=-1)
        assert ours[i] == pytest.approx(ref, abs=1e-9)
        assert ours_torch[i] == pytest.approx(ref, abs=1e-9)
        assert psnr(a[i], b[i])[0] == pytest.approx(metrics.peak_signal_noise_ratio(a[i], b[i], data_range=255),
                                                    abs=1e-9)


def _legacy_pair(seed=3, n=6):
    """uint8 originals (as loaded) and float reconstructions in [-1, 1] near them, so that truncation, rounding
    and the +128 offset give different uint8 values."""
    rng = np.random.default_rng(seed)
    orig = rng.integers(0, 256, (n, 24, 20, 3)).astype(np.uint8)
    recon = np.clip(orig / 127.5 - 1 + rng.normal(0, 0.05, orig.shape), -1.2, 1.2)
    return orig, recon


def test_legacy_modes_against_skimage_and_by_hand():
    metrics = pytest.importorskip("skimage.metrics")
    from tokcli.metrics import legacy

    orig, recon = _legacy_pair()
    trunc = lambda x: (np.clip((np.clip(x, -1, 1) + 1) / 2 * 255, 0, 255)).astype(np.uint8)  # noqa: E731
    rnd = lambda x: np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)  # noqa: E731
    # tok: the protocol, identical to metrics/image.py on rounded uint8
    assert np.allclose(legacy.psnr(orig, recon, "tok"), psnr(orig, rnd(recon)), atol=1e-9)
    assert np.allclose(legacy.ssim(orig, recon, "tok"), ssim(orig, rnd(recon)), atol=1e-12)
    # wetok: truncation, skimage per image with data_range 255 and its default 7x7 window
    for i in range(len(orig)):
        b = trunc(recon[i])
        assert legacy.psnr(orig, recon, "wetok")[i] == pytest.approx(
            metrics.peak_signal_noise_ratio(orig[i], b, data_range=255), abs=1e-9)
        assert legacy.ssim(orig, recon, "wetok")[i] == pytest.approx(
            metrics.structural_similarity(orig[i], b, data_range=255, channel_axis=-1), abs=1e-9)
    # flowmo: skimage PSNR of the whole batch of 5 (the official loop's bug), on /255 floats
    fl = legacy.psnr(orig, recon, "flowmo", batch=5)
    assert len(fl) == 2
    assert fl[0] == pytest.approx(metrics.peak_signal_noise_ratio(orig[:5] / 255.0, trunc(recon[:5]) / 255.0,
                                                                  data_range=1.0), abs=1e-9)
    # ... and the same figure from per-image values (how tok bench aggregates it, independent of its batching)
    assert legacy.flowmo_psnr_mean(legacy.psnr(orig, recon, "wetok"), batch=5) == pytest.approx(fl.mean(), abs=1e-9)
    # llamagen: GT float, recon via clamp(127.5 x + 128), SSIM with data_range=2.0
    rec = np.clip(127.5 * recon + 128, 0, 255).astype(np.uint8) / 255.0
    for i in range(len(orig)):
        assert legacy.psnr(orig, recon, "llamagen")[i] == pytest.approx(
            metrics.peak_signal_noise_ratio(orig[i] / 255.0, rec[i], data_range=1.0), abs=1e-9)
        assert legacy.ssim(orig, recon, "llamagen")[i] == pytest.approx(
            metrics.structural_similarity(orig[i] / 255.0, rec[i], data_range=2.0, channel_axis=-1), abs=1e-9)
    # the conventions are not the same number: truncation loses ~half a level on average
    assert np.mean(legacy.psnr(orig, recon, "wetok")) < np.mean(legacy.psnr(orig, recon, "tok")) - 1e-3
    assert np.mean(legacy.ssim(orig, recon, "llamagen")) > np.mean(legacy.ssim(orig, recon, "wetok"))
    with pytest.raises(ValueError, match="unknown PSNR mode"):
        legacy.psnr(orig, recon, "adm")
    with pytest.raises(TypeError, match="uint8"):
        legacy.psnr(orig / 127.5 - 1, recon, "wetok")


def test_codebook_usage_hand_values():
    idx = np.array([[0, 0, 1, 1]])                 # two codes of four, equally often
    u = codebook_usage(idx, 4)
    assert u["used"] == 2 and u["usage"] == 0.5 and u["tokens"] == 4
    assert u["perplexity"] == pytest.approx(2.0) and u["entropy_bits"] == pytest.approx(1.0)
    assert "groups" not in u
    uniform = codebook_usage(np.arange(8).reshape(2, 4), 8)
    assert uniform["usage"] == 1.0 and uniform["perplexity"] == pytest.approx(8.0)
    one = codebook_usage(np.full((3, 3), 5), 8)
    assert one["perplexity"] == pytest.approx(1.0) and one["used"] == 1


def test_codebook_usage_groups_and_streaming():
    # [N, h, w, g] with g = 2: group 0 uses codes {0, 1}, group 1 only code 3
    idx = np.zeros((2, 2, 2, 2), np.uint8)
    idx[..., 0] = np.array([[0, 1], [1, 0]])
    idx[..., 1] = 3
    u = codebook_usage(idx, 4, group_axis=-1)
    assert [g["used"] for g in u["groups"]] == [2, 1]
    assert [g["usage"] for g in u["groups"]] == [0.5, 0.25]
    assert u["groups"][0]["perplexity"] == pytest.approx(2.0)
    assert u["used"] == 3 and u["usage"] == 0.75 and u["tokens"] == 16
    p = np.array([4, 4, 0, 8]) / 16
    assert u["perplexity"] == pytest.approx(math.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    counter = UsageCounter(4, group_axis=-1)
    counter.update(idx[:1])
    counter.update(idx[1:])
    assert counter.result() == u
    with pytest.raises(ValueError):
        codebook_usage(np.array([4]), 4)


def test_bits_per_pixel():
    # WeTok 16x16x4 groups of 256 codes on a 256x256 image: 1024 tokens x 8 bits / 65536 px = 0.125 bpp
    bits = token_bits_per_image("indices", (16, 16, 4), codebook_size=256)
    assert bits == 8192.0
    assert bits_per_pixel(bits, 1, 256, 256) == 0.125
    assert token_bits_per_image("bits", (256, 18)) == 256 * 18
    assert token_bits_per_image("latents", (32, 8), latent_bits=32) == 32 * 8 * 32
    tf = TokenFile(header={"tokens": {"kind": "indices", "shape": [16, 16, 4], "codebook_size": 256}},
                   keys=["a", "b"], kind="indices", array=np.zeros((2, 16, 16, 4), np.uint8))
    r = bpp_report(tf, 256, 256, file_bytes=4096)
    assert r["token_bpp"] == 0.125 and r["file_bpp"] == 4096 * 8 / (2 * 65536)
    with pytest.raises(ValueError):
        bits_per_pixel(1, 0, 256, 256)


# ------------------------------------------------------------------------- the metric objects of `tok bench`


def _spec(kind="indices", shape=(4, 4, 2), codebook_size=16, **extra):
    from types import SimpleNamespace

    return SimpleNamespace(kind=kind, shape=tuple(shape), codebook_size=codebook_size, extra=extra)


def _batches(n=7, size=16, per=3, token_shape=(4, 4, 2), codebook_size=16, seed=0):
    """Batches of (original, reconstruction, tokens) of n images, ``per`` at a time, indices 0..n-1."""
    import torch

    from tokcli.metrics.base import Batch

    rng = np.random.default_rng(seed)
    orig = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    noise = rng.normal(0, 12, orig.shape)
    recon = torch.from_numpy(np.clip((orig + noise) / 127.5 - 1, -1.2, 1.2)).permute(0, 3, 1, 2).float()
    recon[2] = torch.from_numpy(orig[2] / 127.5 - 1).permute(2, 0, 1)  # one perfect reconstruction: PSNR cap
    tokens = rng.integers(0, codebook_size, (n, *token_shape)).astype(np.uint16)
    return [Batch([f"k{i}" for i in range(s, min(s + per, n))], list(range(s, min(s + per, n))), orig[s:s + per],
                  recon[s:s + per], tokens[s:s + per]) for s in range(0, n, per)]


def _shard(batches, rank, world):
    """The batches rank ``rank`` of ``world`` would see (every world-th image), re-batched."""
    from tokcli.metrics.base import Batch

    out = []
    for b in batches:
        take = [j for j, i in enumerate(b.index) if i % world == rank]
        if take:
            out.append(Batch([b.keys[j] for j in take], [b.index[j] for j in take], b.orig[take], b.recon[take],
                             b.tokens[take]))
    return out


def _one_and_merged(make, batches):
    """(metric fed every batch, metric merged from two interleaved halves)."""
    whole = make()
    for b in batches:
        whole.update(b)
    halves = []
    for rank in (0, 1):
        m = make()
        for b in _shard(batches, rank, 2):
            m.update(b)
        halves.append(m)
    merged = make()
    merged.merge([h.state() for h in halves])
    return whole, merged


@pytest.mark.parametrize("mode", ["tok", "wetok", "flowmo", "llamagen"])
def test_psnr_ssim_merge_of_two_halves_equals_one_pass(mode):
    from tokcli.metrics.pixel import PSNR, SSIM

    batches = _batches()
    for make in (lambda: PSNR(mode), lambda: SSIM(mode, size=16)):
        whole, merged = _one_and_merged(make, batches)
        assert merged.index == whole.index == list(range(7))  # back in input order
        assert merged.values == whole.values
        assert merged.result() == whole.result() and merged.per_image() == whole.per_image()
        assert merged.protocol() == whole.protocol()
    psnr_metric, _ = _one_and_merged(lambda: PSNR(mode), batches)
    if mode == "tok":
        assert psnr_metric.values[2] == 100.0  # identical images: capped, not inf
    if mode == "flowmo":  # one MSE per 5 consecutive images, from the per-image values in input order
        assert "one MSE per 5" in psnr_metric.protocol()["psnr"]
        assert psnr_metric.result()["psnr"] != pytest.approx(np.mean(psnr_metric.values))


def test_psnr_metric_values_and_checks():
    from tokcli.errors import TokUsageError
    from tokcli.metrics.pixel import PSNR, SSIM

    batches = _batches()
    m = PSNR()
    for b in batches:
        m.update(b)
    expected = np.minimum(np.concatenate([psnr(b.orig, b.recon_u8) for b in batches]), 100.0)
    assert m.values == expected.tolist() and m.result()["psnr"] == float(np.mean(expected))
    with pytest.raises(TokUsageError, match="--psnr-mode"):
        PSNR("adm")
    with pytest.raises(TokUsageError, match="at least 11x11"):
        SSIM(size=10)


def test_usage_merge_of_two_halves_equals_one_pass():
    from tokcli.metrics.usage import Usage

    batches = _batches()
    spec = _spec(groups=2, bits_per_group=4)
    whole, merged = _one_and_merged(lambda: Usage(spec), batches)
    assert np.array_equal(merged.codes.counts, whole.codes.counts)
    assert np.array_equal(merged.joint.counts, whole.joint.counts)
    r = whole.result()["usage"]
    assert merged.result()["usage"] == r
    tokens = np.concatenate([b.tokens for b in batches]).astype(np.int64)
    assert r["tokens"] == tokens.size and len(r["groups"]) == 2
    assert r["groups"][1]["used"] == len(np.unique(tokens[..., 1]))
    assert r["joint"]["codebook_size"] == 256 and r["joint"]["tokens"] == tokens.size // 2
    assert r["joint"]["used"] == len(np.unique(tokens[..., 0] + 16 * tokens[..., 1]))
    # a rank without images contributes nothing
    empty = Usage(spec)
    empty.merge([Usage(spec).state(), whole.state()])
    assert empty.result() == whole.result()


def test_usage_of_a_1d_token_spec_counts_one_group():
    """Groups come from the token spec, not from the rank of the token tensor: CODA's [680] is one codebook."""
    from tokcli.metrics.usage import Usage, spec_groups

    spec = _spec(shape=(680,), codebook_size=4096, patch_size_list=[1, 2])
    assert spec_groups(spec) is None
    batches = _batches(token_shape=(680,), codebook_size=4096)
    whole, merged = _one_and_merged(lambda: Usage(spec), batches)
    r = whole.result()["usage"]
    assert "groups" not in r and r["joint"] is None and r["tokens"] == 7 * 680
    assert merged.result() == whole.result()
    tokens = np.concatenate([b.tokens for b in batches])
    assert r["used"] == len(np.unique(tokens)) and r["codebook_size"] == 4096
    # a 3-D index tensor whose spec declares no groups is still one codebook
    three = Usage(_spec(shape=(4, 4, 2)))
    for b in _batches():
        three.update(b)
    assert "groups" not in three.result()["usage"] and three.joint is None
    # a declared single group is reported as one group; no joint code
    one = Usage(_spec(shape=(4, 4, 1), groups=1))
    for b in _batches(token_shape=(4, 4, 1)):
        one.update(b)
    assert len(one.result()["usage"]["groups"]) == 1 and one.joint is None
    with pytest.raises(ValueError, match="declares 2 groups"):
        Usage(_spec(groups=2)).update(_batches(token_shape=(4, 4, 3))[0])


def test_bpp_metric_uses_the_token_helpers():
    from tokcli.metrics.usage import Bpp

    batches = _batches()
    whole, merged = _one_and_merged(lambda: Bpp(_spec(), 16), batches)
    b = whole.result()["bpp"]
    assert merged.result() == whole.result()
    assert b["tokens_per_image"] == 32 and b["tokens"] == 32 * 4 / 256
    assert b["stored_bytes_per_image"] == 32 and b["stored_bpp"] == 32 * 8 / 256  # uint8 for 16 codes
    assert b["compression_ratio"] == 24 * 256 / (32 * 4)
    assert Bpp(_spec(), 16).result() == {}  # no batch seen
    lat = Bpp(_spec(kind="latents", codebook_size=None), 16)
    lat.update(batches[0])
    assert lat.result()["bpp"]["tokens"] == 32 * 16 / 256 and lat.result()["bpp"]["stored_bpp"] is None


def _fake_rfid(**kw):
    """An RFID metric whose "Inception features" are integer pixel values (float64 sums of them are exact)."""
    from tokcli.metrics.rfid import RFID

    m = RFID(None, "0" * 64, **kw)
    m._features = lambda images: np.tile(np.asarray(images, np.float64).reshape(len(images), -1)[:, :64], 32)
    return m


def test_rfid_merge_of_two_halves_adds_the_float64_sums():
    import torch

    batches = _batches()
    whole, merged = _one_and_merged(_fake_rfid, batches)
    for side in ("fake", "real"):
        a, b = getattr(whole, side), getattr(merged, side)
        assert a.n == b.n == 7
        assert torch.equal(a.sum, b.sum) and torch.equal(a.outer, b.outer)
    feats = whole._features(np.concatenate([b.orig for b in batches]))
    np.testing.assert_array_equal(whole.real.mean(), feats.mean(0))
    assert whole.notes() and "7 images" in whole.notes()[0]
    # only the primary rank computes the distance; every rank checks N
    secondary = _fake_rfid(primary=False)
    secondary.merge([whole.state()])
    assert secondary.result() == {}
    from tokcli.errors import TokError

    one = _fake_rfid()
    one.update(batches[0].__class__(["a"], [0], batches[0].orig[:1], batches[0].recon[:1], batches[0].tokens[:1]))
    with pytest.raises(TokError, match="at least 2 images"):
        one.result()
    # against a reference file there are no statistics of the originals to merge
    from tokcli.metrics.fid_stats import FeatureStats

    ref = FeatureStats().update(feats)
    a, b = _one_and_merged(lambda: _fake_rfid(ref=ref, ref_path="ref.npz"), batches)
    assert a.real is None and b.real is None and torch.equal(a.fake.outer, b.fake.outer)
