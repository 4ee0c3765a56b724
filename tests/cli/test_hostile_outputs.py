"""Issue 9, hostile files and first use: token files (zip bombs, pickles, forged members), outputs (a failed run
keeps the previous outputs, stale temporaries, permissions, unwritable places, full disks), pipes, input keys, and
CODA's sampled encode."""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_tok, write_images

SAMPLES = REPO / "samples"


def _one_line_error(p) -> str:
    text = p.stderr.decode()
    assert "Traceback" not in text and "internal" not in text, text
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def codes(tiny_model, images, tmp_path) -> Path:
    out = tmp_path / "codes.npz"
    p = run_tok("encode", images, "-m", tiny_model, "-o", out)
    assert p.returncode == 0, p.stderr.decode()
    return out


def _members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _rewrite(path: Path, members: dict[str, np.ndarray], raw: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for k, v in members.items():
            buf = io.BytesIO()
            np.save(buf, v)
            z.writestr(f"{k}.npy", buf.getvalue())
        for name, data in (raw or {}).items():
            z.writestr(name, data)


# ---------------------------------------------------------------------------------------------------- 1: zip bomb
def _npy_header(shape, descr: str) -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    pad = 64 - (10 + len(text) + 1) % 64
    text = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def _deflated_zeros(prefix: bytes, megabytes: int) -> bytes:
    """A raw deflate stream of ``prefix`` + ``megabytes`` MiB of zeros, built from one repeated block (a full flush
    resets the compressor, so every MiB of zeros compresses to the same bytes): 3 GB in ~3 MB, in milliseconds."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    mib = bytes(1 << 20)
    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH) == block
    return head + block * megabytes + c.flush(zlib.Z_FINISH)


def _raw_zip(path: Path, members: list[tuple[str, int, bytes, int, int]]) -> None:
    """A zip written by hand: (name, method, stored bytes, uncompressed size, crc32) per member."""
    out, central = bytearray(), bytearray()
    for name, method, data, usize, crc in members:
        fn = name.encode()
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data), usize, len(fn), 0)
        out += fn + data
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(data), usize,
                               len(fn), 0, 0, 0, 0, 0, offset) + fn
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + eocd))


def _bomb(path: Path) -> Path:
    """A ~3 MB token file whose indices member declares (and really unpacks to) 3 GB of zeros."""
    mib = 2861                        # 3.0e9 bytes
    n, per = mib * 1024, 1024         # N images of 1024 uint8 tokens: exactly mib MiB
    header = {"tok_format": 1, "family": "wetok", "tokens": {"kind": "indices", "shape": [per],
                                                             "codebook_size": 256}}
    hbuf = io.BytesIO()
    np.save(hbuf, np.array(json.dumps(header)))
    keys = _npy_header((n,), "<U1") + bytes(4 * n)
    idx = _deflated_zeros(_npy_header((n, per), "|u1"), mib)
    _raw_zip(path, [
        ("header.npy", 0, hbuf.getvalue(), len(hbuf.getvalue()), zlib.crc32(hbuf.getvalue())),
        ("keys.npy", 8, zlib.compress(keys, 9)[2:-4], len(keys), zlib.crc32(keys)),
        ("indices.npy", 8, idx, 128 + (mib << 20), 0),
    ])
    return path


def test_zip_bomb_is_refused_fast_and_without_memory(tmp_path):
    from tokcli.core.tokens import bytes_report, read_token_file
    from tokcli.errors import TokError

    bomb = _bomb(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 5_000_000
    for reader in (read_token_file, bytes_report):
        tracemalloc.start()
        t = time.perf_counter()
        with pytest.raises(TokError, match="zip bomb") as ei:
            reader(bomb)
        dt = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert dt < 2.0 and peak < 200 << 20, (dt, peak)
        assert "\n" not in str(ei.value)


def test_zip_bomb_cli_one_line(tmp_path):
    bomb = _bomb(tmp_path / "bomb.npz")
    for args in (("info", bomb), ("decode", bomb, "-o", tmp_path / "out")):
        t = time.perf_counter()
        p = run_tok(*args)
        assert p.returncode == 1 and "zip bomb" in _one_line_error(p)
        assert time.perf_counter() - t < 10


def test_forged_sizes_unknown_members_and_raw_pickles(codes, tmp_path):
    from tokcli.core.tokens import read_token_file
    from tokcli.errors import TokError

    import pickle

    m = _members(codes)
    # a member of raw pickle bytes (np.load would hand it back as bytes)
    _rewrite(codes, {k: v for k, v in m.items() if k != "indices"}, {"indices.npy": pickle.dumps({"a": 1})})
    with pytest.raises(TokError, match="not a .npy array"):
        read_token_file(codes)
    p = run_tok("decode", codes, "-o", tmp_path / "o1")
    assert p.returncode == 1 and "pickled bytes are refused" in _one_line_error(p)
    _rewrite(codes, m, {"evil.npy": b"\x93NUMPY"})
    with pytest.raises(TokError, match="unknown member 'evil.npy'"):
        read_token_file(codes)
    # a .npy header that declares more than its member holds
    forged = _npy_header((5, 16, 16, 2), "|u1") + bytes(10)
    _rewrite(codes, {k: v for k, v in m.items() if k != "indices"}, {"indices.npy": forged})
    with pytest.raises(TokError, match="declares a uint8 array of shape"):
        read_token_file(codes)


def test_header_preprocess_string_is_one_line(codes, tmp_path):
    m = _members(codes)
    h = json.loads(m["header"].item())
    h["preprocess"] = "adm"
    m["header"] = np.array(json.dumps(h))
    _rewrite(codes, m)
    p = run_tok("decode", codes, "-o", tmp_path / "out")
    assert p.returncode == 1 and "preprocess must be a JSON object" in _one_line_error(p)


# ------------------------------------------------------------------------------- 5: a failed run keeps old outputs
def _truncated_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 90).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[:60])


def test_failed_reconstruct_leaves_previous_outputs(tiny_model, tiny_model_other, images, tmp_path):
    out = tmp_path / "out"
    p = run_tok("reconstruct", images, "-m", tiny_model, "-o", out, "-b", "1")
    assert p.returncode == 0, p.stderr.decode()
    before = _tree(out)
    assert len(before) == 5
    _truncated_png(images / "img2x.png")  # sorts after img0/img2: two PNGs would already be replaced
    p = run_tok("reconstruct", images, "-m", tiny_model_other, "-o", out, "-b", "1")
    assert p.returncode == 1 and "img2x.png" in _one_line_error(p)
    assert _tree(out) == before
    assert [q.name for q in out.iterdir() if q.name.startswith(".")] == []
    # with --skip-errors the run succeeds with the good images (replaced), the failure listed, exit 1
    p = run_tok("reconstruct", images, "-m", tiny_model_other, "-o", out, "-b", "1", "--skip-errors")
    assert p.returncode == 1 and "1 input(s) failed" in p.stderr.decode()
    after = _tree(out)
    assert sorted(after) == sorted(before) and all(after[k] != before[k] for k in before)


# ------------------------------------------------------------------------------ 7: full disk, odd keys, odd places
def test_full_disk_during_reconstruct_and_decode(tiny_model, images, codes, tmp_path, monkeypatch):
    out = tmp_path / "out"
    p = run_tok("reconstruct", images, "-m", tiny_model, "-o", out, "-b", "2")
    assert p.returncode == 0
    before = _tree(out)
    calls = {"n": 0}
    real_save = Image.Image.save

    def save(self, fp, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    for args in (("reconstruct", images, "-m", tiny_model), ("decode", codes, "-m", tiny_model)):
        calls["n"] = 0
        p = run_tok(*args, "-o", out, "-b", "1")
        line = _one_line_error(p)
        assert p.returncode == 1 and "no space left on device while writing" in line
        assert str(out) in line and ".tmp-" not in line
        assert _tree(out) == before


def test_decode_into_a_file_proc_and_bad_keys(tiny_model, codes, tmp_path):
    file_out = tmp_path / "a-file"
    file_out.write_text("x")
    p = run_tok("decode", codes, "-o", file_out)
    assert p.returncode == 1 and "is a file, not a folder" in _one_line_error(p)
    p = run_tok("decode", codes, "-o", "/proc/out")
    assert p.returncode == 1 and "/proc/out" in _one_line_error(p)
    m = _members(codes)
    for key, what in (("k" * 300 + ".png", "longer than the 255"), ("a\0b.png", "NUL")):
        keys = m["keys"].tolist()
        keys[1] = key
        _rewrite(codes, {**m, "keys": np.array(keys)})
        p = run_tok("decode", codes, "-o", tmp_path / "out")
        assert p.returncode == 1 and what in _one_line_error(p), p.stderr.decode()


def test_decode_missing_token_file(tmp_path):
    p = run_tok("decode", "missing.npz", "-o", tmp_path / "out", cwd=tmp_path)
    assert p.returncode == 1 and _one_line_error(p) == "error: no such file or folder: missing.npz"


# ------------------------------------------------------------------- 6: temporaries, permissions, bounds, checks
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_processes_are_removed(tiny_model, images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / f".img0.png.tmp-{dead}-abc_12.png").write_bytes(b"junk")
        (out / f".tok-stage.tmp-{dead}-xyz9").mkdir()
        (out / f".tok-stage.tmp-{dead}-xyz9" / "a.png").write_bytes(b"junk")
        keep = out / f".img1.png.tmp-{live.pid}-def34.png"
        keep.write_bytes(b"someone else's")
        codes = tmp_path / "c"
        codes.mkdir()
        (codes / f".codes.npz.tmp-{dead}-q1w2e3.npz").write_bytes(b"junk")
        p = run_tok("reconstruct", images, "-m", tiny_model, "-o", out)
        assert p.returncode == 0, p.stderr.decode()
        assert sorted(q.name for q in out.iterdir() if q.name.startswith(".")) == [keep.name]
        p = run_tok("encode", images, "-m", tiny_model, "-o", codes / "codes.npz")
        assert p.returncode == 0
        assert [q.name for q in codes.iterdir()] == ["codes.npz"]
    finally:
        live.kill()
        live.wait()


def test_temp_names_carry_the_pid():
    from tokcli.core.atomic import temp_prefix

    assert temp_prefix("a.png") == f".a.png.tmp-{os.getpid()}-"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_ordinary_permissions(tiny_model, images, tmp_path, umask):
    old = os.umask(umask)
    try:
        p = run_tok("encode", images, "-m", tiny_model, "-o", tmp_path / "codes.npz")
        assert p.returncode == 0
        p = run_tok("reconstruct", images, "-m", tiny_model, "-o", tmp_path / "out")
        assert p.returncode == 0
    finally:
        os.umask(old)
    assert (tmp_path / "codes.npz").stat().st_mode & 0o777 == 0o666 & ~umask
    for png in (tmp_path / "out").rglob("*.png"):
        assert png.stat().st_mode & 0o777 == 0o666 & ~umask
    for d in [tmp_path / "out", *[q for q in (tmp_path / "out").rglob("*") if q.is_dir()]]:
        assert d.stat().st_mode & 0o777 == 0o777 & ~umask


def test_image_size_is_bounded_before_any_work(images, tmp_path, monkeypatch):
    from tokcli.core.images import check_image_size
    from tokcli.errors import TokUsageError

    t = time.perf_counter()
    for cmd in ("encode", "reconstruct"):
        p = run_tok(cmd, images, "-m", tmp_path / "no-such-model", "--image-size", "40000", "-o", tmp_path / "o")
        assert p.returncode == 2 and "above the maximum of 4096" in _one_line_error(p)
    assert time.perf_counter() - t < 10 and not (tmp_path / "o").exists()
    monkeypatch.setenv("TOK_MAX_IMAGE_SIZE", "50000")
    assert check_image_size(40000) == 40000
    monkeypatch.setenv("TOK_MAX_IMAGE_SIZE", "64")
    with pytest.raises(TokUsageError):
        check_image_size(128)


def test_unwritable_output_fails_before_the_model_loads(images, tmp_path):
    # the model does not exist: an error about the output proves the output was checked first
    p = run_tok("encode", images, "-m", tmp_path / "no-such-model", "-o", "/proc/x.npz")
    line = _one_line_error(p)
    assert p.returncode == 1 and "/proc/x.npz" in line
    p = run_tok("reconstruct", images, "-m", tmp_path / "no-such-model", "-o", "/proc/out")
    assert p.returncode == 1 and "/proc/out" in _one_line_error(p)
    p = run_tok("encode", images, "-m", tmp_path / "no-such-model", "-o", tmp_path)  # a folder: a token set...
    assert p.returncode == 1 and "already holds other files" in _one_line_error(p)  # ...not into a used folder


# ---------------------------------------------------------------------------------------------------- 8: pipes
def _closed_reader(args, reads: int = 0) -> subprocess.CompletedProcess:
    """Run tok with stdout into a pipe whose reader reads ``reads`` bytes and then closes it."""
    proc = subprocess.Popen([sys.executable, "-m", "tokcli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    if reads:
        proc.stdout.read(reads)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, b"", err)


def test_closed_pipe_is_silent_and_141():
    for _ in range(3):
        p = _closed_reader(["models"])
        assert p.returncode == 141 and p.stderr == b"", p.stderr.decode()
    p = _closed_reader(["models", "--json"], reads=10)
    assert p.returncode in (0, 141) and p.stderr == b"", p.stderr.decode()


def test_encode_to_a_closed_pipe_is_141(tiny_model, images):
    for _ in range(2):
        p = _closed_reader(["encode", images, "-m", tiny_model, "-o", "-", "-q"])
        assert p.returncode == 141 and p.stderr == b"", p.stderr.decode()


# --------------------------------------------------------------------------------------------- 12: stdin keys
def test_stdin_paths_get_the_same_keys_as_arguments(tiny_model, images, tmp_path):
    from tokcli.core.images import collect_inputs

    files = sorted(str(p.resolve()) for p in images.rglob("*.png"))
    from_args = [it.key for it in collect_inputs(files)]
    from_stdin = [it.key for it in collect_inputs(["-"], stdin=io.StringIO("\n".join(files) + "\n"))]
    assert from_stdin == from_args == [Path(f).name for f in files]
    p = run_tok("encode", "-", "-m", tiny_model, "-o", tmp_path / "c.npz", input="\n".join(files).encode())
    assert p.returncode == 0, p.stderr.decode()
    p = run_tok("decode", tmp_path / "c.npz", "-o", tmp_path / "out")
    assert p.returncode == 0
    assert sorted(q.relative_to(tmp_path / "out").as_posix() for q in (tmp_path / "out").rglob("*.png")) == \
        sorted(Path(f).name for f in files)
    # two files with one name are refused, naming both
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "img0.png").write_bytes((images / "img0.png").read_bytes())
    p = run_tok("encode", "-", "-m", tiny_model, "-o", tmp_path / "d.npz",
                input=f"{images / 'img0.png'}\n{twin / 'img0.png'}\n".encode())
    line = _one_line_error(p)
    assert p.returncode == 1 and str(images / "img0.png") in line and str(twin / "img0.png") in line


# ----------------------------------------------------------------------------------------- 13: upscale warning
def test_small_images_warn_once_with_the_count(tiny_model, tmp_path):
    src = write_images(tmp_path / "imgs", n=3)
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(src / "dot.png")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(src / "small.png")
    p = run_tok("encode", src, "-m", tiny_model, "-o", tmp_path / "c.npz")
    assert p.returncode == 0
    warns = [ln for ln in p.stderr.decode().splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and "2 image(s) smaller than half of 32 px" in warns[0], p.stderr.decode()
    p = run_tok("encode", write_images(tmp_path / "big", n=2), "-m", tiny_model, "-o", tmp_path / "d.npz")
    assert "warning:" not in p.stderr.decode()


# ---------------------------------------------------------------------------------- 18: CODA's sampled posterior
@pytest.fixture(scope="module")
def coda_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coda-in")
    for name in ("astronaut.jpg", "coffee.jpg", "rocket.jpg"):
        (root / name).write_bytes((SAMPLES / name).read_bytes())
    return root


def test_coda_sample_posterior_is_seeded_and_recorded(coda_inputs, tmp_path):
    from tokcli.core.tokens import read_token_file

    outs = {}
    for name, extra in (("mean", []), ("s3", ["--seed", "3"]), ("s3b", ["--seed", "3", "-b", "1"]),
                        ("s4", ["--seed", "4"])):
        flags = [] if name == "mean" else ["--sample-posterior", *extra]
        p = run_tok("encode", coda_inputs, "-m", "coda-tiny", "-o", tmp_path / f"{name}.npz", *flags)
        assert p.returncode == 0, p.stderr.decode()
        outs[name] = read_token_file(tmp_path / f"{name}.npz")
    assert np.array_equal(outs["s3"].array, outs["s3b"].array)           # replays, whatever the batching
    assert not np.array_equal(outs["s3"].array, outs["mean"].array)
    assert not np.array_equal(outs["s3"].array, outs["s4"].array)
    assert outs["s3"].spec["extra"]["posterior"] == "sample" and outs["s3"].spec["extra"]["posterior_seed"] == 3
    assert outs["mean"].spec["extra"]["posterior"] == "mean"
    p = run_tok("reconstruct", coda_inputs, "-m", "coda-tiny", "-o", tmp_path / "rec", "--sample-posterior")
    assert p.returncode == 0, p.stderr.decode()


def test_coda_library_sampled_encode_per_image_seeds():
    import torch

    import tokcli

    model = tokcli.load("coda-tiny", device="cpu")
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    both = model.encode(x, sample_posterior=True, seed=[7, 8])
    one = model.encode(x[1:], sample_posterior=True, seed=[8])
    assert torch.equal(both[1:], one)
    assert torch.equal(model.encode(x, sample_posterior=True, seed=7), both)   # an int seeds image i with 7 + i
    mean, _ = model.vae.posterior(model.check_images(x[:1]))
    noise = model.vae.seeded_noise(mean.shape, [7])
    latent = model.vae.encode_sampled(model.check_images(x[:1]), noise=noise)
    assert torch.equal(model.quantize.flatten_indices(model.quantize.encode(latent)), both[:1])


def test_sample_posterior_refused_by_a_family_without_one(tiny_model, images, tmp_path):
    for cmd in ("encode", "reconstruct"):
        p = run_tok(cmd, images, "-m", tiny_model, "-o", tmp_path / "o.npz", "--sample-posterior")
        assert p.returncode == 2 and "has no posterior sampling" in _one_line_error(p)


def test_model_folders_and_checkpoints_use_pid_named_temporaries(tmp_path):
    """Model folders (save_folder) and training checkpoints are staged like every other output: a stale temporary
    of a dead process beside them is swept, and the finished folder has ordinary permissions."""
    import os
    import stat

    from conftest import TINY_ARGS, make_model_folder

    stale = tmp_path / ".m.tmp-999999999-abc"
    stale.mkdir()
    old = os.umask(0o022)
    try:
        make_model_folder(tmp_path / "m", TINY_ARGS)
    finally:
        os.umask(old)
    assert not stale.exists()
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    for name in ("config.json", "model.safetensors", "README.md"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o644, name


def test_a_refused_decode_or_reconstruct_leaves_no_new_folder(tiny_model, images, tmp_path):
    """The output folder is made up front (to fail fast when it cannot be written); a run refused after that (here:
    a sampler option the family does not take, exit 2) removes it again, and never touches a folder that was there."""
    codes = tmp_path / "c.npz"
    assert run_tok("encode", images, "-m", tiny_model, "-o", codes).returncode == 0
    for args in (("decode", codes), ("reconstruct", images, "-m", tiny_model)):
        p = run_tok(*args, "-o", tmp_path / "new", "--sampler", "bogus=1")
        assert p.returncode == 2 and not (tmp_path / "new").exists(), p.stderr.decode()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.png").write_bytes(b"x")
    assert run_tok("decode", codes, "-o", tmp_path / "old", "--sampler", "bogus=1").returncode == 2
    assert (tmp_path / "old" / "keep.png").read_bytes() == b"x"
