"""First use: what a newcomer types before anything is converted or trained. Offline conversion fails at once,
folders named like registry models do not hijack the name, paths that do not exist say so, registry models
without weights are described, a folder's model is named by its folder, and shipped licences agree."""

from __future__ import annotations

import json
import re
import time

import pytest

from conftest import REPO, TINY_ARGS, make_model_folder, run_tok, write_images
from tokcli.core import registry

SHIPPED = ["wetok-tiny", "kl-tiny", "coda-tiny", "softvq-tiny", "flowmo-tiny"]


@pytest.fixture(autouse=True)
def _empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TOK_CACHE", str(tmp_path / "tok-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


# --- item 10: offline conversion fails at once ------------------------------------------------------------

@pytest.mark.parametrize("name,file", [("wetok-16x", "ImageNet/downsample16/WeTok.ckpt"),
                                       ("coda-mar", "mar_v16384/vae_ema.pth")])
def test_convert_without_network_fails_at_once(name, file):
    """HF_HUB_OFFLINE unset and the Hub unreachable (a closed loopback port): the good one-line error in < 5 s,
    not after huggingface_hub's ~23 s of retries. A real process, since huggingface_hub reads its settings at
    import."""
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    t0 = time.perf_counter()
    p = run_tok("convert", name, env=env, subprocess=True)
    took = time.perf_counter() - t0
    err = p.stderr.decode()
    assert p.returncode == 1 and took < 5.0, (took, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and file in err and "hf download" in err, err
    assert "127.0.0.1:9 is not reachable" in err and "Retrying" not in err


def test_hf_hub_name_without_network_fails_at_once():
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    t0 = time.perf_counter()
    p = run_tok("info", "hf-hub:someorg/absent", env=env, subprocess=True)
    err = p.stderr.decode()
    assert p.returncode == 1 and time.perf_counter() - t0 < 5.0, err
    assert "hf download someorg/absent" in err and "not reachable" in err and err.count("\n") == 1


# --- item 11: a folder named like a registry model -----------------------------------------------------------

def test_output_folder_named_like_a_registry_model_does_not_shadow_it(tmp_path):
    (tmp_path / "wetok-tiny").mkdir()
    (tmp_path / "wetok-tiny" / "img0.png").write_bytes(b"an output, not a model")
    p = run_tok("info", "wetok-tiny", cwd=tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    out = json.loads(p.stdout)
    assert out["type"] == "model_folder" and out["path"] == str(registry.SHIPPED_DIR / "wetok-tiny")
    assert p.stderr.decode() == ""


def test_model_folder_named_like_a_registry_model_shadows_it_with_a_warning(tmp_path):
    make_model_folder(tmp_path / "wetok-tiny", TINY_ARGS, name="mine")
    p = run_tok("info", "wetok-tiny", cwd=tmp_path)
    assert p.returncode == 0 and json.loads(p.stdout)["name"] == "mine"
    err = p.stderr.decode()
    assert "shadows the registry model wetok-tiny" in err and "local-dir:wetok-tiny" in err
    p = run_tok("info", "local-dir:wetok-tiny", cwd=tmp_path)  # explicit: no warning
    assert p.returncode == 0 and json.loads(p.stdout)["name"] == "mine" and p.stderr.decode() == ""


def test_name_hints_suggest_only_valid_forms(tmp_path):
    imgs = write_images(tmp_path / "imgs", n=1)
    p = run_tok("encode", imgs, "-m", "foo:bar", "-o", tmp_path / "t.npz")
    err = p.stderr.decode()
    assert p.returncode == 2 and "hf-hub:foo:bar" not in err and "hf-hub:org/name" in err, err
    p = run_tok("info", "org/thing", cwd=tmp_path)
    assert p.returncode == 2 and "hf-hub:org/thing" in p.stderr.decode()


# --- item 13: paths that do not exist ------------------------------------------------------------------------

@pytest.mark.parametrize("arg", ["/nonexistent", "runs/x/model", "./absent", "local-dir:/nonexistent"])
def test_info_on_a_missing_path_says_so(tmp_path, arg):
    p = run_tok("info", arg, cwd=tmp_path)
    err = p.stderr.decode()
    path = arg.removeprefix("local-dir:")
    assert p.returncode == 1 and err == f"error: no such file or folder: {path}\n", err


def test_encode_with_a_missing_model_path_says_so(tmp_path):
    imgs = write_images(tmp_path / "imgs", n=1)
    p = run_tok("encode", imgs, "-m", "/nonexistent/model", "-o", tmp_path / "t.npz")
    assert p.returncode == 1 and p.stderr.decode() == "error: no such file or folder: /nonexistent/model\n"


def test_convert_with_missing_paths_says_so(tmp_path):
    p = run_tok("convert", "runs/missing.ckpt", "--as", "wetok-16x", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.decode() == "error: no such file or folder: runs/missing.ckpt\n"
    (tmp_path / "w.ckpt").write_bytes(b"x")
    p = run_tok("convert", "w.ckpt", "--family", "wetok", "--config", "missing.yaml", "-o", "out", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.decode() == "error: no such file or folder: missing.yaml\n"


def test_info_on_an_unknown_bare_name_stays_a_usage_error(tmp_path):
    p = run_tok("info", "wetok-16", cwd=tmp_path)
    assert p.returncode == 2 and "did you mean" in p.stderr.decode()


# --- item 15: registry models without weights; a folder's model is named by its folder -----------------------

def test_info_on_a_registry_model_that_is_not_converted(tmp_path):
    p = run_tok("info", "wetok-16x", cwd=tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    out = json.loads(p.stdout)
    assert out["type"] == "registry_entry" and out["available"] is False and out["name"] == "wetok-16x"
    assert out["get"] == "tok convert wetok-16x" and out["entry"]["hub_repo"] == "GrayShine/WeTok"
    assert "tok convert wetok-16x" in out["how"]


def test_a_folder_model_is_named_by_its_folder(tmp_path):
    import tokcli

    make_model_folder(tmp_path / "runs" / "x" / "model", TINY_ARGS, name="wetok-tiny")  # the recipe's name
    imgs = write_images(tmp_path / "imgs", n=1, size=(32, 32))
    p = run_tok("encode", imgs, "-m", "runs/x/model", "-o", "t.npz", "-q", cwd=tmp_path)
    err = p.stderr.decode()
    assert p.returncode == 0 and "with runs/x/model ->" in err and "with wetok-tiny" not in err, err
    tok = tokcli.load(str(tmp_path / "runs" / "x" / "model"), device="cpu")
    assert tok.name == str(tmp_path / "runs" / "x" / "model") and tok.config_name == "wetok-tiny"
    assert tokcli.load("wetok-tiny", device="cpu").name == "wetok-tiny"  # a registry name stays the name


# --- item 16: shipped licences agree and the cards list the training images' licences --------------------------

def _front_matter_license(card: str) -> str:
    m = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert m, "the card has no YAML front matter"
    lic = re.search(r"^license:\s*(\S+)\s*$", m.group(1), re.M)
    assert lic, "the card's front matter has no license"
    return lic.group(1)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_licences_agree_and_cards_list_the_photos_licences(name):
    p = run_tok("models", "--json")
    row = {r["name"]: r for r in json.loads(p.stdout)}[name]
    folder = REPO / "tokcli" / "weights" / name
    cfg = json.loads((folder / "config.json").read_text())
    card = (folder / "README.md").read_text()
    assert row["license"] == cfg["provenance"]["license"] == _front_matter_license(card)
    photo_licences = cfg["training"]["data"]["licenses"]
    assert photo_licences and all(lic in card for lic in photo_licences)
    if any(lic.startswith(("CC-BY-SA", "GPL")) for lic in photo_licences):  # share-alike / copyleft photos
        assert row["license"] == "other" and cfg["provenance"].get("license_note")
    assert "## Licence" in card and "## Training photos and attribution" in card
    assert card.count("- `train/") == cfg["training"]["data"]["num_images"]


def test_shipped_models_are_untouched_by_the_card_edits():
    """config.json and README.md may change; model.safetensors must still have the sha256 config.json records."""
    from tokcli.core.checkpoint import sha256_file

    for name in SHIPPED:
        folder = REPO / "tokcli" / "weights" / name
        cfg = json.loads((folder / "config.json").read_text())
        assert sha256_file(folder / "model.safetensors") == cfg["provenance"]["weights_sha256"]


def test_a_one_size_model_says_so_before_any_work(tmp_path):
    """coda-tiny takes exactly 128x128 images: --image-size 100 and 256 are usage errors up front (issue 9, 13)."""
    from conftest import REPO, run_tok

    for size in ("100", "256"):
        p = run_tok("encode", REPO / "samples", "-m", "coda-tiny", "--image-size", size, "-o", tmp_path / "c.npz")
        err = p.stderr.decode()
        assert p.returncode == 2 and "takes only 128x128" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "c.npz").exists()
