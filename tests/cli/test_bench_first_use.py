"""`tok bench` on a machine without the pretrained files: one line and no network unless asked (`--download` or
TOK_DOWNLOAD=1), refused offline even when asked, and a fetched file announced with its full path and sha256."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import run_tok
from tokcli.core import pretrained

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
ALEX_FILE = "alexnet-owt-7be5be79.pth"


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every download path raises and is recorded; downloads neither asked nor forbidden by the environment."""
    calls: list = []

    def refuse(*a, **k):
        calls.append(a[:1])
        raise AssertionError("network access")

    monkeypatch.setattr(pretrained, "fetch_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for var in ("TOK_OFFLINE", "TOK_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    return calls


def fake_fetch(monkeypatch, source: Path) -> list:
    """Make the download function copy ``source`` (as if it came from the URL); returns the calls."""
    calls: list = []

    def fetch(url, dest, *, sha256_prefix=None):
        calls.append((url, Path(dest)))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        return hashlib.sha256(Path(dest).read_bytes()).hexdigest()

    monkeypatch.setattr(pretrained, "fetch_url", fetch)
    return calls


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    from tokcli.metrics.fid import FIDInception

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("src") / INCEPTION_FILE
    torch.save(FIDInception().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory) -> Path:
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, s in shapes.items():
        state[f"features.{i}.weight"] = torch.randn(s, generator=g) * 0.01
        state[f"features.{i}.bias"] = torch.randn(s[0], generator=g) * 0.01
    path = tmp_path_factory.mktemp("src") / ALEX_FILE
    torch.save(state, path)
    return path


def _one_error_line(p) -> str:
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr.decode()
    assert p.stdout == b""
    return lines[0]


@pytest.mark.parametrize("metric, fname", [("rfid", INCEPTION_FILE), ("lpips", ALEX_FILE)])
def test_missing_file_without_opt_in_is_one_line_and_no_network(tiny_model, images, tmp_path, no_network,
                                                                metric, fname):
    home = tmp_path / "torch-home"
    p = run_tok("bench", metric, images, "-m", tiny_model, "-q",
                env={"TORCH_HOME": str(home), "HF_HUB_OFFLINE": "0"})
    assert p.returncode == 1
    line = _one_error_line(p)
    assert fname in line and str(home / "hub" / "checkpoints") in line
    assert "--download" in line and "TOK_DOWNLOAD=1" in line and "https://" in line
    assert no_network == [] and not (home / "hub").exists()


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "TOK_OFFLINE": "1"}])
@pytest.mark.parametrize("ask", ["--download", "TOK_DOWNLOAD=1"])
def test_opt_in_is_refused_offline(tiny_model, images, tmp_path, no_network, env, ask):
    env = {**env, "TORCH_HOME": str(tmp_path / "torch-home")}
    flags = ["--download"] if ask == "--download" else []
    if not flags:
        env["TOK_DOWNLOAD"] = "1"
    p = run_tok("bench", "rfid", images, "-m", tiny_model, "-q", *flags, env=env)
    assert p.returncode == 1
    line = _one_error_line(p)
    var = "TOK_OFFLINE" if "TOK_OFFLINE" in env else "HF_HUB_OFFLINE"
    assert INCEPTION_FILE in line and f"{var} is set" in line
    assert no_network == []


def test_rfid_download_prints_where_the_file_goes(tiny_model, images, tmp_path, no_network, monkeypatch):
    small = tmp_path / "small.bin"
    small.write_bytes(b"not really the weights")
    calls = fake_fetch(monkeypatch, small)
    home = tmp_path / "torch-home"
    dest = (home / "hub" / "checkpoints" / INCEPTION_FILE).resolve()
    p = run_tok("bench", "rfid", images, "-m", tiny_model, "-q", "--download",
                env={"TORCH_HOME": str(home), "HF_HUB_OFFLINE": "0"})
    err = p.stderr.decode()
    assert calls and calls[0][1] == dest and calls[0][0].endswith(INCEPTION_FILE)
    assert f"-> {dest}" in err
    assert f"downloaded {dest} (sha256 {hashlib.sha256(small.read_bytes()).hexdigest()})" in err
    # the small file is not the network: one line saying so, no traceback
    assert p.returncode == 1 and "cannot read the FID Inception weights" in err and "Traceback" not in err


def test_stats_and_lpips_download_then_run(images, tiny_model, tmp_path, no_network, monkeypatch, inception_file,
                                           alexnet_file):
    home = tmp_path / "torch-home"
    env = {"TORCH_HOME": str(home), "HF_HUB_OFFLINE": "0"}
    fake_fetch(monkeypatch, inception_file)
    out = tmp_path / "new" / "folder" / "ref.npz"
    p = run_tok("bench", "stats", images, "-o", out, "--size", "32", "--device", "cpu", "-q", "--download", env=env)
    assert p.returncode == 0, p.stderr.decode()
    sha = hashlib.sha256(inception_file.read_bytes()).hexdigest()
    assert f"(sha256 {sha})" in p.stderr.decode() and json.loads(p.stdout)["weights_sha256"] == sha
    assert out.is_file()
    fake_fetch(monkeypatch, alexnet_file)
    p = run_tok("bench", "lpips", images, "-m", tiny_model, "--device", "cpu", "--json", "-q", env={
        **env, "TOK_DOWNLOAD": "1"})
    assert p.returncode == 0, p.stderr.decode()
    dest = (home / "hub" / "checkpoints" / ALEX_FILE).resolve()
    sha = hashlib.sha256(alexnet_file.read_bytes()).hexdigest()
    assert f"downloaded {dest} (sha256 {sha})" in p.stderr.decode()
    assert json.loads(p.stdout)["protocol"]["lpips"]["backbone_sha256"] == sha
    # the next run finds both files: nothing fetched, nothing said
    monkeypatch.setattr(pretrained, "fetch_url", lambda *a, **k: pytest.fail("fetched again"))
    p = run_tok("bench", "lpips", images, "-m", tiny_model, "--device", "cpu", "-q", env=env)
    assert p.returncode == 0 and b"download" not in p.stderr
