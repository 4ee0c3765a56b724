"""core/images.py: input discovery, safe decoding of awkward files, ADM crop, value-range conversion, PNG out."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokcli.core.images import (InputItem, adm_center_crop, collect_inputs, iter_batches, load_image,
                                output_path, output_paths, save_png, to_tensor, to_uint8)
from tokcli.errors import TokError, TokUsageError


def _rgb(h=8, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(arr_or_im, path, **kw):
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


# ----------------------------------------------------------------------------------------------------------
# collect_inputs
# ----------------------------------------------------------------------------------------------------------
def test_folder_keys_mirror_tree_sorted(tmp_path):
    root = tmp_path / "data"
    for rel in ["b/2.png", "a/1.JPG", "a/sub/3.webp", "top.png", ".hidden/x.png", "notes.txt", "a/.y.png"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            p.write_text("hi")
        else:
            _save(_rgb(), p, format="PNG")  # content format does not matter for discovery
    items = collect_inputs([str(root)])
    assert [it.key for it in items] == ["a/1.JPG", "a/sub/3.webp", "b/2.png", "top.png"]
    assert items[0].path == root / "a" / "1.JPG"
    flat = collect_inputs([str(root)], recursive=False)
    assert [it.key for it in flat] == ["top.png"]


def test_single_file_any_extension_and_duplicates(tmp_path):
    f = tmp_path / "one" / "pic.dat"
    f.parent.mkdir()
    f.write_bytes(b"x")
    assert collect_inputs([str(f)]) == [InputItem(f, "pic.dat")]
    g = tmp_path / "two" / "pic.dat"
    g.parent.mkdir()
    g.write_bytes(b"x")
    with pytest.raises(TokError, match="same key 'pic.dat'"):
        collect_inputs([str(f), str(g)])


def test_collect_errors(tmp_path):
    with pytest.raises(TokUsageError):
        collect_inputs([])
    with pytest.raises(TokError, match="no such file or folder: .*nope"):
        collect_inputs([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(TokError, match=r"contains no images \(looked for .png, .jpg"):
        collect_inputs([str(tmp_path / "empty")])


def test_collect_stdin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save(_rgb(), tmp_path / "imgs" / "a.png")
    _save(_rgb(), tmp_path / "imgs" / "b.png")
    stdin = io.StringIO(f"imgs/a.png\n\n  ./imgs/b.png  \n{tmp_path / 'imgs' / 'a.png'}\n")
    with pytest.raises(TokError, match="same key 'a.png'"):
        collect_inputs(["-"], stdin=stdin)
    items = collect_inputs(["-"], stdin=io.StringIO(f"imgs/b.png\n{tmp_path / 'imgs' / 'a.png'}\n"))
    assert [it.key for it in items] == ["b.png", "a.png"]
    with pytest.raises(TokError, match="no paths"):
        collect_inputs(["-"], stdin=io.StringIO("\n\n"))


# ----------------------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------------------
def test_rgba_and_la_composite_over_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)      # opaque red
    rgba[0, 1] = (0, 0, 0, 0)          # fully transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)        # half black over white -> 127
    rgba[1, 1] = (10, 20, 30, 255)
    out = load_image(_save(rgba, tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [127, 127, 127]  # round(255 * 127 / 255) = 127
    assert out[1, 1].tolist() == [10, 20, 30]
    la = Image.fromarray(np.array([[[0, 0], [200, 255]]], np.uint8), mode="LA")
    assert load_image(_save(la, tmp_path / "la.png")).tolist() == [[[255, 255, 255], [200, 200, 200]]]


def test_palette_with_and_without_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    assert load_image(_save(im, tmp_path / "p.png")).tolist() == [[[0, 0, 255], [0, 255, 0]]]
    im.info["transparency"] = 0
    _save(im, tmp_path / "pt.png", transparency=0)
    assert load_image(tmp_path / "pt.png").tolist() == [[[255, 255, 255], [0, 255, 0]]]
    gif = _save(im, tmp_path / "pt.gif", transparency=0)
    assert load_image(gif).tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_grey_16bit_cmyk(tmp_path):
    grey = np.array([[0, 100, 255]], np.uint8)
    assert load_image(_save(grey, tmp_path / "l.png")).tolist() == [[[0] * 3, [100] * 3, [255] * 3]]
    v16 = np.array([[0, 257, 65535, 128, 129, 32896]], np.uint16)
    im16 = Image.fromarray(v16)
    assert im16.mode == "I;16"
    for name in ("g16.png", "g16.tif"):
        out = load_image(_save(im16, tmp_path / name))
        assert out[..., 0].tolist() == [[0, 1, 255, 0, 1, 128]]
        assert (out[..., 0] == out[..., 2]).all()
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 0, 0))  # full magenta
    for name in ("c.jpg", "c.tif"):
        out = load_image(_save(cmyk, tmp_path / name))
        assert out.shape == (1, 1, 3)
        assert out[0, 0, 0] > 200 and out[0, 0, 1] < 60 and out[0, 0, 2] > 200
    f32 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert load_image(_save(f32, tmp_path / "f.tif"))[..., 0].tolist() == [[0, 128, 255]]


def test_exif_orientation_rotates(tmp_path):
    arr = np.zeros((4, 6, 3), np.uint8)   # H=4, W=6, one white block at the top-left
    arr[:2, :2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6                      # "rotate 90 CW to display"
    p = _save(arr, tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    out = load_image(p)
    assert out.shape == (6, 4, 3)
    # Rotating 90 degrees clockwise moves the top-left corner to the top-right.
    assert out[:2, -2:].mean() > 200 and out[:2, :2].mean() < 50


def test_first_frame_of_animation(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50)
    out = load_image(p)
    assert out.shape == (4, 4, 3) and out[0, 0, 0] > 200 and out[0, 0, 2] < 50


@pytest.mark.parametrize("case", ["empty", "text", "truncated", "folder", "missing", "corrupt_crc"])
def test_bad_files_are_one_line_tokerrors(tmp_path, case):
    p = tmp_path / "bad.png"
    if case == "empty":
        p.write_bytes(b"")
        expect = "empty file"
    elif case == "text":
        p.write_text("this is not an image\n")
        expect = "not an image"
    elif case == "truncated":
        buf = io.BytesIO()
        Image.fromarray(_rgb(64, 64)).save(buf, format="PNG")
        p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        expect = "cannot decode"
    elif case == "corrupt_crc":
        buf = io.BytesIO()
        Image.fromarray(_rgb(64, 64)).save(buf, format="PNG")
        data = bytearray(buf.getvalue())
        data[60:80] = b"\x00" * 20
        p.write_bytes(bytes(data))
        expect = "cannot decode"
    elif case == "folder":
        p.mkdir()
        expect = "is a folder"
    else:
        expect = "no such file"
    with pytest.raises(TokError) as ei:
        load_image(p)
    msg = str(ei.value)
    assert expect in msg and str(p) in msg and "\n" not in msg


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    p = _save(_rgb(20, 20), tmp_path / "big.png")
    monkeypatch.setenv("TOK_MAX_PIXELS", "300")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray DecompressionBombWarning either
        with pytest.raises(TokError, match="pixel limit"):
            load_image(p)   # 400 px: between the limit and twice it (Pillow would only warn)
        monkeypatch.setenv("TOK_MAX_PIXELS", "100")
        with pytest.raises(TokError, match="pixel limit"):
            load_image(p)   # 400 px: more than twice the limit (Pillow's own error)
    monkeypatch.setenv("TOK_MAX_PIXELS", "400")
    assert load_image(p).shape == (20, 20, 3)
    monkeypatch.setenv("TOK_MAX_PIXELS", "lots")
    with pytest.raises(TokUsageError):
        load_image(p)


def test_refuses_unsupported_format(tmp_path):
    p = tmp_path / "x.png"
    Image.fromarray(_rgb()).save(p, format="PCX")
    with pytest.raises(TokError, match="PCX files are not supported"):
        load_image(p)


def test_no_leaked_file_handles(tmp_path):
    good = _save(_rgb(), tmp_path / "g.png")
    bad = tmp_path / "b.png"
    bad.write_text("nope")
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.exists():
        pytest.skip("needs /proc")
    before = len(os.listdir(fd_dir))
    for _ in range(20):
        load_image(good)
        with pytest.raises(TokError):
            load_image(bad)
    assert len(os.listdir(fd_dir)) <= before


def test_byte_range_of_a_file_decodes_with_the_same_rules(tmp_path, monkeypatch):
    png = io.BytesIO()
    Image.fromarray(_rgb(20, 20)).save(png, format="PNG")
    p = tmp_path / "blob.bin"
    p.write_bytes(b"\0" * 100 + png.getvalue() + b"tail")
    got = load_image(p, offset=100, size=len(png.getvalue()), shown_as="blob.tar:x.png")
    assert np.array_equal(got, _rgb(20, 20))
    with pytest.raises(TokError, match=r"^blob\.tar:x\.png: not an image file"):
        load_image(p, offset=0, size=50, shown_as="blob.tar:x.png")
    with pytest.raises(TokError, match=r"^blob\.tar:x\.png: empty file"):
        load_image(p, offset=0, size=0, shown_as="blob.tar:x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # load_image sets it; restore after
    monkeypatch.setenv("TOK_MAX_PIXELS", "300")
    with pytest.raises(TokError, match=r"^blob\.tar:x\.png: image is larger than the 300-pixel limit"):
        load_image(p, offset=100, size=len(png.getvalue()), shown_as="blob.tar:x.png")


def test_input_item_defaults_keep_plain_files_unchanged(tmp_path):
    p = tmp_path / "a.png"
    assert InputItem(p, "a.png") == InputItem(p, "a.png", None, None)
    assert InputItem(p, "a.png").shown == str(p)
    assert InputItem(tmp_path / "s.tar", "c/a.png", 512, 10).shown == f"{tmp_path / 's.tar'}:c/a.png"


# ----------------------------------------------------------------------------------------------------------
# crop and conversion
# ----------------------------------------------------------------------------------------------------------
def _adm_reference(arr, size):
    """ADM centre crop written independently: explicit loop sizes, PIL calls on fresh images."""
    h, w = arr.shape[:2]
    im = Image.fromarray(arr)
    while h >= 2 * size and w >= 2 * size:
        h, w = h // 2, w // 2
        im = im.resize((w, h), Image.Resampling.BOX)
    s = size / min(h, w)
    h2, w2 = round(h * s), round(w * s)
    im = im.resize((w2, h2), Image.Resampling.BICUBIC)
    y0, x0 = (h2 - size) // 2, (w2 - size) // 2
    return np.asarray(im.crop((x0, y0, x0 + size, y0 + size)))


@pytest.mark.parametrize("hw,size", [((300, 500), 64), ((130, 64), 64), ((37, 90), 64), ((64, 64), 64),
                                     ((1000, 257), 32)])
def test_adm_center_crop(hw, size):
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    grad = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(np.uint8)
    out = adm_center_crop(grad, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _adm_reference(grad, size))


def test_adm_center_crop_identity_and_halving():
    img = _rgb(32, 32)
    np.testing.assert_array_equal(adm_center_crop(img, 32), img)
    # 128 -> BOX halving twice -> 32: equal to averaging 4x4 blocks (exactly, up to rounding of PIL's BOX).
    big = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)
    np.testing.assert_array_equal(adm_center_crop(big, 32), img)


def test_to_tensor_to_uint8_round_trip_all_values():
    v = np.arange(256, dtype=np.uint8)
    batch = np.stack([v.reshape(16, 16)] * 3, -1)[None]           # [1, 16, 16, 3]
    x = to_tensor(batch)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 16, 16)
    expected = (batch / 127.5 - 1.0).astype(np.float32)
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), expected)  # bit-identical to WeTok's numpy path
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(to_uint8(x), batch)


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, 1.0, 3.0, float("nan"), 0.0, (10.6 / 127.5) - 1, (10.4 / 127.5) - 1])
    x = x.view(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = to_uint8(x)
    assert out.shape == (1, 1, 8, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 255, 255, 128, 128, 11, 10]


# ----------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------
def test_save_png_and_output_path(tmp_path):
    img = _rgb()
    dest = output_path(tmp_path / "out", "a/b/c.JPEG")
    assert dest == tmp_path / "out" / "a" / "b" / "c.png"
    save_png(img, dest)
    np.testing.assert_array_equal(load_image(dest), img)
    assert [p.name for p in (tmp_path / "out" / "a" / "b").iterdir()] == ["c.png"]  # no temp files left
    assert output_path(tmp_path, "./x.tar.gz") == tmp_path / "x.tar.png"
    for bad in ["../x.png", "a/../../x.png", "/etc/x.png", "C:/x.png", ""]:
        with pytest.raises(TokError):
            output_path(tmp_path, bad)
    with pytest.raises(TokError, match="would both be written"):
        output_paths(tmp_path, ["a.jpg", "a.png"])


# ----------------------------------------------------------------------------------------------------------
# iter_batches
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_iter_batches(tmp_path, workers):
    for i in range(5):
        _save(_rgb(40 + i, 50, seed=i), tmp_path / "in" / f"{i}.png")
    (tmp_path / "in" / "2.png").write_text("broken")
    items = collect_inputs([str(tmp_path / "in")])
    errors: list = []
    batches = list(iter_batches(items, 32, 2, skip_errors=True, errors=errors, workers=workers))
    assert [k for k, _ in batches] == [["0.png", "1.png"], ["3.png", "4.png"]]
    assert all(b.shape == (2, 32, 32, 3) and b.dtype == np.uint8 for _, b in batches)
    np.testing.assert_array_equal(batches[1][1][1], adm_center_crop(load_image(items[4].path), 32))
    assert len(errors) == 1 and errors[0][0] == "2.png" and "not an image" in errors[0][1]
    with pytest.raises(TokError, match="2.png"):
        list(iter_batches(items, 32, 2, workers=workers))


def test_iter_batches_native_size_groups_by_shape(tmp_path):
    for i, hw in enumerate([(8, 8), (8, 8), (9, 8), (8, 8)]):
        _save(_rgb(*hw, seed=i), tmp_path / f"{i}.png")
    items = collect_inputs([str(tmp_path)])
    shapes = [(k, b.shape) for k, b in iter_batches(items, None, 4)]
    assert shapes == [(["0.png", "1.png"], (2, 8, 8, 3)), (["2.png"], (1, 9, 8, 3)), (["3.png"], (1, 8, 8, 3))]
