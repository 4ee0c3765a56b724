"""MaskGIT (tokcli/gen/maskgit): positions per layout, the sampler's CFG / seeding / schedule, the training
objective's masks, exact resume through `tok train`, and one-line refusals of bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokcli.errors import TokError, TokUsageError

ARGS = {"token_shape": [14], "levels": [1, 2, 3], "codebook_size": 16, "num_classes": 3, "hidden_size": 32,
        "depth": 2, "num_heads": 2}


def make(**kw):
    from tokcli.gen.maskgit.model import MaskGIT

    torch.manual_seed(0)
    m = MaskGIT(**{**ARGS, **kw})
    with torch.no_grad():  # a random head, so the logits depend on the inputs
        m.head.weight.normal_(0, 0.5)
    return m.eval()


def test_positions_follow_the_tokenizer_layout():
    m = make()
    assert [tuple(t.shape) for t in m.pos_levels] == [(1, 32), (4, 32), (9, 32)]  # one table per scale
    torch.testing.assert_close(m.positions(), torch.cat([t for t in m.pos_levels]))
    g = make(token_shape=[3, 2, 4], levels=None)  # WeTok [h, w, groups], flattened with the group fastest
    assert g.seq_len == 24 and g.pos_grid.shape == (6, 32) and g.pos_group.shape == (4, 32)
    torch.testing.assert_close(g.positions()[2 * 4 + 3], g.pos_grid[2] + g.pos_group[3])
    f = make(token_shape=[6], levels=None)  # FlowMo-style 1-D ids
    assert f.positions().shape == (6, 32)
    with pytest.raises(TokError, match="do not tile"):
        make(levels=[1, 2])


def test_forward_is_bidirectional_and_ignores_nothing():
    m = make()
    ids = torch.randint(0, 16, (1, 14))
    base = m(ids, torch.tensor([1]))
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % 16
    moved = m(later, torch.tensor([1]))
    assert not torch.allclose(base[0, 0], moved[0, 0])  # position 0 sees the last position: no causal mask
    assert not torch.allclose(base, m(ids, torch.tensor([2])))  # the class matters
    assert base.shape == (1, 14, 16)  # logits of the codebook only, never the mask id


def test_cfg_is_one_batched_call_equal_to_two_calls():
    from tokcli.gen.maskgit.sampler import guided_logits

    m = make()
    ids = torch.randint(0, 17, (3, 14))
    y = torch.tensor([0, 1, 2])
    calls = []
    hook = m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    with torch.inference_mode():
        got = guided_logits(m, ids, y, 3.0)
        hook.remove()
        c, u = m(ids, y), m(ids, torch.full_like(y, 3))
    assert calls == [6]  # cond + uncond in one forward pass
    torch.testing.assert_close(got, u + 3.0 * (c - u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided_logits(m, ids, y, 1.0), c)


def test_seeds_are_per_sample_and_batch_independent():
    m = make()
    x = m.sample([0, 1, 2, 1], seed=5, steps=8, cfg=2.0)
    assert x.shape == (4, 14) and x.dtype == torch.long and int(x.min()) >= 0 and int(x.max()) < 16
    for i, c in enumerate([0, 1, 2, 1]):
        assert torch.equal(m.sample([c], seed=5 + i, steps=8, cfg=2.0)[0], x[i])
    assert torch.equal(m.sample([1, 2], seed=[6, 7], steps=8, cfg=2.0), x[1:3])
    assert not torch.equal(x[1], x[3])  # same class, different seeds
    assert make(token_shape=[3, 2, 4], levels=None).sample([0]).shape == (1, 3, 2, 4)  # the tokenizer's shape
    long = m.sample([0, 2], seed=5, steps=32, cfg=2.0)
    assert long.shape == (2, 14) and torch.equal(m.sample([2], seed=6, steps=32, cfg=2.0)[0], long[1])


def test_noise_replays_a_seeded_run():
    m = make()
    g = [torch.Generator().manual_seed(s) for s in (3, 4)]
    u = torch.stack([torch.rand(2, 8, 14, generator=gi, dtype=torch.float64) for gi in g])
    assert torch.equal(m.sample([0, 2], noise=u, seed=99), m.sample([0, 2], seed=3))
    with pytest.raises(TokUsageError, match="noise must be"):
        m.sample([0], noise=torch.rand(1, 2, 3, 14))


def test_the_cosine_schedule():
    from tokcli.gen.maskgit.objective import random_mask
    from tokcli.gen.maskgit.sampler import mask_ratio, masked_after

    assert mask_ratio(0) == 1 and abs(mask_ratio(1)) < 1e-12 and abs(mask_ratio(0.5) - math.sqrt(0.5)) < 1e-12
    assert masked_after(8, 680) == [666, 628, 565, 480, 377, 260, 132, 0]  # floor(680 cos(pi t / 16))
    for steps in (1, 8, 32):
        s = masked_after(steps, 680)
        assert len(s) == steps and s[-1] == 0 and all(a > b for a, b in zip([680] + s, s))  # >= 1 id per step
    assert masked_after(8, 4) == [3, 2, 1, 1, 1, 1, 1, 0]  # fewer ids than steps: one stays masked till the end
    g = torch.Generator().manual_seed(0)
    mask = random_mask(2000, 10, generator=g)
    g = torch.Generator().manual_seed(0)
    r = torch.rand(2000, generator=g)
    want = torch.ceil(torch.cos(math.pi / 2 * r) * 10).clamp(1, 10)
    assert torch.equal(mask.sum(1).float(), want)
    long = random_mask(4000, 500, generator=torch.Generator().manual_seed(1))
    assert abs(float(long.float().mean()) - 2 / math.pi) < 0.02  # E[cos(pi r / 2)] = 2 / pi


@pytest.mark.parametrize("call, needle", [
    (lambda m: m.sample([3]), "class 3 is out of range"),
    (lambda m: m.sample([-1]), "out of range"),
    (lambda m: m.sample([0], steps=0), "steps must be a positive integer"),
    (lambda m: m.sample([0], cfg=-1.0), "cfg must be a number >= 0"),
    (lambda m: m.sample([0], temperature=float("nan")), "temperature must be"),
    (lambda m: m.sample([0], top_k=3), "takes no sampler option top_k"),
    (lambda m: make(class_dropout_prob=0.0).sample([0], cfg=2.0), "has no null class"),
])
def test_bad_input_is_one_line(call, needle):
    with pytest.raises(TokUsageError, match=needle) as e:
        call(make())
    assert "\n" not in str(e.value)


def _token_file(path, n=64, labels=True, seed=0):
    from tokcli.core.tokens import write_token_file

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 16, size=(n, 2, 2, 3))
    header = {"model": "local-dir:/nowhere/tok", "model_sha256": "ab" * 32, "family": "wetok",
              "tokens": {"kind": "indices", "codebook_size": 16, "extra": {"groups": 3}}}
    write_token_file(path, header=header, keys=[f"k{i}" for i in range(n)], indices=ids,
                     labels=rng.integers(0, 2, size=n) if labels else None)
    return path


def _recipe(tokens, **model_args):
    from tokcli.train.recipe import recipe_from_dict

    return recipe_from_dict({
        "model": {"family": "maskgit", "name": "tiny",
                  "model_args": {"hidden_size": 16, "depth": 1, "num_heads": 2, **model_args}},
        "data": {"tokens": str(tokens), "batch_size": 8},
        "optim": {"lr": 1e-3, "max_steps": 6, "ema_decay": 0.9},
        "run": {"log_every": 1, "ckpt_every": 3, "device": "cpu"}}, source="test")


def test_training_resumes_exactly_and_exports_the_tokenizer(tmp_path):
    from safetensors.torch import load_file

    from tokcli.train.loop import train

    tokens = _token_file(tmp_path / "codes.npz")
    full = train(_recipe(tokens), output_dir=tmp_path / "a", progress=False)
    train(_recipe(tokens), output_dir=tmp_path / "b", max_steps=3, progress=False)
    resumed = train(_recipe(tokens), resume=tmp_path / "b", max_steps=6, progress=False)
    a, b = load_file(f"{full['model_dir']}/model.safetensors"), load_file(f"{resumed['model_dir']}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json

    cfg = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert cfg["family"] == "maskgit" and cfg["tokenizer"] == {"name": "local-dir:/nowhere/tok", "sha256": "ab" * 32}
    assert cfg["model_args"]["token_shape"] == [2, 2, 3] and cfg["model_args"]["num_classes"] == 2
    assert {"ce", "acc", "mask_ratio"} <= set(full["final_losses"])


def test_token_data_without_labels(tmp_path):
    from tokcli.train.loop import train

    tokens = _token_file(tmp_path / "codes.npz", labels=False)
    with pytest.raises(TokUsageError, match="has no labels but model_args.num_classes = 4") as e:
        train(_recipe(tokens, num_classes=4), output_dir=tmp_path / "a", progress=False)
    assert "\n" not in str(e.value)
    res = train(_recipe(tokens), output_dir=tmp_path / "u", max_steps=1, progress=False)  # unconditional
    import tokcli

    assert tokcli.load_generator(res["model_dir"], device="cpu").num_classes == 1
    with pytest.raises(TokUsageError, match="codebook_size = 8 but the token file"):
        train(_recipe(tokens, codebook_size=8), output_dir=tmp_path / "c", progress=False)
