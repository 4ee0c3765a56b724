"""Token sets read one shard at a time (TokenSource) and mapped from disk for training (TokenArrays); the set writer's
fingerprint refusals."""

from __future__ import annotations

import numpy as np
import pytest

from tokcli.core import token_set
from tokcli.core.set_writer import SetWriter, fingerprint, shard_count
from tokcli.core.token_set import TokenArrays, open_tokens
from tokcli.core.tokens import read_token_file, write_token_file, write_token_set
from tokcli.errors import TokError


def _header(kind="indices", shape=(4, 2), **extra):
    spec = {"kind": kind, "shape": list(shape), **({"codebook_size": 300} if kind == "indices" else {})}
    return {"model": "m", "family": "f", "tokens": spec, **extra}


@pytest.fixture(params=["indices", "bits", "latents"])
def payload(request):
    rng = np.random.default_rng(0)
    kind = request.param
    n = 11
    arr = {"indices": lambda: rng.integers(0, 300, (n, 4, 2)),  # uint16 on disk
           "bits": lambda: rng.integers(0, 2, (n, 4, 10)),     # 10 bits: 2 packed bytes
           "latents": lambda: rng.standard_normal((n, 4, 2)).astype(np.float32)}[kind]()
    return kind, arr, [f"c{i % 3}/{i:03d}.png" for i in range(n)], rng.integers(0, 3, n)


def test_arrays_gather_the_rows_of_the_concatenated_set(payload, tmp_path):
    kind, arr, keys, labels = payload
    write_token_set(tmp_path / "set", header=_header(kind, arr.shape[1:]), keys=keys, labels=labels, shard_size=4,
                    **{kind: arr})
    whole = read_token_file(tmp_path / "set")
    data = TokenArrays(tmp_path / "set")
    assert len(data) == 11 and data.kind == kind and data.shape == tuple(arr.shape[1:])
    assert all(isinstance(p, np.memmap) for p, _ in data._parts)  # mapped from disk, not loaded
    idx = [10, 0, 3, 4, 4, 7, 8]  # across all three shards, repeats, unordered
    np.testing.assert_array_equal(data.gather(idx), whole.array[idx])
    np.testing.assert_array_equal(data.gather(idx), arr[idx].astype(whole.array.dtype))
    np.testing.assert_array_equal(data.labels, labels)
    with pytest.raises(IndexError):
        data.gather([11])
    write_token_file(tmp_path / "one.npz", header=_header(kind, arr.shape[1:]), keys=keys, **{kind: arr})
    np.testing.assert_array_equal(TokenArrays(tmp_path / "one.npz").gather(idx), whole.array[idx])


def test_a_source_reads_shards_only_when_asked_and_one_at_a_time(tmp_path, monkeypatch):
    arr = np.arange(10 * 8).reshape(10, 4, 2) % 300
    write_token_set(tmp_path / "set", header=_header(), keys=[f"{i}" for i in range(10)], indices=arr, shard_size=3)
    reads = []
    real = token_set.read_shard
    monkeypatch.setattr(token_set, "read_shard", lambda d, e: reads.append(e["file"]) or real(d, e))
    src = open_tokens(tmp_path / "set")
    assert len(src) == 10 and src.shards == 4 and reads == []  # the manifest only
    it = src.files()
    first = next(it)
    assert reads == ["part-00000.npz"] and first.keys == ["0", "1", "2"]
    assert [len(tf) for tf in it] == [3, 3, 1] and len(reads) == 4


def test_writer_refuses_a_folder_of_another_run(tmp_path):
    h = _header(model_sha256="a" * 64, precision="fp32")
    fp = fingerprint(h, [f"{i}" for i in range(5)], 2)
    assert shard_count(5, 2) == 3 and shard_count(0, 2) == 1
    w = SetWriter(tmp_path / "set", fp)
    assert w.scan() == {}
    for i, keys in enumerate((["0", "1"], ["2", "3"], ["4"])):
        w.write_shard(i, lambda p, k=keys: write_token_file(p, header=h, keys=k, indices=np.zeros((len(k), 4, 2),
                                                                                                    np.uint16)),
                      len(keys), [])
    w.finish(h)
    assert read_token_file(tmp_path / "set").keys == ["0", "1", "2", "3", "4"]
    assert set(SetWriter(tmp_path / "set", fp).scan()) == {0, 1, 2}
    other = fingerprint({**h, "precision": "tf32"}, [f"{i}" for i in range(5)], 2)
    with pytest.raises(TokError, match='precision "fp32" there, "tf32" now'):
        SetWriter(tmp_path / "set", other).scan()
    renamed = fingerprint(h, [f"{i}" for i in (0, 1, 2, 3, 9)], 2)
    with pytest.raises(TokError, match="other input files"):
        SetWriter(tmp_path / "set", renamed).scan()


def test_generator_batches_from_a_set_equal_those_from_the_file(tmp_path):
    """Training reads a set through TokenArrays: the same micro-batches, ranks included, as from one file."""
    from tokcli.train.recipe import DataSection
    from tokcli.train.token_data import TokenData

    rng = np.random.default_rng(1)
    arr, keys, labels = rng.integers(0, 300, (9, 4, 2)), [f"{i}.png" for i in range(9)], rng.integers(0, 5, 9)
    write_token_file(tmp_path / "one.npz", header=_header(), keys=keys, indices=arr, labels=labels)
    write_token_set(tmp_path / "set", header=_header(), keys=keys, indices=arr, labels=labels, shard_size=4)
    a = TokenData(DataSection(tokens=str(tmp_path / "one.npz"), batch_size=4), seed=3)
    b = TokenData(DataSection(tokens=str(tmp_path / "set"), batch_size=4), seed=3)
    assert len(a) == len(b) == 9 and b.num_classes == a.num_classes
    for m in (0, 1, 5):
        for rank in (0, 1):
            x, y = a.for_rank(rank, 2).batch(m), b.for_rank(rank, 2).batch(m)
            assert x["tokens"].dtype == y["tokens"].dtype and x["tokens"].shape == (4, 8)
            assert all(bool((x[k] == y[k]).all()) for k in ("tokens", "labels"))
    np.testing.assert_array_equal(b.tokens.numpy(), arr.reshape(9, -1))
