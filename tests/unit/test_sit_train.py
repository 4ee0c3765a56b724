"""SiT's training objective (``flow``, tokcli/gen/sit/objective.py): the path and velocity match the samplers'
convention, exact resume through `tok train`, the label dropout rate, the latents' normalisation, and one-line
refusals of token files it cannot train on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tokcli.errors import TokError, TokUsageError

L, C = 4, 3
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "sit-softvq-tiny-cpu.toml"


def _latent_file(path, n=64, labels=True, seed=0, extra=None, indices=False):
    from tokcli.core.tokens import write_token_file

    rng = np.random.default_rng(seed)
    header = {"model": "local-dir:/nowhere/softvq", "model_sha256": "ab" * 32, "family": "softvq",
              "tokens": {"kind": "latents", "latent_dim": C,
                         "extra": {"vq_mean": 0.5, "vq_std": 2.0, "normalized": False} if extra is None else extra}}
    payload = {"latents": rng.standard_normal((n, L, C)).astype(np.float32)}
    if indices:
        header["tokens"] = {"kind": "indices", "codebook_size": 16, "extra": {}}
        payload = {"indices": rng.integers(0, 16, size=(n, L))}
    write_token_file(path, header=header, keys=[f"k{i}" for i in range(n)],
                     labels=rng.integers(0, 2, size=n) if labels else None, **payload)
    return path


def _recipe(tokens, batch_size=8, **model_args):
    from tokcli.train.recipe import recipe_from_dict

    return recipe_from_dict({
        "model": {"family": "sit", "name": "tiny",
                  "model_args": {"hidden_size": 16, "depth": 1, "num_heads": 2, **model_args}},
        "data": {"tokens": str(tokens), "batch_size": batch_size},
        "optim": {"lr": 1e-3, "max_steps": 6, "ema_decay": 0.9},
        "run": {"log_every": 1, "ckpt_every": 3, "device": "cpu"}}, source="test")


def test_the_path_is_the_samplers():
    """x_t = t eps + (1 - t) x, v = eps - x: the sampler's Euler ODE from t = 1 with that velocity lands on x,
    and the sampler's linear-path score of that velocity is the path's score -eps / t."""
    from tokcli.gen.sit.objective import flow_pair
    from tokcli.gen.sit.sampler import euler_ode, score_from_velocity

    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(5, L, C, generator=g, dtype=torch.float64), torch.randn(5, L, C, generator=g,
                                                                                   dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    xt, v = flow_pair(x, eps, t)
    torch.testing.assert_close(xt[0], x[0])
    torch.testing.assert_close(xt[-1], eps[-1])
    torch.testing.assert_close(v, eps - x)
    torch.testing.assert_close(xt[2], 0.5 * (x[2] + eps[2]))
    out = euler_ode(lambda state, tt: v, eps, steps=7)  # constant along the straight path
    torch.testing.assert_close(out, x)
    for i in (1, 2, 3):
        score = score_from_velocity(v[i], xt[i], float(t[i]), "linear")
        torch.testing.assert_close(score, -eps[i] / t[i])


def test_training_resumes_exactly_and_exports_the_tokenizer(tmp_path):
    import json

    from safetensors.torch import load_file

    from tokcli.train.loop import train

    tokens = _latent_file(tmp_path / "codes.npz")
    full = train(_recipe(tokens), output_dir=tmp_path / "a", progress=False)
    train(_recipe(tokens), output_dir=tmp_path / "b", max_steps=3, progress=False)
    resumed = train(_recipe(tokens), resume=tmp_path / "b", max_steps=6, progress=False)
    a, b = load_file(f"{full['model_dir']}/model.safetensors"), load_file(f"{resumed['model_dir']}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = train(_recipe(tokens), output_dir=tmp_path / "c", max_steps=1, progress=False)
    c = load_file(f"{fresh['model_dir']}/model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the comparison can fail: 1 step differs from 6
    cfg = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert cfg["family"] == "sit" and cfg["tokenizer"] == {"name": "local-dir:/nowhere/softvq", "sha256": "ab" * 32}
    args = cfg["model_args"]
    assert (args["input_size"], args["in_channels"], args["num_classes"]) == (L, C, 2)
    assert cfg["sample"]["sampler"] == "ode" and cfg["sample"]["path_type"] == "linear"
    assert cfg["sample"]["cfg"] > 1  # conditional with a null class: guided by default
    assert cfg["training"]["latent_scale"] == {"mean": 0.5, "std": 2.0}
    assert set(full["final_losses"]) >= {"loss", "mse"} and full["final_losses"]["mse"] > 0
    import tokcli

    gen = tokcli.load_generator(full["model_dir"], device="cpu")
    assert gen.sample([0, 1], seed=0, steps=2).shape == (2, L, C)


def _objective(tokens, **model_args):
    from tokcli.core.registry import get_family

    r = _recipe(tokens, **model_args)
    obj = get_family("sit").objective("flow")(r, device="cpu")
    obj.prepare()
    obj.build(None)
    return obj


def test_label_dropout_rate(tmp_path):
    obj = _objective(_latent_file(tmp_path / "codes.npz"), class_dropout_prob=0.25)
    model = obj.model
    seen = []
    model.y_embedder.embedding_table.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].clone()))
    n = 20_000
    y = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(1))
    batch = {"tokens": torch.randn(n, L, C), "labels": y}
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        loss, logs = obj.loss("model", obj.networks, batch, 0, 0)
    got = seen[-1]
    dropped = got == 2  # the null class = num_classes
    rate = float(dropped.float().mean())
    print(f"label dropout rate {rate:.4f} (want 0.25, binomial sd {np.sqrt(0.25 * 0.75 / n):.4f})")
    assert abs(rate - 0.25) < 0.015  # 5 sd
    assert torch.equal(got[~dropped], y[~dropped])  # the others are kept as they are
    assert float(loss) == pytest.approx(logs["mse"]) and float(loss) > 0
    model.eval()
    with torch.no_grad():
        obj.loss("model", obj.networks, batch, 0, 0)
    assert torch.equal(seen[-1], y)  # no dropout outside training


def test_latents_are_normalised_as_the_sampler_denormalises(tmp_path):
    from tokcli.core.token_reader import read_token_file
    from tokcli.gen.sit.objective import LatentTokenData

    raw = _latent_file(tmp_path / "raw.npz")
    d = LatentTokenData(_recipe(raw).data, seed=0)
    z = torch.from_numpy(read_token_file(raw).array)
    torch.testing.assert_close(d.tokens, (z - 0.5) / 2.0)
    b = d.batch(0)
    assert b["tokens"].dtype == torch.float32 and b["tokens"].shape == (8, L, C) and b["labels"].dtype == torch.long
    assert torch.equal(d.batch(3)["tokens"], LatentTokenData(_recipe(raw).data, seed=0).batch(3)["tokens"])
    obj = _objective(raw)  # SiT.tokens_for maps the model's space back to the file's latents
    from types import SimpleNamespace

    tok = SimpleNamespace(name="t", family="softvq", spec=SimpleNamespace(kind="latents", shape=(L, C), extra=dict(
        read_token_file(raw).header["tokens"]["extra"])))
    torch.testing.assert_close(obj.model.tokens_for(d.tokens, tok), z)
    done = _latent_file(tmp_path / "norm.npz", extra={"vq_mean": 0.5, "vq_std": 2.0, "normalized": True})
    torch.testing.assert_close(LatentTokenData(_recipe(done).data, seed=0).tokens,
                               torch.from_numpy(read_token_file(done).array))


@pytest.mark.parametrize("make, kwargs, err, needle", [
    (lambda p: _latent_file(p, indices=True), {}, TokError, "holds 64 images of indices"),
    (lambda p: _latent_file(p, labels=False), {"num_classes": 4}, TokUsageError,
     "has no labels but model_args.num_classes = 4"),
    (lambda p: _latent_file(p, extra={}), {}, TokError, "records no latent statistics"),
    (lambda p: _latent_file(p, extra={"vq_mean": 0.0, "vq_std": 0.0}), {}, TokError, "vq_std must be a positive"),
    (lambda p: _latent_file(p), {"input_size": 8}, TokUsageError, "model_args.input_size = 8 but the token file"),
    (lambda p: _latent_file(p), {"num_classes": 1}, TokUsageError, "has labels 0..1"),
])
def test_bad_token_files_are_one_line(tmp_path, make, kwargs, err, needle):
    from tokcli.train.loop import train

    tokens = make(tmp_path / "codes.npz")
    with pytest.raises(err, match=needle) as e:
        train(_recipe(tokens, **kwargs), output_dir=tmp_path / "run", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "model").exists()


def test_unconditional_without_labels(tmp_path):
    from tokcli.train.loop import train

    tokens = _latent_file(tmp_path / "codes.npz", labels=False)
    res = train(_recipe(tokens), output_dir=tmp_path / "u", max_steps=1, progress=False)
    import tokcli

    gen = tokcli.load_generator(res["model_dir"], device="cpu")
    assert gen.num_classes == 1 and gen.sample_defaults["cfg"] == 1.0


def test_the_cpu_recipe_parses():
    from tokcli.train.recipe import load_recipe

    r = load_recipe(RECIPE)
    assert r.model.family == "sit" and r.model.objective in (None, "flow")
    assert r.data.tokenizer == "softvq-tiny" and r.data.tokens and r.data.crop_size == 128
    a = r.model.model_args
    assert (a["input_size"], a["in_channels"]) == (32, 16)  # softvq-tiny's latents
    from tokcli.gen.sit.model import SiT

    params = sum(p.numel() for p in SiT(**a).parameters())
    assert params * 4 < 20e6, params  # fp32 model.safetensors under 20 MB


def test_lognormal_t_is_the_official_weighting_and_bad_schedules_are_refused():
    import torch

    from tokcli.gen.sit.objective import SiTFlowLoss, sample_t

    torch.manual_seed(0)
    t = sample_t(200_000, "lognormal", "cpu")
    logit = torch.log(t / (1 - t))  # sigma = exp(N(0, 1)) and t = sigma / (1 + sigma): logit(t) ~ N(0, 1)
    assert abs(float(logit.mean())) < 0.01 and abs(float(logit.std()) - 1) < 0.01
    u = sample_t(200_000, "uniform", "cpu")
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.std()) - (1 / 12) ** 0.5) < 0.005
    assert any("t_schedule" in p for p in SiTFlowLoss(t_schedule="cosine").problems())
    assert not SiTFlowLoss(t_schedule="lognormal").problems()
