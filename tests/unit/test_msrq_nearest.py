"""tokcli.quant.msrq beyond parity: the "nearest" assignment (multi-scale residual VQ without attention, plain VQ
at one scale), the inference fast path of the attention assignment (ids bit-identical to the training path) and
the usage statistics. Random weights, no fixtures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokcli.quant.msrq as msrq
from tokcli.quant.msrq import MultiScaleAttentionQuantizer
from tokcli.quant.vq import VectorQuantizer

C0 = torch.tensor([1.0, -2.0, 0.5])
V1 = torch.tensor([0.25, 0.5, -0.75])
CHECKER = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]] * 2)  # 4x4, mean exactly 0


def _constructed():
    """Scales [1, 2, 4] on a 4x4 latent f = C0 + checkerboard(+V1 / -V1), all values dyadic (exact in float):
    level 1 sees mean(f) = C0 (code 0); level 2 sees the 2x2 block means of the checkerboard, exactly 0 (code 3);
    level 3 sees the checkerboard itself (codes 1 and 2). Codes 4 and 5 are distractors."""
    f = C0.view(1, 3, 1, 1) + CHECKER.view(1, 1, 4, 4) * V1.view(1, 3, 1, 1)
    codebook = torch.stack([C0, V1, -V1, torch.zeros(3), torch.full((3,), 5.0), torch.tensor([-3.0, 0.0, 3.0])])
    q = MultiScaleAttentionQuantizer(3, 6, [1, 2, 4], assignment="nearest")
    with torch.no_grad():
        q.codebooks.weight.copy_(codebook)
    return q, f


def test_nearest_has_no_attention_parameters():
    q = MultiScaleAttentionQuantizer(16, 64, [1, 2, 4], assignment="nearest")
    assert q.attn is None and list(q.state_dict()) == ["codebooks.weight"]
    assert [n for n, _ in q.named_parameters()] == ["codebooks.weight"]
    cfg = {"vae_latent_channels": 16, "codebook_size": 64, "patch_size_list": [1, 2, 4], "vq_attn_dim": 8,
           "vq_norm_type": "rms_norm", "vq_commitment_beta": 0.05}
    assert MultiScaleAttentionQuantizer.from_config(cfg).assignment == "attention"
    near = MultiScaleAttentionQuantizer.from_config({**cfg, "vq_assignment": "nearest"})
    assert near.assignment == "nearest" and near.attn is None and near.beta == 0.05
    with pytest.raises(ValueError):
        MultiScaleAttentionQuantizer(16, 64, [1, 2, 4], assignment="cosine")


def test_nearest_exact_latent_gives_expected_ids_and_zero_error():
    q, f = _constructed()
    ids = q.encode(f)
    assert [t.tolist() for t in ids[:2]] == [[[[0]]], [[[3, 3], [3, 3]]]]
    assert torch.equal(ids[2][0], torch.where(CHECKER > 0, 1, 2))
    assert torch.equal(q.decode_ids(ids), f)  # zero quantization error
    assert torch.equal(q.decode_ids(q.flatten_indices(ids)), f)
    out = q(f)
    assert out.losses["vq"].item() == 0.0 and out.losses["entropy"].item() == 0.0
    assert torch.equal(out.quantized, f)
    tr = q.trace(f)
    assert torch.equal(tr.indices, q.flatten_indices(ids))
    # margins = second-nearest squared distance (the nearest is 0): min over the other codes at level 1 (-V1,
    # 3.875), ||V1||^2 = 0.875 at level 2 (from the zero code) and at level 3 (+-V1 to the zero code)
    d0 = ((q.codebooks.weight[1:] - C0) ** 2).sum(-1).min().item()
    assert d0 == 3.875 and tr.logit_margin[0, 0].item() == pytest.approx(d0)
    assert torch.allclose(tr.logit_margin[0, 1:], torch.full((20,), 0.875))


def test_usage_stats_per_level_and_overall():
    q, f = _constructed()
    st = q.usage_stats(q.encode(f))
    assert [lv["scale"] for lv in st["levels"]] == [1, 2, 4]
    assert [lv["used"] for lv in st["levels"]] == [1, 1, 2]
    assert [lv["tokens"] for lv in st["levels"]] == [1, 4, 16]
    assert st["levels"][2]["perplexity"] == pytest.approx(2.0) and st["levels"][0]["perplexity"] == 1.0
    assert st["overall"]["used"] == 4 and st["overall"]["usage"] == pytest.approx(4 / 6)
    p = torch.tensor([1, 4, 8, 8], dtype=torch.float64) / 21  # code counts over the 21 tokens
    assert st["overall"]["perplexity"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)
    flat = q.flatten_indices(q.encode(f))
    assert q.usage_stats(flat.numpy()) == st == q.usage_stats(flat)
    with pytest.raises(ValueError):
        q.usage_stats(flat[:, :5])


def test_single_scale_nearest_equals_plain_vq():
    g = torch.Generator().manual_seed(0)
    ms = MultiScaleAttentionQuantizer(8, 97, [6], assignment="nearest", beta=0.3)
    vq = VectorQuantizer(8, 97, beta=0.3)
    with torch.no_grad():
        vq.codebook.weight.copy_(ms.codebooks.weight)
    f = torch.randn(3, 8, 6, 6, generator=g)
    f1, f2 = f.clone().requires_grad_(True), f.clone().requires_grad_(True)
    a, b = ms(f1), vq(f2)
    assert torch.equal(a.ids[0], b.ids)
    assert torch.equal(a.quantized, b.quantized)
    b_loss = b.losses["codebook"] + b.losses["commitment"]
    assert a.losses["vq"].item() == pytest.approx(b_loss.item(), rel=1e-6)
    w = torch.randn(f.shape, generator=g)
    ((a.quantized * w).sum() + a.losses["vq"]).backward()
    ((b.quantized * w).sum() + b_loss).backward()
    assert torch.allclose(f1.grad, f2.grad, atol=1e-7)
    assert torch.allclose(ms.codebooks.weight.grad, vq.codebook.weight.grad, atol=1e-7)


def test_nearest_multiscale_losses_and_straight_through():
    g = torch.Generator().manual_seed(1)
    q = MultiScaleAttentionQuantizer(4, 32, [1, 2, 3, 5], assignment="nearest", beta=0.25)
    f = torch.randn(2, 4, 5, 5, generator=g, requires_grad=True)
    out = q(f)
    tr = q.trace(f.detach())
    assert torch.equal(q.flatten_indices(out.ids), tr.indices)
    # vq_loss = mean over levels of (1 + beta) * mean((r_l - z_l)^2), r_l / z_l as the trace records them
    per_level = [((1 + q.beta) * ((r - z) ** 2).mean()).item()
                 for r, z in zip(tr.level_inputs.split([1, 4, 9, 25], 1), tr.level_codes.split([1, 4, 9, 25], 1))]
    assert out.losses["vq"].item() == pytest.approx(sum(per_level) / 4, rel=1e-6)
    assert torch.allclose(out.quantized, q.decode_ids(q.encode(f.detach())), atol=1e-6)
    w = torch.randn(f.shape, generator=g)
    (out.quantized * w).sum().backward()
    assert torch.equal(f.grad, w)


def _attention(v: int, scales, seed: int = 0) -> MultiScaleAttentionQuantizer:
    torch.manual_seed(seed)
    q = MultiScaleAttentionQuantizer(16, v, scales, attn_dim=32, beta=0.05).eval()
    with torch.no_grad():  # non-trivial norm weights, so the per-dimension RMSNorm scale matters
        q.attn.norm_q.weight.uniform_(0.5, 1.5)
        q.attn.norm_k.weight.uniform_(0.5, 1.5)
    return q


def _dense_official_ids(q: MultiScaleAttentionQuantizer, f: torch.Tensor) -> torch.Tensor:
    """argmax of softmax of the dense logits (the official formulation), one level after another."""
    B, D, H, W = f.shape
    C = q.codebooks.weight
    k, v = q.attn.norm_k(q.attn.to_k(C)), q.attn.to_v(C)
    res, ids = f.clone(), []
    for pn in q.patch_size_list:
        x = F.interpolate(res, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(B, pn * pn, D)
        soft = (q.attn.norm_q(q.attn.to_q(x)) @ k.t() / math.sqrt(k.shape[-1])).softmax(-1)
        idx = soft.argmax(-1)
        ids.append(idx)
        up = F.interpolate(v[idx].reshape(B, pn, pn, D).permute(0, 3, 1, 2), size=(H, W), mode="bicubic")
        res = res - up
    return torch.cat(ids, 1)


@pytest.mark.parametrize("block_rows", [None, 3])
def test_attention_encode_ids_equal_forward_large_codebook(monkeypatch, block_rows):
    v = 16384
    if block_rows is not None:  # many small row blocks, including 1-row remainders (MKL's small-row kernels)
        monkeypatch.setitem(msrq.LOGIT_BLOCK_ELEMENTS, "cpu", v * block_rows)
    q = _attention(v, [1, 2, 3, 5, 8])
    f = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5)) * 1.5
    with torch.no_grad():
        out = q(f)
    enc = q.encode(f)
    for a, b in zip(enc, out.ids):
        assert torch.equal(a, b)
    flat = q.flatten_indices(enc)
    assert torch.equal(q.trace(f).indices, flat)
    with torch.no_grad():
        assert (_dense_official_ids(q, f) == flat).float().mean().item() == 1.0
    assert len(set(flat.flatten().tolist())) > 20  # a real assignment, not one code everywhere
    # decode of the ids reproduces the training path's quantized value exactly
    assert torch.equal(q.decode_ids(enc), out.quantized)
    assert torch.equal(q.decode_ids(flat), out.quantized)


def test_attention_logits_blocks_are_the_dense_product(monkeypatch):
    q = _attention(256, [1, 2])
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(6))
    k = q.attn.keys(q.codebooks.weight)
    dense = q.attn.logits(x, k)
    monkeypatch.setitem(msrq.LOGIT_BLOCK_ELEMENTS, "cpu", 256 * 4)
    blocked = q.attn.logits(x, k)
    assert blocked.shape == (2, 7, 256)
    assert torch.allclose(blocked, torch.matmul(x, k.t()) / math.sqrt(32), atol=1e-5)
    assert torch.allclose(blocked, dense, atol=1e-5)
    assert torch.equal(q.attn.assign(x, k), blocked.argmax(-1))


def test_attention_encode_ids_equal_forward_under_autocast():
    q = _attention(1024, [1, 2, 4, 8], seed=1)
    f = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        enc, fwd = q.encode(f), q(f).ids
    assert all(torch.equal(a, b) for a, b in zip(enc, fwd))
