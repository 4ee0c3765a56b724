"""tokcli.report: markdown table content, figures that exist and show something, protocol warnings, errors."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
from PIL import Image

from tokcli.errors import TokError
from tokcli.report import write_report

PROTOCOL = {"n_images": 4, "n_failed": 0, "image_size": 256, "crop": "adm_center (test)", "psnr": "tok psnr",
            "ssim": "tok ssim", "lpips": None, "rfid": None, "seed": 0, "precision": "fp32", "device": "cpu",
            "tok_version": "0.1.0"}


def _result(name, family, *, bpp=None, psnr=None, ssim=None, lpips=None, rfid=None, usage=None, perplexity=None,
            **protocol):
    metrics = {k: v for k, v in (("psnr", psnr), ("ssim", ssim), ("lpips", lpips), ("rfid", rfid)) if v is not None}
    if usage is not None:
        metrics["usage"] = {"codebook_size": 256, "usage": usage, "perplexity": perplexity,
                            "groups": [{"usage": usage}]}
    if bpp is not None:
        metrics["bpp"] = {"tokens": bpp, "stored_bpp": bpp, "tokens_per_image": 2048, "stored_bytes_per_image": 2048}
    return {"model": {"name": name, "family": family, "sha256": "0" * 64, "source": f"weights/{name}"},
            "protocol": {**PROTOCOL, **protocol}, "metrics": metrics,
            "per_image": {"key": ["a", "b"], "psnr": [psnr, psnr]}}


A = _result("wetok-tiny", "wetok", bpp=0.25, psnr=20.7712, ssim=0.58734, rfid=95.2049, usage=0.9871,
            perplexity=174.83)
B = _result("coda-small", "coda", bpp=0.0625, psnr=24.5, ssim=0.71, lpips=0.3127, rfid=12.3456)  # no usage


def _rows(md: str) -> dict[str, dict[str, str]]:
    """The markdown table as {model: {header: cell}} (checks that every row has one cell per header)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]  # noqa: E731
    header = split(lines[0])
    assert re.fullmatch(r"\|(-{3,}:?\|)+", lines[1].replace(":-", "-")), lines[1]
    rows = {}
    for ln in lines[2:]:
        cells = split(ln)
        assert len(cells) == len(header), ln
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _image(path):
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def test_table_values_and_missing(tmp_path):
    written = write_report([A, B], tmp_path / "report.md")
    md_path = tmp_path / "report.md"
    assert md_path in written and (tmp_path / "report_rd.png") in written
    assert (tmp_path / "report_grid.png") not in written and not (tmp_path / "report_grid.png").exists()
    md = md_path.read_text(encoding="utf-8")
    rows = _rows(md)
    assert set(rows) == {"wetok-tiny", "coda-small"}
    a, b = rows["wetok-tiny"], rows["coda-small"]
    assert (a["family"], a["N"], a["size"]) == ("wetok", "4", "256")
    assert (a["bpp"], a["PSNR (dB) ↑"], a["SSIM ↑"], a["rFID ↓"]) == ("0.2500", "20.77", "0.5873", "95.20")
    assert (a["usage %"], a["perplexity"]) == ("98.7", "174.8")
    assert a["LPIPS ↓"] == "—"  # not measured for A
    assert (b["family"], b["bpp"], b["PSNR (dB) ↑"], b["LPIPS ↓"], b["rFID ↓"]) == (
        "coda", "0.0625", "24.50", "0.3127", "12.35")
    assert b["usage %"] == "—" and b["perplexity"] == "—"
    # same protocol: no warning; images linked relatively
    assert "different protocols" not in md
    assert "](report_rd.png)" in md
    assert "adm_center (test)" in md and "**image_size**: 256" in md
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_rd_plot_is_a_real_image(tmp_path):
    write_report([A, B], tmp_path / "r.md")
    im = _image(tmp_path / "r_rd.png")
    w, h = im.size
    assert 600 <= w <= 2000 and 250 <= h <= 1000 and w > h  # two panels side by side
    px = np.asarray(im, dtype=np.float64)
    assert px.var() > 0
    # one coloured marker per model (C0 blue, C1 orange) — the points were actually drawn
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(px - rgb).sum(-1) < 30).sum() > 20, rgb


def test_rd_plot_single_panel_and_none(tmp_path):
    only_psnr = _result("m", "wetok", bpp=0.5, psnr=30.0)
    write_report([only_psnr], tmp_path / "one.md")
    w, h = _image(tmp_path / "one_rd.png").size
    assert w < 700  # one panel only

    no_bpp = _result("m", "wetok", psnr=30.0)
    written = write_report([no_bpp], tmp_path / "none.md")
    assert written == [tmp_path / "none.md"] and not (tmp_path / "none_rd.png").exists()
    md = (tmp_path / "none.md").read_text(encoding="utf-8")
    assert "No plot" in md and "_rd.png" not in md
    assert _rows(md)["m"]["bpp"] == "—"


def test_grid_contains_originals_and_reconstructions(tmp_path):
    colours = [(250, 10, 10), (10, 240, 20), (20, 30, 245), (240, 240, 5)]
    orig = np.stack([np.full((32, 32, 3), c, np.uint8) for c in colours])
    recon = orig.copy()
    recon[..., 0] = 128  # reconstructions: a distinct colour per image too
    keys = ["red.png", "green.png", "blue.png", "yellow.png"]
    written = write_report([A], tmp_path / "rep.md", grid=(orig, recon, keys), title="My title")
    gpath = tmp_path / "rep_grid.png"
    assert gpath in written
    md = (tmp_path / "rep.md").read_text(encoding="utf-8")
    assert md.startswith("# My title\n") and "](rep_grid.png)" in md
    im = _image(gpath)
    w, h = im.size
    assert w >= 4 * 32 and h >= 2 * 32
    px = np.asarray(im).reshape(-1, 3)
    assert px.astype(np.float64).var() > 0
    present = {tuple(p) for p in np.unique(px, axis=0)}
    for c in colours:
        assert c in present, f"original colour {c} missing from the grid"
        assert (128, c[1], c[2]) in present, "reconstruction colour missing from the grid"
    # each original appears at least as a full 32x32 block (4 rows: orig, recon, two zooms)
    for c in colours:
        assert (px == c).all(-1).sum() >= 2 * 32 * 32


def test_grid_keeps_at_most_eight_pairs(tmp_path):
    colours = [(20 * i + 5, 60, 200) for i in range(10)]  # not grey: text anti-aliasing cannot produce them
    orig = np.stack([np.full((16, 16, 3), c, np.uint8) for c in colours])
    write_report([A], tmp_path / "r.md", grid=(orig, orig, [str(i) for i in range(10)]))
    px = np.asarray(_image(tmp_path / "r_grid.png")).reshape(-1, 3)
    counts = [int((px == c).all(-1).sum()) for c in colours]
    assert all(n >= 2 * 16 * 16 for n in counts[:8]) and counts[8:] == [0, 0]  # images 0..7 only


def test_protocol_mismatch_note(tmp_path):
    other = _result("small-res", "wetok", bpp=1.0, psnr=28.0, image_size=128)
    write_report([A, other], tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "different protocols" in md
    note = [ln for ln in md.splitlines() if ln.startswith("> - **image_size**")]
    assert note and "256 (wetok-tiny)" in note[0] and "128 (small-res)" in note[0]
    # a metric measured only by one model (lpips None elsewhere) or a device change is not a protocol mismatch
    b2 = copy.deepcopy(B)
    b2["protocol"].update(lpips={"net": "alex"}, device="cuda", seconds=3.0)
    write_report([A, b2], tmp_path / "s.md")
    assert "different protocols" not in (tmp_path / "s.md").read_text(encoding="utf-8")


def test_errors(tmp_path):
    with pytest.raises(TokError, match="no bench results"):
        write_report([], tmp_path / "r.md")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TokError, match="cannot write report"):
        write_report([A], blocker / "r.md")
    with pytest.raises(TokError, match="cannot write report"):
        write_report([A], tmp_path)  # a folder
    bad = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(TokError, match="differ in shape"):
        write_report([A], tmp_path / "g.md", grid=(bad, bad[:, :4], ["a", "b"]))
    assert not (tmp_path / "g.md").exists()
