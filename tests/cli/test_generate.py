"""`tok generate` end to end with a tiny random SoftVQ tokenizer and a tiny random SiT generator built here (no shipped
weights): decodable PNGs named by class and index, the same images for any batch size, a token file that `tok decode`
turns into the same PNGs, and one-line refusals of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_tok

TOK_ARGS = {"encoder_model": "tok_vit_tiny", "decoder_model": "tok_vit_tiny", "encoder_depth": 1, "decoder_depth": 1,
            "image_size": 32, "num_latent_tokens": 4, "codebook_embed_dim": 4, "codebook_size": 16,
            "num_codebooks": 2, "vq_mean": 0.05, "vq_std": 0.5,
            "layer_scale_init": 1.0}  # a random decoder that depends on its tokens
GEN_ARGS = {"input_size": 4, "in_channels": 4, "hidden_size": 32, "depth": 1, "num_heads": 2, "num_classes": 5}


def _one_line_error(p, code=2):
    err = p.stderr.decode()
    assert p.returncode == code and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def randomize(model, seed: int) -> None:
    """Re-draw every trainable tensor (adaLN-Zero would make the network the identity and the velocity 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)


def make_sit_folder(dest, tokenizer: str | None, sha: str | None, seed: int = 0, **args):
    from tokcli.gen.sit.model import SiT

    gen = SiT(**{**GEN_ARGS, **args})
    randomize(gen, seed)
    gen.tokenizer_ref = {"name": tokenizer, "sha256": sha} if tokenizer else {}
    gen.sample_defaults.update(steps=4)
    gen.save_folder(dest, name=dest.name, provenance={"source": f"random init, seed {seed} (test fixture)"})
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(tokenizer folder, generator folder naming it)."""
    import torch

    from tokcli.families.softvq.model import SoftVQ

    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    tok = SoftVQ(**TOK_ARGS)
    folder = tok.save_folder(root / "tok", name="tiny-softvq", provenance={"source": "random init (test fixture)"})
    gen = make_sit_folder(root / "gen", f"local-dir:{folder.path}", folder.sha256)
    return folder.path, gen


def _pngs(folder) -> dict[str, np.ndarray]:
    from PIL import Image

    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def test_generate_writes_decodable_pngs_by_class_and_index(models, tmp_path):
    _, gen = models
    p = run_tok("generate", "-m", gen, "--class", "1,3", "-n", "2", "--seed", "5", "-o", tmp_path / "out",
                "--device", "cpu", "-q")
    assert p.returncode == 0, p.stderr.decode()
    imgs = _pngs(tmp_path / "out")
    assert sorted(imgs) == ["class0001/00000.png", "class0001/00001.png", "class0003/00000.png",
                            "class0003/00001.png"]
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in imgs.values())
    assert len({a.tobytes() for a in imgs.values()}) == 4  # different seeds, different images
    assert p.stdout == b"" and "generated 4 image(s)" in p.stderr.decode()


def test_same_seed_same_images_for_any_batch_size(models, tmp_path):
    _, gen = models
    runs = {}
    for b in ("1", "3"):
        p = run_tok("generate", "-m", gen, "--class", "all", "-n", "1", "--seed", "7", "-b", b, "--sampler", "sde",
                    "-o", tmp_path / b, "--tokens-out", tmp_path / f"{b}.npz", "--device", "cpu", "-q")
        assert p.returncode == 0, p.stderr.decode()
        with np.load(tmp_path / f"{b}.npz", allow_pickle=False) as z:
            runs[b] = (_pngs(tmp_path / b), z["latents"].copy(), z["labels"].copy())
    (img1, tok1, lab1), (img3, tok3, lab3) = runs["1"], runs["3"]
    assert list(lab1) == list(lab3) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(tok1, tok3, rtol=0, atol=1e-5)  # fp32 GEMM blocking only
    assert sorted(img1) == sorted(img3)
    assert max(int(np.abs(img1[k].astype(int) - img3[k]).max()) for k in img1) <= 1


def test_tokens_out_decodes_to_the_same_pngs(models, tmp_path):
    tok, gen = models
    p = run_tok("generate", "-m", gen, "--class", "2", "-n", "3", "--sampler", "ode", "--cfg", "2.5", "-b", "2",
                "-o", tmp_path / "gen", "--tokens-out", tmp_path / "codes.npz", "--device", "cpu", "-q")
    assert p.returncode == 0, p.stderr.decode()
    with np.load(tmp_path / "codes.npz", allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        assert list(z["keys"]) == [f"class0002/{i:05d}" for i in range(3)] and list(z["labels"]) == [2, 2, 2]
    assert header["family"] == "softvq" and header["tokens"]["shape"] == [4, 4]
    assert header["generator"]["family"] == "sit" and header["generator"]["sampler"]["cfg"] == 2.5
    d = run_tok("decode", tmp_path / "codes.npz", "-o", tmp_path / "dec", "-b", "2", "--device", "cpu", "-q")
    assert d.returncode == 0, d.stderr.decode()
    a, b = _pngs(tmp_path / "gen"), _pngs(tmp_path / "dec")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_latents_are_denormalised_with_the_tokenizer_statistics(models):
    import torch

    import tokcli

    tok_path, gen_path = models
    gen, tok = tokcli.load_generator(gen_path, device="cpu"), tokcli.load(tok_path, device="cpu")
    x = gen.sample([0, 4], seed=3, sampler="ode", cfg=1.0)
    assert x.shape == (2, 4, 4) and x.dtype == torch.float64
    torch.testing.assert_close(gen.sample([4], seed=4, sampler="ode", cfg=1.0), x[1:], rtol=0, atol=1e-6)  # seed + i
    torch.testing.assert_close(gen.tokens_for(x, tok), x.float() * 0.5 + 0.05)
    z = torch.randn(2, 4, 4)
    torch.testing.assert_close(gen.sample([0, 4], noise=z, sampler="ode", steps=2),
                               gen.sample([0, 4], noise=z, seed=99, sampler="ode", steps=2))


@pytest.mark.parametrize("args, needle", [
    (("--class", "5"), "class 5 is out of range"),
    (("--class", "-1"), "out of range"),
    (("--class", "x"), "--class takes class ids"),
    (("--class", "1", "--steps", "0"), "--steps must be at least 1"),
    (("--class", "1", "-n", "0"), "-n (samples per class) must be at least 1"),
    (("--class", "1", "--sampler", "heun"), "sampler must be one of ode, sde"),
    (("--class", "1", "--guidance-interval", "0.8,0.2"), "guidance_interval"),
    (("--class", "1", "--cfg", "-1"), "cfg must be a number >= 0"),
])
def test_bad_input_is_one_line(models, tmp_path, args, needle):
    _, gen = models
    p = run_tok("generate", "-m", gen, *args, "-o", tmp_path / "out", "--device", "cpu", "-q")
    assert needle in _one_line_error(p), p.stderr.decode()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_tokenizer_names_the_model_to_get(models, tmp_path, monkeypatch):
    tok, _ = models
    gen = make_sit_folder(tmp_path / "g", "softvq-b-64", None)  # a registry tokenizer not converted here
    p = run_tok("generate", "-m", gen, "--class", "0", "-o", tmp_path / "out", "--device", "cpu",
                env={"TOK_CACHE": str(tmp_path / "cache")})
    err = _one_line_error(p, code=1)
    assert "softvq-b-64" in err and "tok convert softvq-b-64" in err
    bare = make_sit_folder(tmp_path / "bare", None, None)
    p = run_tok("generate", "-m", bare, "--class", "0", "-o", tmp_path / "out", "--device", "cpu")
    assert "--tokenizer NAME" in _one_line_error(p)
    p = run_tok("generate", "-m", bare, "--class", "0", "-o", tmp_path / "out", "--tokenizer", tok, "--device", "cpu",
                "-q")
    assert p.returncode == 0, p.stderr.decode()


def test_other_tokenizer_weights_or_shapes_are_refused(models, tmp_path):
    tok, _ = models
    gen = make_sit_folder(tmp_path / "g", f"local-dir:{tok}", "0" * 64)
    p = run_tok("generate", "-m", gen, "--class", "0", "-o", tmp_path / "out", "--device", "cpu")
    assert "another checkpoint" in _one_line_error(p, code=1)
    wide = make_sit_folder(tmp_path / "w", f"local-dir:{tok}", None, in_channels=8)
    p = run_tok("generate", "-m", wide, "--class", "0", "-o", tmp_path / "out", "--device", "cpu")
    assert "latents of shape [4, 4]" in _one_line_error(p, code=1)


def test_load_refuses_the_other_kind(models):
    import tokcli
    from tokcli.errors import TokUsageError

    tok, gen = models
    with pytest.raises(TokUsageError, match="is a generator"):
        tokcli.load(gen, device="cpu")
    with pytest.raises(TokUsageError, match="is a tokenizer"):
        tokcli.load_generator(tok, device="cpu")
    p = run_tok("generate", "-m", tok, "--class", "0", "-o", "x", "--device", "cpu")
    assert "load it with tokcli.load" in _one_line_error(p)


def test_generator_cards_say_how_to_load_them(models):
    """The folder's card tags and loads a generator as a generator, a tokenizer's as a tokenizer."""
    tok, gen = models
    card, tcard = (gen / "README.md").read_text(), (tok / "README.md").read_text()
    assert "- image-generator" in card and "tokcli.load_generator(" in card
    assert "- image-tokenizer" in tcard and "tokcli.load(" in tcard and "load_generator" not in tcard
