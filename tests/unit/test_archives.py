"""core/archives.py: tar archives (flat, ImageNet-style nested, WebDataset-style) read in place as inputs give the
keys and pixels of the same images in a folder; hostile or damaged archives are one-line TokErrors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokcli.core.archives import Member, image_members, read_member
from tokcli.core.images import IMAGE_EXTS, InputItem, collect_inputs, iter_batches, load_cropped, load_item
from tokcli.errors import TokError


def _image_bytes(seed: int, fmt: str) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type = size, kind
    return ti


def _write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            tf.addfile(_info(name, len(data)), io.BytesIO(data))
    return path


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            tf.addfile(_info(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


# The same images as a folder tree and as archive members.
FLAT = {"b.png": _image_bytes(0, "PNG"), "a/c.jpg": _image_bytes(1, "JPEG"), "a/d.PNG": _image_bytes(2, "PNG")}


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


@pytest.fixture
def imagenet_like(tmp_path):
    """ImageNet train style: an outer tar of per-class tars, plus the same images extracted into class folders."""
    classes = {"n01440764": {"n01440764_10026.JPEG": _image_bytes(3, "JPEG"),
                             "n01440764_1.JPEG": _image_bytes(4, "JPEG")},
               "n01443537": {"n01443537_7.JPEG": _image_bytes(5, "JPEG")}}
    outer = {f"{c}.tar": _tar_bytes(files) for c, files in classes.items()}
    tar = _write_tar(tmp_path / "train.tar", outer)
    folder = _folder(tmp_path / "train", {f"{c}/{n}": d for c, files in classes.items() for n, d in files.items()})
    return tar, folder


# ----------------------------------------------------------------------------------------------------------
# keys and pixels match the extracted folder
# ----------------------------------------------------------------------------------------------------------
def test_flat_tar_keys_and_pixels_match_folder(tmp_path):
    tar = _write_tar(tmp_path / "shard.TAR", {"./" + k if k == "b.png" else k: v for k, v in FLAT.items()})
    folder = _folder(tmp_path / "extracted", FLAT)
    from_tar, from_dir = collect_inputs([str(tar)]), collect_inputs([str(folder)])
    assert [it.key for it in from_tar] == [it.key for it in from_dir] == ["a/c.jpg", "a/d.PNG", "b.png"]
    assert all(it.path == tar and it.offset is not None for it in from_tar)
    for a, b in zip(from_tar, from_dir):
        assert np.array_equal(load_cropped(a, None), load_cropped(b, None))
        assert np.array_equal(load_cropped(a, 4), load_cropped(b, 4))


def test_nested_class_tars_give_class_folder_keys(imagenet_like):
    tar, folder = imagenet_like
    from_tar, from_dir = collect_inputs([str(tar)]), collect_inputs([str(folder)])
    assert [it.key for it in from_tar] == [it.key for it in from_dir] == [
        "n01440764/n01440764_1.JPEG", "n01440764/n01440764_10026.JPEG", "n01443537/n01443537_7.JPEG"]
    for a, b in zip(from_tar, from_dir):
        assert np.array_equal(load_item(a), load_item(b))


def test_iter_batches_threads_same_as_serial(imagenet_like, tmp_path):
    tar, _ = imagenet_like
    flat = _write_tar(tmp_path / "flat.tar", FLAT)
    items = collect_inputs([str(tar), str(flat)])
    serial = list(iter_batches(items, 8, 2, workers=0))
    threaded = list(iter_batches(items, 8, 2, workers=2))
    assert [k for k, _ in serial] == [k for k, _ in threaded]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(serial, threaded))
    assert sum(len(k) for k, _ in serial) == 6


def test_stdin_line_naming_a_tar_is_expanded(tmp_path):
    tar = _write_tar(tmp_path / "s.tar", FLAT)
    items = collect_inputs(["-"], stdin=io.StringIO(f"{tar}\n"))
    assert [it.key for it in items] == ["a/c.jpg", "a/d.PNG", "b.png"]


def test_webdataset_shard_keeps_images_skips_other_members(tmp_path):
    tar = _write_tar(tmp_path / "000000.tar", {"s1.jpg": FLAT["a/c.jpg"], "s1.cls": b"3", "s1.json": b"{}",
                                               "s2.png": FLAT["b.png"], "s2.cls": b"7"})
    assert [it.key for it in collect_inputs([str(tar)])] == ["s1.jpg", "s2.png"]


def test_hidden_links_folders_and_devices_are_skipped(tmp_path):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tf:
        for name in ("ok.png", ".hidden.png", ".git/x.png", "a/.cache/y.png"):
            tf.addfile(_info(name, len(FLAT["b.png"])), io.BytesIO(FLAT["b.png"]))
        link = _info("link.png", kind=tarfile.SYMTYPE)
        link.linkname = "/etc/passwd"
        tf.addfile(link)
        hard = _info("hard.png", kind=tarfile.LNKTYPE)
        hard.linkname = "ok.png"
        tf.addfile(hard)
        tf.addfile(_info("dir.png", kind=tarfile.DIRTYPE))
        tf.addfile(_info("dev.png", kind=tarfile.CHRTYPE))
        tf.addfile(_info("fifo.png", kind=tarfile.FIFOTYPE))
    assert [it.key for it in collect_inputs([str(path)])] == ["ok.png"]


def test_member_ranges_point_into_the_outer_file(imagenet_like):
    tar, folder = imagenet_like
    data = tar.read_bytes()
    for m in image_members(tar, IMAGE_EXTS):
        assert isinstance(m, Member)
        assert data[m.offset:m.offset + m.size] == (folder / m.key).read_bytes()


# ----------------------------------------------------------------------------------------------------------
# refused archives: one line each
# ----------------------------------------------------------------------------------------------------------
def _one_line_error(args) -> str:
    with pytest.raises(TokError) as e:
        collect_inputs(args)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.mark.parametrize("name, why", [("../evil.png", "'..'"), ("a/../../evil.png", "'..'"),
                                       ("/etc/evil.png", "absolute"), ("C:/evil.png", "absolute"),
                                       ("..\\evil.png", "backslash"), ("a\x1b[2Jb.png", "control")])
def test_hostile_member_names_are_refused(tmp_path, name, why):
    tar = _write_tar(tmp_path / "bad.tar", {"ok.png": FLAT["b.png"], name: FLAT["b.png"]})
    msg = _one_line_error([str(tar)])
    assert "bad.tar" in msg and repr(name) in msg and why in msg


def test_hostile_name_in_a_nested_tar_names_both_archives(tmp_path):
    tar = _write_tar(tmp_path / "outer.tar", {"cls.tar": _tar_bytes({"../x.png": FLAT["b.png"]})})
    msg = _one_line_error([str(tar)])
    assert "outer.tar:cls.tar" in msg and "'../x.png'" in msg


def test_truncated_archive_is_refused_when_listing(tmp_path):
    tar = _write_tar(tmp_path / "cut.tar", FLAT)
    last = max(image_members(tar, IMAGE_EXTS), key=lambda m: m.offset)
    full = tar.read_bytes()
    for cut in (last.offset + 3, last.offset - 100, 700, 100):
        tar.write_bytes(full[:cut])
        msg = _one_line_error([str(tar)])
        assert "cut.tar" in msg


def test_archive_cut_at_a_member_boundary_is_refused(tmp_path):
    tar = _write_tar(tmp_path / "cut.tar", FLAT)
    first = min(image_members(tar, IMAGE_EXTS), key=lambda m: m.offset)
    end = first.offset + -(-first.size // 512) * 512  # the next header starts here
    tar.write_bytes(tar.read_bytes()[:end])
    assert "end-of-archive" in _one_line_error([str(tar)])


def test_archive_truncated_after_listing_is_refused_when_loading(tmp_path):
    tar = _write_tar(tmp_path / "s.tar", FLAT)
    items = collect_inputs([str(tar)])
    last = max(items, key=lambda it: it.offset)
    tar.write_bytes(tar.read_bytes()[:last.offset + 10])
    with pytest.raises(TokError, match=r"s\.tar:.*past the end") as e:
        load_cropped(last, None)
    assert "\n" not in str(e.value)
    errors: list = []
    got = list(iter_batches(items, None, 4, skip_errors=True, errors=errors, workers=2))
    assert [k for k, _ in errors] == [last.key] and sum(len(k) for k, _ in got) == 2


def test_read_member_refuses_a_range_past_the_end_and_an_oversized_member(tmp_path):
    tar = _write_tar(tmp_path / "s.tar", FLAT)
    n = tar.stat().st_size
    with pytest.raises(TokError, match="past the end"):
        read_member(tar, n - 10, 11, limit=1 << 20, shown_as="s.tar:x.png")
    with pytest.raises(TokError, match="limit"):
        read_member(tar, 0, 2 << 20, limit=1 << 20, shown_as="s.tar:x.png")
    with pytest.raises(TokError, match="past the end"):
        load_item(InputItem(tar, "x.png", offset=n, size=600))
    assert read_member(tar, 0, 5, limit=10, shown_as="s.tar:x") == tar.read_bytes()[:5]


def test_tar_without_images_is_refused(tmp_path):
    tar = _write_tar(tmp_path / "empty.tar", {"notes.txt": b"hi", "s.cls": b"1"})
    assert "contains no images" in _one_line_error([str(tar)])
    empty = tmp_path / "nothing.tar"
    with tarfile.open(empty, "w"):
        pass
    assert "contains no images" in _one_line_error([str(empty)])


def test_not_a_tar_and_compressed_tars_are_refused(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    assert "junk.tar" in _one_line_error([str(junk)])
    (tmp_path / "zero.tar").write_bytes(b"")
    assert "zero.tar" in _one_line_error([str(tmp_path / "zero.tar")])
    for name, mode in (("x.tar.gz", "w:gz"), ("x.tgz", "w:gz"), ("x.tar.bz2", "w:bz2"), ("x.tar.xz", "w:xz")):
        with tarfile.open(tmp_path / name, mode) as tf:
            tf.addfile(_info("a.png", len(FLAT["b.png"])), io.BytesIO(FLAT["b.png"]))
        assert "uncompressed .tar" in _one_line_error([str(tmp_path / name)])
    gz_named_tar = tmp_path / "gz.tar"
    gz_named_tar.write_bytes((tmp_path / "x.tar.gz").read_bytes())
    assert "gzip-compressed" in _one_line_error([str(gz_named_tar)])


def test_duplicate_keys_are_refused(tmp_path):
    tar = _write_tar(tmp_path / "s.tar", FLAT)
    folder = _folder(tmp_path / "d", {"b.png": FLAT["b.png"]})
    assert "same key 'b.png'" in _one_line_error([str(tar), str(folder)])
    twice = tmp_path / "twice.tar"
    twice.write_bytes(_tar_bytes({"a/x.png": FLAT["b.png"], "a.tar": _tar_bytes({"x.png": FLAT["b.png"]})}))
    assert "'a/x.png'" in _one_line_error([str(twice)])


def test_a_huge_header_is_refused_without_reading_it(tmp_path):
    hdr = _info("././@LongLink", 1 << 30, tarfile.GNUTYPE_LONGNAME)
    data = hdr.tobuf(tarfile.GNU_FORMAT) + b"x" * 512
    path = tmp_path / "long.tar"
    with open(path, "wb") as f:
        f.write(data)
        f.truncate((1 << 30) + 2048)  # sparse on disk: the claimed header is "there" but must not be read
    assert "long.tar" in _one_line_error([str(path)])


def test_damaged_member_names_archive_and_key(tmp_path):
    tar = _write_tar(tmp_path / "s.tar", {"bad.png": b"\x89PNG\r\n\x1a\n garbage", "good.png": FLAT["b.png"]})
    bad = collect_inputs([str(tar)])[0]
    with pytest.raises(TokError, match=r"s\.tar:bad\.png: ") as e:
        load_item(bad)
    assert "\n" not in str(e.value)
