"""WeTok's factorised AR generator on tiny random models (no fixture): the bit regrouping between sub-tokens and a
tokenizer's groups, the official filter order, the inverse-CDF draw, the k = 2 module names, grouped-query heads,
the KV-cache sampler against teacher forcing, replay from uniforms / tokens, per-sample seeds, the folder round trip
and one-line refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tokcli.errors import TokError, TokUsageError
from tokcli.gen.wetok_ar.model import WeTokAR, regroup
from tokcli.gen.wetok_ar.sampler import draw, filter_logits, sample_tokens

ARGS = {"block_size": 9, "spatial_n_layer": 2, "factorized_n_layer": 1, "factorized_bits": [2, 3], "n_head": 2,
        "dim": 16, "class_num": 4, "multiple_of": 8}


def tiny(seed: int = 0, **kw) -> WeTokAR:
    torch.manual_seed(seed)
    m = WeTokAR(**{**ARGS, **kw})
    with torch.no_grad():
        for p in m.parameters():  # the official init zeroes the heads: re-draw everything
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.2) + (p.dim() == 1))
    return m.eval()


def test_regroup_is_lsb_first_and_round_trips():
    ids = torch.tensor([[5, 3]])  # bits 1,0,1 | 1,1,0
    assert regroup(ids, [3, 3], [2, 4]).tolist() == [[1, 7]]
    assert regroup(ids, [3, 3], [6]).tolist() == [[5 + 3 * 8]]
    x = torch.randint(0, 8, (4, 9, 4))
    assert torch.equal(regroup(regroup(x, [3] * 4, [5, 7]), [5, 7], [3] * 4), x)
    with pytest.raises(ValueError):
        regroup(x, [3] * 4, [3] * 3)


def test_filter_order_temperature_then_top_k_then_top_p():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0, -1.0]])
    k2 = filter_logits(logits, 1.0, 2, 1.0)
    assert torch.isinf(k2).tolist() == [[False, False, False, True, True]]  # ties with the k-th are kept
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])  # no ties for top-p (the sort order of ties is free)
    p = torch.softmax(logits, -1)[0]
    top_p = float(p[0] + p[1] / 2)  # crossed inside the second entry: the first two stay
    kept = ~torch.isinf(filter_logits(logits, 1.0, 0, top_p))
    assert kept.tolist() == [[True, True, False, False, False]]
    tiny_p = ~torch.isinf(filter_logits(logits, 1.0, 0, 1e-6))
    assert tiny_p.tolist() == [[True, False, False, False, False]]  # the top-1 always stays
    hot = filter_logits(logits, 0.25, 0, 0.9)  # a low temperature sharpens before top-p: fewer tokens kept
    assert (~torch.isinf(hot)).sum() < (~torch.isinf(filter_logits(logits, 1.0, 0, 0.9))).sum()


def test_draw_is_the_inverse_cdf_and_never_a_filtered_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(4, 1)
    u = torch.tensor([0.0, 0.4999, 0.5, 1 - 1e-12], dtype=torch.float64)
    assert draw(probs, u).tolist() == [1, 1, 3, 3]
    onehot = torch.zeros(3, 6)
    onehot[:, 4] = 1
    assert draw(onehot, torch.tensor([0.0, 0.5, 0.999999])).tolist() == [4, 4, 4]


def test_k2_uses_the_official_pre_and_post_names_and_gqa_builds():
    m = WeTokAR(**{**ARGS, "n_kv_head": 1})
    keys = set(m.state_dict())
    assert {"pre_emb.weight", "post_emb.weight", "head.0.weight", "head.1.weight",
            "class_emb.embedding_table.weight"} <= keys
    assert m.state_dict()["spatial_blocks.0.attention.wqkv.weight"].shape == (16 + 2 * 8, 16)
    assert m.state_dict()["class_emb.embedding_table.weight"].shape == (5, 16)
    assert not any("kv_cache" in k or "rope" in k for k in keys)
    four = WeTokAR(**{**ARGS, "factorized_bits": [1, 1, 2, 2]})
    assert {"0_emb.weight", "3_emb.weight"} <= set(four.state_dict())


@pytest.mark.parametrize("kw, cfg", [({}, 1.0), ({"n_kv_head": 1}, [2.0, 1.5]), ({"factorized_bits": [1, 2, 2]}, 3.0)])
def test_kv_cache_sampling_equals_teacher_forcing(kw, cfg):
    m = tiny(1, **kw)
    y = torch.tensor([0, 3, 2])
    recs = {}
    with torch.inference_mode():
        out = sample_tokens(m, y, seeds=[5, 6, 7], cfg=cfg, on_subtoken=lambda n, i, r: recs.setdefault(i, []).append(
            (r["cond"], r["uncond"])))
        tf = m(tuple(out[..., i] for i in range(m.k)) + (y,))
        null = m(tuple(out[..., i] for i in range(m.k)) + (torch.full_like(y, 4),))
    for i in range(m.k):
        torch.testing.assert_close(torch.stack([c for c, _ in recs[i]], 1), tf[i], rtol=0, atol=1e-5)
        if cfg != 1.0:
            torch.testing.assert_close(torch.stack([u for _, u in recs[i]], 1), null[i], rtol=0, atol=1e-5)
        else:
            assert recs[i][0][1] is None  # no CFG, no doubled batch


def test_seeds_uniforms_and_forced_tokens_replay():
    m = tiny(2)
    a = m.sample([1, 2, 3], seed=40)
    assert a.shape == (3, 9, 2) and a.dtype == torch.long
    assert torch.equal(a, torch.cat([m.sample([1], seed=40), m.sample([2, 3], seed=[41, 42])]))
    u = torch.stack([torch.rand((9, 2), generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                     for s in (40, 41, 42)])
    assert torch.equal(m.sample([1, 2, 3], noise=u, seed=999), a)
    assert torch.equal(m.sample([1, 2, 3], noise=a), a)
    assert not torch.equal(m.sample([1, 2, 3], seed=41), a)
    with pytest.raises(TokUsageError, match="noise must be"):
        m.sample([1], noise=torch.zeros(1, 9, 3))
    with pytest.raises(TokUsageError, match="forced sub-token 0 is outside 0..3"):
        m.sample([1], noise=torch.full((1, 9, 2), 4))
    with pytest.raises(TokUsageError, match="uniforms must lie in"):
        m.sample([1], noise=torch.ones(1, 9, 2))


@pytest.mark.parametrize("opts, needle", [
    ({"cfg": [1, 2, 3]}, "cfg takes one value or 2"), ({"temperature": 0}, "temperature must be a number > 0"),
    ({"top_k": -1}, "top_k must be an integer >= 0"), ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"steps": 3}, "takes no sampler option steps"), ({"cfg": float("nan")}, "cfg must be a number >= 0"),
])
def test_bad_sampler_options_are_one_line(opts, needle):
    with pytest.raises(TokUsageError, match=None) as e:
        tiny().sample([0], **opts)
    assert needle in str(e.value)
    with pytest.raises(TokUsageError, match="class 4 is out of range"):
        tiny().sample([4])


def test_no_null_class_means_no_cfg():
    m = tiny(class_dropout_prob=0.0)
    assert m.null_class is None and m.class_emb.embedding_table.weight.shape[0] == 4
    with pytest.raises(TokUsageError, match="no null class"):
        m.sample([0], cfg=2.0)
    assert m.sample([0], cfg=1.0).shape == (1, 9, 2)


@pytest.mark.parametrize("args, needle", [
    ({"block_size": 8}, "not a square"), ({"n_head": 3}, "head size divisible by 4"),
    ({"factorized_bits": []}, "factorized_bits must be a list"), ({"bogus": 1}, "unknown wetok_ar model_args bogus"),
    ({"n_kv_head": 3, "n_head": 2}, "not a multiple of n_kv_head"), ({"norm_eps": -1}, "norm_eps"),
])
def test_bad_model_args(args, needle):
    with pytest.raises(TokError, match=None) as e:
        WeTokAR(**{**ARGS, **args})
    assert needle in str(e.value)


def _fake_tokenizer(groups: int, bits: int, grid: int):
    spec = SimpleNamespace(kind="indices", shape=(grid, grid, groups), extra={"groups": groups, "bits_per_group": bits})
    return SimpleNamespace(spec=spec, name="fake", family="wetok")


def test_tokens_for_and_back_through_a_tokenizer_layout():
    m = tiny(3)
    tok = _fake_tokenizer(1, 5, 3)  # one 5-bit group per position = the generator's 2 + 3 bits
    s = m.sample([0, 1], seed=3)
    t = m.tokens_for(s, tok)
    assert t.shape == (2, 3, 3, 1) and torch.equal(t[..., 0].reshape(2, 9), s[..., 0] + 4 * s[..., 1])
    back = m.subtokens_from_tokens(t, tok)
    assert torch.equal(torch.stack(back, -1), s)
    with pytest.raises(TokError, match="samples a 3x3 grid of 5 bits"):
        m.check_tokenizer(_fake_tokenizer(2, 3, 3))
    with pytest.raises(TokError, match="records no groups"):
        m.check_tokenizer(SimpleNamespace(spec=SimpleNamespace(kind="indices", shape=(3, 3), extra={}), name="x",
                                          family="y"))


def test_folder_round_trip(tmp_path):
    m = tiny(4)
    m.tokenizer_ref = {"name": "local-dir:tok", "sha256": None}
    m.save_folder(tmp_path / "g", name="g")
    g = WeTokAR.from_folder(tmp_path / "g")
    assert g.tokenizer_name == f"local-dir:{tmp_path / 'g' / 'tok'}"
    assert g.sample_defaults["cfg"] == 1.75 and g.sample_defaults["top_k"] == 0  # k != 4: one cfg for all
    assert torch.equal(g.sample([2], seed=9), m.sample([2], seed=9))
    loss, parts = g.loss(g(tuple(torch.zeros(1, 9, dtype=torch.long) for _ in range(2)) + (torch.tensor([1]),)),
                         [torch.zeros(1, 9, dtype=torch.long)] * 2)
    assert len(parts) == 2 and math.isfinite(float(loss))
