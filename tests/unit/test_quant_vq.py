"""tokcli.quant.vq: nearest-code search (chunked, exact argmin), first_argmax, straight-through VQ and its losses."""

from __future__ import annotations

import pytest
import torch

from tokcli.quant.vq import VectorQuantizer, first_argmax, nearest_code, straight_through, vq_losses


def _brute_force(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 argmin of ||x - c||^2 and the gap between the two smallest distances of each row."""
    d = ((x.double()[:, None, :] - codebook.double()[None]) ** 2).sum(-1)
    two = d.topk(2, dim=-1, largest=False).values
    return d.argmin(-1), two[:, 1] - two[:, 0]


@pytest.mark.parametrize("v", [7, 32, 1000, 1024, 16384])
def test_first_argmax_equals_torch_argmax(v):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(37, v, generator=g)
    assert torch.equal(first_argmax(x), x.argmax(-1))
    ties = torch.randint(0, 3, (41, v), generator=g).float()  # many exact ties: the first maximum must win
    assert torch.equal(first_argmax(ties), ties.argmax(-1))


def test_first_argmax_nan_and_blocks():
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(0))
    x[1, 700] = float("nan")
    x[2, 3] = x[2, 1000] = 50.0  # the same maximum in two blocks: the first one
    got = first_argmax(x)
    assert torch.equal(got, x.argmax(-1)) and got[1] == 700 and got[2] == 3


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 103, 104, None])
def test_nearest_code_equals_brute_force_argmin(chunk):
    g = torch.Generator().manual_seed(1)
    x, codebook = torch.randn(103, 8, generator=g), torch.randn(300, 8, generator=g)
    want, gap = _brute_force(x, codebook)
    assert float(gap.min()) > 1e-4  # no near-ties in this draw: float rounding cannot change the winner
    assert torch.equal(nearest_code(x, codebook, chunk=chunk), want)


def test_nearest_code_large_codebook_and_ties():
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(65536, 4, generator=g)
    x = torch.randn(50, 4, generator=g)
    want, gap = _brute_force(x, codebook)
    ok = gap > 1e-5  # with 65536 codes in 4-D a few rows have near-ties; compare the others exactly
    assert int(ok.sum()) >= 45
    got = nearest_code(x, codebook)  # default chunk: 64 rows x 65536 codes at a time
    assert torch.equal(got[ok], want[ok])
    # every returned code is (one of) the nearest
    d = ((x[:, None] - codebook[None]) ** 2).sum(-1)
    assert torch.allclose(d.gather(1, got[:, None])[:, 0], d.min(-1).values, atol=1e-5)
    dup = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # rows 0 and 2 equal: the lower id wins
    assert nearest_code(torch.tensor([[0.9, 0.1]]), dup).tolist() == [0]


def test_nearest_code_rejects_bad_shapes():
    with pytest.raises(ValueError):
        nearest_code(torch.zeros(3, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError):
        nearest_code(torch.zeros(3, 4), torch.zeros(5, 4), chunk=0)


def _hand_vq(beta: float) -> tuple[VectorQuantizer, torch.Tensor]:
    vq = VectorQuantizer(2, 3, beta=beta)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    # two vectors on a [B=1, D=2, N=2] latent: (0.9, 0.1) -> code 1, (0.2, 1.5) -> code 2
    z = torch.tensor([[[0.9, 0.2], [0.1, 1.5]]], requires_grad=True)
    return vq, z


def test_vq_loss_values_and_gradients_by_hand():
    beta = 0.25
    vq, z = _hand_vq(beta)
    out = vq(z)
    assert out.ids.tolist() == [[1, 2]]
    assert torch.equal(out.quantized.detach(), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]))
    # squared errors 0.01, 0.01 (first vector), 0.04, 0.25 (second): mean 0.0775
    assert sorted(out.losses) == ["codebook", "commitment"] and out.stats == {}
    assert out.losses["codebook"].item() == pytest.approx(0.0775, rel=1e-6)
    assert out.losses["commitment"].item() == pytest.approx(beta * 0.0775, rel=1e-6)
    loss = out.losses["codebook"] + out.losses["commitment"]
    assert loss.item() == pytest.approx((1 + beta) * 0.0775, rel=1e-6)
    loss.backward()
    # codebook term: d/dq mean((q - sg z)^2) = 2 (q - z) / 4 on the used rows; code 0 unused
    want_cb = torch.tensor([[0.0, 0.0], [0.05, -0.05], [-0.1, 0.25]])
    assert torch.allclose(vq.codebook.weight.grad, want_cb, atol=1e-7)
    # commitment term: beta * 2 (z - q) / 4, in z's [B, D, N] layout
    want_z = beta * 0.5 * torch.tensor([[[-0.1, 0.2], [0.1, -0.5]]])
    assert torch.allclose(z.grad, want_z, atol=1e-7)


def test_straight_through_gradient_is_identity():
    vq, _ = _hand_vq(0.25)
    z = torch.randn(2, 2, 5, 3, generator=torch.Generator().manual_seed(3), requires_grad=True)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    out = vq(z)
    (out.quantized * w).sum().backward()
    assert torch.equal(z.grad, w)  # exactly the identity (losses not in this backward)
    assert vq.codebook.weight.grad is None  # and nothing reaches the codebook through the quantized value
    assert torch.allclose(out.quantized, vq.decode_ids(out.ids), atol=1e-6)
    assert out.ids.shape == (2, 5, 3)
    q = vq.decode_ids(out.ids)
    assert torch.equal(straight_through(z, q).detach(), (z + (q - z)).detach())
    cb, cm = vq_losses(z, q, 0.5)
    assert cm.item() == pytest.approx(0.5 * cb.item(), rel=1e-6)


def test_vector_quantizer_rejects_wrong_channels():
    with pytest.raises(ValueError):
        VectorQuantizer(4, 8)(torch.zeros(1, 3, 2, 2))
