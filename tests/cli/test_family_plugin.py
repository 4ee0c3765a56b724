"""Adding a family = one package: a throw-away family that lives in tests/plugins/toyfam (not in tokcli/) is found
through $TOK_FAMILIES and goes through `tok train`, `tok encode`, `tok decode`, `tok models` and `tok info` with
no edit to any file in tokcli/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_tok, write_images

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Register the toy family for this module (in-process and for subprocesses), train it for a few steps."""
    import os

    from tokcli.core import registry

    old_env = {k: os.environ.get(k) for k in ("TOK_FAMILIES", "PYTHONPATH")}
    sys.path.insert(0, str(PLUGINS))
    os.environ["TOK_FAMILIES"] = "toyfam"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), old_env["PYTHONPATH"]]))
    registry.reload()
    root = tmp_path_factory.mktemp("toy")
    imgs = write_images(root / "imgs", n=4, size=(16, 16))
    recipe = root / "toy.toml"
    recipe.write_text(f"""
[model]
family = "toyfam"
name = "toy"
model_args = {{ dim = 8, codebook_size = 16, patch = 4, image_size = 16 }}
[data]
roots = ["{imgs.as_posix()}"]
crop_size = 16
batch_size = 2
[loss]
perceptual = "none"
gan_weight = 0.0
vq_weight = 0.5
[optim]
lr = 1e-2
max_steps = 20
ema_decay = 0.0
[run]
log_every = 5
ckpt_every = 10
""")
    p = run_tok("train", recipe, "-o", root / "run")
    assert p.returncode == 0, p.stderr.decode()
    yield {"root": root, "imgs": imgs, "model": root / "run" / "model", "recipe": recipe}
    registry.unregister_family("toyfam")
    sys.path.remove(str(PLUGINS))
    sys.modules.pop("toyfam", None)
    for k, v in old_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    registry.reload()


def test_train_exports_a_folder_of_the_new_family(toy):
    cfg = json.loads((toy["model"] / "config.json").read_text())
    assert cfg["family"] == "toyfam"
    assert cfg["model_args"] == {"dim": 8, "codebook_size": 16, "patch": 4, "image_size": 16}
    assert cfg["tokens"]["shape"] == [4, 4] and cfg["tokens"]["codebook_size"] == 16
    card = (toy["model"] / "README.md").read_text()
    assert "A throw-away family from the test suite." in card  # the family's own card section
    assert "0.5 x VQ" in card  # the objective's term, with the recipe's weight
    log = [json.loads(x) for x in (toy["root"] / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20] and all("vq" in r and "l1" in r for r in log)
    assert log[-1]["l1"] < log[0]["l1"]  # it learns


def test_encode_decode_equals_reconstruct(toy):
    root = toy["root"]
    p = run_tok("encode", toy["imgs"], "-m", toy["model"], "-o", root / "codes.npz", "-q")
    assert p.returncode == 0, p.stderr.decode()
    with np.load(root / "codes.npz", allow_pickle=False) as z:
        header = json.loads(z["header"][()])
        ids = z["indices"]
    assert header["family"] == "toyfam" and ids.shape == (4, 4, 4) and ids.dtype == np.uint8
    assert ids.max() < 16
    p = run_tok("decode", root / "codes.npz", "-o", root / "dec", "-q")
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("reconstruct", toy["imgs"], "-m", toy["model"], "-o", root / "rec", "-q")
    assert p.returncode == 0, p.stderr.decode()
    from PIL import Image

    dec = sorted(x.relative_to(root / "dec") for x in (root / "dec").rglob("*.png"))
    assert len(dec) == 4
    for rel in dec:
        a = np.asarray(Image.open(root / "dec" / rel))
        b = np.asarray(Image.open(root / "rec" / rel))
        assert np.array_equal(a, b)


def test_registry_lists_the_family_and_a_sampler_option_is_refused(toy):
    p = run_tok("models", "toy-*", "--json")
    assert p.returncode == 0, p.stderr.decode()
    rows = json.loads(p.stdout)
    assert [r["name"] for r in rows] == ["toy-untrained"] and rows[0]["family"] == "toyfam"
    import torch

    import tokcli

    tok = tokcli.load(str(toy["model"]), device="cpu")
    ids = torch.zeros(1, 4, 4, dtype=torch.long)
    from tokcli.errors import TokUsageError

    with pytest.raises(TokUsageError, match="no sampler option steps"):
        tok.decode(ids, steps=4)


def test_a_real_process_finds_the_family_through_the_environment(toy):
    p = run_tok("info", toy["model"], subprocess=True)
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["family"] == "toyfam"
