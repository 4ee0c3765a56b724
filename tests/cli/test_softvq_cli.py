"""SoftVQ-VAE through the command line: the registry, `tok convert NAME` from the Hugging Face cache (and its one-line
refusal offline), and `tok decode` refusing latents of another model or of the wrong L / d."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import PARITY, run_tok, write_images

SOFTVQ = PARITY / "softvq"
TINY = {"encoder_model": "vit_small_patch14_dinov2.lvd142m", "decoder_model": "vit_small_patch14_dinov2.lvd142m",
        "encoder_depth": 1, "decoder_depth": 1, "image_size": 64, "num_latent_tokens": 8,
        "codebook_embed_dim": 8, "codebook_size": 16, "num_codebooks": 2}


def _one_line_error(p, code=1):
    err = p.stderr.decode()
    assert p.returncode == code and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _official_release(dest, args: dict, seed: int = 0):
    """A random SoftVQ written as an official PyTorchModelHubMixin folder (official key names and config keys)."""
    import torch
    from safetensors.torch import save_file

    from tokcli.families.softvq.model import SoftVQ

    torch.manual_seed(seed)
    m = SoftVQ(**args)
    state = {k.replace("decoder.to_pixel.", "decoder.to_pixel.model."): v.contiguous()
             for k, v in m.state_dict().items()}
    state["quantize.codebook_used"] = torch.zeros(args.get("num_codebooks", 4), 65536)
    tok_only = ("encoder_depth", "decoder_depth", "normalize_latents", "entropy_temperature", "layer_scale_init")
    cfg = {k: v for k, v in m.model_args.items() if k not in tok_only}
    cfg.update(enc_type="vit", dec_type="vit", enc_pretrained=True, repa=False, z_channels=256,
               entropy_loss_ratio=0.0)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(state, str(dest / "model.safetensors"))
    return dest


def test_registry_lists_the_demo_and_the_eight_releases():
    p = run_tok("models", "softvq-*", "--json")
    assert p.returncode == 0, p.stderr.decode()
    rows = json.loads(p.stdout)
    rows = rows if isinstance(rows, list) else rows.get("models", rows)
    names = {r["name"] for r in rows}
    assert names == {f"softvq-{s}-{n}" for s in ("b", "bl", "l") for n in (32, 64)} | {
        "softvq-bl-64-512", "softvq-l-32-512", "softvq-tiny"}  # the eight releases and the shipped demo


def test_convert_name_offline_names_the_files_and_the_command(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    p = run_tok("convert", "softvq-l-64", "-o", tmp_path / "out", env=env)
    err = _one_line_error(p)
    assert "SoftVQVAE/softvq-l-64:model.safetensors" in err and "SoftVQVAE/softvq-l-64:config.json" in err
    assert "hf download SoftVQVAE/softvq-l-64 model.safetensors config.json" in err
    assert not (tmp_path / "out").exists()


def test_convert_name_from_the_hf_cache(tmp_path):
    """`tok convert softvq-b-64` with both files in the HF cache (a small random stand-in with the name's sizes)."""
    snap = tmp_path / "hub" / "models--SoftVQVAE--softvq-b-64"
    rev = "0123456789abcdef0123456789abcdef01234567"
    args = dict(TINY, image_size=256, num_latent_tokens=64, codebook_embed_dim=32, num_codebooks=4)
    _official_release(snap / "snapshots" / rev, args)
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text(rev)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    p = run_tok("convert", "softvq-b-64", "-o", tmp_path / "out", env=env)
    assert p.returncode == 0, p.stderr.decode()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["provenance"]["registry_name"] == "softvq-b-64"
    assert cfg["provenance"]["source"] == "hf-hub:SoftVQVAE/softvq-b-64/model.safetensors"
    assert cfg["model_args"]["encoder_depth"] == 1 and cfg["tokens"]["shape"] == [64, 32]


@pytest.mark.skipif(not (SOFTVQ / "expected.npz").is_file(), reason="SoftVQ parity fixture not found")
def test_convert_as_a_name_whose_sizes_the_config_contradicts(tmp_path):
    p = run_tok("convert", SOFTVQ / "checkpoint" / "model.safetensors", "--as", "softvq-l-64", "-o", tmp_path / "o")
    err = _one_line_error(p)
    assert "image_size=64" in err and "softvq-l-64" in err and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The decoding model and token files of other models: (model folder, {name: token file})."""
    from tokcli.families.softvq.convert import convert_official

    root = tmp_path_factory.mktemp("softvq-cli")
    imgs = write_images(root / "imgs", n=2)
    model = root / "model"
    convert_official(_official_release(root / "release", TINY), None, model)
    files = {}
    others = {"d": dict(TINY, codebook_embed_dim=4), "L": dict(TINY, num_latent_tokens=4)}
    for key, args in others.items():
        other = root / f"other-{key}"
        convert_official(_official_release(root / f"release-{key}", args, seed=1), None, other)
        files[key] = root / f"{key}.npz"
        p = run_tok("encode", imgs, "-m", other, "-o", files[key], "--device", "cpu")
        assert p.returncode == 0, p.stderr.decode()
    files["own"] = root / "own.npz"
    assert run_tok("encode", imgs, "-m", model, "-o", files["own"], "--device", "cpu").returncode == 0
    return model, files, imgs


def test_decode_refuses_latents_of_the_wrong_width_or_length(folders, tmp_path):
    model, files, _ = folders
    err = _one_line_error(run_tok("decode", files["d"], "-m", model, "-o", tmp_path / "a"))
    assert "latent_dim=4" in err
    err = _one_line_error(run_tok("decode", files["L"], "-m", model, "-o", tmp_path / "b"))
    assert "token shape [4, 8]" in err
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    p = run_tok("decode", files["own"], "-o", tmp_path / "c")
    assert p.returncode == 0, p.stderr.decode()


def test_decode_refuses_tokens_of_another_family(folders, tiny_model, tmp_path):
    model, _, imgs = folders
    wetok = tmp_path / "wetok.npz"
    assert run_tok("encode", imgs, "-m", tiny_model, "-o", wetok, "--device", "cpu").returncode == 0
    err = _one_line_error(run_tok("decode", wetok, "-m", model, "-o", tmp_path / "out"))
    assert "'wetok'" in err and "softvq" in err


def test_info_shows_the_latent_statistics(folders):
    _, files, _ = folders
    p = run_tok("info", files["own"])
    assert p.returncode == 0, p.stderr.decode()
    with np.load(files["own"], allow_pickle=False) as z:
        header = json.loads(str(z["header"][()]))
    assert set(header["tokens"]["extra"]) >= {"vq_mean", "vq_std", "normalized"}
    assert b"vq_std" in p.stdout


def test_decode_refuses_normalised_latents_for_a_raw_model(folders, tmp_path):
    """Same weights, same sha256, but the file holds (z - mean) / std: decoding it as raw z would be silently wrong."""
    import shutil

    model, files, imgs = folders
    norm = tmp_path / "norm-model"
    shutil.copytree(model, norm)
    cfg = json.loads((norm / "config.json").read_text())
    cfg["model_args"]["normalize_latents"] = True
    cfg["tokens"]["extra"]["normalized"] = True
    (norm / "config.json").write_text(json.dumps(cfg))
    p = run_tok("encode", imgs, "-m", norm, "-o", tmp_path / "n.npz", "--device", "cpu")
    assert p.returncode == 0, p.stderr.decode()
    err = _one_line_error(run_tok("decode", tmp_path / "n.npz", "-m", model, "-o", tmp_path / "out"))
    assert "normalized=True" in err
    assert run_tok("decode", tmp_path / "n.npz", "-m", norm, "-o", tmp_path / "ok").returncode == 0


def test_convert_a_release_folder_through_the_cli(tmp_path):
    rel = _official_release(tmp_path / "release", TINY)
    p = run_tok("convert", rel, "-o", tmp_path / "no-family")
    assert p.returncode == 2 and b"--family" in p.stderr
    p = run_tok("convert", rel, "--family", "softvq", "-o", tmp_path / "m")
    assert p.returncode == 0, p.stderr.decode()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["family"] == "softvq" and cfg["model_args"]["num_latent_tokens"] == 8


def test_float16_latents_halve_the_payload_and_decode_like_reconstruct(folders, tmp_path):
    """--latent-dtype float16: recorded in the header, half the payload bytes, latents = float32 ones rounded, and
    decode(file) == reconstruct --latent-dtype float16 bit for bit (reconstruct rounds the same way)."""
    from PIL import Image

    model, files, imgs = folders
    half = tmp_path / "half.npz"
    p = run_tok("encode", imgs, "-m", model, "-o", half, "--latent-dtype", "float16", "--device", "cpu")
    assert p.returncode == 0, p.stderr.decode()
    with np.load(half, allow_pickle=False) as z, np.load(files["own"], allow_pickle=False) as full:
        header = json.loads(str(z["header"][()]))
        assert header["latent_dtype"] == "float16" and z["latents"].dtype == np.float16
        assert z["latents"].nbytes * 2 == full["latents"].nbytes
        np.testing.assert_array_equal(z["latents"], full["latents"].astype(np.float16))
        assert np.abs(z["latents"].astype(np.float32) - full["latents"]).max() > 0  # it did round
    assert run_tok("decode", half, "-o", tmp_path / "dec").returncode == 0
    p = run_tok("reconstruct", imgs, "-m", model, "-o", tmp_path / "rec", "--latent-dtype", "float16",
                "--device", "cpu")
    assert p.returncode == 0, p.stderr.decode()
    for png in sorted((tmp_path / "rec").rglob("*.png")):
        other = tmp_path / "dec" / png.relative_to(tmp_path / "rec")
        np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(other)))


def test_latent_dtype_is_refused_where_it_does_not_apply(folders, tiny_model, tmp_path):
    model, _, imgs = folders
    err = _one_line_error(run_tok("encode", imgs, "-m", tiny_model, "-o", tmp_path / "w.npz",
                                  "--latent-dtype", "float16"), code=2)
    assert "applies to latent tokens" in err and not (tmp_path / "w.npz").exists()
    err = _one_line_error(run_tok("encode", imgs, "-m", model, "-o", tmp_path / "b.npz",
                                  "--latent-dtype", "bfloat16"), code=2)
    assert "float32, float16" in err


def test_a_header_that_lies_about_the_latent_dtype_is_refused(folders, tmp_path):
    from tokcli.core.tokens import read_token_file, write_token_file

    _, files, _ = folders
    tf = read_token_file(files["own"])
    bad = tmp_path / "bad.npz"
    write_token_file(bad, header={**tf.header, "latent_dtype": "float16"}, keys=list(tf.keys), latents=tf.array)
    err = _one_line_error(run_tok("info", bad))
    assert "stored as float32 but the header says float16" in err


def test_bench_usage_counts_the_argmax_ids(folders):
    """SoftVQ tokens are soft latents; `tok bench usage` counts their per-token argmax ids, per codebook."""
    import torch

    import tokcli
    from tokcli.core.images import collect_inputs, iter_batches, to_tensor
    from tokcli.metrics.usage import codebook_usage

    model, _, imgs = folders
    p = run_tok("bench", "usage", imgs, "-m", model, "--json", "--device", "cpu")
    assert p.returncode == 0, p.stderr.decode()
    usage = json.loads(p.stdout)["metrics"]["usage"]
    tok = tokcli.load(str(model), device="cpu")
    items = collect_inputs([str(imgs)])
    _, batch = next(iter(iter_batches(items, tok.image_size, 8)))
    with torch.no_grad():
        ids = tok.encode_ids(to_tensor(batch)).numpy()  # [B, L]; token t uses codebook t // (L / G)
    want = codebook_usage(ids.reshape(len(ids), 2, -1).transpose(0, 2, 1), TINY["codebook_size"], group_axis=-1)
    assert usage["tokens"] == want["tokens"] == len(ids) * TINY["num_latent_tokens"]
    assert usage["used"] == want["used"] and [g["used"] for g in usage["groups"]] == [g["used"] for g in want["groups"]]
    assert "argmax" in usage["counted"]
