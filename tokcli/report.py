"""Turn `tok bench` results into a human-readable report: one markdown file plus PNG figures beside it.

``write_report(results, "out/report.md", grid=...)`` produces:

- ``out/report.md``: a title, one table row per result (model, family, N, size, bpp, PSNR, SSIM, LPIPS, rFID,
  codebook usage, perplexity; "—" where a metric was not measured), the protocol of the first result, a warning
  when the results were measured under different protocols (only numbers from one protocol are comparable), and
  the figures embedded with relative links;
- ``out/report_rd.png``: rate–distortion plot, bits per pixel of the tokens (x) against PSNR (higher is better)
  and against rFID (lower is better), one labelled point per model. A panel is drawn only when at least one
  result has both bpp and that metric; when neither panel has data no PNG is written and the markdown says why;
- ``out/report_grid.png`` (only with ``grid``): originals above their reconstructions for up to 8 images, plus a
  nearest-neighbour zoom of the centre of each so that tokenizer artefacts are visible.

Figures are drawn with matplotlib's Agg canvas (no pyplot, so no display is needed and a user's interactive
backend is untouched) and PIL. Every file is written atomically (tokcli.core.atomic).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

import numpy as np

from tokcli.core.atomic import atomic_write_bytes, atomic_write_text
from tokcli.errors import TokError

MISSING = "—"
GRID_MAX = 8  # image pairs in the grid
ZOOM = 4  # the zoom rows show the centre 1/ZOOM of each side, enlarged ZOOM times
# protocol fields that must agree for numbers to be comparable (None = metric not measured, not compared)
COMPARED = ("n_images", "image_size", "crop", "uint8", "psnr", "ssim", "lpips", "rfid", "precision")


# ---------------------------------------------------------------------------------------------- values


def _get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...`` or None when any level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _num(v: Any) -> float | None:
    """A finite-or-infinite float, or None for missing / non-numeric / NaN values."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _fmt(v: Any, spec: str) -> str:
    v = _num(v)
    if v is None:
        return MISSING
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def _int(v: Any) -> str:
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else MISSING


def _name(result: dict, i: int) -> str:
    return str(_get(result, "model", "name") or f"result {i + 1}")


def _usage_pct(result: dict) -> float | None:
    u = _num(_get(result, "metrics", "usage", "usage"))
    return None if u is None else 100.0 * u


# (header, formatter) for each table column
COLUMNS: list[tuple[str, Callable[[dict, int], str]]] = [
    ("model", lambda r, i: _name(r, i)),
    ("family", lambda r, i: str(_get(r, "model", "family") or MISSING)),
    ("N", lambda r, i: _int(_get(r, "protocol", "n_images"))),
    ("size", lambda r, i: _int(_get(r, "protocol", "image_size"))),
    ("bpp", lambda r, i: _fmt(_get(r, "metrics", "bpp", "tokens"), ".4f")),
    ("PSNR (dB) ↑", lambda r, i: _fmt(_get(r, "metrics", "psnr"), ".2f")),
    ("SSIM ↑", lambda r, i: _fmt(_get(r, "metrics", "ssim"), ".4f")),
    ("LPIPS ↓", lambda r, i: _fmt(_get(r, "metrics", "lpips"), ".4f")),
    ("rFID ↓", lambda r, i: _fmt(_get(r, "metrics", "rfid"), ".2f")),
    ("usage %", lambda r, i: _fmt(_usage_pct(r), ".1f")),
    ("perplexity", lambda r, i: _fmt(_get(r, "metrics", "usage", "perplexity"), ".1f")),
]


# ---------------------------------------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(results: Sequence[dict]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if h in ("model", "family") else "---:" for h, _ in COLUMNS) + "|"]
    for i, r in enumerate(results):
        lines.append("| " + " | ".join(_cell(f(r, i)) for _, f in COLUMNS) + " |")
    return lines


def _show(v: Any) -> str:
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_show(x)}" for k, x in v.items() if x is not None)
    return str(v)


def _protocol_lines(results: Sequence[dict]) -> list[str]:
    proto = _get(results[0], "protocol") or {}
    lines = ["## Protocol", ""]
    if len(results) > 1:
        lines += [f"As recorded for {_name(results[0], 0)}:", ""]
    if proto:
        lines += [f"- **{_cell(str(k))}**: {_cell(_show(v))}" for k, v in proto.items() if v is not None]
    else:
        lines.append("No protocol recorded.")
    diffs = protocol_differences(results)
    if diffs:
        lines += ["", "> **Warning: these results were measured under different protocols.** Numbers are only "
                      "comparable between models evaluated under one protocol (same images, N, image size, metric "
                      "definitions). Differences:", ">"]
        for key, groups in diffs.items():
            lines.append(f"> - **{key}**: " + "; ".join(f"{_cell(v)} ({', '.join(names)})" for v, names in groups))
    skipped = [(_name(r, i), m, why) for i, r in enumerate(results)
               for m, why in (_get(r, "skipped") or {}).items()]
    if skipped:
        lines += ["", "Metrics skipped:", ""] + [f"- {_cell(n)}: {m} ({_cell(str(why))})" for n, m, why in skipped]
    return lines


def protocol_differences(results: Sequence[dict]) -> dict[str, list[tuple[str, list[str]]]]:
    """For each protocol field in ``COMPARED`` on which the results disagree: [(value, [model names])]. A field
    that is missing or None in a result (the metric was not measured) is not counted as a disagreement."""
    out = {}
    for key in COMPARED:
        groups: dict[str, list[str]] = {}
        for i, r in enumerate(results):
            v = _get(r, "protocol", key)
            if v is not None:
                groups.setdefault(json.dumps(v, sort_keys=True, default=str) if isinstance(v, dict) else str(v),
                                  []).append(_name(r, i))
        if len(groups) > 1:
            out[key] = list(groups.items())
    return out


# ---------------------------------------------------------------------------------------------- figures


def _rd_points(results: Sequence[dict], metric: str) -> list[tuple[str, float, float]]:
    pts = []
    for i, r in enumerate(results):
        x, y = _num(_get(r, "metrics", "bpp", "tokens")), _num(_get(r, "metrics", metric))
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            pts.append((_name(r, i), x, y))
    return pts


def rd_plot_png(results: Sequence[dict]) -> bytes | None:
    """PNG bytes of the rate–distortion figure, or None when no result has bpp together with PSNR or rFID."""
    panels = [(m, label, pts) for m, label in (("psnr", "PSNR (dB), higher is better"),
                                               ("rfid", "rFID, lower is better"))
              if (pts := _rd_points(results, m))]
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(panels), 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (metric, label, pts) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for k, (name, x, y) in enumerate(pts):
            ax.plot(x, y, "o", color=f"C{k % 10}", markersize=7)
            ax.annotate(name, (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8)
        ax.set_xlabel("bits per pixel (tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"rate vs {metric.upper() if metric == 'psnr' else 'rFID'}")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.3, y=0.2)  # room for the labels
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _as_images(a: Any, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise TokError(f"report grid: {what} images must be an array [N, H, W, 3], got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def grid_png(orig: Any, recon: Any, keys: Sequence[str]) -> bytes:
    """PNG bytes of a grid: one column per image (up to ``GRID_MAX``), rows original / reconstruction / original
    centre zoom / reconstruction centre zoom, the key above each column."""
    from PIL import Image, ImageDraw, ImageFont

    orig, recon = _as_images(orig, "original"), _as_images(recon, "reconstructed")
    if orig.shape != recon.shape:
        raise TokError(f"report grid: originals {orig.shape} and reconstructions {recon.shape} differ in shape")
    n = min(len(orig), GRID_MAX)
    if n == 0:
        raise TokError("report grid: no images")
    keys = [str(k) for k in list(keys)[:n]] + [f"#{i}" for i in range(len(keys), n)]
    h, w = orig.shape[1:3]
    # display tile: small images enlarged (nearest) to at least 128 px, big ones reduced to at most 256 px
    scale = max(1, math.ceil(128 / max(h, w))) if max(h, w) < 128 else min(1.0, 256 / max(h, w))
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    ch, cw = max(1, h // ZOOM), max(1, w // ZOOM)
    top, left = (h - ch) // 2, (w - cw) // 2

    def tile(a: np.ndarray, zoom: bool) -> Image.Image:
        im = Image.fromarray(a[top:top + ch, left:left + cw] if zoom else a)
        return im.resize((tw, th), Image.NEAREST if zoom or scale >= 1 else Image.LANCZOS)

    font = ImageFont.load_default()
    rows = ["original", "reconstruction", f"original, centre x{ZOOM}", f"recon, centre x{ZOOM}"]
    pad, label_h, label_w = 4, 16, 120
    canvas = Image.new("RGB", (label_w + n * (tw + pad) + pad, label_h + len(rows) * (th + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = label_h + pad + r * (th + pad)
        draw.text((pad, y + th // 2 - 6), row, fill="black", font=font)
        for c in range(n):
            x = label_w + pad + c * (tw + pad)
            canvas.paste(tile((orig if r % 2 == 0 else recon)[c], zoom=r >= 2), (x, y))
            if r == 0:
                key = keys[c]
                while len(key) > 1 and draw.textlength(key, font=font) > tw:
                    key = key[:-2] + "…"
                draw.text((x, 2), key, fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- report


def write_report(results: list[dict], path: str | os.PathLike, *,
                 grid: tuple[np.ndarray, np.ndarray, list[str]] | None = None,
                 title: str | None = None) -> list[Path]:
    """Write the markdown report at ``path`` and its figures beside it (``<stem>_rd.png``, and ``<stem>_grid.png``
    when ``grid=(originals, reconstructions, keys)`` is given, uint8 [N, H, W, 3]). Returns the written paths,
    the markdown last. Raises TokError for an empty ``results`` or a path that cannot be written."""
    if not results:
        raise TokError("no bench results to report (run `tok bench` first)")
    if not all(isinstance(r, dict) for r in results):
        raise TokError("report: every bench result must be a dict (the JSON that `tok bench` writes)")
    path = Path(path)
    if path.is_dir():
        raise TokError(f"cannot write report {path}: it is a folder (give a file name such as report.md)")
    rd_path, grid_path = (path.with_name(f"{path.stem}_{s}.png") for s in ("rd", "grid"))
    title = title or ("Reconstruction report: " + ", ".join(_name(r, i) for i, r in enumerate(results)))

    rd = rd_plot_png(results)
    grid_bytes = grid_png(*grid) if grid is not None else None

    lines = [f"# {title}", ""]
    versions = sorted({str(v) for r in results if (v := _get(r, "protocol", "tok_version"))})
    if versions:
        lines += [f"Generated from `tok bench` results (tok {', '.join(versions)}). ↑ higher is better, "
                  "↓ lower is better; bpp counts the bits of the tokens per image pixel; "
                  f"{MISSING} means not measured.", ""]
    lines += _table(results) + [""] + _protocol_lines(results) + ["", "## Rate–distortion", ""]
    if rd is not None:
        missing = [_name(r, i) for i, r in enumerate(results) if _num(_get(r, "metrics", "bpp", "tokens")) is None]
        lines.append(f"![rate-distortion]({quote(rd_path.name)})")
        if missing:
            lines += ["", f"Not plotted (no bpp measured): {', '.join(missing)}."]
    else:
        lines.append("No plot: no result has bits per pixel together with PSNR or rFID "
                     "(run `tok bench` with the bpp metric and psnr or rfid).")
    if grid_bytes is not None:
        who = f" ({_name(results[0], 0)})" if len(results) == 1 else ""
        lines += ["", "## Reconstructions", "",
                  f"Originals above their reconstructions{who}; the lower rows enlarge the centre "
                  f"{ZOOM}x (nearest neighbour) so that fine detail is visible.", "",
                  f"![originals and reconstructions]({quote(grid_path.name)})"]

    written = []
    try:
        for dest, data in ((rd_path, rd), (grid_path, grid_bytes)):
            if data is not None:
                atomic_write_bytes(dest, data)
                written.append(dest)
        atomic_write_text(path, "\n".join(lines) + "\n")
    except OSError as e:
        raise TokError(f"cannot write report {path}: {e.strerror or e}") from None
    written.append(path)
    return written
