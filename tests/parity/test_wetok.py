"""WeTok: parity with the official implementation through the converter, plus GD / stage-2 behaviour."""


import numpy as np
import pytest
import torch

from tokcli.core.model import TokModel
from tokcli.errors import TokError
from tokcli.families.wetok.convert import convert_official
from tokcli.families.wetok.model import WeTok, official_model_args

from conftest import PARITY as PARITY_ROOT

PARITY = PARITY_ROOT / "wetok"
needs_parity = pytest.mark.skipif(not (PARITY / "expected.npz").is_file(),
                                  reason=f"WeTok parity fixture not found at {PARITY} (set TOK_PARITY_DIR)")

TINY = {"ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1, "z_channels": 16, "groups": 2, "codebook_size": 256,
        "image_size": 64}
SMALL = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 16, "groups": 2, "image_size": 16}


@pytest.fixture(scope="module")
def expected():
    return np.load(PARITY / "expected.npz")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wetok")
    plain = convert_official(PARITY / "WeTok.ckpt", PARITY / "config.yaml", root / "plain", name="wetok-parity")
    gd = convert_official(PARITY / "WeTok_gd.ckpt", PARITY / "config_gd.yaml", root / "gd")
    return {"plain": plain, "gd": gd, "root": root}


@pytest.fixture(scope="module")
def models(folders):
    return {k: TokModel.from_folder(folders[k].path) for k in ("plain", "gd")}


def _check_parity(model, expected, prefix):
    x = torch.from_numpy(expected["input"])
    with torch.inference_mode():
        z = model.encode_latent(x)
        codes = model.quantize.quantize(z)
        idx = model.encode(x)
        noise = torch.from_numpy(expected["gd_noise"]) if prefix else None
        recon = model.decode_codes(codes, noise=noise)
        recon_tok = model.decode(idx, noise=noise, clamp=False)
    assert (z - torch.from_numpy(expected[prefix + "pre_quant"])).abs().max().item() <= 2e-4
    assert np.array_equal(codes.numpy(), expected[prefix + "codes"])
    b, h, w, g = idx.shape
    assert np.array_equal(idx.reshape(b, h * w, g).numpy(), expected[prefix + "indices"])
    assert np.array_equal(idx.reshape(-1).numpy(), expected[prefix + "indices_flat"])
    for r in (recon, recon_tok):
        d = (r - torch.from_numpy(expected[prefix + "recon"])).abs()
        assert d.max().item() <= 1e-3 and d.mean().item() <= 1e-5
    # the non-EMA weights give clearly different images: we really loaded the EMA shadows
    assert (recon - torch.from_numpy(expected[prefix + "recon_nonema"])).abs().max().item() > 0.1
    # decoding codes rebuilt from the indices gives the same image as decoding the quantizer output
    assert (recon_tok - recon).abs().max().item() <= 1e-5


@needs_parity
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parity_plain(models, expected, layout):
    m = models["plain"].set_memory_format(layout)  # both layouts give the official outputs
    assert not m.stochastic_decoder
    _check_parity(m, expected, "")


@needs_parity
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parity_generative_decoder(models, expected, layout):
    m = models["gd"].set_memory_format(layout)
    assert m.stochastic_decoder and m.decoder.conv_in.in_channels == 32
    _check_parity(m, expected, "gd_")


@needs_parity
def test_converted_folder(folders):
    cfg = folders["plain"].config
    assert cfg["family"] == "wetok" and cfg["name"] == "wetok-parity"
    assert cfg["model_args"]["groups"] == 2 and cfg["model_args"]["ch_mult"] == [1, 1, 2]
    assert cfg["tokens"]["shape"] == [64, 64, 2]  # image_size 256 by default, downsample 4
    assert cfg["tokens"]["codebook_size"] == 256 and cfg["tokens"]["downsample"] == 4
    assert cfg["decode"] == {} and folders["gd"].config["decode"] == {"seed": 0}
    prov = cfg["provenance"]
    assert prov["ema_tensors"] == 81 and prov["raw_tensors"] == 0 and prov["license"] == "apache-2.0"
    assert len(prov["source_sha256"]) == 64
    gprov = folders["gd"].config["provenance"]
    assert gprov["raw_tensors"] == 34 and gprov["ema_tensors"] == 47  # stage-2 file: no encoder shadows
    for f in (folders["plain"], folders["gd"]):
        keys = list(f.state_dict())
        assert not any(k.startswith(("loss", "model_ema", "quantize")) for k in keys)
        assert all(k.startswith(("encoder.", "decoder.")) for k in keys)
        assert f.verify()


@needs_parity
def test_gd_detected_from_weight_shape(folders):
    # the plain config (no gan_decoder) with the GD checkpoint: the shape wins, the disagreement is recorded
    f = convert_official(PARITY / "WeTok_gd.ckpt", PARITY / "config.yaml", folders["root"] / "gd_from_plain_cfg")
    assert f.config["model_args"]["generative_decoder"] is True
    assert "notes" in f.config["provenance"]
    f2 = convert_official(PARITY / "WeTok.ckpt", None, folders["root"] / "from_args",
                          model_args={**TINY, "generative_decoder": True})
    assert f2.config["model_args"]["generative_decoder"] is False


@needs_parity
def test_gd_seeded_decoding(models, expected):
    m = models["gd"]
    idx = torch.from_numpy(expected["gd_indices"]).reshape(2, 16, 16, 2)[:1, :8, :8]
    with torch.inference_mode():
        a = m.decode(idx, seed=1)
        b = m.decode(idx, seed=1)
        c = m.decode(idx, seed=2)
        d = m.decode(idx)  # decode.seed = 0 from the folder
        e = m.decode(idx, seed=0)
    assert torch.equal(a, b) and torch.equal(d, e)
    assert (a - c).abs().max().item() > 1e-3
    assert a.min() >= -1 and a.max() <= 1


@needs_parity
def test_batch_independence(models, expected):
    m = models["plain"]
    x = torch.from_numpy(expected["input"])
    with torch.inference_mode():
        both = m.encode(x)
        one = m.encode(x[1:2])
    assert torch.equal(both[1:2], one)


def test_extend_to_generative_keeps_outputs():
    torch.manual_seed(0)
    m = WeTok(**SMALL).eval()
    gd = m.extend_to_generative()
    assert gd.stochastic_decoder and not m.stochastic_decoder
    assert gd.model_args["generative_decoder"] and gd.decoder.conv_in.weight.shape[1] == 32
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        tok = m.encode(x)
        ref = m.decode(tok, clamp=False)
        out = gd.decode(tok, noise=torch.randn(1, 16, 8, 8) * 3, clamp=False)
        out2 = gd.decode(tok, seed=5, clamp=False)
    assert torch.equal(gd.encode(x), tok)
    assert (out - ref).abs().max().item() <= 1e-5 and (out2 - ref).abs().max().item() <= 1e-5
    # the extended model's weights load into a freshly built GD model
    fresh = WeTok(**{**SMALL, "generative_decoder": True})
    fresh.load_state_dict(gd.state_dict(), strict=True)


def test_training_forward_and_freeze():
    torch.manual_seed(0)
    m = WeTok(**{**SMALL, "entropy_mode": "paper"}).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, aux = m(x)
    assert recon.shape == x.shape and aux["indices"].shape == (2, 8, 8, 2)
    assert aux["per_sample_entropy"].item() > 0 and aux["commitment"].item() > 0
    (recon.abs().mean() + 0.1 * aux["entropy_aux"] + 0.25 * aux["commitment"]).backward()
    assert m.encoder.conv_in.weight.grad is not None
    gd = m.extend_to_generative().freeze_encoder().train()
    assert not gd.encoder.training and gd.decoder.training
    recon, aux = gd(x)
    assert aux["entropy_aux"].item() == 0.0
    recon.mean().backward()
    assert gd.encoder.conv_in.weight.grad is None and gd.decoder.conv_in.weight.grad is not None


def test_spec_and_preprocess_ds16():
    m = WeTok(**{"ch": 32, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 1, "z_channels": 32, "groups": 4})
    spec = m.spec
    assert spec.shape_for(256, 256) == (16, 16, 4)
    assert spec.shape == (16, 16, 4) and spec.codebook_size == 256 and spec.downsample == 16
    assert spec.extra == {"groups": 4, "bits_per_group": 8} and "LSB-first" in spec.layout
    assert m.preprocess == {"image_size": 256, "crop": "adm_center", "value_range": [-1, 1], "multiple_of": 16}


def test_model_args_validation():
    with pytest.raises(TokError, match="z_channels"):
        WeTok(**{**TINY, "z_channels": 24})
    with pytest.raises(TokError, match="unknown"):
        WeTok(**{**TINY, "bogus": 1})
    with pytest.raises(TokError, match="power of two"):
        WeTok(**{**TINY, "codebook_size": 200})
    args = official_model_args({"ddconfig": {"ch": 256, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 4,
                                             "z_channels": 64, "double_z": False}, "embed_dim": 64,
                                "n_embed": 256, "num_codebooks": 8})
    assert args["groups"] == 8 and args["codebook_size"] == 256 and not args["generative_decoder"]


def test_decode_rejects_bad_tokens():
    m = WeTok(**TINY).eval()
    with pytest.raises(TokError, match="invalid wetok tokens"):
        m.decode(torch.full((1, 4, 4, 2), 256))
    with pytest.raises(TokError):
        m.decode(torch.zeros(1, 4, 4, 2, dtype=torch.long), noise=torch.zeros(1, 16, 4, 4))
    with pytest.raises(TokError, match="multiple"):
        m.encode(torch.zeros(1, 3, 30, 30))


def test_convert_errors(tmp_path):
    cfg = PARITY / "config.yaml"
    with pytest.raises(TokError) as e:
        convert_official(tmp_path / "missing.ckpt", None, tmp_path / "out", model_args=TINY)
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(TokError) as e:
        convert_official(garbage, None, tmp_path / "out", model_args=TINY)
    assert "cannot read" in str(e.value) and "\n" not in str(e.value)
    notlightning = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(1)}, notlightning)
    with pytest.raises(TokError, match="not a Lightning checkpoint") as e:
        convert_official(notlightning, None, tmp_path / "out", model_args=TINY)
    assert "\n" not in str(e.value)
    with pytest.raises(TokError, match="config"):
        convert_official(notlightning, None, tmp_path / "out")
    # a checkpoint that does not match the architecture names the offending tensor
    small = WeTok(**{**TINY, "ch": 64})
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": small.state_dict()}, wrong)
    with pytest.raises(TokError, match="encoder.conv_in.weight"):
        convert_official(wrong, None, tmp_path / "out", model_args=TINY)
    if cfg.is_file():
        with pytest.raises(TokError, match="already exists"):
            tmp = tmp_path / "exists"
            tmp.mkdir()
            convert_official(PARITY / "WeTok.ckpt", cfg, tmp)
    assert not (tmp_path / "out").exists()


def test_depth_to_space_is_dcr():
    from tokcli.nn.conv_resnet import depth_to_space_dcr

    c = 3
    x = torch.randn(2, 4 * c, 5, 7)
    y = depth_to_space_dcr(x, 2)
    assert y.shape == (2, c, 10, 14)
    for ch in range(c):
        for i in range(2):
            for j in range(2):  # output channel ch at sub-pixel (i, j) <- input channel (2 i + j) * C + ch
                assert torch.equal(y[:, ch, i::2, j::2], x[:, (2 * i + j) * c + ch])
    assert not torch.equal(y, torch.nn.functional.pixel_shuffle(x, 2))  # CRD would be wrong
    cl = depth_to_space_dcr(x.contiguous(memory_format=torch.channels_last), 2)
    assert torch.equal(cl, y) and cl.is_contiguous(memory_format=torch.channels_last)


def test_adaptive_group_norm_values():
    from tokcli.nn.conv_resnet import AdaptiveGroupNorm

    torch.manual_seed(0)
    ada = AdaptiveGroupNorm(4, 32)
    x, style = torch.randn(2, 32, 3, 5), torch.randn(2, 4, 3, 5)
    flat = style.flatten(2)
    var = ((flat - flat.mean(-1, keepdim=True)) ** 2).sum(-1) / (flat.shape[-1] - 1)  # unbiased
    scale = ada.gamma(torch.sqrt(var + 1e-6))[:, :, None, None]
    shift = ada.beta(flat.mean(-1))[:, :, None, None]
    want = torch.nn.functional.group_norm(x, 32, eps=1e-6) * scale + shift
    assert torch.allclose(ada(x, style), want, atol=1e-5)


def test_gd_per_image_seeds_do_not_depend_on_batching():
    torch.manual_seed(0)
    m = WeTok(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=16, groups=2, generative_decoder=True,
              image_size=16).eval()
    tokens = torch.randint(0, 256, (3, 8, 8, 2))
    with torch.inference_mode():
        whole = m.decode(tokens, seed=[10, 11, 12])
        parts = torch.cat([m.decode(tokens[i:i + 1], seed=[10 + i]) for i in range(3)])
        other = m.decode(tokens, seed=[10, 11, 13])
    # same noise per image whatever the batching (conv results may differ in the last float bits by batch size)
    assert torch.allclose(whole, parts, atol=1e-5, rtol=0)
    assert torch.equal(whole[:2], other[:2]) and float((whole[2] - other[2]).abs().max()) > 1e-2
