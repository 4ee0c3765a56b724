"""Evidence that SiT training works (objective ``flow``): on a synthetic latent token file whose distribution is
known, `tok train` (the real loop, the real objective, a token file) fits a tiny SiT on the CPU, and

- its held-out flow loss approaches the optimum, computed exactly: for a Gaussian mixture the best velocity
  v*(x_t, t, c) = E[eps - x | x_t, c] has a closed form, so the excess of any model over the optimum,
  E||v - v*||^2, is measured directly (the loss itself minus the optimal loss on the same draws equals it up to
  Monte-Carlo noise, which is checked too). A model that knows each class's mean and covariance but not its
  mixture structure (the best single-Gaussian velocity, also closed form) must be beaten by a wide margin;
- its samples (the existing Euler ODE of ``sampler.py``, no guidance), mapped back through ``SiT.tokens_for``,
  reproduce each class's component weights, component means and spread in the raw latent space of the file: the
  file stores raw z with vq_mean / vq_std that are not 0 / 1, so a wrong normalisation on either side shows up.

The data: latents of L = 4 tokens x C = 2 channels, 2 classes; a latent of class c is drawn from one of 2 isotropic
Gaussian components (means MU[c, k] with entries +-1 in the normalised space, std S), weights W[c].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

L, C, NC, K = 4, 2, 2, 2
S = 0.25                       # component std (normalised space)
W = np.array([[0.3, 0.7], [0.6, 0.4]])
VQ_MEAN, VQ_STD = 0.5, 2.0     # raw z = x * VQ_STD + VQ_MEAN


def means(seed: int = 0) -> np.ndarray:
    """MU [NC, K, L, C] in the normalised space: random +-1 patterns, the two components of a class differing
    in at least half of the entries (well separated at std S)."""
    rng = np.random.default_rng(seed)
    mu = rng.choice([-1.0, 1.0], size=(NC, K, L, C))
    for c in range(NC):
        flip = rng.permutation(L * C)[: L * C // 2]
        mu[c, 1].reshape(-1)[flip] = -mu[c, 0].reshape(-1)[flip]
    return mu


def draw(mu: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normalised x [n, L, C], class [n], component [n])."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NC, size=n)
    k = (rng.random(n) > W[y, 0]).astype(np.int64)
    return mu[y, k] + S * rng.standard_normal((n, L, C)), y, k


def optimal_velocity(xt: np.ndarray, t: np.ndarray, y: np.ndarray, mu: np.ndarray, w: np.ndarray,
                     var: np.ndarray) -> np.ndarray:
    """E[eps - x | x_t, class] for x_t = t eps + (1 - t) x, x | (c, k) ~ N(mu[c, k], var[c, k] I) (float64)."""
    d = L * C
    a, tt = (1 - t)[:, None, None, None], t[:, None, None, None]
    m, v = mu[y], var[y][:, :, None, None]                    # [n, K, L, C], [n, K, 1, 1]
    tot = a ** 2 * v + tt ** 2                                # Var(x_t | k)
    r = xt[:, None] - a * m
    logp = np.log(w[y]) - 0.5 * ((r ** 2) / tot).sum((2, 3)) - 0.5 * d * np.log(tot[:, :, 0, 0])
    post = np.exp(logp - logp.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    ex = m + a * v / tot * r                                  # E[x | x_t, k]
    ee = tt / tot * r                                         # E[eps | x_t, k]
    return (post[:, :, None, None] * (ee - ex)).sum(1)


def write_file(path, x: np.ndarray, y: np.ndarray) -> None:
    from tokcli.core.tokens import write_token_file

    header = {"model": "local-dir:/nowhere/softvq-synthetic", "model_sha256": "cd" * 32, "family": "softvq",
              "tokens": {"kind": "latents", "shape": [L, C], "latent_dim": C,
                         "extra": {"vq_mean": VQ_MEAN, "vq_std": VQ_STD, "normalized": False}}}
    z = (x * VQ_STD + VQ_MEAN).astype(np.float32)  # raw latents, as a SoftVQ tokenizer without normalisation writes
    write_token_file(path, header=header, keys=[f"s{i:05d}" for i in range(len(z))], latents=z, labels=y)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tokcli.train.loop import train
    from tokcli.train.recipe import recipe_from_dict

    root = tmp_path_factory.mktemp("sit-synthetic")
    mu = means()
    x, y, _ = draw(mu, 8000, seed=1)
    write_file(root / "train.npz", x, y)
    recipe = recipe_from_dict({
        "model": {"family": "sit", "name": "sit-synthetic",
                  "model_args": {"hidden_size": 64, "depth": 2, "num_heads": 4, "class_dropout_prob": 0.1}},
        "data": {"tokens": str(root / "train.npz"), "batch_size": 128},
        "optim": {"optimizer": "adamw", "lr": 5e-3, "betas": [0.9, 0.99], "max_steps": 400, "ema_decay": 0.98,
                  "ema_warmup": True, "warmup_steps": 30, "lr_schedule": "cosine", "min_lr": 1e-4,
                  "grad_clip": 1.0},
        "run": {"seed": 0, "log_every": 100, "ckpt_every": 10_000, "device": "cpu"},
    }, source="synthetic")
    res = train(recipe, output_dir=root / "run", progress=False)
    import tokcli

    return mu, tokcli.load_generator(res["model_dir"], device="cpu"), res


def test_heldout_flow_loss_approaches_the_optimum(trained):
    from tokcli.gen.sit.objective import flow_pair

    mu, gen, res = trained
    x, y, _ = draw(mu, 6000, seed=2)
    g = np.random.default_rng(3)
    t, eps = g.random(len(x)), g.standard_normal(x.shape)
    xt, target = (v.numpy() for v in flow_pair(torch.from_numpy(x), torch.from_numpy(eps), torch.from_numpy(t)))
    with torch.inference_mode():
        v = gen(torch.from_numpy(xt).float(), torch.from_numpy(t).float(), torch.from_numpy(y)).double().numpy()
    best = optimal_velocity(xt, t, y, mu, W, np.full((NC, K), S ** 2))
    # the best single Gaussian per class (same mean and total covariance, diagonal): blind to the mixture
    m1 = (W[:, :, None, None] * mu).sum(1)                                       # [NC, L, C]
    var1 = S ** 2 + (W[:, :, None, None] * (mu - m1[:, None]) ** 2).sum(1)       # [NC, L, C]
    a, tt = (1 - t)[:, None, None], t[:, None, None]
    tot = a ** 2 * var1[y] + tt ** 2
    gauss = (tt / tot - a * var1[y] / tot) * (xt - a * m1[y]) - m1[y]
    loss, opt = ((v - target) ** 2).mean(), ((best - target) ** 2).mean()
    excess, excess_gauss = ((v - best) ** 2).mean(), ((gauss - best) ** 2).mean()
    print(f"held-out flow loss {loss:.4f}; optimum {opt:.4f}; excess E|v - v*|^2 {excess:.4f} (single-Gaussian "
          f"model {excess_gauss:.4f}); train {res['seconds']} s, final {res['final_losses']}")
    assert excess_gauss > 0.3  # the mixture structure matters: knowing the class's moments is far from enough
    # the model has more than 85 % of what separates the single-Gaussian model from the optimum
    assert excess < 0.15 * excess_gauss, (excess, excess_gauss)
    assert loss < opt + 0.15 * excess_gauss, (loss, opt)
    assert abs((loss - opt) - excess) < 0.02  # loss = optimum + excess on these draws (no model beats the optimum)


def test_samples_reproduce_the_mixture(trained):
    from types import SimpleNamespace

    mu, gen, _ = trained
    n = 500
    labels = [0] * n + [1] * n
    x = gen.sample(labels, seed=0, sampler="ode", steps=32, cfg=1.0)
    fake = SimpleNamespace(name="synthetic", family="softvq", spec=SimpleNamespace(
        kind="latents", shape=(L, C), extra={"vq_mean": VQ_MEAN, "vq_std": VQ_STD, "normalized": False}))
    z = gen.tokens_for(x, fake).double().numpy()                                 # raw latents
    raw_mu = mu * VQ_STD + VQ_MEAN
    for c in range(NC):
        zc = z[c * n:(c + 1) * n]
        dist = ((zc[:, None] - raw_mu[c][None]) ** 2).sum((2, 3))                # [n, K]
        k = dist.argmin(1)
        frac = np.bincount(k, minlength=K) / n
        err = [np.abs(zc[k == j].mean(0) - raw_mu[c, j]).max() for j in range(K)]
        spread = [zc[k == j].std(0).mean() / VQ_STD for j in range(K)]
        # a sample sits on a component, not between two: |x - mu_k|^2 / S^2 ~ chi^2_8, whose 0.999 quantile is 26.1
        far = float((dist.min(1) / VQ_STD ** 2 > 26.1 * S ** 2).mean())
        print(f"class {c}: weights {frac.round(3)} (want {W[c]}), max mean error {np.round(err, 3)} (raw units, "
              f"std {S * VQ_STD}), spread {np.round(spread, 3)} (want {S}), off-component {far:.3f}")
        assert np.abs(frac - W[c]).max() < 0.07, frac       # binomial sd at n = 500: 0.02
        assert max(err) < 0.15 * VQ_STD, err  # 0.15 normalised units: 0.6 component std; the means are >= 4 apart
        assert all(0.6 * S < s < 1.5 * S for s in spread), spread
        assert far < 0.03
