"""WeTok's factorised AR generator against the official parity fixture (../shared/parity/wetok-ar, README there):
`tok convert` of the official Lightning .ckpt + GenStage config.yaml -> generator folder (+ the frozen first stage as
a WeTok tokenizer folder) -> tokcli.load_generator -> the 2-D RoPE table, teacher-forced logits of every head and
the block outputs, the image forward and its loss, the three KV-cache sampling runs replayed from the recorded tokens
(cond / uncond / guided logits, probabilities, contexts, decoded images), greedy tokens exactly and the seeded runs
from their seeds with the official multinomial stream; bad checkpoints and configs refused with one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from conftest import PARITY, convert_fixture, read_npz, run_tok

AR = PARITY / "wetok-ar"
CKPT, CONFIG = AR / "WeTok_AR.ckpt", AR / "config.yaml"
TOL, PROB_TOL = 2e-5, 1e-5
RUNS = ("greedy", "seeded", "filtered")
pytestmark = pytest.mark.skipif(not (AR / "expected.npz").is_file(),
                                reason=f"WeTok AR parity fixture not found at {AR} (set TOK_PARITY_DIR)")


@pytest.fixture(scope="module")
def inputs() -> dict:
    return read_npz(AR / "inputs.npz")


@pytest.fixture(scope="module")
def expected() -> dict:
    return read_npz(AR / "expected.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_fixture(tmp_path_factory, CKPT, "wetok_ar", CONFIG, "wetok-ar-fixture")


@pytest.fixture(scope="module")
def gen(converted):
    import tokcli

    return tokcli.load_generator(f"local-dir:{converted}", device="cpu")


@pytest.fixture(scope="module")
def tok(gen):
    import tokcli

    return tokcli.load(gen.tokenizer_name, device="cpu")


def close(name: str, got, want, tol: float = TOL) -> float:
    got = got.detach().double().cpu().numpy() if hasattr(got, "detach") else np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    diff = float(np.abs(got - want).max())
    print(f"{name}: max abs diff {diff:.3g}")  # shown with pytest -s
    assert diff <= tol, f"{name}: max abs diff {diff:.3g} > {tol}"
    return diff


def _t(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def test_the_folders_keep_the_official_sizes_and_the_released_settings(converted, gen, tok):
    cfg = json.loads((converted / "config.json").read_text())
    a = cfg["model_args"]
    assert cfg["family"] == "wetok_ar" and a["factorized_bits"] == [3, 3, 3, 3] and a["class_num"] == 10
    assert (a["block_size"], a["dim"], a["n_head"], a["spatial_n_layer"], a["factorized_n_layer"]) == (16, 64, 4, 2, 2)
    assert cfg["sample"] == {"cfg": [1.75, 1.8, 2.0, 2.0], "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0}
    assert {"vocab_size", "cond_dim", "token_factorization"} <= set(cfg["provenance"]["ignored_config_keys"])
    assert cfg["tokenizer"]["name"] == "local-dir:tokenizer" and cfg["tokenizer"]["sha256"] == tok.sha256
    tcfg = json.loads((converted / "tokenizer" / "config.json").read_text())
    assert tcfg["family"] == "wetok" and tcfg["model_args"]["image_size"] == 16
    assert tok.spec.shape == (4, 4, 4) and tok.spec.codebook_size == 8
    assert gen.null_class == 10 and gen.tokenizer_name == f"local-dir:{converted / 'tokenizer'}"


def test_rope_table_and_teacher_forced_logits_of_every_head(gen, inputs, expected):
    import torch

    cos, sin = gen.rope(slice(None), "cpu")
    close("freqs_cis", torch.stack([cos, sin], dim=-1), expected["freqs_cis"], 1e-6)
    assert not cos[0].any() and not sin[0].any()  # the class row is zeros, not the identity
    toks = [_t(inputs[f"tf_tokens_{i}"]) for i in range(4)]
    seen: dict[str, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda m, a, out, key=f"{kind}{j}": seen.__setitem__(key, out))
             for kind, blocks in (("spatial", gen.spatial_blocks), ("factorized", gen.factorized_blocks))
             for j, b in enumerate(blocks)]
    try:
        with torch.inference_mode():
            logits = gen(tuple(toks) + (_t(inputs["tf_labels"])[:, None],))
    finally:
        for h in hooks:
            h.remove()
    for j in range(2):
        close(f"tf_spatial{j}_out", seen[f"spatial{j}"], expected[f"tf_spatial{j}_out"])
        close(f"tf_factorized{j}_out", seen[f"factorized{j}"], expected[f"tf_factorized{j}_out"])
    for i in range(4):
        close(f"tf_logits_{i}", logits[i], expected[f"tf_logits_{i}"])


def test_image_forward_and_loss(gen, tok, inputs, expected):
    import torch

    x = torch.from_numpy(inputs["images"].astype(np.float64) / 127.5 - 1.0).float().permute(0, 3, 1, 2).contiguous()
    close("image_x", x, expected["image_x"], 0.0)
    with torch.inference_mode():
        logits, targets = gen.image_forward(x, _t(inputs["tf_labels"]), tok)
        total, parts = gen.loss(logits, targets)
    for i in range(4):
        assert np.array_equal(targets[i].numpy(), expected[f"img_tokens_{i}"]), f"img_tokens_{i}"
        close(f"img_logits_{i}", logits[i], expected[f"img_logits_{i}"])
        close(f"img_loss_{i}", parts[i], expected[f"img_loss_{i}"], 1e-5)
    close("img_loss", total, expected["img_loss"], 1e-5)


def _settings(expected, run: str) -> dict:
    return {"cfg": expected["cfg_scale"].tolist(), "temperature": expected[f"{run}_temperature"].tolist(),
            "top_k": [int(v) for v in expected[f"{run}_top_k"]], "top_p": expected[f"{run}_top_p"].tolist()}


def _replay(gen, inputs, expected, run: str, **kw):
    """(tokens [B, N, k], per-sub-token records, contexts) of the run, forced to the recorded tokens by default."""
    import torch

    from tokcli.gen.wetok_ar.sampler import sample_tokens

    recs: dict[int, list] = {i: [] for i in range(4)}
    hs: list = []
    forced = _t(expected[f"{run}_tokens"]).permute(1, 2, 0)  # (k, B, N) -> (B, N, k)
    kw = {"noise": forced, **kw}
    with torch.inference_mode():
        out = sample_tokens(gen, _t(inputs["sample_labels"]), seeds=[0, 1], **_settings(expected, run),
                            on_context=lambda n, h: hs.append(h[:, 0].clone()),
                            on_subtoken=lambda n, i, r: recs[i].append(r), **kw)
    return out, recs, torch.stack(hs)


@pytest.mark.parametrize("run", RUNS)
def test_kv_cache_runs_replayed_from_the_recorded_tokens(gen, tok, inputs, expected, run):
    import torch

    out, recs, hs = _replay(gen, inputs, expected, run)
    assert np.array_equal(out.permute(2, 0, 1).numpy(), expected[f"{run}_tokens"])
    assert list(expected[f"{run}_input_pos"]) == list(range(16)) and len(hs) == 16
    close(f"{run}_h", hs, expected[f"{run}_h"])
    for i in range(4):
        stack = {key: torch.stack([r[key] for r in recs[i]]) for key in ("cond", "uncond", "cfg", "probs")}
        close(f"{run}_logits_cond_{i}", stack["cond"], expected[f"{run}_logits_cond_{i}"])
        close(f"{run}_logits_uncond_{i}", stack["uncond"], expected[f"{run}_logits_uncond_{i}"])
        close(f"{run}_logits_cfg_{i}", stack["cfg"], expected[f"{run}_logits_cfg_{i}"])
        close(f"{run}_probs_{i}", stack["probs"], expected[f"{run}_probs_{i}"], PROB_TOL)
        chosen = stack["probs"].gather(-1, out[:, :, i].T[..., None])[..., 0]
        close(f"{run}_logprob_{i} (as prob)", chosen, np.exp(expected[f"{run}_logprob_{i}"]), PROB_TOL)
    with torch.inference_mode():
        img = tok.decode(gen.tokens_for(out, tok), clamp=False)
    close(f"{run}_image", img, expected[f"{run}_image"])


def test_kv_cache_equals_teacher_forcing_on_the_sampled_sequence(gen, inputs, expected):
    import torch

    out, recs, _ = _replay(gen, inputs, expected, "seeded")
    with torch.inference_mode():
        tf = gen(tuple(out[..., i] for i in range(4)) + (_t(inputs["sample_labels"]),))
    for i in range(4):
        close(f"kv vs tf {i}", torch.stack([r["cond"] for r in recs[i]]).transpose(0, 1), tf[i].numpy())


def test_greedy_tokens_exactly_through_the_public_sampler(gen, inputs, expected):
    import torch

    want = expected["greedy_tokens"]
    for seed in (0, 123):  # greedy does not depend on the draws
        got = gen.sample(_t(inputs["sample_labels"]), seed=seed, top_k=1)
        assert got.dtype == torch.long and got.shape == (2, 16, 4)
        assert np.array_equal(got.permute(2, 0, 1).numpy(), want), f"greedy tokens differ (seed {seed})"


@pytest.mark.parametrize("run", ("seeded", "filtered"))
def test_seeded_runs_from_their_seeds_with_the_official_multinomial(gen, inputs, expected, run):
    import torch

    if not torch.__version__.startswith("2.14.1"):
        pytest.skip(f"the fixture's seeds reproduce with torch 2.14.1's CPU multinomial (this is {torch.__version__})")
    g = torch.Generator().manual_seed(int(expected[f"{run}_seed"]))
    out, _, _ = _replay(gen, inputs, expected, run, noise=None,
                        draw_fn=lambda probs, u: torch.multinomial(probs, 1, generator=g)[:, 0])
    assert np.array_equal(out.permute(2, 0, 1).numpy(), expected[f"{run}_tokens"])


def test_seeded_samples_do_not_depend_on_the_batch(gen):
    import torch

    a = gen.sample([3, 8, 1], seed=11, top_p=0.9)
    b = torch.cat([gen.sample([3], seed=11, top_p=0.9), gen.sample([8, 1], seed=[12, 13], top_p=0.9)])
    assert torch.equal(a, b)


def _release(tmp_path, gpt=None, first=None, state=None):
    """A copy of the fixture release with config / state-dict changes."""
    import torch

    rel = tmp_path / "release"
    rel.mkdir()
    cfg = yaml.safe_load(CONFIG.read_text())
    init = cfg["model"]["init_args"]
    init["transformer_config"]["params"].update(gpt or {})
    init["first_stage_config"]["params"].update(first or {})
    (rel / "config.yaml").write_text(yaml.safe_dump(cfg))
    if state is None:
        shutil.copy(CKPT, rel / "WeTok_AR.ckpt")
    else:
        ck = torch.load(CKPT, map_location="cpu", weights_only=True)
        state(ck["state_dict"])
        torch.save(ck, rel / "WeTok_AR.ckpt")
    return rel


@pytest.mark.parametrize("gpt, first, state, needle", [
    ({"dim": 32, "cond_dim": 32}, None, None, "says dim=32 but the weights have dim=64"),
    ({"factorized_bits": [3, 3, 3, 4]}, None, None, "factorized_bits"),
    ({"spatial_n_layer": 3}, None, None, "says spatial_n_layer=3 but the weights have spatial_n_layer=2"),
    ({"class_num": 1000}, None, None, "says class_num=1000"),
    ({"multiple_of": 128, "ffn_dim_multiplier": 0.5}, None, None, "ffn_hidden"),
    ({"factorized_k": 3}, None, None, "factorized_k 3 but 4 factorized_bits"),
    ({"cls_token_num": 2}, None, None, "cls_token_num 2 is not supported"),
    ({"token_factorization": False}, None, None, "token_factorization is off"),
    (None, {"factorized_bits": [6, 6]}, None, "first stage's factorized_bits [6, 6] differ"),
    (None, None, lambda sd: sd.pop("transformer.norm.weight"), "1 missing: norm.weight"),
    (None, None, lambda sd: sd.__setitem__("transformer.extra.weight", sd["transformer.norm.weight"]),
     "1 unexpected: extra.weight"),
    (None, None, lambda sd: sd.__setitem__("cond_stage_model.x", sd["transformer.norm.weight"]),
     "outside transformer.* / first_stage_model.*"),
])
def test_bad_releases_are_one_line(tmp_path, gpt, first, state, needle):
    rel = _release(tmp_path, gpt, first, state)
    p = run_tok("convert", rel / "WeTok_AR.ckpt", "--family", "wetok_ar", "--config", rel / "config.yaml",
                "-o", tmp_path / "out")
    err = p.stderr.decode()
    assert p.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err and not (tmp_path / "out").exists()
    assert [q.name for q in tmp_path.iterdir()] == ["release"]  # no tokenizer or temp folder left behind


def test_stale_kv_caches_are_dropped_and_foreign_pickles_refused(tmp_path):
    import argparse

    import torch

    rel = _release(tmp_path, state=lambda sd: sd.update({
        "transformer.spatial_blocks.0.attention.kv_cache.k_cache": torch.zeros(2, 4, 24, 16)}))
    p = run_tok("convert", rel / "WeTok_AR.ckpt", "--family", "wetok_ar", "--config", rel / "config.yaml",
                "-o", tmp_path / "ok")
    assert p.returncode == 0, p.stderr.decode()
    prov = json.loads((tmp_path / "ok" / "config.json").read_text())["provenance"]
    assert prov["dropped_kv_cache_buffers"] == 1
    ck = torch.load(CKPT, map_location="cpu", weights_only=True)
    ck["hyper_parameters"] = argparse.Namespace(lr=1.0)
    torch.save(ck, tmp_path / "pickled.ckpt")
    p = run_tok("convert", tmp_path / "pickled.ckpt", "--family", "wetok_ar", "--config", CONFIG,
                "-o", tmp_path / "bad")
    err = p.stderr.decode()
    assert p.returncode == 1 and len(err.strip().splitlines()) == 1 and "argparse.Namespace" in err, err


def test_tokenizer_out_writes_the_tokenizer_elsewhere(tmp_path):
    from tokcli.gen.wetok_ar.convert import convert_official

    folder = convert_official(CKPT, CONFIG, tmp_path / "gen", tokenizer_out=tmp_path / "tok")
    ref = folder.config["tokenizer"]
    assert ref["name"] == f"local-dir:{(tmp_path / 'tok').resolve()}" and not (tmp_path / "gen" / "tokenizer").exists()
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["family"] == "wetok"


def test_cli_tokenizer_out(tmp_path):
    p = run_tok("convert", CKPT, "--family", "wetok_ar", "--config", CONFIG, "-o", tmp_path / "gen",
                "--tokenizer-out", tmp_path / "tok")
    assert p.returncode == 0, p.stderr.decode()
    ref = json.loads((tmp_path / "gen" / "config.json").read_text())["tokenizer"]
    assert ref["name"] == f"local-dir:{(tmp_path / 'tok').resolve()}" and (tmp_path / "tok" / "model.safetensors").is_file()
    # a tokenizer checkpoint carries no second model: refused before anything is read or written
    p = run_tok("convert", CKPT, "--family", "wetok", "--config", CONFIG, "-o", tmp_path / "w",
                "--tokenizer-out", tmp_path / "t2")
    err = p.stderr.decode()
    assert p.returncode == 2 and "--tokenizer-out is for generator checkpoints" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists() and not (tmp_path / "t2").exists()


def test_allow_listed_lightning_containers_load(tmp_path, monkeypatch):
    """A global on the converter's allow-list (Lightning's AttributeDict in real checkpoints; argparse.Namespace
    stands in for it here, lightning not being installed) is loaded with torch.serialization.safe_globals."""
    import argparse

    import torch

    from tokcli.gen.wetok_ar import convert

    ck = torch.load(CKPT, map_location="cpu", weights_only=True)
    ck["hyper_parameters"] = argparse.Namespace(lr=1.0)
    torch.save(ck, tmp_path / "hp.ckpt")
    monkeypatch.setattr(convert, "SAFE_GLOBALS", ("argparse.Namespace",))
    assert len(convert.read_checkpoint(tmp_path / "hp.ckpt")) == 119
