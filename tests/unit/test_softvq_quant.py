"""The soft vector quantizer (tokcli/quant/softvq.py), the ViT blocks (tokcli/nn/vit.py) and the SoftVQ model's
arguments, against independent re-derivations (numpy / plain torch) of the conventions in ../shared/research."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokcli.errors import MissingWeightsError, TokError
from tokcli.quant.softvq import SoftVectorQuantizer


def _quantizer(g=2, k=16, d=4, seed=0, **kw):
    torch.manual_seed(seed)
    q = SoftVectorQuantizer(k, d, g, **kw)
    with torch.no_grad():  # stored rows of any norm (the forward normalises them)
        q.embedding.copy_(torch.randn(g, k, d) * torch.rand(g, k, 1).add(0.5))
    return q


def test_contiguous_groups_cosine_softmax_mix_not_renormalised():
    q = _quantizer()
    z_hat = torch.randn(3, 8, 4)
    out = q(z_hat)
    c = F.normalize(q.embedding, dim=-1)
    for t in range(8):
        g = t // 4  # tokens 0..3 -> codebook 0, 4..7 -> codebook 1 (not interleaved)
        cos = F.normalize(z_hat[:, t], dim=-1) @ c[g].T
        p = torch.softmax(cos / 0.07, -1)
        assert torch.allclose(out.quantized[:, t], p @ c[g], atol=1e-6)
        assert torch.equal(out.ids[:, t], cos.argmax(-1))
    assert float(out.quantized.detach().norm(dim=-1).max()) <= 1 + 1e-6  # a convex mix of unit vectors
    assert torch.allclose(q.similarity(z_hat)[:, 5], F.normalize(z_hat[:, 5], dim=-1) @ c[1].T, atol=1e-6)


def test_entropy_term_is_h_q_minus_h_mean_q_at_its_own_temperature():
    q = _quantizer(k=8).train()
    z_hat = torch.randn(2, 8, 4)
    out = q(z_hat)
    logits = q.similarity(z_hat).reshape(-1, 8).double().numpy() / 0.01  # all groups pooled, temperature 0.01
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    h_rows = -(p * np.log(p)).sum(-1).mean()
    p_bar = p.mean(0)
    want = h_rows - (-(p_bar * np.log(p_bar + 1e-6)).sum())
    assert float(out.losses["entropy"]) == pytest.approx(want, abs=1e-4)
    assert "entropy" not in q.eval()(z_hat).losses  # inference: no training term


def test_codebook_gets_gradient_only_through_the_mix():
    q = _quantizer().train()
    z_hat = torch.randn(2, 8, 4, requires_grad=True)
    q(z_hat).losses["entropy"].backward()
    assert q.embedding.grad is None or float(q.embedding.grad.abs().max()) == 0  # detached in the similarities
    assert float(z_hat.grad.abs().max()) > 0
    q.zero_grad()
    q(z_hat).quantized.sum().backward()
    assert float(q.embedding.grad.abs().max()) > 0


def test_usage_and_perplexity_count_ids_per_group():
    q = _quantizer(g=2, k=4, d=3)
    ids = torch.tensor([[0, 0, 1, 1, 3, 3, 3, 3], [0, 0, 2, 2, 3, 3, 3, 3]])
    counts = q.code_counts(ids)
    assert counts.tolist() == [[4, 2, 2, 0], [0, 0, 0, 8]]
    s = q.usage_stats(ids)
    assert float(s["usage"]) == pytest.approx(4 / 8)  # 3 codes of group 0 + 1 of group 1, of 2 x 4
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert float(s["perplexity"]) == pytest.approx((math.exp(h0) + 1.0) / 2, rel=1e-6)


def test_decode_ids_is_the_hard_codeword_and_tends_to_the_soft_mix():
    q = _quantizer()
    z_hat = torch.randn(2, 8, 4)
    out = q(z_hat)
    hard = q.decode_ids(out.ids)
    c = F.normalize(q.embedding, dim=-1)
    assert torch.allclose(hard[0, 6], c[1, out.ids[0, 6]])
    cold = _quantizer(tau=1e-4)(z_hat)
    assert torch.allclose(cold.quantized, q.decode_ids(cold.ids), atol=1e-4)  # tau -> 0: the hard codeword
    with pytest.raises(ValueError):
        q.decode_ids(torch.full((1, 8), 16))


def test_shapes_are_checked():
    q = _quantizer(g=3)
    with pytest.raises(ValueError, match="3 equal"):
        q(torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match=r"\[B, L, 4\]"):
        q(torch.randn(1, 6, 5))


def test_unpatchify_layout_row_col_rgb():
    from tokcli.nn.vit import unpatchify

    p, grid = 2, 3
    patches = torch.arange(grid * grid * p * p * 3, dtype=torch.float32).reshape(1, grid * grid, p * p * 3)
    img = unpatchify(patches, p)
    for i, r, c, ch in ((0, 0, 0, 0), (4, 1, 0, 2), (8, 1, 1, 1), (5, 0, 1, 0)):
        assert img[0, ch, p * (i // grid) + r, p * (i % grid) + c] == patches[0, i, (r * p + c) * 3 + ch]


def test_vit_names_and_fused_attention():
    from tokcli.nn.vit import build_vit, vit_arch

    assert vit_arch("vit_large_patch14_dinov2.lvd142m") == (1024, 16, 24)
    with pytest.raises(TokError, match="unsupported ViT"):
        vit_arch("vit_giant_patch14_dinov2.lvd142m")
    v = build_vit("vit_small_patch14_dinov2", depth=2, image_size=32, patch_size=16)
    assert len(v.blocks) == 2 and all(b.attn.fused_attn for b in v.blocks)
    assert v.pos_embed.shape == (1, 1 + 4, 384) and v.norm.eps == 1e-6
    assert float(v.blocks[0].ls1.gamma.detach().max()) == pytest.approx(1e-5)


def test_tok_tiny_width_and_layer_scale_init():
    """tok_vit_tiny: the DINOv2 block at width 192 / 3 heads for CPU demos; it has no DINOv2 weights to load.
    layer_scale_init sets only the initial LayerScale (a loaded checkpoint overwrites it)."""
    from tokcli.families.softvq.model import SoftVQ
    from tokcli.nn.vit import dinov2_repo

    m = SoftVQ(encoder_model="tok_vit_tiny", decoder_model="tok_vit_tiny", encoder_depth=1, decoder_depth=1,
               image_size=32, num_latent_tokens=4, codebook_embed_dim=4, codebook_size=8, num_codebooks=2,
               layer_scale_init=0.1)
    assert m.encoder.width == m.decoder.width == 192 and m.encoder.model.blocks[0].attn.num_heads == 3
    assert torch.all(m.decoder.model.blocks[0].ls2.gamma == 0.1)
    with pytest.raises(TokError, match="tok_vit_tiny is tok.s own ViT width: no DINOv2 weights"):
        dinov2_repo("tok_vit_tiny")


def test_dinov2_init_reads_the_local_cache_only(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    from tokcli.nn.vit import build_vit, load_dinov2

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    vit = build_vit("vit_small_patch14_dinov2", depth=1, image_size=32, patch_size=16)
    monkeypatch.delenv("TOK_DOWNLOAD", raising=False)
    with pytest.raises(MissingWeightsError, match="hf download timm/vit_small_patch14_dinov2.lvd142m"):
        load_dinov2(vit, "vit_small_patch14_dinov2.lvd142m")
    monkeypatch.setenv("TOK_DOWNLOAD", "1")  # asked for, but HF_HUB_OFFLINE forbids it: still one line, no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE is set, so it is not downloaded"):
        load_dinov2(vit, "vit_small_patch14_dinov2.lvd142m")
    monkeypatch.delenv("TOK_DOWNLOAD")
    torch.manual_seed(0)  # a stand-in for timm's DINOv2 file: patch 14 at 56 px
    src = VisionTransformer(img_size=56, patch_size=14, num_classes=0, embed_dim=384, depth=1, num_heads=6,
                            init_values=1e-5)
    rev = "0" * 40
    repo = tmp_path / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()},
              str(repo / "snapshots" / rev / "model.safetensors"))
    load_dinov2(vit, "vit_small_patch14_dinov2.lvd142m")
    assert torch.equal(vit.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    assert vit.patch_embed.proj.weight.shape == (384, 3, 16, 16) and vit.pos_embed.shape == (1, 5, 384)


def test_model_args_are_checked():
    from tokcli.families.softvq.model import normalize_model_args

    base = {"encoder_model": "vit_small_patch14_dinov2.lvd142m", "decoder_model": "vit_base_patch14_dinov2",
            "num_latent_tokens": 8, "codebook_embed_dim": 4}
    a = normalize_model_args(base)
    assert (a["encoder_depth"], a["decoder_depth"], a["num_codebooks"], a["tau"]) == (12, 12, 4, 0.07)
    with pytest.raises(TokError, match="unknown SoftVQ model_args repa"):
        normalize_model_args({**base, "repa": True})
    with pytest.raises(TokError, match="multiple of num_codebooks"):
        normalize_model_args({**base, "num_latent_tokens": 6})
    with pytest.raises(TokError, match="need codebook_embed_dim"):
        normalize_model_args({k: v for k, v in base.items() if k != "codebook_embed_dim"})
    with pytest.raises(TokError, match="vq_std"):
        normalize_model_args({**base, "vq_std": 0})


def test_model_encode_decode_and_training_aux():
    from tokcli.families.softvq.model import SoftVQ

    torch.manual_seed(0)
    m = SoftVQ(encoder_model="vit_small_patch14_dinov2", decoder_model="vit_small_patch14_dinov2",
               encoder_depth=1, decoder_depth=1, image_size=32, num_latent_tokens=4, codebook_embed_dim=4,
               codebook_size=8, num_codebooks=2, vq_mean=0.1, vq_std=0.5, normalize_latents=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        t = m.eval().encode(x)
        z = m.quantize_images(x).quantized
        assert torch.allclose(t, (z - 0.1) / 0.5) and m.spec.shape == (4, 4)
        assert torch.allclose(m.decode(t, clamp=False), m.decode_latents(z), atol=1e-6)
    with pytest.raises(TokError, match=r"\[N, 4, 4\]"):
        m.decode(torch.zeros(1, 4, 5))
    recon, aux = m.train()(x)
    assert recon.shape == x.shape and {"entropy", "usage", "perplexity", "zq_cos", "ids", "z"} <= set(aux)
