"""FlowMo stage 1B (post-training through the checkpointed k-step sampler) with `tok train` on a tiny model: the
decoder trains and the encoder stays frozen, resume is exact, the sampler grids are the official ones, and a recipe
that asks for the ResNet-50 loss without its file stops at start-up with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FLOWMO_TINY, run_tok
from safetensors.torch import load_file
from test_flowmo_train import write_recipe
from test_train import _assert_same, _assert_same_state, make_blobs, read_metrics


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blobs(tmp_path_factory.mktemp("blobs"), n=6, size=24)


@pytest.fixture(scope="module")
def stage1a(tmp_path_factory) -> Path:
    """A random-init tiny FlowMo folder standing in for a stage-1A model."""
    from tokcli.families.flowmo.model import FlowMo

    torch.manual_seed(0)
    dest = tmp_path_factory.mktemp("init") / "flowmo-1a"
    FlowMo(**FLOWMO_TINY).save_folder(dest, name="flowmo-1a", provenance={"source": "random init (test fixture)"})
    return dest


def post_recipe(path: Path, root: Path, init: Path, **loss) -> Path:
    return write_recipe(path, root, model={"objective": "post", "init_from": str(init), "model_args": {}},
                        loss={"perceptual": "none", "post_perceptual": "pixel-l2", "post_steps": 3, **loss},
                        optim={"max_steps": 3})


def test_post_training_trains_the_decoder_only(blobs, stage1a, tmp_path):
    import json

    recipe = post_recipe(tmp_path / "post.toml", blobs, stage1a)
    run = tmp_path / "run"
    p = run_tok("train", recipe, "-o", run, "-q")
    assert p.returncode == 0, p.stderr.decode()
    before = load_file(str(stage1a / "model.safetensors"))
    after = load_file(str(run / "checkpoints" / "step-0000003" / "model.safetensors"))
    enc = [k for k in before if k.startswith("encoder.")]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    moved = max(float((before[k] - after[k]).abs().max()) for k in before if k.startswith("decoder."))
    assert moved > 1e-4
    rows = read_metrics(run)
    assert len(rows) == 3 and {"flow", "sample"} <= set(rows[-1]) and "entropy" not in rows[-1]
    training = json.loads((run / "model" / "config.json").read_text())["training"]
    assert training["stage"] == "1B" and training["post_perceptual"] == "pixel-l2", training


def test_post_training_resumes_exactly(blobs, stage1a, tmp_path):
    recipe = post_recipe(tmp_path / "post.toml", blobs, stage1a)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_tok("train", recipe, "-o", straight, "-q").returncode == 0
    p = run_tok("train", recipe, "-o", split, "--max-steps", "2", "-q")
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("train", recipe, "--resume", split, "-q")
    assert p.returncode == 0, p.stderr.decode()
    _assert_same(load_file(str(straight / "model" / "model.safetensors")),
                 load_file(str(split / "model" / "model.safetensors")), "exported model")
    last = "checkpoints/step-0000003"
    _assert_same(load_file(str(straight / last / "model.safetensors")),
                 load_file(str(split / last / "model.safetensors")), "raw weights")
    _assert_same_state(*(torch.load(r / last / "state.pt", weights_only=True) for r in (straight, split)))


def test_resnet50_without_its_file_is_one_line(blobs, stage1a, tmp_path):
    recipe = post_recipe(tmp_path / "post.toml", blobs, stage1a, post_perceptual="resnet50")
    env = {"TORCH_HOME": str(tmp_path / "torch-home"), "TOK_DOWNLOAD": "0"}
    p = run_tok("train", recipe, "-o", tmp_path / "run", "-q", env=env)
    err = p.stderr.decode().strip()
    assert p.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "resnet50-0676ba61.pth" in err and "post_perceptual" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_post_needs_init_from_and_a_known_loss(blobs, tmp_path):
    recipe = write_recipe(tmp_path / "a.toml", blobs, model={"objective": "post"},
                          loss={"perceptual": "none", "post_perceptual": "pixel-l2"})
    p = run_tok("train", recipe, "-o", tmp_path / "a", "-q")
    assert p.returncode == 2 and b"init_from" in p.stderr and b"Traceback" not in p.stderr, p.stderr
    recipe = write_recipe(tmp_path / "b.toml", blobs, loss={"perceptual": "none", "post_perceptual": "vgg"})
    p = run_tok("train", recipe, "-o", tmp_path / "b", "-q")
    assert p.returncode == 2 and b"post_perceptual" in p.stderr, p.stderr


def test_random_grids_and_the_checkpointed_sample():
    from tokcli.families.flowmo.model import FlowMo
    from tokcli.families.flowmo.post import checkpointed_sample, random_grids

    torch.manual_seed(0)
    ts = random_grids(5, 8, "cpu")
    assert ts.shape == (5, 9) and torch.all(ts[:, 0] == 1) and torch.all(ts[:, -1] == 0)
    assert torch.all(ts[:, :-1] > ts[:, 1:]) and not torch.equal(ts[0], ts[1])  # its own grid per image
    m = FlowMo(**FLOWMO_TINY)
    z, cond = torch.randn(2, 3, 16, 16), m.condition(torch.randn(2, 4, 6).sign())
    grid = random_grids(2, 3, "cpu")
    out = checkpointed_sample(m, z, cond, grid)
    ref = z
    with torch.no_grad():
        for i in range(3):  # the same Euler steps without checkpointing
            ref = ref - (grid[:, i] - grid[:, i + 1])[:, None, None, None] * m.velocity(ref, grid[:, i], cond)
    assert torch.allclose(out.detach(), ref, atol=1e-6)
    out.square().mean().backward()
    assert m.decoder.img_in.weight.grad is not None and m.encoder.img_in.weight.grad is None


def test_resnet50_loss_reads_the_local_file(tmp_path, monkeypatch):
    """The file rule: a torchvision-format ResNet-50 in $TORCH_HOME/hub/checkpoints is found and read (random
    weights here: the real file is not on this machine); the logit MSE is 0 on equal images and differentiable."""
    from torchvision.models import resnet50

    from tokcli.families.flowmo.post import RESNET50_FILE, load_resnet50

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("TOK_DOWNLOAD", raising=False)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(resnet50(weights=None).state_dict(), tmp_path / "hub" / "checkpoints" / RESNET50_FILE[0])
    loss = load_resnet50("cpu")
    assert not loss.training and not any(p.requires_grad for p in loss.parameters())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    sample = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    assert loss(x, x).item() == 0.0
    d = loss(sample, x)
    d.backward()
    assert d.item() > 0 and sample.grad is not None and sample.grad.abs().sum().item() > 0
