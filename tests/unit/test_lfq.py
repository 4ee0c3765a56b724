"""Group-wise lookup-free quantization: index convention, round trips and entropy values."""

import itertools
import math

import pytest
import torch

from tokcli.quant.lfq import GroupLFQ

LN2 = math.log(2)


def brute_force_entropies(z: torch.Tensor, groups: int, temperature: float = 0.01, eps: float = 0.0):
    """Reference in float64 with explicit loops over every code of every group.

    Returns (official per-sample, official codebook, paper per-sample, paper codebook)."""
    b, d, h, w = z.shape
    dp = d // groups
    codes = [torch.tensor([1.0 if (k >> j) & 1 else -1.0 for j in range(dp)], dtype=torch.float64)
             for k in range(2 ** dp)]
    zz = z.double().reshape(b, d, h * w)
    token_h = []  # per (b, n, g)
    probs = {k: [] for k in range(groups)}
    for bi, n, k in itertools.product(range(b), range(h * w), range(groups)):
        v = zz[bi, k * dp:(k + 1) * dp, n]
        logits = torch.stack([2 * (v * c).sum() / temperature for c in codes])
        p = torch.softmax(logits, 0)
        token_h.append(-(p * torch.log_softmax(logits, 0)).sum())
        probs[k].append(p)

    def ent(p):
        return -(p * torch.log(p + eps)).sum() if eps else -torch.special.xlogy(p, p).sum()

    token_h = torch.stack(token_h)
    off_ps = token_h.mean()
    pooled = torch.stack([p for k in range(groups) for p in probs[k]]).mean(0)
    off_cb = ent(pooled)
    pap_ps = token_h.view(b * h * w, groups).sum(-1).mean()
    pap_cb = sum(ent(torch.stack(probs[k]).mean(0)) for k in range(groups))
    return off_ps, off_cb, pap_ps, pap_cb


def test_index_convention_hand_built():
    q = GroupLFQ(8, groups=2)  # d' = 4
    z = torch.zeros(1, 8, 1, 2)
    # position (0, 0): group 0 bits (1, 0, 0 [exact zero], 1) -> 1 + 8 = 9; group 1 bits (0, 0, 0, 1) -> 8
    z[0, :, 0, 0] = torch.tensor([0.5, -1.0, 0.0, 2.0, -0.1, -0.2, -0.3, 0.4])
    # position (0, 1): group 0 bits (0, 1, 1, 0) -> 6; group 1 all positive -> 15
    z[0, :, 0, 1] = torch.tensor([-3.0, 1e-7, 0.2, -0.2, 1.0, 2.0, 3.0, 4.0])
    idx = q.codes_to_indices(q.quantize(z))
    assert idx.dtype == torch.long and idx.shape == (1, 1, 2, 2)
    assert idx.tolist() == [[[[9, 8], [6, 15]]]]
    codes = q.quantize(z)
    assert codes[0, :, 0, 0].tolist() == [1, -1, -1, 1, -1, -1, -1, 1]  # exact 0 -> -1
    assert q.decode_ids(idx)[0, :, 0, 1].tolist() == [-1, 1, 1, -1, 1, 1, 1, 1]


def test_zero_maps_to_minus_one_and_no_scaling():
    q = GroupLFQ(16, groups=2)
    codes = q.quantize(torch.zeros(2, 16, 3, 3))
    assert (codes == -1).all()
    assert q.codes_to_indices(codes).eq(0).all()
    big = q.quantize(torch.full((1, 16, 1, 1), 123.0))
    assert (big == 1).all()


def test_straight_through_gradient_and_values():
    q = GroupLFQ(16, groups=2)
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    codes = q.quantize(z)
    assert torch.allclose(codes.abs(), torch.ones_like(codes), atol=1e-6, rtol=0)
    (codes * torch.arange(16.0).view(1, 16, 1, 1)).sum().backward()
    assert torch.equal(z.grad, torch.arange(16.0).view(1, 16, 1, 1).expand_as(z))


@pytest.mark.parametrize("dim,groups", [(16, 2), (32, 4), (6, 6), (16, 1)])
def test_round_trip_random_indices(dim, groups):
    q = GroupLFQ(dim, groups)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, q.codebook_size, (3, 5, 7, groups), generator=g)
    idx[0, 0, 0] = q.codebook_size - 1
    idx[0, 0, 1] = 0
    codes = q.decode_ids(idx)
    assert codes.shape == (3, dim, 5, 7) and codes.is_contiguous()
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(q.codes_to_indices(codes), idx)
    assert torch.equal(q.codes_to_indices(q.quantize(codes)), idx)


def test_codebook_rows_are_decoded_indices():
    q = GroupLFQ(12, groups=3)  # d' = 4
    cb = q.codebook()
    assert cb.shape == (16, 4)
    assert cb[0].tolist() == [-1, -1, -1, -1]
    assert cb[1].tolist() == [1, -1, -1, -1]  # LSB first
    assert cb[8].tolist() == [-1, -1, -1, 1]


def test_index_range_validation():
    q = GroupLFQ(8, groups=2)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        q.decode_ids(torch.full((1, 2, 2, 2), 16))
    with pytest.raises(ValueError):
        q.decode_ids(torch.full((1, 2, 2, 2), -1))
    with pytest.raises(ValueError, match="integer"):
        q.decode_ids(torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        q.decode_ids(torch.zeros(1, 2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        GroupLFQ(10, groups=3)


def test_no_state():
    q = GroupLFQ(32, groups=4)
    assert q.state_dict() == {} and list(q.parameters()) == []


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_entropy_matches_brute_force(groups, eps):
    torch.manual_seed(groups)
    z = torch.randn(2, 6, 2, 3) * 0.02  # small values keep the T = 0.01 softmax away from one-hot
    q = GroupLFQ(6, groups)
    ref = brute_force_entropies(z, groups, eps=eps)
    off = q.entropy_loss(z, mode="official", eps=eps)
    pap = q.entropy_loss(z, mode="paper", eps=eps)
    for got, want in zip((off["per_sample_entropy"], off["codebook_entropy"], pap["per_sample_entropy"],
                          pap["codebook_entropy"]), ref):
        assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
    assert off["entropy_aux"].item() == pytest.approx((ref[0] - ref[1]).item(), rel=1e-4, abs=1e-5)
    # weights
    w = q.entropy_loss(z, mode="paper", sample_weight=0.5, codebook_weight=2.0, eps=eps)
    assert w["entropy_aux"].item() == pytest.approx((0.5 * ref[2] - 2.0 * ref[3]).item(), rel=1e-4, abs=1e-5)


def test_paper_mode_g1_is_plain_lfq_and_token_entropy_is_additive():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 3, 3) * 0.03
    full = GroupLFQ(8, 1).entropy_loss(z, mode="paper", eps=0)
    ref = brute_force_entropies(z, 1)
    assert full["per_sample_entropy"].item() == pytest.approx(ref[2].item(), rel=1e-4)
    assert full["codebook_entropy"].item() == pytest.approx(ref[3].item(), rel=1e-4)
    # Eq. 7: the token entropy over {-1,1}^8 equals the sum of the group entropies (p factorises exactly)
    for g in (2, 4, 8):
        grouped = GroupLFQ(8, g).entropy_loss(z, mode="paper", eps=0)
        assert grouped["per_sample_entropy"].item() == pytest.approx(full["per_sample_entropy"].item(), rel=1e-4)
        # Eq. 9 is an approximation: sum of marginal entropies >= joint entropy
        assert grouped["codebook_entropy"].item() >= full["codebook_entropy"].item() - 1e-5
        official = GroupLFQ(8, g).entropy_loss(z, mode="official", eps=0)
        assert official["per_sample_entropy"].item() == pytest.approx(grouped["per_sample_entropy"].item() / g,
                                                                      rel=1e-5)


def test_uniform_case_values():
    z = torch.zeros(2, 16, 2, 2)  # all logits equal -> uniform p over each group's 2^8 codes
    q = GroupLFQ(16, groups=2)
    off = q.entropy_loss(z, mode="official", eps=0)
    pap = q.entropy_loss(z, mode="paper", eps=0)
    assert off["per_sample_entropy"].item() == pytest.approx(8 * LN2, rel=1e-6)
    assert off["codebook_entropy"].item() == pytest.approx(8 * LN2, rel=1e-6)
    assert pap["per_sample_entropy"].item() == pytest.approx(16 * LN2, rel=1e-6)
    assert pap["codebook_entropy"].item() == pytest.approx(16 * LN2, rel=1e-6)
    assert off["entropy_aux"].item() == pytest.approx(0.0, abs=1e-5)
    # official eps: -sum p log(p + 1e-5) with p = 1/256
    with_eps = q.entropy_loss(z, mode="official")["codebook_entropy"].item()
    assert with_eps == pytest.approx(-math.log(1 / 256 + 1e-5), rel=1e-6)
    assert q.entropy_loss(z)["commitment"].item() == pytest.approx(1.0)  # (0 - (-1))^2


def test_official_pools_groups_paper_does_not():
    # group 0 always code 0 (all bits negative), group 1 always code 255: confident tokens
    z = torch.empty(4, 16, 2, 2)
    z[:, :8] = -1.0
    z[:, 8:] = 1.0
    q = GroupLFQ(16, groups=2)
    off = q.entropy_loss(z, mode="official", eps=0)
    pap = q.entropy_loss(z, mode="paper", eps=0)
    assert off["per_sample_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert pap["per_sample_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert off["codebook_entropy"].item() == pytest.approx(LN2, rel=1e-6)  # pooled: two codes, half each
    assert pap["codebook_entropy"].item() == pytest.approx(0.0, abs=1e-6)  # each group uses one code
    assert off["commitment"].item() == pytest.approx(0.0)


def test_bsq_style_one_bit_groups():
    torch.manual_seed(1)
    z = torch.randn(2, 5, 3, 3) * 0.005
    q = GroupLFQ(5, groups=5)  # d' = 1, codes {-1, +1}
    p1 = torch.sigmoid(4 * z.double() / 0.01)  # softmax over logits 2 z c / T, c = +-1
    h = -(p1 * p1.log() + (1 - p1) * (1 - p1).log())
    pap = q.entropy_loss(z, mode="paper", eps=0)
    assert pap["per_sample_entropy"].item() == pytest.approx(h.sum(1).mean().item(), rel=1e-4)
    pbar = p1.mean(dim=(0, 2, 3))
    hbar = -(pbar * pbar.log() + (1 - pbar) * (1 - pbar).log())
    assert pap["codebook_entropy"].item() == pytest.approx(hbar.sum().item(), rel=1e-4)


def test_plain_lfq_16_bits():
    q = GroupLFQ(16, groups=1)
    assert q.codebook_size == 65536
    idx = torch.tensor([[[[0], [65535]], [[1], [32768]]]])
    codes = q.decode_ids(idx)
    assert torch.equal(q.codes_to_indices(codes), idx)
    z = torch.randn(1, 16, 2, 2, requires_grad=True)
    out = q.entropy_loss(z)
    out["entropy_aux"].backward()
    assert torch.isfinite(z.grad).all()
    assert 0 <= out["codebook_entropy"].item() <= 16 * LN2 + 1e-4


def test_forward_aux_training_vs_eval():
    q = GroupLFQ(16, groups=2)
    z = torch.randn(2, 16, 3, 3)
    out = q.train()(z)
    assert out.ids.shape == (2, 3, 3, 2) and torch.equal(q.decode_ids(out.ids), out.quantized)
    assert sorted(out.losses) == ["commitment", "entropy_aux"]
    assert sorted(out.stats) == ["codebook_entropy", "per_sample_entropy"]
    assert out.stats["per_sample_entropy"].item() > 0
    q.eval()
    out2 = q(z)
    assert torch.equal(out2.ids, out.ids) and torch.equal(out.quantized, out2.quantized)
    assert out2.losses["entropy_aux"].item() == 0.0


def _ddp_worker(rank: int, world: int, port: int, z: torch.Tensor, result_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        part = z.chunk(world)[rank].clone().requires_grad_(True)
        out = GroupLFQ(16, groups=2).entropy_loss(part, eps=0)
        out["codebook_entropy"].backward()
        torch.save({"codebook": out["codebook_entropy"].detach(), "grad": part.grad},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_codebook_entropy_uses_the_global_batch_under_ddp(tmp_path):
    """Two gloo ranks holding half a batch each get the codebook entropy of the whole batch (not the mean of two
    half-batch entropies) and, summed over ranks as DDP's averaged gradients imply, the whole batch's gradient."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    z = torch.randn(4, 16, 2, 2) * 0.02
    z[:2, :8] -= 0.05  # the two halves use different codes: local and global entropies differ clearly
    full = z.clone().requires_grad_(True)
    want = GroupLFQ(16, groups=2).entropy_loss(full, eps=0)["codebook_entropy"]
    want.backward()
    halves = [GroupLFQ(16, groups=2).entropy_loss(h, eps=0)["codebook_entropy"].item() for h in z.chunk(2)]
    assert abs(sum(halves) / 2 - want.item()) > 1e-3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, z, str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in res:
        assert r["codebook"].item() == pytest.approx(want.item(), rel=1e-5)
    # each rank's gradient is world x its share (all-reduced backward); DDP then averages over the ranks
    grad = torch.cat([r["grad"] for r in res]) / 2
    assert torch.allclose(grad, full.grad, rtol=1e-4, atol=1e-7)


def test_global_mean_is_the_plain_mean_in_one_process():
    from tokcli.quant.base import global_mean

    x = torch.randn(3, 4, 5)
    assert torch.equal(global_mean(x, (0, 1)), x.mean((0, 1)))
