"""SiT on SoftVQ latents against the official parity fixture (../shared/parity/softvq-sit, README there): `tok convert`
of the official PyTorchModelHubMixin folder -> generator folder -> tokcli.load_generator -> every intermediate of the
forward pass, the velocity gen(x_t, t, y), the CFG combination, the score / drift conversions and the Euler ODE /
Euler-Maruyama SDE runs given the stored noise, within the README's 1e-5 (guidance flags exact); bad releases refused
with one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import PARITY, convert_fixture, read_npz, run_tok

SIT = PARITY / "softvq-sit"
CKPT = SIT / "checkpoint"
TOL = 1e-5
pytestmark = pytest.mark.skipif(not (SIT / "expected.npz").is_file(),
                                reason=f"SiT parity fixture not found at {SIT} (set TOK_PARITY_DIR)")


@pytest.fixture(scope="module")
def inputs() -> dict:
    return read_npz(SIT / "inputs.npz")


@pytest.fixture(scope="module")
def expected() -> dict:
    return read_npz(SIT / "expected.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_fixture(tmp_path_factory, CKPT / "model.safetensors", "sit", CKPT / "config.json", "sit-fixture")


@pytest.fixture(scope="module")
def gen(converted):
    import tokcli

    return tokcli.load_generator(f"local-dir:{converted}", device="cpu")


def close(name: str, got, want, tol: float = TOL) -> float:
    got = got.detach().double().cpu().numpy() if hasattr(got, "detach") else np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    diff = float(np.abs(got - want).max())
    assert diff <= tol, f"{name}: max abs diff {diff:.3g} > {tol}"
    return diff


def _t(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def test_the_folder_keeps_the_official_sizes_and_the_sampling_defaults(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["family"] == "sit" and cfg["model_args"]["num_classes"] == 1000
    assert {k: cfg["model_args"][k] for k in ("input_size", "in_channels", "hidden_size", "depth", "num_heads")} == {
        "input_size": 16, "in_channels": 8, "hidden_size": 64, "depth": 2, "num_heads": 4}
    assert cfg["sample"]["steps"] == 250 and cfg["sample"]["cfg"] == 1.75 and cfg["sample"]["sampler"] == "sde"
    assert {"license", "repo_url", "tags", "path_type"} <= set(cfg["provenance"]["ignored_config_keys"])


def test_forward_intermediates_and_velocity(gen, inputs, expected):
    import torch

    x, t, y = _t(inputs["x_t"]), _t(inputs["t"]), _t(inputs["y"])
    assert gen.null_class == int(expected["null_id"]) == 1000
    with torch.inference_mode():
        close("pos_embed", gen.pos_embed[0], expected["pos_embed"], 0.0)
        close("x_embed", gen.x_embedder(x), expected["x_embed"])
        close("t_emb", gen.t_embedder(t), expected["t_emb"])
        close("y_emb", gen.y_embedder(y), expected["y_emb"])
        c = gen.condition(t, y)
        close("c", c, expected["c"])
        h = gen.x_embedder(x) + gen.pos_embed
        for i, block in enumerate(gen.blocks):
            close(f"block{i}_mod", block.adaLN_modulation(c), expected[f"block{i}_mod"])
            h = block(h, c)
            close(f"block{i}_out", h, expected[f"block{i}_out"])
        close("final_mod", gen.final_layer.adaLN_modulation(c), expected["final_mod"])
        close("v_cond", gen(x, t, y), expected["v_cond"])


def test_cfg_combination_score_and_drift(gen, inputs, expected):
    import torch

    from tokcli.gen.sit.sampler import Velocity, is_guided, score_from_velocity

    x, t, y = _t(inputs["x_t"]), _t(inputs["t"]), _t(inputs["y"])
    with torch.inference_mode():
        both = gen(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 1000)]))
        v_c, v_u = both.double().chunk(2)
        close("v_uncond", v_u, expected["v_uncond"])
        guided = [is_guided(float(s), 1.75, (0.0, 0.7)) for s in inputs["t"].astype(np.float64)]
        assert guided == list(expected["cfg_guided"])
        for i, s in enumerate(inputs["t"].tolist()):  # the sampler's own combination, one time per sample
            v = Velocity(gen, y[i:i + 1], 1.75, (0.0, 0.7))(x[i:i + 1].double(), float(np.float64(s)))
            close(f"v_cfg[{i}]", v[0], expected["v_cfg"][i])
    for path in ("linear", "cosine"):
        v, xt = expected["v_cond"].astype(np.float64), inputs["x_t"].astype(np.float64)
        ts = inputs["t"].astype(np.float64)
        score = np.stack([score_from_velocity(_t(v[i]), _t(xt[i]), float(ts[i]), path).numpy() for i in range(4)])
        want = expected[f"score_{path}"]
        rel = np.abs(score - want).max() / np.abs(want).max()
        assert rel <= 1e-5, f"score_{path}: relative diff {rel:.3g}"
        drift = v - 0.5 * (2 * ts[:, None, None]) * score
        close(f"drift_{path}", drift, expected[f"drift_{path}"], TOL * max(1.0, float(np.abs(want).max())))


def _run(gen, inputs, sampler: str, path: str = "linear", cfg: float = 1.75):
    """(samples, trajectory, model calls, raw outputs per call) of one fixture run, replayed from the stored noise."""
    import torch

    from tokcli.gen.sit.sampler import sample_latents

    z, y = _t(inputs["sample_z"]), _t(inputs["sample_y"])
    noise = {"z": z, "steps": _t(inputs[f"sde_{path}_noise"][:, :2])} if sampler == "sde" else z
    traj, calls = [], []
    with torch.inference_mode():
        out = sample_latents(gen, y, seeds=[0, 1], noise=noise, sampler=sampler, steps=6, cfg=cfg,
                             guidance_interval=(0.0, 0.7), path_type=path,
                             on_step=lambda i, x: traj.append(x.clone()), on_call=lambda o, yy: calls.append(o.clone()))
        public = gen.sample(y, noise=noise, sampler=sampler, steps=6, cfg=cfg, guidance_interval=[0.0, 0.7],
                            path_type=path)
    assert torch.equal(out, public)  # the Generator contract runs the same sampler
    return out, torch.stack(traj), calls


@pytest.mark.parametrize("sampler, path", [("ode", "linear"), ("sde", "linear"), ("sde", "cosine")])
def test_samplers_replay_the_official_runs(gen, inputs, expected, sampler, path):
    from tokcli.gen.sit.sampler import is_guided, time_grid

    key = "ode" if sampler == "ode" else f"sde_{path}"
    grid = time_grid(sampler, 6).numpy()
    close(f"{key}_ts", grid, expected[f"{key}_ts"], 0.0)
    assert [is_guided(float(t), 1.75, (0.0, 0.7)) for t in grid[:-1]] == list(expected[f"{key}_guided"])
    out, traj, calls = _run(gen, inputs, sampler, path)
    n = 2  # the official script doubles the batch once more: its rows 0..n-1 are these samples
    close(f"{key}_samples", out.float(), expected[f"{key}_samples"])
    close(f"{key}_out_full[:n]", out, expected[f"{key}_out_full"][:n])
    close(f"{key}_traj[:, :n]", traj, expected[f"{key}_traj"][:, :n])
    assert len(calls) == int(expected[f"{key}_model_calls"]) == 6
    first = [i for i, g in enumerate(expected[f"{key}_guided"]) if g][0]
    v2, raw = expected[f"{key}_v_step2"], calls[first]  # official [x; x; x; x], labels [y, null, null, null]
    assert raw.shape[0] == 2 * n  # the CFG batch is doubled once
    close(f"{key}_v_step2 cond", raw[:n], v2[:n])
    close(f"{key}_v_step2 uncond", raw[n:], v2[2 * n:3 * n])


def test_no_cfg_means_no_doubling(gen, inputs, expected):
    out, _, calls = _run(gen, inputs, "ode", cfg=1.0)
    close("ode_nocfg_out", out, expected["ode_nocfg_out"])
    assert all(c.shape[0] == 2 for c in calls)


def test_seeded_samples_do_not_depend_on_the_batch(gen):
    import torch

    a = gen.sample([207, 3, 5], seed=11, sampler="sde", steps=3)
    b = torch.cat([gen.sample([207], seed=11, sampler="sde", steps=3), gen.sample([3, 5], seed=[12, 13],
                                                                                   sampler="sde", steps=3)])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _release(tmp_path, **changes):
    rel = tmp_path / "release"
    shutil.copytree(CKPT, rel)
    cfg = json.loads((rel / "config.json").read_text())
    cfg.update(changes)
    (rel / "config.json").write_text(json.dumps(cfg))
    return rel


@pytest.mark.parametrize("changes, needle", [
    ({"vae_1d": False}, "vae_1d=False is not supported"),
    ({"depth": 3}, "says depth=3 but the weights have depth=2"),
    ({"num_heads": 3}, "not a multiple of num_heads"),
    ({"num_classes": 999}, "does not match"),
    ({"decoder_hidden_size": 32}, "decoder_hidden_size 32 differs"),
])
def test_bad_releases_are_one_line(tmp_path, changes, needle):
    rel = _release(tmp_path, **changes)
    p = run_tok("convert", rel / "model.safetensors", "--family", "sit", "--config", rel / "config.json",
                "-o", tmp_path / "out")
    err = p.stderr.decode()
    assert p.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err and not (tmp_path / "out").exists()


def test_convert_as_a_registry_name_checks_the_sizes(tmp_path):
    p = run_tok("convert", CKPT / "model.safetensors", "--as", "sit-xl_softvq-bl-32", "-o", tmp_path / "o")
    err = p.stderr.decode()
    assert p.returncode == 1 and "sit-xl_softvq-bl-32" in err and "input_size" in err and not (tmp_path / "o").exists()
