"""FlowMo on a tiny random model (no fixture needed): the sampler's grids, guidance interval, batched CFG, per-image
seeds and replayed noise; the strided LFQ id convention; bad tokens, sampler keywords and converter inputs refused
with one clear error; `tok convert flowmo-lo` from the Hugging Face cache and offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FLOWMO_TINY, run_tok
from tokcli.errors import TokError, TokUsageError

TINY = FLOWMO_TINY
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tiny_flowmo):
    return tiny_flowmo


@pytest.fixture(scope="module")
def ids(flowmo_ids):
    return flowmo_ids


# --- sampler ------------------------------------------------------------------------------------------------
def test_pow_and_linear_grids():
    from tokcli.families.flowmo.sampler import time_grid

    ts, dts = time_grid(4, "pow_0.25")
    assert ts.dtype == torch.float32 and ts.tolist() == [1.0, 0.31640625, 0.0625, 0.00390625]
    assert (dts.sum() - 1).abs() < 1e-6 and dts[-1] == ts[-1]
    ts, dts = time_grid(4, "linear")
    assert ts.tolist() == [1.0, 0.75, 0.5, 0.25] and dts.tolist() == [0.25] * 4
    lin, _ = time_grid(5, "pow_1")  # rho = 1 is the linear grid
    assert torch.allclose(lin, time_grid(5, "linear")[0])


def test_guidance_interval_of_the_official_25_steps():
    from tokcli.families.flowmo.sampler import guidance_interval, guided_steps, time_grid

    lo, hi = guidance_interval([0.17, 1.02])
    assert lo == pytest.approx(0.17 / 1.17) and hi == pytest.approx(1.02 / 2.02)
    g = guided_steps(time_grid(25)[0], 1.5, (lo, hi))
    assert sum(g) == 6 and [i for i, x in enumerate(g) if x] == list(range(4, 10))  # 25 + 6 = 31 passes
    assert not any(guided_steps(time_grid(25)[0], 1.0, (lo, hi)))
    assert all(guided_steps(time_grid(3)[0], 2.0, guidance_interval("all")))
    assert guidance_interval(None) is None
    assert guidance_interval("(.17,1.02)") == (lo, hi)


def test_batched_cfg_equals_two_calls(tiny, ids):
    from tokcli.families.flowmo.sampler import sample

    cond = tiny.condition(tiny.codes_from_ids(ids))
    z0 = tiny.initial_noise(3, seed=0)
    calls = []

    def counted(z, t, c):
        calls.append(z.shape[0])
        return tiny.velocity(z, t, c)

    with torch.inference_mode():
        one = sample(counted, z0, cond, steps=6, cfg=2.0, cfg_interval="all", batched_cfg=True)
        n_batched = len(calls)
        two = sample(counted, z0, cond, steps=6, cfg=2.0, cfg_interval="all", batched_cfg=False)
    assert n_batched == 6 and calls[:6] == [6] * 6 and len(calls) == 6 + 12
    assert float((one - two).abs().max()) < 1e-5


def test_seeds_are_per_image_and_noise_replays(tiny, ids):
    from tokcli.families.flowmo.sampler import make_noise

    kw = dict(steps=3, cfg=1.5, cfg_interval="all")
    with torch.inference_mode():
        full = tiny.decode(ids, seed=[10, 11, 12], **kw)
        one = tiny.decode(ids[1:2], seed=[11], **kw)
        same_int = tiny.decode(ids, seed=10, **kw)  # an int seeds image i with seed + i
        replay = tiny.decode(ids, noise=make_noise([10, 11, 12], (3, 16, 16), "cpu"), **kw)
        other = tiny.decode(ids, seed=[20, 21, 22], **kw)
    assert torch.equal(make_noise([11], (3, 16, 16), "cpu")[0], make_noise([10, 11], (3, 16, 16), "cpu")[1])
    assert float((full[1:2] - one).abs().max()) < 1e-5
    assert torch.equal(full, same_int) and torch.equal(full, replay)
    assert float((full - other).abs().max()) > 1e-3
    assert float(full.abs().max()) <= 1


def test_defaults_and_keywords(tiny, ids):
    assert tiny.decode_defaults["steps"] == 25 and tiny.decode_defaults["schedule"] == "pow_0.25"
    with torch.inference_mode():
        a = tiny.decode(ids[:1], seed=0, steps=2, schedule="linear", clamp=False)
        b = tiny.decode(ids[:1], seed=0, steps=2, schedule="pow_0.25", clamp=False)
    assert float((a - b).abs().max()) > 1e-4
    with pytest.raises(TokUsageError, match="takes: steps, cfg, schedule, cfg_interval"):
        tiny.decode(ids, seed=0, eta=1.0)


@pytest.mark.parametrize("kw,msg", [({"steps": 0}, "positive integer"), ({"steps": 2.5}, "positive integer"),
                                    ({"schedule": "cosine"}, "unknown FlowMo sampler schedule"),
                                    ({"schedule": "pow_-1"}, "unknown FlowMo sampler schedule"),
                                    ({"cfg": float("nan")}, "finite"),
                                    ({"cfg_interval": [1.0]}, "cfg_interval"),
                                    ({"cfg_interval": "some"}, "cfg_interval")])
def test_bad_sampler_keywords(tiny, ids, kw, msg):
    with pytest.raises(TokError, match=msg):
        tiny.decode(ids, seed=0, **{"steps": 1, **kw})


# --- tokens -------------------------------------------------------------------------------------------------
def test_strided_lsb_ids():
    from tokcli.quant.lfq_groups import StridedLFQ

    q = StridedLFQ(6, 3)  # fh = 2: sub-token h of position t uses channels h, h + 2, h + 4
    code = torch.tensor([[[1.0, -1, -1, 1, 1, 0]]])  # 0 counts as -1
    assert q.ids(code).tolist() == [[1 + 4, 2]]
    assert torch.equal(q.decode_ids(q.ids(code)), torch.where(code > 0, 1.0, -1.0))
    z = torch.randn(2, 5, 6)
    out = q.train()(z)
    assert torch.equal(out.ids, q.ids(z)) and set(out.losses) == {"entropy_aux", "commitment"}
    assert torch.equal(out.quantized.detach(), q.decode_ids(out.ids))


def test_spec_and_encode(tiny):
    s = tiny.spec
    assert s.kind == "indices" and s.shape == (8,) and s.codebook_size == 8 and s.downsample is None
    assert s.extra == {"code_length": 4, "context_dim": 6, "fg": 3, "fh": 2, "bit_layout": "flowmo-strided-lsb",
                       "bits_per_image": 24}
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        ids = tiny.encode(x)
    assert ids.shape == (2, 8) and ids.dtype == torch.int64 and int(ids.max()) < 8
    with pytest.raises(TokError, match="takes only 16x16"):
        tiny.encode(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("bad,msg", [(np.full((1, 8), 8), r"\[0, 7\]"), (np.full((1, 8), -1), r"\[0, 7\]"),
                                     (np.zeros((1, 9), dtype=int), r"\[N, 8\]"), (np.zeros((1, 8)), "integers")])
def test_bad_tokens(tiny, bad, msg):
    with pytest.raises(TokError, match=msg):
        tiny.decode(bad, seed=0, steps=1)


def test_bad_noise(tiny, ids):
    with pytest.raises(TokError, match="noise must have shape"):
        tiny.decode(ids, noise=torch.zeros(3, 3, 8, 8), steps=1)
    with pytest.raises(TokError, match="2 seeds for a batch of 3"):
        tiny.decode(ids, seed=[1, 2], steps=1)


# --- converter ----------------------------------------------------------------------------------------------
def _official_files(tmp_path, model, args, extra_cfg: str = ""):
    """The model as an official .pth (EMA + raw) + a config.yaml in the official layout."""
    sd = model.state_dict()
    pth = tmp_path / "flowmo.pth"
    torch.save({"total_steps": 1, "model_ema_state_dict": sd, "model_state_dict": sd}, pth)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"data:\n  image_size: {args['image_size']}\nmodel:\n  patch_size: {args['patch_size']}\n"
        f"  code_length: {args['code_length']}\n  context_dim: {args['context_dim']}\n"
        f"  codebook_size_for_entropy: {args['codebook_size_for_entropy']}\n  quantization_type: lfq\n"
        f"  enable_mup: true\n  enc_depth: 1\n  dec_depth: 1\n  mup_width: 6\n{extra_cfg}"
        f"eval:\n  sampling:\n    sample_steps: 7\n    schedule: pow_0.25\n    cfg: 1.5\n"
        f"    mode: rf\n    cfg_interval: (.17,1.02)\n")
    return pth, cfg


def test_convert_round_trip(tiny, tmp_path):
    import tokcli
    from tokcli.families.flowmo.convert import convert_official

    pth, cfg = _official_files(tmp_path, tiny, TINY)
    convert_official(pth, cfg, tmp_path / "out")
    m = tokcli.load(f"local-dir:{tmp_path / 'out'}", device="cpu")
    assert m.decode_defaults == {"seed": 0, "steps": 7, "cfg": 1.5, "schedule": "pow_0.25",
                                 "cfg_interval": [0.17, 1.02]}
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(m.encode(x), tiny.encode(x))
        assert torch.equal(m.decode(m.encode(x), seed=4, steps=2), tiny.decode(tiny.encode(x), seed=4, steps=2))


@pytest.mark.parametrize("change,msg", [(("context_dim: 6", "context_dim: 3"), "context_dim=3"),
                                        (("patch_size: 4", "patch_size: 2"), "patch_size=2"),
                                        (("quantization_type: lfq", "quantization_type: kl"), "not supported"),
                                        (("model:", "modelx:"), "no 'model' block")])
def test_convert_refuses_a_config_that_does_not_fit(tiny, tmp_path, change, msg):
    from tokcli.families.flowmo.convert import convert_official

    pth, cfg = _official_files(tmp_path, tiny, TINY)
    cfg.write_text(cfg.read_text().replace(*change))
    with pytest.raises(TokError, match=msg):
        convert_official(pth, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_convert_refuses_a_file_without_ema(tiny, tmp_path):
    from tokcli.families.flowmo.convert import convert_official

    pth, cfg = _official_files(tmp_path, tiny, TINY)
    torch.save({"state_dict": tiny.state_dict()}, pth)
    with pytest.raises(TokError, match="has no model_ema_state_dict"):
        convert_official(pth, cfg, tmp_path / "out")
    torch.save({"model_ema_state_dict": {"encoder.img_in.weight": torch.zeros(2, 2)}}, pth)
    with pytest.raises(TokError, match="not a FlowMo checkpoint"):
        convert_official(pth, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tok_convert_flowmo_lo_from_the_hf_cache_and_offline(tmp_path):
    from tokcli.families.flowmo.model import FlowMo

    cache = tmp_path / "hf"
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    p = run_tok("convert", "flowmo-lo", "-o", tmp_path / "lo", env=env)
    err = p.stderr.decode()
    assert p.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "hf download ksarge/FlowMo flowmo_lo.pth" in err and "--as flowmo-lo" in err
    # the registry's architecture with tiny towers: a stand-in for the 945 M-parameter release
    args = {**TINY, "image_size": 256, "code_length": 256, "context_dim": 18, "codebook_size_for_entropy": 9}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FlowMo(**args).state_dict().items()}
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    (tmp_path / "src").mkdir()
    torch.save({"total_steps": 1, "model_ema_state_dict": sd}, tmp_path / "src" / "flowmo_lo.pth")
    snap = cache / "models--ksarge--FlowMo" / "snapshots" / COMMIT  # huggingface_hub's cache layout
    snap.mkdir(parents=True)
    (cache / "models--ksarge--FlowMo" / "refs").mkdir()
    (cache / "models--ksarge--FlowMo" / "refs" / "main").write_text(COMMIT)
    (tmp_path / "src" / "flowmo_lo.pth").rename(snap / "flowmo_lo.pth")
    p = run_tok("convert", "flowmo-lo", "-o", tmp_path / "lo", env=env)
    assert p.returncode == 0, p.stderr.decode()
    cfg = json.loads((tmp_path / "lo" / "config.json").read_text())
    assert cfg["tokens"]["shape"] == [512] and cfg["tokens"]["extra"]["bits_per_image"] == 4608
    assert cfg["decode"]["steps"] == 25 and cfg["provenance"]["registry_name"] == "flowmo-lo"
    # the same file registered as flowmo-hi: its weights take 18 channels, the entry says 56
    p = run_tok("convert", snap / "flowmo_lo.pth", "--as", "flowmo-hi", "-o", tmp_path / "hi", env=env)
    assert p.returncode == 1 and b"context_dim=56" in p.stderr and not (tmp_path / "hi").exists()
