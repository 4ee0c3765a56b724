"""`tok encode --labels folder`: class labels from ImageFolder-style class folders (sorted names -> ids 0..C-1, the
names in the header), with a tiny random tokenizer built here; one-line refusals of images outside a class folder
and of an unknown label source."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_tok

TOK_ARGS = {"encoder_model": "tok_vit_tiny", "decoder_model": "tok_vit_tiny", "encoder_depth": 1, "decoder_depth": 1,
            "image_size": 32, "num_latent_tokens": 4, "codebook_embed_dim": 4, "codebook_size": 16,
            "num_codebooks": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    from PIL import Image

    from tokcli.families.softvq.model import SoftVQ

    root = tmp_path_factory.mktemp("labels")
    torch.manual_seed(0)
    folder = SoftVQ(**TOK_ARGS).save_folder(root / "tok", name="tiny", provenance={"source": "random (test)"})
    rng = np.random.default_rng(0)
    for cls, n in (("zebra", 2), ("ant", 1), ("mole", 2)):
        (root / "imgs" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "imgs" / cls / f"{i}.png")
    return root, folder.path


def test_labels_from_class_folders(setup, tmp_path):
    from tokcli.core.tokens import read_token_file

    root, tok = setup
    p = run_tok("encode", root / "imgs", "-m", tok, "--labels", "folder", "-o", tmp_path / "c.npz", "--device", "cpu",
                "-q")
    assert p.returncode == 0, p.stderr.decode()
    tf = read_token_file(tmp_path / "c.npz")
    assert tf.header["labels"] == {"from": "folder", "classes": ["ant", "mole", "zebra"]}
    names = tf.header["labels"]["classes"]
    assert tf.labels.dtype == np.int64 and [names[i] for i in tf.labels] == [k.split("/")[0] for k in tf.keys]
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert list(z["labels"]) == [0, 1, 1, 2, 2] and json.loads(str(z["header"]))["labels"]["classes"][0] == "ant"
    p = run_tok("encode", root / "imgs", "-m", tok, "-o", tmp_path / "n.npz", "--device", "cpu", "-q")
    assert p.returncode == 0 and read_token_file(tmp_path / "n.npz").labels is None  # no --labels: none


@pytest.mark.parametrize("where, labels, needle", [
    ("imgs/ant/0.png", "folder", "is not inside a class folder"),
    ("imgs", "name", "--labels must be 'folder' or a labels file"),
])
def test_bad_labels_are_one_line(setup, tmp_path, where, labels, needle):
    root, tok = setup
    p = run_tok("encode", root / where, "-m", tok, "--labels", labels, "-o", tmp_path / "x.npz", "--device", "cpu")
    err = p.stderr.decode()
    assert p.returncode == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "x.npz").exists()
