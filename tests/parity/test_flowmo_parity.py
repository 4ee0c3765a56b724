"""FlowMo end to end on the official parity fixture (../shared/parity/flowmo, README there): `tok convert` of the
official .pth + config.yaml -> model folder -> tokcli.load -> the LFQ ids exactly, the encoder latent, both decoder
velocities and the guided / unguided samplers (given z0) within the README tolerance (1e-4); the CLI on top; bad
files refused with one line and nothing written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import PARITY, convert_fixture, read_npz, run_tok

FLOWMO = PARITY / "flowmo"
TOL = 1e-4  # the fixture README's tolerance for a re-implementation in fp32
pytestmark = pytest.mark.skipif(not (FLOWMO / "expected.npz").is_file(),
                                reason=f"FlowMo parity fixture not found at {FLOWMO} (set TOK_PARITY_DIR)")


@pytest.fixture(scope="module")
def expected() -> dict:
    return read_npz(FLOWMO / "expected.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_fixture(tmp_path_factory, FLOWMO / "checkpoint.pth", "flowmo", FLOWMO / "config.yaml",
                           "flowmo-fixture")


@pytest.fixture(scope="module")
def model(converted):
    import tokcli

    return tokcli.load(f"local-dir:{converted}", device="cpu")


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_sizes_come_from_the_weights(converted):
    cfg = json.loads((converted / "config.json").read_text())
    a, meta = cfg["model_args"], json.loads((FLOWMO / "fixture_meta.json").read_text())
    for side, tower in (("enc", "encoder"), ("dec", "decoder")):
        m = meta[tower]
        assert (a[f"{side}_hidden_size"], a[f"{side}_num_heads"], a[f"{side}_depth"], a[f"{side}_axes_dim"]) == \
            (m["hidden_size"], m["num_heads"], m["depth"], m["axes_dim"])
    assert cfg["decode"] == {"seed": 0, "steps": 4, "cfg": 1.5, "schedule": "pow_0.25", "cfg_interval": [0.17, 1.02]}
    t = cfg["tokens"]
    assert t["kind"] == "indices" and t["shape"] == [32] and t["codebook_size"] == 8
    assert {k: t["extra"][k] for k in ("code_length", "context_dim", "fg", "fh", "bits_per_image")} == \
        {"code_length": 16, "context_dim": 6, "fg": 3, "fh": 2, "bits_per_image": 96}
    assert cfg["provenance"]["weights"] == "model_ema_state_dict"


def test_encoder_and_ids_match_the_official_code(model, expected):
    import torch

    x = torch.from_numpy(expected["x"])
    with torch.inference_mode():
        pre = model.encode_latent(x)
        ids = model.encode(x)
    assert _maxdiff(pre, expected["pre_quant"]) <= TOL
    assert ids.dtype == torch.int64 and np.array_equal(ids.numpy(), expected["lfq_indices"])
    assert np.array_equal(model.codes_from_ids(ids).numpy(), expected["code"])


def test_velocities_match(model, expected):
    import torch

    code = torch.from_numpy(expected["code"])
    cond = model.condition(code)
    xt, t = torch.from_numpy(expected["x_t"]), torch.from_numpy(expected["t_single"])
    with torch.inference_mode():
        vc = model.velocity(xt, t, cond)
        vu = model.velocity(xt, t, cond * 0)
        both = model.velocity(torch.cat((xt, xt)), torch.cat((t, t)), torch.cat((cond, cond * 0)))
    assert _maxdiff(vc, expected["velocity_cond"]) <= TOL
    assert _maxdiff(vu, expected["velocity_uncond"]) <= TOL
    assert _maxdiff(both, np.concatenate((expected["velocity_cond"], expected["velocity_uncond"]))) <= TOL


def test_grid_and_guided_steps_match(expected):
    from tokcli.families.flowmo.sampler import guidance_interval, guided_steps, time_grid

    ts, dts = time_grid(4, "pow_0.25")
    assert np.array_equal(np.append(ts.numpy(), 0.0).astype(np.float32), expected["sampler_ts"])
    assert np.array_equal(dts.numpy(), expected["sampler_ts"][:-1] - expected["sampler_ts"][1:])
    assert guided_steps(ts, 1.5, guidance_interval("(.17,1.02)")) == expected["sampler_guided"].tolist()


@pytest.mark.parametrize("cfg,key", [(None, "sample"), (1.0, "sample_noguide")])
def test_decode_matches_the_official_sampler(model, expected, cfg, key):
    import torch

    from tokcli.families.flowmo.sampler import sample

    ids, z0 = torch.from_numpy(expected["lfq_indices"]), torch.from_numpy(expected["z0"])
    kw = {} if cfg is None else {"cfg": cfg}
    with torch.inference_mode():
        raw = model.decode(ids, noise=z0, steps=4, clamp=False, **kw)
        clipped = model.decode(ids, noise=z0, steps=4, **kw)
        traj: list = []
        sample(model.velocity, z0, model.condition(model.codes_from_ids(ids)), steps=4, cfg=cfg or 1.5,
               cfg_interval=[0.17, 1.02], trajectory=traj)
    assert _maxdiff(raw, expected[f"{key}_raw"]) <= TOL
    assert _maxdiff(clipped, expected[key]) <= TOL
    assert _maxdiff(torch.stack(traj), expected[f"{key}_traj" if cfg else "sample_traj"]) <= TOL


def test_batched_cfg_equals_two_calls(model, expected):
    import torch

    from tokcli.families.flowmo.sampler import sample

    z0 = torch.from_numpy(expected["z0"])
    cond = model.condition(torch.from_numpy(expected["code"]))
    kw = dict(steps=4, cfg=1.5, cfg_interval=[0.17, 1.02])
    with torch.inference_mode():
        one = sample(model.velocity, z0, cond, batched_cfg=True, **kw)
        two = sample(model.velocity, z0, cond, batched_cfg=False, **kw)
    assert _maxdiff(one, two) <= 1e-5


def _write_inputs(tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, im in enumerate(np.load(FLOWMO / "inputs.npy", allow_pickle=False)):
        Image.fromarray(im).save(imgs / f"im{i}.png")
    return imgs


def test_cli_encode_info_decode(converted, expected, tmp_path):
    imgs = _write_inputs(tmp_path)
    codes = tmp_path / "codes.npz"
    p = run_tok("encode", imgs, "-m", converted, "-o", codes, "--device", "cpu")
    assert p.returncode == 0, p.stderr.decode()
    with np.load(codes, allow_pickle=False) as z:
        ids, header = z["indices"], json.loads(str(z["header"][()]))
    assert ids.dtype == np.uint8 and np.array_equal(ids, expected["lfq_indices"])  # 32x32 PNGs: no resize
    assert header["family"] == "flowmo" and header["tokens"]["extra"]["bit_layout"] == "flowmo-strided-lsb"
    p = run_tok("info", codes)
    assert p.returncode == 0 and b"bits_per_image" in p.stdout, p.stderr.decode()
    for bs in ("1", "2"):
        p = run_tok("decode", codes, "-o", tmp_path / f"dec{bs}", "--steps", "2", "--seed", "3", "-b", bs)
        assert p.returncode == 0, p.stderr.decode()
    for i in range(2):  # the same seed gives the same image for any batch size
        assert (tmp_path / "dec1" / f"im{i}.png").read_bytes() == (tmp_path / "dec2" / f"im{i}.png").read_bytes()
    p = run_tok("decode", codes, "-o", tmp_path / "dec0", "--steps", "0")
    assert p.returncode == 2 and b"Traceback" not in p.stderr
    with np.load(codes, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for name, ids, needle in (("range", np.where(arrays["indices"] == 0, 8, arrays["indices"]), "outside the codebook"),
                              ("short", arrays["indices"][:, :31], "per-image shape (31,)")):
        np.savez(tmp_path / f"{name}.npz", **{**arrays, "indices": ids.astype(np.uint8)})
        p = run_tok("decode", tmp_path / f"{name}.npz", "-o", tmp_path / f"o-{name}", "--steps", "1")
        _fails_cleanly(p, tmp_path / f"o-{name}", needle)


def _fails_cleanly(p, dest, *needles):
    err = p.stderr.decode()
    assert p.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in needles), err
    assert not dest.exists() and not any(dest.parent.glob(f".{dest.name}.tmp-*"))


def test_config_that_contradicts_the_weights(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text((FLOWMO / "config.yaml").read_text().replace("context_dim: 6", "context_dim: 9"))
    p = run_tok("convert", FLOWMO / "checkpoint.pth", "--family", "flowmo", "--config", cfg, "-o", tmp_path / "o")
    _fails_cleanly(p, tmp_path / "o", "context_dim=9", "encoder.txt_in takes 6")
    cfg.write_text((FLOWMO / "config.yaml").read_text().replace("dec_depth: 2", "dec_depth: 3"))
    p = run_tok("convert", FLOWMO / "checkpoint.pth", "--family", "flowmo", "--config", cfg, "-o", tmp_path / "o")
    _fails_cleanly(p, tmp_path / "o", "dec_depth=3", "2 blocks")


def test_pth_without_the_ema_weights(tmp_path):
    import torch

    ck = torch.load(FLOWMO / "checkpoint.pth", map_location="cpu", weights_only=True)
    bad = tmp_path / "raw.pth"
    torch.save({"total_steps": 1, "model_state_dict": ck["model_state_dict"]}, bad)
    p = run_tok("convert", bad, "--family", "flowmo", "--config", FLOWMO / "config.yaml", "-o", tmp_path / "o")
    _fails_cleanly(p, tmp_path / "o", "no model_ema_state_dict", "model_state_dict")
    trunc = tmp_path / "trunc.pth"
    shutil.copy(FLOWMO / "checkpoint.pth", trunc)
    trunc.write_bytes(trunc.read_bytes()[:100_000])
    p = run_tok("convert", trunc, "--family", "flowmo", "--config", FLOWMO / "config.yaml", "-o", tmp_path / "o")
    _fails_cleanly(p, tmp_path / "o", "cannot read")
