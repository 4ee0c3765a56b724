"""The convolutional families run in either memory layout (the default per device is the measured faster one): the
shipped models give the very tokens in channels-last as in contiguous memory on the sample photos, reconstructions
within float rounding, and the layout is recorded in the token header."""

from __future__ import annotations

import pytest
import torch

import tokcli
from conftest import REPO, run_tok
from tokcli.core.images import collect_inputs, iter_batches, to_tensor


@pytest.mark.parametrize("name", ["wetok-tiny", "coda-tiny", "kl-tiny"])
def test_shipped_models_give_the_same_tokens_in_both_layouts(name):
    models = {fmt: tokcli.load(name, device="cpu", memory_format=fmt) for fmt in ("contiguous", "channels_last")}
    assert {fmt: m.memory_format for fmt, m in models.items()} == {"contiguous": "contiguous",
                                                                    "channels_last": "channels_last"}
    from tokcli.core.device import AUTO_MEMORY_FORMAT

    assert tokcli.load(name, device="cpu").memory_format == AUTO_MEMORY_FORMAT["cpu"]  # the measured CPU default
    items = collect_inputs([str(REPO / "samples")])
    size = models["contiguous"].preprocess["image_size"]
    (keys, imgs), = list(iter_batches(items, size, len(items)))
    x = to_tensor(imgs)
    with torch.inference_mode():
        out = {fmt: (m.encode(x), ) for fmt, m in models.items()}
        for fmt, m in models.items():
            out[fmt] += (m.decode(out["contiguous"][0]),)
    a, b = out["contiguous"], out["channels_last"]
    if a[0].dtype.is_floating_point:  # KL latents: float rounding only
        assert (a[0] - b[0]).abs().max().item() < 1e-4
    else:
        assert torch.equal(a[0], b[0]), f"{(a[0] != b[0]).sum().item()} of {a[0].numel()} tokens differ"
    # the decoders: float rounding (coda-tiny: 1.4e-4 contiguous / 1.3e-5 channels-last from float64), far below
    # the 7.8e-3 of one uint8 level
    assert (a[1] - b[1]).abs().max().item() < 1e-3
    assert b[1].is_contiguous(memory_format=torch.channels_last) or b[1].is_contiguous()


def test_layout_is_recorded_and_can_be_chosen(tmp_path):
    p = run_tok("encode", REPO / "samples" / "coffee.jpg", "-o", tmp_path / "a.npz", "-q",
                env={"TOK_MEMORY_FORMAT": "channels_last"})
    assert p.returncode == 0, p.stderr
    from tokcli.core.tokens import read_token_file

    assert read_token_file(tmp_path / "a.npz").header["memory_format"] == "channels_last"
    p = run_tok("encode", REPO / "samples" / "coffee.jpg", "-o", tmp_path / "c.npz", "-q", "--memory-format",
                "contiguous")
    assert p.returncode == 0 and read_token_file(tmp_path / "c.npz").header["memory_format"] == "contiguous"
    p = run_tok("encode", REPO / "samples" / "coffee.jpg", "-o", tmp_path / "b.npz", "-q",
                env={"TOK_MEMORY_FORMAT": "sideways"})
    assert p.returncode == 2 and "unknown memory format 'sideways'" in p.stderr.decode()
