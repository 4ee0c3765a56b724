"""Parity of tokcli.quant.msrq (CODA quantizer) with the official-code fixture in <parity>/coda."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CODA_PARITY, requires_coda_parity
from tokcli.quant.msrq import MultiScaleAttentionQuantizer

FIX = CODA_PARITY
pytestmark = requires_coda_parity

TOL_LEVEL_INPUTS = 2.5e-4   # README: latent / level_inputs
TOL_CODES = 1e-5            # README: f_hat / level_codes / code_values / code_keys


def _load(coda_config, name: str) -> MultiScaleAttentionQuantizer:
    q = MultiScaleAttentionQuantizer.from_config(coda_config)
    sd = torch.load(FIX / name, map_location="cpu", weights_only=True)
    q.load_state_dict(sd, strict=True)
    return q.eval()


@pytest.fixture(scope="module")
def quant(coda_config):
    return _load(coda_config, "quantizer_ema.pth")


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_config_and_layout(coda_config, quant, coda_expected):
    assert quant.patch_size_list == list(coda_expected["scales"]) == coda_config["patch_size_list"]
    assert quant.num_tokens == coda_expected["level_indices"].shape[1] == 680
    assert quant.level_offsets == [0, 1, 5, 14, 30, 55, 91, 155, 255, 424]
    assert quant.attn.attn_dim == coda_config["vq_attn_dim"] and quant.beta == coda_config["vq_commitment_beta"]
    sd = torch.load(FIX / "quantizer_ema.pth", map_location="cpu", weights_only=True)
    assert sorted(quant.state_dict()) == sorted(sd)


def test_tables(quant, coda_expected):
    with torch.no_grad():
        c = quant.codebooks.weight
        assert _maxdiff(quant.attn.values(c), coda_expected["code_values"]) <= TOL_CODES
        assert _maxdiff(quant.attn.keys(c), coda_expected["code_keys"]) <= TOL_CODES


@pytest.mark.parametrize("suffix", ["", "_sampled"])
def test_encode_matches_official(quant, coda_expected, suffix):
    latent = torch.from_numpy(coda_expected["latent" + suffix])
    ids = quant.encode(latent)
    want = quant.split_indices(torch.from_numpy(coda_expected["level_indices" + suffix]))
    assert len(ids) == len(want) == 10
    for lvl, (got, exp, pn) in enumerate(zip(ids, want, quant.patch_size_list)):
        assert got.dtype == torch.int64 and got.shape == (2, pn, pn)
        assert torch.equal(got, exp), f"level {lvl} (pn={pn}): {(got != exp).sum().item()} ids differ"
    assert torch.equal(quant.flatten_indices(ids), torch.from_numpy(coda_expected["level_indices" + suffix]))


@pytest.mark.parametrize("suffix", ["", "_sampled"])
def test_trace_intermediates(quant, coda_expected, suffix):
    tr = quant.trace(torch.from_numpy(coda_expected["latent" + suffix]))
    assert np.array_equal(tr.indices.numpy(), coda_expected["level_indices" + suffix])
    assert _maxdiff(tr.f_hat, coda_expected["f_hat" + suffix]) <= TOL_CODES
    assert _maxdiff(tr.logit_margin, coda_expected["logit_margin" + suffix]) <= 1e-4
    if not suffix:
        assert _maxdiff(tr.level_inputs, coda_expected["level_inputs"]) <= TOL_LEVEL_INPUTS
        assert _maxdiff(tr.level_codes, coda_expected["level_codes"]) <= TOL_CODES


def test_forward_outputs_and_losses(quant, coda_expected):
    out = quant(torch.from_numpy(coda_expected["latent"]))
    assert _maxdiff(out.quantized.detach(), coda_expected["f_hat"]) <= TOL_CODES
    assert np.array_equal(quant.flatten_indices(out.ids).numpy(), coda_expected["level_indices"])
    assert out.losses["vq"].item() == pytest.approx(float(coda_expected["vq_loss"]), rel=1e-5, abs=1e-6)
    assert out.losses["entropy"].item() == pytest.approx(float(coda_expected["entropy_loss"]), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("suffix", ["", "_sampled"])
def test_decode_ids(quant, coda_expected, suffix):
    flat = torch.from_numpy(coda_expected["level_indices" + suffix])
    assert _maxdiff(quant.decode_ids(flat), coda_expected["f_hat" + suffix]) <= TOL_CODES
    per_level = [t.unsqueeze(1) for t in quant.split_indices(flat)]  # official [B, 1, pn, pn] form
    assert _maxdiff(quant.decode_ids(per_level), coda_expected["f_hat" + suffix]) <= TOL_CODES


def test_raw_weights_are_caught(coda_config, coda_expected):
    """Loading the non-EMA file must visibly change ids and f_hat (so these tests would catch the wrong file)."""
    raw = _load(coda_config, "quantizer.pth")
    tr = raw.trace(torch.from_numpy(coda_expected["latent"]))
    frac = (tr.indices.numpy() != coda_expected["level_indices"]).mean()
    assert frac > 0.2, f"only {frac:.1%} ids differ"
    assert _maxdiff(tr.f_hat, coda_expected["f_hat"]) > 0.1


def test_strict_load_rejects_wrong_shapes(coda_config):
    sd = torch.load(FIX / "quantizer_ema.pth", map_location="cpu", weights_only=True)
    bad = MultiScaleAttentionQuantizer.from_config(dict(coda_config, vq_attn_dim=coda_config["vq_attn_dim"] * 2))
    with pytest.raises(RuntimeError):
        bad.load_state_dict(sd, strict=True)
    missing = dict(sd)
    missing.pop("attn.norm_k.weight")
    with pytest.raises(RuntimeError):
        MultiScaleAttentionQuantizer.from_config(coda_config).load_state_dict(missing, strict=True)


def _reference_forward(q: MultiScaleAttentionQuantizer, f: torch.Tensor):
    """Plain transcription of the official algorithm with dense one-hot tensors (independent of the module's
    gather formulation), used to compare gradients."""
    B, D, H, W = f.shape
    C = q.codebooks.weight
    k = q.attn.norm_k(q.attn.to_k(C))
    v = q.attn.to_v(C)
    f_hat, res, losses = torch.zeros_like(f), f.clone(), []
    for pn in q.patch_size_list:
        r = F.interpolate(res, size=(pn, pn), mode="area")
        x = r.permute(0, 2, 3, 1).reshape(B, pn * pn, D)
        logits = q.attn.norm_q(q.attn.to_q(x)) @ k.t() / math.sqrt(k.shape[-1])
        soft = logits.softmax(-1)
        hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
        z = (hard - soft.detach() + soft) @ v
        z2 = hard @ v
        losses.append(((z - x) ** 2).mean() + ((z2.detach() - x) ** 2).mean()
                      + q.beta * ((z2 - x.detach()) ** 2).mean())
        up = F.interpolate(z.reshape(B, pn, pn, D).permute(0, 3, 1, 2), size=(H, W), mode="bicubic")
        f_hat, res = f_hat + up, res - up
    return f_hat, torch.stack(losses).mean()


def test_gradients_match_one_hot_formulation(quant, coda_expected):
    lat = torch.from_numpy(coda_expected["latent"][:1])
    grads = []
    def module_forward(x):
        out = quant(x)
        return out.quantized, out.losses["vq"]

    for fn in (module_forward, lambda x: _reference_forward(quant, x)):
        quant.zero_grad()
        x = lat.clone().requires_grad_(True)
        qz, vq = fn(x)
        ((qz * torch.linspace(-1, 1, qz.numel()).reshape(qz.shape)).sum() + vq).backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in quant.parameters()])
    quant.zero_grad()
    for a, b in zip(*grads):
        scale = float(b.abs().max())
        assert scale > 0 and float((a - b).abs().max()) <= 1e-5 * scale + 1e-7, (float((a - b).abs().max()), scale)
