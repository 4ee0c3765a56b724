"""core/tokens.py: the .npz token file and sharded sets: round trips, byte cost, and refusal of bad files."""

from __future__ import annotations

import io
import json
import struct
import sys
import zipfile

import numpy as np
import pytest

import tokcli
from tokcli.core.tokens import (TokenFile, bytes_report, pack_bits, read_token_file, unpack_bits,
                                write_manifest, write_token_file, write_token_set)
from tokcli.errors import TokError

SPEC = {"kind": "indices", "shape": [16, 16, 4], "codebook_size": 256, "layout": "h, w, group"}


def _header(**tokens):
    return {"model": "wetok-test", "family": "wetok", "tokens": {**SPEC, **tokens}}


def _indices(n=3, seed=0, high=256, shape=(16, 16, 4)):
    return np.random.default_rng(seed).integers(0, high, (n, *shape), dtype=np.int64)


def _members(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _rewrite(path, drop=(), **arrays):
    m = _members(path)
    for k in drop:
        m.pop(k)
    m.update(arrays)
    with open(path, "wb") as f:
        np.savez(f, **m)


def _header_array(path, **changes):
    h = json.loads(_members(path)["header"].item())
    h.update(changes)
    return np.array(json.dumps(h))


# ----------------------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------------------
def test_indices_round_trip_and_narrowing(tmp_path):
    idx = _indices()
    p = tmp_path / "codes.npz"
    write_token_file(p, header=_header(), keys=["a.png", "b/c.png", "d.png"], indices=idx,
                     labels=np.array([1, 2, 3]))
    tf = read_token_file(p)
    assert isinstance(tf, TokenFile) and tf.kind == "indices" and len(tf) == 3
    assert tf.array.dtype == np.uint8 and np.array_equal(tf.array, idx)
    assert tf.keys == ["a.png", "b/c.png", "d.png"] and tf.labels.tolist() == [1, 2, 3]
    assert tf.shape == (16, 16, 4) and tf.spec["codebook_size"] == 256
    h = tf.header
    assert h["tok_format"] == 1 and h["tok_version"] == tokcli.__version__ and h["created"].endswith("Z")
    assert h["model"] == "wetok-test" and h["tokens"]["kind"] == "indices"
    # loadable by plain numpy without pickles
    m = _members(p)
    assert m["header"].shape == () and m["keys"].dtype.kind == "U" and m["indices"].dtype == np.uint8


@pytest.mark.parametrize("high,dtype", [(200, np.uint8), (300, np.uint16), (70000, np.uint32)])
def test_dtype_by_largest_value_without_codebook(tmp_path, high, dtype):
    idx = _indices(n=2, high=high, shape=(4,))
    idx[0, 0] = high - 1
    p = tmp_path / "x.npz"
    write_token_file(p, header={"tokens": {"kind": "indices", "shape": [4]}}, keys=["a", "b"], indices=idx)
    tf = read_token_file(p)
    assert tf.array.dtype == dtype and np.array_equal(tf.array, idx)


def test_dtype_by_codebook_size(tmp_path):
    p = tmp_path / "x.npz"
    write_token_file(p, header={"tokens": {"kind": "indices", "shape": [2], "codebook_size": 4096}},
                     keys=["a"], indices=np.array([[1, 2]], np.int32))
    assert read_token_file(p).array.dtype == np.uint16  # the codebook decides, not this file's largest value


def test_bits_round_trip(tmp_path):
    bits = np.random.default_rng(1).integers(0, 2, (2, 4, 4, 10)).astype(np.uint8)
    p = tmp_path / "bits.npz"
    write_token_file(p, header={"tokens": {"kind": "bits", "bits": 10}}, keys=["a", "b"], bits=bits)
    m = _members(p)
    assert m["bits"].shape == (2, 4, 4, 2) and m["bits"].dtype == np.uint8
    tf = read_token_file(p)
    assert tf.kind == "bits" and tf.header["bit_count"] == 10 and tf.shape == (4, 4, 10)
    assert np.array_equal(tf.array, bits)
    packed, count = pack_bits(bits.astype(bool))
    assert count == 10 and np.array_equal(unpack_bits(packed, count), bits)
    with pytest.raises(ValueError):
        pack_bits(np.array([0, 2]))


@pytest.mark.parametrize("dtype,stored", [(np.float16, np.float16), (np.float32, np.float32),
                                          (np.float64, np.float32)])
def test_latents_round_trip(tmp_path, dtype, stored):
    lat = np.random.default_rng(2).standard_normal((2, 32, 8)).astype(dtype)
    p = tmp_path / "lat.npz"
    write_token_file(p, header={"tokens": {"kind": "latents", "latent_dim": 8}}, keys=["a", "b"], latents=lat)
    tf = read_token_file(p)
    assert tf.kind == "latents" and tf.array.dtype == stored
    np.testing.assert_array_equal(tf.array, lat.astype(stored))


def test_torch_tensors_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "t.npz"
    write_token_file(p, header=_header(shape=[2, 2, 1]), keys=["a"], indices=torch.tensor([[[[1], [2]], [[3], [4]]]]))
    assert read_token_file(p).array.ravel().tolist() == [1, 2, 3, 4]


def test_exact_byte_cost(tmp_path):
    n = 5
    p = tmp_path / "codes.npz"
    write_token_file(p, header=_header(), keys=[f"{i}.png" for i in range(n)], indices=_indices(n))
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("indices.npy")
    assert info.compress_type == zipfile.ZIP_STORED
    assert info.file_size == info.compress_size == n * 16 * 16 * 4 + 128   # data + one .npy header
    r = bytes_report(p)
    assert r["n"] == n and r["kind"] == "indices" and r["dtype"] == "uint8"
    assert r["payload_bytes"] == n * 1024 and r["payload_bytes_per_image"] == 1024
    assert r["file_bytes"] == p.stat().st_size
    with zipfile.ZipFile(p) as z:  # keys are deflated (fixed-width UTF-32 compresses ~40:1 on real paths)
        keys_info = z.getinfo("keys.npy")
    assert keys_info.compress_type == zipfile.ZIP_DEFLATED and r["keys_bytes"] == keys_info.compress_size
    assert r["overhead_bytes"] == r["file_bytes"] - r["payload_bytes"] - r["keys_bytes"] - r["header_bytes"]
    assert r["overhead_bytes"] > 0 and r["bytes_per_image"] == r["file_bytes"] / n


def test_writer_rejects_bad_calls(tmp_path):
    p = tmp_path / "x.npz"
    idx = _indices(2)
    with pytest.raises(ValueError, match="exactly one"):
        write_token_file(p, header=_header(), keys=["a", "b"])
    with pytest.raises(ValueError, match="exactly one"):
        write_token_file(p, header=_header(), keys=["a", "b"], indices=idx, latents=idx.astype(float))
    with pytest.raises(ValueError, match="keys"):
        write_token_file(p, header=_header(), keys=["a"], indices=idx)
    with pytest.raises(ValueError, match="unique"):
        write_token_file(p, header=_header(), keys=["a", "a"], indices=idx)
    with pytest.raises(ValueError, match="shape"):
        write_token_file(p, header=_header(shape=[8, 8, 4]), keys=["a", "b"], indices=idx)
    with pytest.raises(ValueError, match="codebook"):
        write_token_file(p, header=_header(codebook_size=16), keys=["a", "b"], indices=idx)
    with pytest.raises(ValueError, match="non-negative"):
        write_token_file(p, header=_header(), keys=["a", "b"], indices=idx - 1)
    with pytest.raises(TypeError):
        write_token_file(p, header=_header(), keys=["a", "b"], indices=idx.astype(np.float32))
    assert not p.exists() and list(tmp_path.iterdir()) == []   # nothing half-written


def test_stdout_and_stdin(tmp_path, monkeypatch):
    class Stream:
        def __init__(self, data=b""):
            self.buffer = io.BytesIO(data)

    out = Stream()
    monkeypatch.setattr(sys, "stdout", out)
    write_token_file("-", header=_header(), keys=["a"], indices=_indices(1))
    data = out.buffer.getvalue()
    assert data[:4] == b"PK\x03\x04"
    monkeypatch.setattr(sys, "stdin", Stream(data))
    tf = read_token_file("-")
    assert tf.keys == ["a"] and np.array_equal(tf.array, _indices(1))
    monkeypatch.setattr(sys, "stdin", Stream(data))
    assert bytes_report("-")["file_bytes"] == len(data)
    monkeypatch.setattr(sys, "stdin", Stream(b""))
    with pytest.raises(TokError, match="<stdin> is empty"):
        read_token_file("-")


# ----------------------------------------------------------------------------------------------------------
# refusing bad files
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def good(tmp_path):
    p = tmp_path / "codes.npz"
    write_token_file(p, header=_header(), keys=["a", "b", "c"], indices=_indices(3))
    return p


def _expect(path, pattern):
    with pytest.raises(TokError, match=pattern) as ei:
        read_token_file(path)
    assert "\n" not in str(ei.value)


def _object_npy() -> bytes:
    """The bytes of a .npy holding an object array, built by hand (the data part is never read)."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }"
    pad = 64 - (10 + len(header) + 1) % 64
    header = (header + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\x80\x04N."


def test_object_array_refused(good):
    m = _members(good)
    with zipfile.ZipFile(good, "w") as z:
        for k in ("header", "keys"):
            buf = io.BytesIO()
            np.save(buf, m[k])
            z.writestr(f"{k}.npy", buf.getvalue())
        z.writestr("indices.npy", _object_npy())
    _expect(good, "contains Python objects")


def test_truncated_and_not_npz(good, tmp_path):
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    _expect(good, "damaged or truncated")
    good.write_bytes(data[:-30])   # central directory cut
    _expect(good, "damaged or truncated")
    txt = tmp_path / "t.npz"
    txt.write_text("hello")
    _expect(txt, "not a token file")
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    _expect(npy, "not a token file")
    empty = tmp_path / "e.npz"
    empty.write_bytes(b"")
    _expect(empty, "empty")
    _expect(tmp_path / "missing.npz", "no such file or folder")


def test_damaged_member_crc(good):
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("indices.npy")
    start = info.header_offset + 30 + len(info.filename) + len(z.getinfo("indices.npy").extra) + 200
    data[start: start + 8] = bytes((b + 1) % 256 for b in data[start: start + 8])
    good.write_bytes(bytes(data))
    _expect(good, "damaged")


def test_header_problems(good):
    _rewrite(good, header=np.array("{not json"))
    _expect(good, "not valid JSON")
    _rewrite(good, header=np.array("[1, 2]"))
    _expect(good, "not a JSON object")
    _rewrite(good, header=np.array(json.dumps({"tokens": SPEC})))
    _expect(good, "no tok_format")
    _rewrite(good, header=np.array(json.dumps({"tok_format": 2, "tokens": SPEC})))
    _expect(good, "newer than this tok reads")
    _rewrite(good, header=np.array(["a", "b"]))
    _expect(good, "header must be a single string")
    _rewrite(good, drop=["header"])
    _expect(good, "has no header")


def test_payload_and_keys_problems(good):
    m = _members(good)
    _rewrite(good, keys=m["keys"][:2])
    _expect(good, "2 keys but 3 images")
    _rewrite(good, keys=np.array(["a", "b", "a"]))
    _expect(good, "appears more than once")
    _rewrite(good, keys=m["keys"], latents=np.zeros((3, 16, 16, 4), np.float32))
    _expect(good, "2 payloads")
    _rewrite(good, drop=["indices", "latents"])
    _expect(good, "no payload")


def test_tampered_shape_and_values(good):
    idx = _members(good)["indices"]
    _rewrite(good, indices=idx[:, :8])
    _expect(good, r"per-image shape \(8, 16, 4\) but the header says \(16, 16, 4\)")
    bad = idx.astype(np.uint16)
    bad[1, 2, 3, 0] = 300
    _rewrite(good, indices=bad)
    _expect(good, "index 300 is outside the codebook of 256")
    neg = idx.astype(np.int16)
    neg[0, 0, 0, 0] = -1
    _rewrite(good, indices=neg)
    _expect(good, "negative index -1")
    _rewrite(good, indices=idx.astype(np.float32))
    _expect(good, "dtype float32")


# ----------------------------------------------------------------------------------------------------------
# sharded sets
# ----------------------------------------------------------------------------------------------------------
def _set(tmp_path, n=7, shard_size=3):
    keys = [f"img{i}.png" for i in range(n)]
    idx = _indices(n, seed=5)
    d = tmp_path / "set"
    manifest = write_token_set(d, header=_header(), keys=keys, indices=idx, labels=np.arange(n),
                               shard_size=shard_size)
    return d, keys, idx, manifest


def test_sharded_set_round_trip(tmp_path):
    d, keys, idx, manifest = _set(tmp_path)
    assert [s["file"] for s in manifest["shards"]] == ["part-00000.npz", "part-00001.npz", "part-00002.npz"]
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1] and manifest["count"] == 7
    for target in (d, d / "manifest.json"):
        tf = read_token_file(target)
        assert tf.keys == keys and np.array_equal(tf.array, idx) and tf.labels.tolist() == list(range(7))
        assert tf.header["model"] == "wetok-test"
    r = bytes_report(d)
    assert r["n"] == 7 and r["shards"] == 3 and r["payload_bytes"] == 7 * 1024


def test_write_manifest_for_rank_files(tmp_path):
    for rank in range(2):
        write_token_file(tmp_path / f"part-{rank:05d}.npz", header=_header(), keys=[f"r{rank}"],
                         indices=_indices(1, seed=rank))
    write_manifest(tmp_path, ["part-00000.npz", "part-00001.npz"])
    tf = read_token_file(tmp_path)
    assert tf.keys == ["r0", "r1"] and np.array_equal(tf.array[1], _indices(1, seed=1)[0])


def test_sharded_set_problems(tmp_path):
    d, keys, idx, manifest = _set(tmp_path)
    mpath = d / "manifest.json"
    original = mpath.read_text()
    # a shard replaced by another valid file: sha256 catches it
    write_token_file(d / "part-00001.npz", header=_header(), keys=["x", "y", "z"], indices=_indices(3))
    _expect(d, "part-00001.npz does not match its sha256")
    write_token_set(d, header=_header(), keys=keys, indices=idx, shard_size=3)
    original = mpath.read_text()   # new shards, new hashes (the header holds the creation time)
    m = json.loads(original)
    m["count"] = 8
    mpath.write_text(json.dumps(m))
    _expect(d, "says 8 images but the shards hold 7")
    m = json.loads(original)
    m["shards"][0]["count"] = 2
    mpath.write_text(json.dumps(m))
    _expect(d, "holds 3 images but manifest.json says 2")
    m = json.loads(original)
    m["shards"][0]["file"] = "../evil.npz"
    mpath.write_text(json.dumps(m))
    _expect(d, "must be a plain name")
    mpath.write_text(original)
    (d / "part-00002.npz").unlink()
    _expect(d, "part-00002.npz listed in manifest.json is missing")
    mpath.unlink()
    _expect(d, "without manifest.json")


def test_write_to_unwritable_target_is_tokerror(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(TokError, match="cannot write"):
        write_token_file(tmp_path / "adir", header=_header(), keys=["a"], indices=_indices(1))
