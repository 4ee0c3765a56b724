"""Training WeTok's factorised AR generator (tokcli/gen/wetok_ar/objective.py) through `tok train`: exact resume and
the exported folder, the loss is the model's official one on the regrouped sub-tokens, label dropout to the null
class (from the global RNG), and one-line refusals of token files that do not fit and of a conditional model
without labels."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokcli.errors import TokUsageError

MODEL_ARGS = {"spatial_n_layer": 1, "factorized_n_layer": 1, "n_head": 2, "dim": 16, "multiple_of": 8}


def _token_file(path, n=48, grid=3, groups=2, bits=3, labels=True, seed=0, shape=None, **spec):
    from tokcli.core.tokens import write_token_file

    rng = np.random.default_rng(seed)
    shape = shape or [grid, grid, groups]
    ids = rng.integers(0, 2 ** bits, size=(n, *shape))
    tokens = {"kind": "indices", "shape": shape, "codebook_size": 2 ** bits,
              "extra": {"groups": groups, "bits_per_group": bits}, **spec}
    header = {"model": "local-dir:/nowhere/tok", "model_sha256": "cd" * 32, "family": "wetok", "tokens": tokens}
    write_token_file(path, header=header, keys=[f"k{i}" for i in range(n)], indices=ids,
                     labels=rng.integers(0, 3, size=n) if labels else None)
    return path


def _recipe(tokens, max_steps=6, **model_args):
    from tokcli.train.recipe import recipe_from_dict

    return recipe_from_dict({
        "model": {"family": "wetok_ar", "name": "tiny-ar", "model_args": {**MODEL_ARGS, **model_args}},
        "data": {"tokens": str(tokens), "batch_size": 8},
        "optim": {"optimizer": "adamw", "lr": 1e-3, "max_steps": max_steps, "ema_decay": 0.9, "grad_clip": 1.0},
        "run": {"log_every": 1, "ckpt_every": 3, "device": "cpu"}}, source="test")


def _objective(recipe):
    from tokcli.core.registry import get_family

    obj = get_family("wetok_ar").objective("next_token")(recipe, device="cpu")
    obj.prepare()
    obj.build()
    return obj


def test_training_resumes_exactly_and_exports_the_tokenizer(tmp_path):
    from safetensors.torch import load_file

    from tokcli.train.loop import train

    tokens = _token_file(tmp_path / "codes.npz")
    full = train(_recipe(tokens), output_dir=tmp_path / "a", progress=False)
    train(_recipe(tokens), output_dir=tmp_path / "b", max_steps=3, progress=False)
    resumed = train(_recipe(tokens), resume=tmp_path / "b", max_steps=6, progress=False)
    a, b = load_file(f"{full['model_dir']}/model.safetensors"), load_file(f"{resumed['model_dir']}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the raw weights too (the exported ones are the EMA's), and training moved them off the zero-init heads
    ra = load_file(next((tmp_path / "a").rglob("step-0000006/model.safetensors")))
    rb = load_file(next((tmp_path / "b").rglob("step-0000006/model.safetensors")))
    assert all(torch.equal(ra[k], rb[k]) for k in ra) and float(ra["head.0.weight"].abs().max()) > 0
    cfg = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert cfg["family"] == "wetok_ar" and cfg["tokenizer"] == {"name": "local-dir:/nowhere/tok", "sha256": "cd" * 32}
    args = cfg["model_args"]
    assert (args["block_size"], args["factorized_bits"], args["class_num"]) == (9, [3, 3], 3)
    assert {"ce_0", "ce_1", "acc"} <= set(full["final_losses"])
    import tokcli

    gen = tokcli.load_generator(full["model_dir"], device="cpu")
    assert gen.sample([0, 2], seed=1).shape == (2, 9, 2)


def test_the_loss_is_the_models_official_loss_on_the_regrouped_subtokens(tmp_path):
    from tokcli.gen.wetok_ar.model import regroup

    tokens = _token_file(tmp_path / "codes.npz")
    obj = _objective(_recipe(tokens, factorized_bits=[2, 4]))  # another split of a position's 6 bits
    model = obj.model.eval()
    with torch.no_grad():
        for h in model.head:  # the official init zeroes the heads: every loss would be log V
            h.weight.normal_(0, 0.5)
    batch = obj.tokens.batch(0)
    flat = batch["tokens"].reshape(8, 9, 2)
    want = regroup(flat, [3, 3], [2, 4])
    assert torch.equal(want[..., 0], flat[..., 0] & 3)  # LSB-first: sub-token 0 = the low 2 bits of group 0
    assert torch.equal(want[..., 1], (flat[..., 0] >> 2) + 2 * flat[..., 1])
    loss, logs = obj.loss("model", obj.networks, batch, 0, 0)
    toks = [want[..., 0], want[..., 1]]
    with torch.no_grad():
        ref, parts = model.loss(model(tuple(toks) + (batch["labels"],)), toks)
    assert float(loss.detach()) == pytest.approx(float(ref), abs=1e-6)
    assert [logs["ce_0"], logs["ce_1"]] == pytest.approx([float(p) for p in parts], abs=1e-6)


def test_label_dropout_sends_labels_to_the_null_class_from_the_global_rng(tmp_path):
    tokens = _token_file(tmp_path / "codes.npz", n=256)
    obj = _objective(_recipe(tokens, class_dropout_prob=0.5))
    seen: list[torch.Tensor] = []
    obj.model.class_emb.embedding_table.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    batch = {"tokens": obj.tokens.tokens, "labels": obj.tokens.labels}

    def run(seed: int, train: bool) -> torch.Tensor:
        seen.clear()
        obj.model.train(train)
        torch.manual_seed(seed)
        loss, _ = obj.loss("model", obj.networks, batch, 0, 0)
        return loss, seen[0]

    loss, y = run(0, True)
    dropped = y == 3  # class_num 3: row 3 is the null class
    assert 0.4 < float(dropped.float().mean()) < 0.6, float(dropped.float().mean())
    assert torch.equal(y[~dropped], obj.tokens.labels[~dropped])
    assert torch.equal(run(0, True)[1], y) and not torch.equal(run(1, True)[1], y)  # the global RNG decides
    assert torch.equal(run(0, False)[1], obj.tokens.labels)  # eval: no dropout
    with torch.no_grad():
        for h in obj.model.head:  # zero heads (the official init) pass no gradient back
            h.weight.normal_(0, 0.5)
    obj.model.zero_grad()
    run(0, True)[0].backward()
    grad = obj.model.class_emb.embedding_table.weight.grad
    assert float(grad[3].abs().sum()) > 0  # the null row is trained (for CFG)


@pytest.mark.parametrize("spec, args, needle", [
    ({"shape": [680], "extra": {}}, {}, "record no tokens.extra groups / bits_per_group"),
    ({"shape": [3, 3, 3]}, {}, "token shape [3, 3, 3] is not a square grid of 2 groups"),
    ({"shape": [2, 8, 2]}, {}, "token shape [2, 8, 2] is not a square grid"),
    ({"codebook_size": 16}, {}, "codebook_size 16 is not 2^bits_per_group = 8"),
    ({}, {"factorized_bits": [3, 4]}, "factorized_bits = [3, 4] must split the 6 bits"),
    ({}, {"block_size": 16}, "block_size = 16 but the token file"),
    ({}, {"class_num": 2}, "class_num = 2 but"),
])
def test_token_files_that_do_not_fit_are_refused_in_one_line(tmp_path, spec, args, needle):
    from tokcli.train.loop import train

    tokens = _token_file(tmp_path / "codes.npz", **spec)
    with pytest.raises(TokUsageError) as e:
        train(_recipe(tokens, **args), output_dir=tmp_path / "run", progress=False)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_token_data_without_labels(tmp_path):
    from tokcli.train.loop import train

    tokens = _token_file(tmp_path / "codes.npz", labels=False)
    with pytest.raises(TokUsageError, match="has no labels but model_args.class_num = 4") as e:
        train(_recipe(tokens, class_num=4), output_dir=tmp_path / "a", progress=False)
    assert "\n" not in str(e.value)
    res = train(_recipe(tokens, max_steps=1), output_dir=tmp_path / "u", progress=False)  # unconditional
    import tokcli

    gen = tokcli.load_generator(res["model_dir"], device="cpu")
    assert gen.num_classes == 1 and gen.null_class == 1


def test_subtokens_match_the_models_tokenizer_side(tmp_path):
    """The objective's regrouping of a batch = the model's ``subtokens_from_tokens`` (the image forward's targets)."""
    tokens = _token_file(tmp_path / "codes.npz", groups=3, bits=2)
    obj = _objective(_recipe(tokens, factorized_bits=[1, 5]))
    tok = SimpleNamespace(spec=SimpleNamespace(extra={"groups": 3, "bits_per_group": 2}))
    flat = obj.tokens.tokens[:5]
    ref = obj.model.subtokens_from_tokens(flat.reshape(5, 3, 3, 3), tok)
    assert all(torch.equal(a, b) for a, b in zip(obj.subtokens(flat), ref))
