"""The one rule for pretrained files (tokcli/core/pretrained.py): local places first, never a download unless asked,
offline wins, one line naming the file when missing, the full path and sha256 on stderr when fetched."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import urllib.request
from pathlib import Path

import pytest

from tokcli.core import pretrained
from tokcli.core.pretrained import PretrainedFile
from tokcli.errors import MissingWeightsError

URL = "https://example.invalid/weights/net-0123abcd.pth"


@pytest.fixture
def spec(tmp_path) -> PretrainedFile:
    return PretrainedFile(what="the test weights", name="net-0123abcd.pth", folder=tmp_path / "hub" / "checkpoints",
                          url=URL, aliases=("net-copy.pth",), option="--net-weights")


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every way out of this process raises and is recorded; the env neither asks nor forbids downloads."""
    calls: list = []

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("network access")

    monkeypatch.setattr(pretrained, "fetch_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for var in ("HF_HUB_OFFLINE", "TOK_OFFLINE", "TOK_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_missing_without_opt_in_is_one_line_and_no_network(spec, no_network):
    with pytest.raises(MissingWeightsError) as e:
        pretrained.ensure(spec)
    msg = str(e.value)
    assert "\n" not in msg and no_network == []
    for part in (spec.name, str(spec.folder), URL, "--net-weights FILE", "--download", "TOK_DOWNLOAD=1"):
        assert part in msg, part
    # a command without a --download flag (training) names only the variable
    quiet = dataclasses.replace(spec, fetch_flag=None, option=None)
    msg = str(pytest.raises(MissingWeightsError, pretrained.ensure, quiet).value)
    assert "TOK_DOWNLOAD=1" in msg and "--download" not in msg and no_network == []


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TOK_OFFLINE"])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_offline_refuses_even_when_asked(spec, no_network, monkeypatch, var, how):
    monkeypatch.setenv(var, "1")
    if how == "env":
        monkeypatch.setenv("TOK_DOWNLOAD", "1")
    with pytest.raises(MissingWeightsError) as e:
        pretrained.ensure(spec, download=how == "flag")
    msg = str(e.value)
    assert var in msg and spec.name in msg and str(spec.folder) in msg and "\n" not in msg
    assert no_network == []


@pytest.mark.parametrize("how", ["flag", "env"])
def test_asked_online_fetches_and_prints_path_and_sha256(spec, no_network, monkeypatch, capsys, how):
    fetched = []

    def fake_fetch(url, dest, *, sha256_prefix=None):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(b"weights")
        fetched.append((url, Path(dest)))
        return hashlib.sha256(b"weights").hexdigest()

    monkeypatch.setattr(pretrained, "fetch_url", fake_fetch)
    if how == "env":
        monkeypatch.setenv("TOK_DOWNLOAD", "1")
    path = pretrained.ensure(spec, download=how == "flag")
    assert path == spec.path.resolve() and fetched == [(URL, spec.path.resolve())]
    err = capsys.readouterr().err
    assert f"-> {spec.path.resolve()}" in err
    assert f"downloaded {spec.path.resolve()} (sha256 {hashlib.sha256(b'weights').hexdigest()})" in err
    # the next run finds it and says nothing
    assert pretrained.ensure(spec) == spec.path and capsys.readouterr().err == ""


def test_failed_download_is_one_line(spec, no_network, monkeypatch):
    def broken(url, dest, **kw):
        raise OSError("network unreachable\nmore")

    monkeypatch.setattr(pretrained, "fetch_url", broken)
    msg = str(pytest.raises(MissingWeightsError, pretrained.ensure, spec, download=True).value)
    assert "network unreachable" in msg and "\n" not in msg and spec.name in msg and str(spec.folder) in msg


def test_local_places_in_order(spec, tmp_path, no_network):
    spec.folder.mkdir(parents=True)
    (spec.folder / "net-copy.pth").write_bytes(b"alias")
    assert pretrained.ensure(spec) == spec.folder / "net-copy.pth"
    (spec.folder / spec.name).write_bytes(b"main")
    assert pretrained.ensure(spec) == spec.folder / spec.name
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"mine")
    assert pretrained.ensure(spec, mine) == mine
    msg = str(pytest.raises(MissingWeightsError, pretrained.ensure, spec, tmp_path / "nope.pth").value)
    assert "--net-weights" in msg and "nope.pth" in msg
    assert no_network == []


def test_hub_files_come_from_the_hf_cache_then_hf_hub_download(tmp_path, no_network, monkeypatch, capsys):
    import huggingface_hub

    spec = PretrainedFile(what="a teacher", name="model.safetensors", folder=tmp_path / "hf",
                          hf=("org/teacher", "model.safetensors"), hf_cache=tmp_path / "hf")
    cached = tmp_path / "hf" / "model.safetensors"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f, cache_dir: None)
    msg = str(pytest.raises(MissingWeightsError, pretrained.ensure, spec).value)
    assert "`hf download org/teacher model.safetensors`" in msg and "--download" in msg and "\n" not in msg

    def fake_hf_download(repo, filename, cache_dir):
        assert cache_dir == tmp_path / "hf"
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(b"teacher")
        return str(cached)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_download)
    assert pretrained.ensure(spec, download=True) == cached
    assert f"downloaded {cached} (sha256 {hashlib.sha256(b'teacher').hexdigest()})" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f, cache_dir: str(cached))
    assert pretrained.ensure(spec) == cached


def test_fetch_url_streams_checks_the_prefix_and_leaves_nothing_on_failure(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3_000_000)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "new" / "dir" / "w.pth"
    assert pretrained.fetch_url(src.as_uri(), dest, sha256_prefix=digest[:8]) == digest
    assert dest.read_bytes() == src.read_bytes()
    bad = tmp_path / "bad" / "w.pth"
    with pytest.raises(MissingWeightsError, match="sha256"):
        pretrained.fetch_url(src.as_uri(), bad, sha256_prefix="00000000")
    assert list(bad.parent.iterdir()) == []


def test_torchvision_backbone_specs_check_their_name_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from tokcli.losses.perceptual import backbone_spec
    from tokcli.metrics.fid import weights_spec

    assert backbone_spec("vgg").sha256_prefix == "397923af"
    assert backbone_spec("alex").sha256_prefix == "7be5be79"
    assert backbone_spec("alex").folder == tmp_path / "hub" / "checkpoints"
    assert weights_spec().folder == tmp_path / "hub" / "checkpoints"
    assert weights_spec().option == "--inception-weights"


def test_a_file_in_a_real_hf_cache_layout_is_found_offline(tmp_path, no_network):
    cache = tmp_path / "hub"
    snap = cache / "models--org--teacher" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"teacher")
    (cache / "models--org--teacher" / "refs").mkdir()
    (cache / "models--org--teacher" / "refs" / "main").write_text("0123abc")
    spec = PretrainedFile(what="a teacher", name="model.safetensors", folder=cache,
                          hf=("org/teacher", "model.safetensors"), hf_cache=cache)
    assert pretrained.ensure(spec) == snap / "model.safetensors" and no_network == []
