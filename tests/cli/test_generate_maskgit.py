"""MaskGIT end to end on the shipped coda-tiny: `tok train` of a recipe that names the tokenizer encodes random crops of
two class folders into a cached token file (folder labels), trains a tiny MaskGIT a few steps and exports a folder
that names coda-tiny (name + sha256); `tok generate -m` decodes its samples through coda-tiny into PNGs, the same for
any batch size, and `--tokens-out` is a token file `tok decode` turns into the same PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_tok

RECIPE = """
[model]
family = "maskgit"
name = "maskgit-test"
model_args = {{ hidden_size = 32, depth = 1, num_heads = 2 }}

[data]
roots = ["{imgs}"]
tokens = "{tokens}"
tokenizer = "coda-tiny"
crops_per_image = 2
crop_size = 128
random_resize = [1.0, 1.5]
batch_size = 4

[optim]
lr = 1e-3
max_steps = 3
ema_decay = 0.9

[run]
log_every = 1
ckpt_every = 3
device = "cpu"
"""


def _pngs(folder) -> dict[str, np.ndarray]:
    from PIL import Image

    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("maskgit-cli")
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)).save(root / "imgs" / cls / f"{i}.png")
    recipe = root / "recipe.toml"
    recipe.write_text(RECIPE.format(imgs=(root / "imgs").as_posix(), tokens=(root / "crops.npz").as_posix()))
    p = run_tok("train", recipe, "-o", root / "run", "-q")
    assert p.returncode == 0, p.stderr.decode()
    return root, root / "run" / "model"


def test_train_encodes_crops_with_folder_labels_and_names_the_tokenizer(trained):
    import tokcli
    from tokcli.core.tokens import read_token_file

    root, model = trained
    tf = read_token_file(root / "crops.npz")
    assert len(tf) == 8 and tf.shape == (680,) and tf.header["model"] == "coda-tiny"
    assert tf.header["labels"]["classes"] == ["cats", "dogs"] and list(tf.labels) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert tf.keys[0] == "0/cats/0.png#crop000" and tf.header["crops"]["crops_per_image"] == 2
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["family"] == "maskgit" and cfg["tokenizer"]["name"] == "coda-tiny"
    assert cfg["tokenizer"]["sha256"] == tf.header["model_sha256"] == tokcli.load("coda-tiny", device="cpu").sha256
    assert cfg["model_args"]["levels"] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16] and cfg["model_args"]["num_classes"] == 2
    assert cfg["training"]["classes"] == ["cats", "dogs"]


def test_generate_decodes_through_coda_tiny_and_tokens_out_decodes(trained, tmp_path):
    _, model = trained
    runs = {}
    for b in ("1", "3"):
        p = run_tok("generate", "-m", model, "--class", "all", "-n", "2", "--steps", "8", "--cfg", "2", "-b", b,
                    "-o", tmp_path / b, "--tokens-out", tmp_path / f"{b}.npz", "--device", "cpu", "-q")
        assert p.returncode == 0, p.stderr.decode()
        with np.load(tmp_path / f"{b}.npz", allow_pickle=False) as z:
            runs[b] = (_pngs(tmp_path / b), z["indices"].copy(), json.loads(str(z["header"])))
    (img1, ids1, header), (img3, ids3, _) = runs["1"], runs["3"]
    assert sorted(img1) == ["class0000/00000.png", "class0000/00001.png", "class0001/00000.png",
                            "class0001/00001.png"]
    assert all(a.shape == (128, 128, 3) and a.dtype == np.uint8 for a in img1.values())
    assert np.array_equal(ids1, ids3) and ids1.shape == (4, 680)  # the same seeds whatever the batch size
    assert header["family"] == "coda" and header["generator"]["family"] == "maskgit"
    assert header["generator"]["sampler"] == {"steps": 8, "cfg": 2.0, "temperature": 4.5}
    d = run_tok("decode", tmp_path / "3.npz", "-o", tmp_path / "dec", "-b", "3", "--device", "cpu", "-q")
    assert d.returncode == 0, d.stderr.decode()
    dec = _pngs(tmp_path / "dec")
    assert sorted(dec) == sorted(img3) and all(np.array_equal(dec[k], img3[k]) for k in dec)  # same batches
    assert max(int(np.abs(img1[k].astype(int) - img3[k]).max()) for k in img1) <= 1  # GEMM blocking only


@pytest.mark.parametrize("args, needle", [
    (("--class", "2"), "class 2 is out of range"),
    (("--class", "0", "--steps", "0"), "--steps must be at least 1"),
    (("--class", "0", "--top-k", "3"), "takes no sampler option top_k"),
])
def test_bad_input_is_one_line(trained, tmp_path, args, needle):
    _, model = trained
    p = run_tok("generate", "-m", model, *args, "-o", tmp_path / "out", "--device", "cpu", "-q")
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err
