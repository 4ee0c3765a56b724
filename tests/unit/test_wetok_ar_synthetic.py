"""Evidence that WeTok AR training works: on a synthetic token corpus whose distribution is known, `tok train` (the
real loop, the `next_token` objective, a token file) fits a tiny factorised AR generator on the CPU, and

- its held-out NLL (teacher forcing, each sub-token head) approaches the exact optimum, the entropy rate of the
  corpus, far below what a model without the previous position or without the intra transformer could reach
  (computed exactly too);
- its samples (the KV-cache sampler) reproduce the corpus's transition statistics, for both sub-token heads, and
  follow their class.

The corpus: a 4x4 grid (N = 16 positions, raster order) of 2 groups of 2 bits (a WeTok-style token file
[16, 4, 4, 2], codebook 4), so the generator's k = 2 heads are the two groups: a_p (group 0) and b_p (group 1),
x_p = (a_p, b_p). 2 classes. A class-conditional Markov chain in raster order:

    a_p ~ P_a[c, x_{p-1}]           (favourite id fa[c, x_{p-1}] with probability 0.8, each other 0.2 / 3)
    b_p ~ P_b[c, a_p, b_{p-1}]      (favourite fb[c, a_p, b_{p-1}] with probability 0.7, each other 0.3 / 3)

with a start state for p = 0. Head 0 needs the previous position (the spatial transformer), head 1 the same
position's a_p too (the intra transformer).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

G, V, C = 4, 4, 2
N = G * G
HIT_A, HIT_B = 0.8, 0.7
START_X, START_B = V * V, V  # the state "before position 0"


def tables(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """P_a [C, V*V + 1, V] (previous full id or start -> a) and P_b [C, V, V + 1, V] (a, previous b or start -> b)."""
    rng = np.random.default_rng(seed)

    def peaked(shape, hit):
        p = np.full((*shape, V), (1 - hit) / (V - 1))
        np.put_along_axis(p, rng.integers(0, V, size=shape)[..., None], hit, axis=-1)
        return p

    return peaked((C, V * V + 1), HIT_A), peaked((C, V, V + 1), HIT_B)


def draw_corpus(pa, pb, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a [n, N], b [n, N], labels [n])."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, size=n)
    a, b = np.zeros((n, N), np.int64), np.zeros((n, N), np.int64)
    s, t = np.full(n, START_X), np.full(n, START_B)
    for p in range(N):
        a[:, p] = (rng.random((n, 1)) > pa[y, s].cumsum(-1)).sum(-1).clip(max=V - 1)
        b[:, p] = (rng.random((n, 1)) > pb[y, a[:, p], t].cumsum(-1)).sum(-1).clip(max=V - 1)
        s, t = a[:, p] + V * b[:, p], b[:, p]
    return a, b, y


def true_nll(pa, pb, a, b, y) -> tuple[float, float]:
    """Mean -log p of the true chain per position, (head 0, head 1), on given sequences."""
    s = np.concatenate([np.full((len(a), 1), START_X), (a + V * b)[:, :-1]], 1)
    t = np.concatenate([np.full((len(a), 1), START_B), b[:, :-1]], 1)
    return float(-np.log(pa[y[:, None], s, a]).mean()), float(-np.log(pb[y[:, None], a, t, b]).mean())


def exact_rates(pa, pb) -> dict[str, float]:
    """Expected NLL per position (nats, both heads) under the chain, by forward recursion over the 16 states: the
    optimum, and the best NLLs without the previous position (per-class, per-position marginals of x_p) or without
    a_p for head 1 (b_p given the previous position only)."""
    out = {"optimum": 0.0, "no_context": 0.0, "no_intra": 0.0}
    for c in range(C):
        prev = np.zeros(V * V + 1)
        prev[START_X] = 1.0  # distribution of the previous state
        for p in range(N):
            t_of = np.array([s // V for s in range(V * V)] + [START_B])
            joint = prev[:, None, None] * pa[c][:, :, None] * pb[c][:, t_of].transpose(1, 0, 2)  # [s, a, b]
            h_a = -(pa[c] * np.log(pa[c])).sum(-1)  # [s]
            pbt = pb[c][:, t_of]  # [a, s, b]
            h_b = -(pbt * np.log(pbt)).sum(-1).T  # [s, a]
            out["optimum"] += (prev * h_a).sum() + (prev[:, None] * pa[c] * h_b).sum()
            m = joint.sum(0).reshape(-1)
            out["no_context"] += -(m * np.log(m)).sum()
            bs = joint.sum(1)  # [s, b]: b given the previous position, without a_p
            cond = bs / bs.sum(-1, keepdims=True).clip(1e-300)
            out["no_intra"] += (prev * h_a).sum() - (bs * np.log(cond.clip(1e-300))).sum()
            prev = np.concatenate([joint.sum(0).T.reshape(-1), [0.0]])  # x = a + V b
    return {k: v / (C * N) for k, v in out.items()}


def write_corpus(path, a, b, y):
    from tokcli.core.tokens import write_token_file

    ids = np.stack([a, b], -1).reshape(len(a), G, G, 2)
    header = {"model": "synthetic-chain", "model_sha256": None, "family": "wetok", "tokens": {
        "kind": "indices", "shape": [G, G, 2], "codebook_size": V, "extra": {"groups": 2, "bits_per_group": 2}}}
    write_token_file(path, header=header, keys=[f"s{i:05d}" for i in range(len(a))], indices=ids, labels=y)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tokcli.train.loop import train
    from tokcli.train.recipe import recipe_from_dict

    root = tmp_path_factory.mktemp("wetok-ar-synthetic")
    pa, pb = tables()
    write_corpus(root / "train.npz", *draw_corpus(pa, pb, 4000, seed=1))
    recipe = recipe_from_dict({
        "model": {"family": "wetok_ar", "name": "wetok-ar-synthetic", "model_args": {
            "spatial_n_layer": 2, "factorized_n_layer": 1, "n_head": 4, "dim": 64, "multiple_of": 64,
            "class_dropout_prob": 0.1, "token_drop": 0.0, "ffn_dropout_p": 0.0}},
        "data": {"tokens": str(root / "train.npz"), "batch_size": 64},
        "optim": {"optimizer": "adamw", "lr": 3e-3, "betas": [0.9, 0.95], "max_steps": 150, "ema_decay": 0.95,
                  "ema_warmup": True, "warmup_steps": 10, "lr_schedule": "cosine", "min_lr": 1e-4,
                  "grad_clip": 1.0},
        "run": {"seed": 0, "log_every": 50, "ckpt_every": 10_000, "device": "cpu"},
    }, source="synthetic")
    cpu = time.process_time()
    res = train(recipe, output_dir=root / "run", progress=False)
    res["cpu_seconds"] = round(time.process_time() - cpu, 2)  # one thread: the wall time on a free core
    import tokcli

    return (pa, pb), tokcli.load_generator(res["model_dir"], device="cpu"), res


def test_heldout_nll_approaches_the_exact_optimum(trained):
    (pa, pb), gen, res = trained
    a, b, y = draw_corpus(pa, pb, 2000, seed=2)
    with torch.inference_mode():
        logits = gen((torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(y)))
    nll = [float(-torch.log_softmax(lg.double(), -1).gather(-1, torch.from_numpy(t)[..., None]).mean())
           for lg, t in zip(logits, (a, b))]
    ref, rates = true_nll(pa, pb, a, b, y), exact_rates(pa, pb)
    print(f"held-out NLL per position {sum(nll):.4f} nats (heads {nll[0]:.4f} + {nll[1]:.4f}); true chain on the "
          f"same data {sum(ref):.4f} ({ref[0]:.4f} + {ref[1]:.4f}); exact optimum {rates['optimum']:.4f}; without "
          f"the previous position {rates['no_context']:.4f}; without the intra transformer {rates['no_intra']:.4f}; "
          f"train {res['seconds']} s ({res['cpu_seconds']} s CPU)")
    assert rates["optimum"] < rates["no_intra"] - 0.1 and rates["no_intra"] < rates["no_context"] - 0.5  # both paths
    assert abs(sum(ref) - rates["optimum"]) < 0.03  # the held-out data follow the chain
    for i in range(2):
        assert nll[i] < ref[i] + 0.03, (i, nll, ref)  # each head within 0.03 nats of the truth, same data
    assert sum(nll) < rates["optimum"] + 0.05
    assert sum(nll) > sum(ref) - 0.02  # held-out data: no model beats the truth beyond noise


def _offsets(x: np.ndarray, fav: np.ndarray) -> np.ndarray:
    """Frequencies of (x - favourite) mod V: [hit, +1, +2, +3]."""
    return np.bincount(((x - fav) % V).reshape(-1), minlength=V) / x.size


def test_samples_reproduce_the_transition_statistics(trained):
    (pa, pb), gen, _ = trained
    n = 300
    x = gen.sample([0] * n + [1] * n, seed=0, cfg=1.0).numpy()  # [2n, N, 2]
    fa, fb = pa.argmax(-1), pb.argmax(-1)
    want_a = np.array([HIT_A] + [(1 - HIT_A) / (V - 1)] * (V - 1))
    want_b = np.array([HIT_B] + [(1 - HIT_B) / (V - 1)] * (V - 1))
    for c in range(C):
        a, b = x[c * n:(c + 1) * n, :, 0], x[c * n:(c + 1) * n, :, 1]
        s = np.concatenate([np.full((n, 1), START_X), (a + V * b)[:, :-1]], 1)
        t = np.concatenate([np.full((n, 1), START_B), b[:, :-1]], 1)
        got_a, got_b = _offsets(a, fa[c][s]), _offsets(b, fb[c][a, t])
        other = 1 - c
        wrong = (a == fa[other][s]).mean()  # the same statistics under the other class's chain: near chance
        tv_a, tv_b = 0.5 * np.abs(got_a - want_a).sum(), 0.5 * np.abs(got_b - want_b).sum()
        print(f"class {c}: head 0 favourite rate {got_a[0]:.3f} (chain {HIT_A}), TV {tv_a:.3f}; head 1 favourite "
              f"rate {got_b[0]:.3f} (chain {HIT_B}), TV {tv_b:.3f}; other class's favourite {wrong:.3f}")
        assert tv_a < 0.03 and tv_b < 0.03, (c, got_a, got_b)
        assert wrong < 0.4, wrong
