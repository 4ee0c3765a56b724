"""SoftVQ-VAE end to end on the official parity fixture (../shared/parity/softvq, README there): `tok convert` of the
official PyTorchModelHubMixin folder -> model folder -> tokcli.load -> every intermediate of the official inference
path within the README tolerance (2e-5), argmax ids exact; the CLI on top; bad releases refused with one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import PARITY, assert_decode_equals_reconstruct, convert_fixture, read_npz, run_tok

SOFTVQ = PARITY / "softvq"
CKPT = SOFTVQ / "checkpoint"
TOL = 2e-5  # the fixture README's tolerance for a re-implementation in fp32
pytestmark = pytest.mark.skipif(not (SOFTVQ / "expected.npz").is_file(),
                                reason=f"SoftVQ parity fixture not found at {SOFTVQ} (set TOK_PARITY_DIR)")


@pytest.fixture(scope="module")
def expected() -> dict:
    return read_npz(SOFTVQ / "expected.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_fixture(tmp_path_factory, CKPT / "model.safetensors", "softvq", CKPT / "config.json",
                           "softvq-fixture")


@pytest.fixture(scope="module")
def model(converted):
    import tokcli

    return tokcli.load(f"local-dir:{converted}", device="cpu")


def _intermediates(model, x):
    """Every array of expected.npz, computed by the tok model (dec_tokens through a hook on the final norm)."""
    import torch

    seen = {}
    hook = model.decoder.model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("dec", o))
    try:
        with torch.inference_mode():
            enc = model.encoder(x)
            z_hat = model.quant_conv(enc)
            q = model.quantize(z_hat)
            cos = model.quantize.similarity(z_hat)
            recon = model.decode(model.encode(x), clamp=False)
    finally:
        hook.remove()
    n = model.decoder.grid ** 2
    return {"enc_out": enc, "z_hat": z_hat, "cos": cos, "probs": torch.softmax(cos / model.quantize.tau, -1),
            "z": q.quantized, "dec_tokens": seen["dec"][:, 1:1 + n], "recon": recon}, q.ids


def test_every_intermediate_matches_the_official_code(model, expected):
    import torch

    x = torch.from_numpy(expected["x"])
    got, ids = _intermediates(model, x)
    diffs = {k: float(np.abs(v.numpy() - expected[k]).max()) for k, v in got.items()}
    assert all(d <= TOL for d in diffs.values()), diffs
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.from_numpy(expected["argmax_idx"]))
    # the official info[2] is the same ids with batch and group axes scrambled (README, convention 3)
    g = model.model_args["num_codebooks"]
    raw = expected["official_info2_raw"].reshape(g, 2, -1)
    assert np.array_equal(np.concatenate([raw[:, b].reshape(-1) for b in range(2)]).reshape(2, -1),
                          expected["argmax_idx"])
    u8 = np.clip(127.5 * got["recon"].numpy() + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(u8.astype(int) - expected["recon_uint8"]).max() <= 1


def test_load_encode_decode_acceptance(model, expected, converted):
    """tokcli.load(...).encode(x) is the soft z [B, L, d]; decode(z, clamp=False) the raw reconstruction."""
    import torch

    cfg = json.loads((converted / "config.json").read_text())
    a = cfg["model_args"]
    assert (a["encoder_depth"], a["decoder_depth"]) == (2, 1)  # from the checkpoint, not the timm name (12)
    assert cfg["tokens"]["kind"] == "latents" and cfg["tokens"]["shape"] == [8, 8]
    assert cfg["tokens"]["downsample"] is None and cfg["tokens"]["extra"]["vq_std"] == pytest.approx(0.27819282)
    assert cfg["provenance"]["dropped_tensors"] == ["quantize.codebook_used"]
    assert "repa_layer_indices" in cfg["provenance"]["ignored_config_keys"]
    x = torch.from_numpy(expected["x"])
    with torch.inference_mode():
        z = model.encode(x)
        recon = model.decode(z, clamp=False)
        clamped = model.decode(z)
    assert z.dtype == torch.float32 and z.shape == (2, 8, 8)
    assert np.abs(z.numpy() - expected["z"]).max() <= TOL
    assert np.abs(recon.numpy() - expected["recon"]).max() <= TOL
    assert float(recon.abs().max()) > 1 and float(clamped.abs().max()) <= 1


def test_normalised_latents_switch(tmp_path, expected):
    """model_args normalize_latents: tokens (z - vq_mean) / vq_std, undone by decode (same reconstruction)."""
    import torch

    import tokcli
    from tokcli.families.softvq.convert import convert_official

    dest = tmp_path / "norm"
    convert_official(CKPT, None, dest, model_args={"normalize_latents": True})  # a folder source works too
    m = tokcli.load(f"local-dir:{dest}", device="cpu")
    x = torch.from_numpy(expected["x"])
    with torch.inference_mode():
        t = m.encode(x)
        recon = m.decode(t, clamp=False)
    assert np.abs(t.numpy() - expected["z_norm"]).max() <= TOL
    assert np.abs(recon.numpy() - expected["recon"]).max() <= TOL
    assert m.spec.extra["normalized"] is True and "(z - vq_mean) / vq_std" in m.spec.layout


def test_ids_decode_is_the_hard_approximation(model, expected):
    import torch

    ids = torch.from_numpy(expected["argmax_idx"])
    hard = model.latents_from_ids(ids)
    c = torch.nn.functional.normalize(model.quantize.embedding, dim=-1)
    assert torch.allclose(hard[1, 5], c[5 // 4, ids[1, 5]])
    assert hard.shape == (2, 8, 8) and float((hard - torch.from_numpy(expected["z"])).abs().max()) > 1e-3


def _write_inputs(tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, im in enumerate(np.load(SOFTVQ / "inputs.npy", allow_pickle=False)):
        Image.fromarray(im).save(imgs / f"im{i}.png")
    return imgs


def test_cli_round_trip_is_bit_exact(converted, expected, tmp_path):
    imgs = _write_inputs(tmp_path)
    lat = tmp_path / "lat.npz"
    p = run_tok("encode", imgs, "-m", converted, "-o", lat, "--device", "cpu")
    assert p.returncode == 0, p.stderr.decode()
    with np.load(lat, allow_pickle=False) as z:
        tokens, header = z["latents"], json.loads(str(z["header"][()]))
    assert tokens.dtype == np.float32 and tokens.shape == (2, 8, 8)
    assert np.abs(tokens - expected["z"]).max() <= TOL  # 64x64 PNGs: no crop, no resize
    t = header["tokens"]
    assert header["family"] == "softvq" and t["kind"] == "latents" and t["layout"].startswith("latent tokens")
    assert t["extra"]["vq_mean"] == pytest.approx(0.029928071) and t["extra"]["vq_std"] == pytest.approx(0.27819282)
    assert_decode_equals_reconstruct(lat, imgs, converted, tmp_path, 2)  # and other sizes are refused


def _release_copy(tmp_path, name="rel"):
    d = tmp_path / name
    shutil.copytree(CKPT, d)
    return d


def _convert(src, dest, config=None):
    return run_tok("convert", src / "model.safetensors", "--family", "softvq", "--config",
                   config or src / "config.json", "-o", dest)


def _fails_cleanly(p, dest, *needles):
    err = p.stderr.decode()
    assert p.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in needles), err
    assert not dest.exists() and not any(dest.parent.glob(f".{dest.name}.tmp-*"))


def test_truncated_weights_are_refused(tmp_path):
    rel = _release_copy(tmp_path)
    w = rel / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _fails_cleanly(_convert(rel, tmp_path / "out"), tmp_path / "out", "truncated")


def test_config_that_does_not_match_the_weights(tmp_path):
    rel = _release_copy(tmp_path)
    cfg = json.loads((rel / "config.json").read_text())
    cfg["codebook_embed_dim"] = 16
    (rel / "config.json").write_text(json.dumps(cfg))
    _fails_cleanly(_convert(rel, tmp_path / "out"), tmp_path / "out", "does not match", "of another shape",
                   "quant_conv.weight")


def test_not_a_softvq_release(tmp_path):
    rel = _release_copy(tmp_path)
    (rel / "config.json").write_text(json.dumps({"ch": 128, "embed_dim": 16}))
    _fails_cleanly(_convert(rel, tmp_path / "out"), tmp_path / "out", "not a SoftVQ-VAE config", "encoder_model")
    cfg = json.loads((CKPT / "config.json").read_text())
    (rel / "config.json").write_text(json.dumps({**cfg, "enc_tuning_method": "lora"}))
    _fails_cleanly(_convert(rel, tmp_path / "out"), tmp_path / "out", "enc_tuning_method", "not supported")


def test_strict_keys_with_the_documented_allow_list(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    rel = _release_copy(tmp_path)
    state = load_file(str(CKPT / "model.safetensors"))
    # HEAD-era checkpoints carry the unused decoder patch_embed, training ones the REPA projector: tolerated
    extra = {"decoder.model.patch_embed.proj.weight": torch.zeros(384, 3, 16, 16),
             "decoder.model.patch_embed.proj.bias": torch.zeros(384), "projection.0.weight": torch.zeros(4, 8)}
    save_file({**state, **extra}, str(rel / "model.safetensors"))
    assert _convert(rel, tmp_path / "ok").returncode == 0
    bad = {k: v for k, v in state.items() if k != "encoder.latent_pos_embed"}
    bad["decoder.extra_head.weight"] = torch.zeros(3)
    save_file(bad, str(rel / "model.safetensors"))
    _fails_cleanly(_convert(rel, tmp_path / "out"), tmp_path / "out", "1 missing: encoder.latent_pos_embed",
                   "1 unexpected: decoder.extra_head.weight")


def test_a_folder_that_is_not_a_release(tmp_path):
    from tokcli.errors import TokError
    from tokcli.families.softvq.convert import convert_official

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokError, match="not a SoftVQ-VAE release: no model.safetensors"):
        convert_official(empty, None, tmp_path / "out")
    shutil.copy(CKPT / "model.safetensors", empty / "model.safetensors")
    with pytest.raises(TokError, match="no config.json beside it"):
        convert_official(empty, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
