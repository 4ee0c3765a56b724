"""`tok encode DATA -o codes/`: sharded token sets equal to the single-file encode, resumed after interruption,
refusing to mix in shards of another run, repairing damaged shards; tar archives as inputs; `tok decode` / `tok info`
reading a set shard by shard; 2-rank torchrun runs, one of them SIGKILLed halfway, equal to one process."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from conftest import REPO, run_tok, write_images
from tokcli.core.tokens import read_token_file


def _encode(imgs, out, model, *extra):
    return run_tok("encode", imgs, "-m", model, "-o", out, "--device", "cpu", "-q", *extra)


def _same_tokens(a, b):
    ta, tb = read_token_file(a), read_token_file(b)
    assert ta.keys == tb.keys and ta.kind == tb.kind
    np.testing.assert_array_equal(ta.array, tb.array)
    assert (ta.labels is None) == (tb.labels is None)
    if ta.labels is not None:
        np.testing.assert_array_equal(ta.labels, tb.labels)


def _one_line(p):
    lines = p.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model):
    """7 images (shards of 2: 2 + 2 + 2 + 1) and their single-file encode."""
    root = tmp_path_factory.mktemp("encode-set")
    imgs = write_images(root / "imgs", n=7)
    p = _encode(imgs, root / "one.npz", tiny_model)
    assert p.returncode == 0, p.stderr
    return root, imgs, root / "one.npz"


def test_set_equals_the_single_file_and_reads_shard_by_shard(data, tiny_model, tmp_path):
    root, imgs, one = data
    p = _encode(imgs, tmp_path / "set/", tiny_model, "--shard-size", "2")
    assert p.returncode == 0 and "(4 shard(s))" in p.stderr.decode(), p.stderr
    names = sorted(q.name for q in (tmp_path / "set").iterdir())
    assert names == ["manifest.json", "part-00000.npz", "part-00001.npz", "part-00002.npz", "part-00003.npz"]
    _same_tokens(one, tmp_path / "set")
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [2, 2, 2, 1] and manifest["count"] == 7
    assert manifest["header"]["set"]["inputs"] == 7 and manifest["header"]["set"]["shard_size"] == 2
    shard = read_token_file(tmp_path / "set" / "part-00002.npz")
    assert shard.header["shard"] == {"index": 2, "inputs": [4, 6], "failed": []}
    # a set decodes to the PNGs of the file, byte for byte (batches span shard borders)
    for src, out in ((one, "d1"), (tmp_path / "set", "d2")):
        assert run_tok("decode", src, "-o", tmp_path / out, "-b", "3", "--device", "cpu", "-q").returncode == 0
    pngs = sorted(q.relative_to(tmp_path / "d1") for q in (tmp_path / "d1").rglob("*.png"))
    assert len(pngs) == 7
    assert all((tmp_path / "d1" / q).read_bytes() == (tmp_path / "d2" / q).read_bytes() for q in pngs)
    info = json.loads(run_tok("info", tmp_path / "set").stdout)
    assert info["type"] == "token_set" and info["count"] == 7 and info["shards"] == 4
    assert info["bytes"]["verified"].startswith("4/4 shards") and info["array"]["shape"][0] == 7


def test_a_folder_output_is_a_set_and_bad_outputs_are_refused(data, tiny_model, tmp_path):
    root, imgs, one = data
    (tmp_path / "empty").mkdir()
    assert _encode(imgs, tmp_path / "empty", tiny_model).returncode == 0  # an existing folder: a set
    _same_tokens(one, tmp_path / "empty")
    p = _encode(imgs, tmp_path / "x.npz", tiny_model, "--shard-size", "2")
    assert p.returncode == 2 and "give -o" in _one_line(p) and not (tmp_path / "x.npz").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    p = _encode(imgs, tmp_path / "used", tmp_path / "no-such-model")  # refused before the model is looked for
    assert p.returncode == 1 and "already holds other files (notes.txt)" in _one_line(p)
    assert sorted(q.name for q in (tmp_path / "used").iterdir()) == ["notes.txt"]


def test_resume_keeps_verified_shards_and_refuses_other_runs(data, tiny_model, tiny_model_other, tmp_path):
    root, imgs, one = data
    out = tmp_path / "set"
    assert _encode(imgs, out, tiny_model, "--shard-size", "2").returncode == 0
    # an interrupted run: no manifest yet, records of shards 0 and 2 (what the writer leaves after each shard),
    # shard 1 in place but its record lost (killed in between), shard 3 never written
    manifest = json.loads((out / "manifest.json").read_text())
    (out / ".tok-progress").mkdir()
    for i in (0, 2):
        s = manifest["shards"][i]
        rec = {"index": i, "file": s["file"], "count": s["count"], "sha256": s["sha256"], "failed": [],
               "set": manifest["header"]["set"]}
        (out / ".tok-progress" / f"part-0000{i}.json").write_text(json.dumps(rec))
    (out / "manifest.json").unlink()
    (out / "part-00003.npz").unlink()
    info_before = {i: (out / f"part-0000{i}.npz").stat().st_mtime_ns for i in (0, 2)}
    progress = json.loads(run_tok("info", out).stdout)
    assert progress["type"] == "token_set_in_progress" and progress["shards_done"] == 2 and progress["shards"] == 4
    p = run_tok("decode", out, "-o", tmp_path / "d", "--device", "cpu", "-q")
    assert p.returncode == 1 and "run the same tok encode again" in _one_line(p)
    # another model, another shard size, other inputs: refused, nothing changed
    for args, why in (((imgs, out, tiny_model_other, "--shard-size", "2"), "model_sha256"),
                      ((imgs, out, tiny_model, "--shard-size", "3"), "shard_size 2 there, 3 now")):
        p = _encode(*args)
        assert p.returncode == 1 and why in _one_line(p) and "another folder" in _one_line(p)
    assert sorted(q.name for q in out.iterdir()) == [".tok-progress", "part-00000.npz", "part-00001.npz",
                                                     "part-00002.npz"]
    # the same command: shards 0 and 2 kept (untouched), 1 (no record) and 3 encoded
    p = _encode(imgs, out, tiny_model, "--shard-size", "2")
    assert p.returncode == 0 and "2 verified shard(s) kept" in p.stderr.decode(), p.stderr
    assert {i: (out / f"part-0000{i}.npz").stat().st_mtime_ns for i in (0, 2)} == info_before
    assert not (out / ".tok-progress").exists()
    _same_tokens(one, out)
    extra = tmp_path / "more"
    shutil.copytree(imgs, extra)
    write_images(extra / "new", n=1, seed=5)
    p = _encode(extra, out, tiny_model, "--shard-size", "2")
    assert p.returncode == 1 and "inputs 7 there, 8 now" in _one_line(p)


def test_a_damaged_shard_is_detected_and_encoded_again(data, tiny_model, tmp_path):
    root, imgs, one = data
    out = tmp_path / "set"
    assert _encode(imgs, out, tiny_model, "--shard-size", "2").returncode == 0
    shard = out / "part-00001.npz"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    for cmd in (("info", out), ("decode", out, "-o", tmp_path / "d", "--device", "cpu", "-q")):
        p = run_tok(*cmd)
        assert p.returncode == 1 and "part-00001.npz does not match its sha256" in _one_line(p)
    assert not (tmp_path / "d").exists()
    p = _encode(imgs, out, tiny_model, "--shard-size", "2")
    err = p.stderr.decode()
    assert p.returncode == 0 and "part-00001.npz does not match its recorded sha256" in err and "3 verified" in err
    _same_tokens(one, out)


def _tar(members: dict[str, bytes], path):
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_a_tar_gives_the_tokens_of_the_folder_with_labels(tiny_model, tmp_path):
    """ImageNet's train tar: one inner tar per class; keys CLASS/IMAGE, so --labels folder gives the classes."""
    imgs = tmp_path / "imgs"
    for c in ("n01", "n02"):
        write_images(imgs / c, n=3, seed=len(c) + (c == "n02"))
    assert _encode(imgs, tmp_path / "folder/", tiny_model, "--shard-size", "2", "--labels", "folder").returncode == 0
    inner = {}
    for c in ("n01", "n02"):
        files = {q.relative_to(imgs / c).as_posix(): q.read_bytes() for q in sorted((imgs / c).rglob("*")) if q.is_file()}
        inner[f"{c}.tar"] = _tar(files, tmp_path / f"{c}.tar").read_bytes()
    big = _tar(inner, tmp_path / "train.tar")
    p = _encode(big, tmp_path / "tar/", tiny_model, "--shard-size", "2", "--labels", "folder")
    assert p.returncode == 0, p.stderr
    _same_tokens(tmp_path / "folder", tmp_path / "tar")
    tf = read_token_file(tmp_path / "tar")
    assert tf.header["labels"]["classes"] == ["n01", "n02"] and list(tf.labels) == [0, 0, 0, 1, 1, 1]
    # a labels file names the classes instead (key or bare file name, one per line)
    lines = [f"{k} {'cat' if k.startswith('n01') else 'dog'}" for k in tf.keys]
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    assert _encode(big, tmp_path / "lab.npz", tiny_model, "--labels", tmp_path / "labels.txt").returncode == 0
    lab = read_token_file(tmp_path / "lab.npz")
    assert lab.header["labels"]["classes"] == ["cat", "dog"] and list(lab.labels) == [0, 0, 0, 1, 1, 1]


def test_failed_inputs_are_listed_in_their_shard_and_again_on_resume(data, tiny_model, tmp_path):
    root, imgs, one = data
    bad = tmp_path / "imgs"
    shutil.copytree(imgs, bad)
    (bad / "img2.png").write_bytes(b"not an image")  # input 1 (sorted keys: img0, img2, img4, ...): shard 0
    out = tmp_path / "set"
    for attempt in range(2):
        p = _encode(bad, out, tiny_model, "--shard-size", "2", "--skip-errors")
        err = p.stderr.decode()
        assert p.returncode == 1 and "1 input(s) failed" in err and "img2.png" in err, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 6 and [s["count"] for s in manifest["shards"]] == [1, 2, 2, 1]
    assert manifest["shards"][0]["failed"][0][0] == "img2.png" and "failed" not in manifest["shards"][1]
    assert read_token_file(out / "part-00000.npz").header["shard"]["failed"] == ["img2.png"]
    full = read_token_file(one)
    got = read_token_file(out)
    want = [k for k in full.keys if k != "img2.png"]
    assert got.keys == want
    np.testing.assert_array_equal(got.array, full.array[[full.keys.index(k) for k in want]])


# ------------------------------------------------------------------------------------------------ torchrun
KILLER = """
import os, signal, sys
from tokcli.core import set_writer

_write = set_writer.SetWriter.write_shard

def write_then_die(self, *args, **kwargs):  # rank 1 is killed right after its first shard is in place
    rec = _write(self, *args, **kwargs)
    if os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return rec

set_writer.SetWriter.write_shard = write_then_die
from tokcli.cli.app import main
main(sys.argv[1:])
"""


@pytest.mark.slow  # three torchrun launches of two fresh torch processes each (~15 s each on 2 cores)
def test_two_ranks_killed_and_resumed_equal_one_process(data, tiny_model, tmp_path):
    root, imgs, one = data
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = ["encode", str(imgs), "-m", str(tiny_model), "--shard-size", "2", "--device", "cpu", "-q"]
    p = subprocess.run([*run, "-m", "tokcli", *args, "-o", str(tmp_path / "two")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("encoded 7 image(s)") == 1  # rank 0 reports
    _same_tokens(one, tmp_path / "two")
    (tmp_path / "killer.py").write_text(KILLER)
    p = subprocess.run([*run, str(tmp_path / "killer.py"), *args, "-o", str(tmp_path / "k")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode != 0 and not (tmp_path / "k" / "manifest.json").exists()
    assert (tmp_path / "k" / "part-00001.npz").is_file()  # rank 1's first shard survived the kill
    p = subprocess.run([*run, "-m", "tokcli", *args, "-o", str(tmp_path / "k")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0 and "verified shard(s) kept" in p.stderr, p.stderr[-3000:]
    _same_tokens(one, tmp_path / "k")
