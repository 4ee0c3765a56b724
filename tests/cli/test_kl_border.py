"""kl-tiny's coloured frame (issue 9, item 17): its decoder, trained on 64 px crops, draws a frame from its
zero-padded convolutions. Decoding a latent padded by one cell (edge values repeated) and cropping back removes it;
the shipped folder makes that its decode default (`decode.border_pad = 1`); `--sampler border_pad=0` gives the
plain decoder."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO


def _ring_ratio(u8: np.ndarray, orig: np.ndarray) -> float:
    e = np.abs(u8.astype(np.float64) - orig).mean(axis=(0, 3))
    ring = np.concatenate([e[:4].ravel(), e[-4:].ravel(), e[:, :4].ravel(), e[:, -4:].ravel()]).mean()
    return float(ring / e[8:-8, 8:-8].mean())


@pytest.fixture(scope="module")
def decoded():
    import torch

    import tokcli
    from tokcli.core.images import collect_inputs, iter_batches, to_tensor, to_uint8

    tok = tokcli.load("kl-tiny", device="cpu")
    (keys, imgs), = list(iter_batches(collect_inputs([str(REPO / "samples")]), 256, 8))
    with torch.inference_mode():
        z = tok.encode(to_tensor(imgs))
        return imgs, {p: to_uint8(tok.decode(z, border_pad=p)) for p in (None, 0, 1)}


def test_the_frame_comes_from_the_decoder_border_and_the_default_removes_it(decoded):
    imgs, out = decoded
    assert _ring_ratio(out[0], imgs) > 1.5      # plain decoder: the outer 4 px err far more than the inside
    assert _ring_ratio(out[1], imgs) < 1.15     # one padded latent cell: the frame is gone
    assert np.array_equal(out[None], out[1])    # and that is what the shipped folder decodes with by default


def test_border_pad_from_the_cli(tmp_path):
    from conftest import run_tok

    p = run_tok("reconstruct", REPO / "samples" / "coffee.jpg", "-m", "kl-tiny", "-o", tmp_path / "a", "-q",
                "--sampler", "border_pad=0")
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("reconstruct", REPO / "samples" / "coffee.jpg", "-m", "kl-tiny", "-o", tmp_path / "b", "-q")
    assert p.returncode == 0, p.stderr.decode()
    assert (tmp_path / "a" / "coffee.png").read_bytes() != (tmp_path / "b" / "coffee.png").read_bytes()
    p = run_tok("reconstruct", REPO / "samples" / "coffee.jpg", "-m", "kl-tiny", "-o", tmp_path / "c", "-q",
                "--sampler", "border_pad=-1")
    assert p.returncode == 2 and b"border_pad" in p.stderr
