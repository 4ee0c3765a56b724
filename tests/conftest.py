"""Shared fixtures: small random WeTok model folders and synthetic image trees (no network, fast on 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
PARITY = Path(os.environ.get("TOK_PARITY_DIR", REPO.parent / "shared" / "parity"))

TINY_ARGS = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 16, "groups": 2,
             "codebook_size": 256, "generative_decoder": False, "image_size": 32}


CODA_PARITY = PARITY / "coda"
requires_coda_parity = pytest.mark.skipif(not (CODA_PARITY / "expected.npz").is_file(),
                                          reason=f"CODA parity fixture not found at {CODA_PARITY} (set TOK_PARITY_DIR)")


@pytest.fixture(scope="session")
def coda_config() -> dict:
    """The CODA parity set's config.json (official key names + the VAE block)."""
    import json

    return json.loads((CODA_PARITY / "config.json").read_text())


@pytest.fixture(scope="session")
def coda_expected() -> dict:
    """The CODA parity set's expected arrays (read once per session; tests must not modify them)."""
    return read_npz(CODA_PARITY / "expected.npz")


def read_npz(path: Path) -> dict:
    """Every array of a fixture ``.npz`` (read without pickle)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def convert_fixture(tmp_path_factory, source: Path, family: str, config: Path, name: str) -> Path:
    """``tok convert SOURCE --family FAMILY --config CONFIG`` into a fresh folder ``name``; the conversion must work."""
    dest = tmp_path_factory.mktemp(family) / name
    p = run_tok("convert", source, "--family", family, "--config", config, "-o", dest)
    assert p.returncode == 0, p.stderr.decode()
    return dest


def make_model_folder(dest: Path, args: dict, seed: int = 0, name: str | None = None) -> Path:
    import torch

    from tokcli.core.registry import get_family

    torch.manual_seed(seed)
    model = get_family("wetok").build(args)
    model.save_folder(dest, name=name or dest.name, provenance={"source": f"random init, seed {seed} (test fixture)"})
    return dest


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """The in-process models are tiny: extra OpenMP threads only add barrier waits on a busy 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("models") / "tiny", TINY_ARGS, seed=0)


@pytest.fixture(scope="session")
def tiny_model_other(tmp_path_factory) -> Path:
    """Same architecture, different weights (another checkpoint)."""
    return make_model_folder(tmp_path_factory.mktemp("models") / "tiny-other", TINY_ARGS, seed=1)


@pytest.fixture(scope="session")
def tiny_gd_model(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("models") / "tiny-gd",
                             dict(TINY_ARGS, generative_decoder=True), seed=2)


def write_images(root: Path, n: int = 5, size=(40, 48), seed: int = 0) -> Path:
    """n smooth random RGB images, some in a nested folder, as PNG and JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size[1], size[0]), Image.BICUBIC)
        path = root / ("sub" if i % 2 else "") / f"img{i}.{'jpg' if i == 3 else 'png'}"
        img.save(path)
    return root


@pytest.fixture
def images(tmp_path) -> Path:
    return write_images(tmp_path / "imgs")


def run_tok(*args, input: bytes | None = None, env: dict | None = None, cwd: Path | None = None,
            subprocess: bool = False):
    """Run the `tok` command line and return a subprocess.CompletedProcess (bytes stdout/stderr, int returncode).

    By default in this process (tests/cli_runner.py: ``tokcli.cli.app.main(argv)`` with captured streams, the
    environment / working folder / registry / torch switches set up and put back), which saves a ~2-4 s torch import
    per call. ``subprocess=True`` runs the real ``python -m tokcli`` process: for what only a process shows (import
    time, the entry point itself, torchrun, signals, process-wide state); TOK_TEST_SUBPROCESS=1 makes every call a
    process."""
    from cli_runner import run_inprocess, run_subprocess

    forced = os.environ.get("TOK_TEST_SUBPROCESS", "") not in ("", "0")  # compare a failing test with the old way
    run = run_subprocess if subprocess or forced else run_inprocess
    return run(args, input=input, env=env, cwd=cwd or REPO)


def assert_decode_equals_reconstruct(codes: Path, imgs: Path, model, out: Path, n: int) -> None:
    """`tok decode` of `codes` and `tok reconstruct` of `imgs` (named im0.png ...) give identical PNGs, and the model
    (a 1-D tokenizer trained at 64 px) refuses another --image-size with one clear usage error."""
    from PIL import Image

    p = run_tok("decode", codes, "-o", out / "dec")
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("reconstruct", imgs, "-m", model, "-o", out / "rec")
    assert p.returncode == 0, p.stderr.decode()
    for i in range(n):
        a = np.asarray(Image.open(out / "dec" / f"im{i}.png"))
        b = np.asarray(Image.open(out / "rec" / f"im{i}.png"))
        assert np.array_equal(a, b)
    p = run_tok("encode", imgs, "-m", model, "-o", out / "c2.npz", "--image-size", "32")
    assert p.returncode == 2 and b"takes only 64x64" in p.stderr and b"Traceback" not in p.stderr


# --- FlowMo unit fixtures ----------------------------------------------------------------------------------------
# a FlowMo small enough to sample in milliseconds: 16 px, patch 4, 4 positions x 6 bits (8 ids of 3 bits); the
# decoder is wider than a patch's 48 values, as training requires (families/flowmo/objective.check_decoder_width)
FLOWMO_TINY = {"image_size": 16, "patch_size": 4, "code_length": 4, "context_dim": 6,
               "codebook_size_for_entropy": 3, "enc_hidden_size": 32, "enc_num_heads": 1, "enc_depth": 1,
               "dec_hidden_size": 64, "dec_num_heads": 2, "dec_depth": 1}


@pytest.fixture(scope="module")
def tiny_flowmo():
    import torch

    from tokcli.families.flowmo.model import FlowMo

    torch.manual_seed(0)
    return FlowMo(**FLOWMO_TINY).eval()


@pytest.fixture(scope="module")
def flowmo_ids(tiny_flowmo):
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 8, (3, tiny_flowmo.num_tokens), generator=g)
