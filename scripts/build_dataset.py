#!/usr/bin/env python3
"""Rebuild tok's small demo training set offline, from openly licensed photos installed by ordinary packages.

Sources
  - Debian ``lomiri-wallpapers-16.04``: 14 photos in /usr/share/backgrounds/ (CC-BY-4.0, CC-BY-SA-4.0, CC0-1.0;
    the licence of each file is read from /usr/share/doc/lomiri-wallpapers-16.04/copyright). The abstract
    gradient ``umang_by_Abhishek_Mudgal.jpg`` is left out: it is not a photograph.
  - Debian ``mate-backgrounds``: the 12 photos in /usr/share/backgrounds/mate/nature/ (GPL-2+).
  - scikit-image (bundled, no download): astronaut, chelsea, coffee, rocket, hubble_deep_field, retina,
    immunohistochemistry, stereo_motorcycle (left view).
  - scikit-learn (bundled): china, flower (CC-BY-2.0).

Output (``--out``, default ``data/``)
  train/    every image except the held-out ones, PNG, downscaled so the short side is at most 512 px
  heldout/  the HELDOUT photos (one split per source image, fixed below), same processing
  SOURCES.json  per image: file, split, source, original, licence, attribution, size

With ``--samples`` it also writes ``samples/`` (6 small JPEGs, CC0 / CC-BY / public domain only, mostly held-out
photos) and ``samples/ATTRIBUTION.md``.

    python scripts/build_dataset.py                 # data/ only
    python scripts/build_dataset.py --samples       # and samples/
    python scripts/build_dataset.py --install       # apt-get install the two Debian packages first (root)

Requirements: ``pip install -e '.[data]'`` from the repository root (scikit-image, scikit-learn) and the two Debian
packages (``sudo apt-get update && sudo apt-get install -y lomiri-wallpapers-16.04 mate-backgrounds``, or
``--install`` as root); with ``--skip-debian`` the Python packages alone give a smaller set (8 training photos).
About 20 s on 2 CPU cores. A missing requirement is named in one line with the command that installs it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

try:
    import numpy as np
    from PIL import Image
except ImportError as _e:  # run before tok is installed: say so in one line
    sys.exit(f"error: missing Python package {_e.name}; install tok with its data extra: pip install -e '.[data]' "
             f"(from the repository root)")

DEBIAN_PACKAGES = ("lomiri-wallpapers-16.04", "mate-backgrounds")
APT_COMMAND = "apt-get update && apt-get install -y " + " ".join(DEBIAN_PACKAGES)
SUDO_APT_COMMAND = "sudo apt-get update && sudo apt-get install -y " + " ".join(DEBIAN_PACKAGES)
PIP_COMMAND = "pip install -e '.[data]'"  # from the repository root (or: pip install 'tokcli[data]')
PYTHON_PACKAGES = {"skimage": "scikit-image", "sklearn": "scikit-learn"}  # module -> pip name (the [data] extra)
LOMIRI_DIR = Path("/usr/share/backgrounds")
LOMIRI_COPYRIGHT = Path("/usr/share/doc/lomiri-wallpapers-16.04/copyright")
LOMIRI_SKIP = {"umang_by_Abhishek_Mudgal.jpg"}  # an abstract gradient, not a photo
MATE_DIR = Path("/usr/share/backgrounds/mate/nature")
MATE_COPYRIGHT = Path("/usr/share/doc/mate-backgrounds/copyright")
MAX_SHORT_SIDE = 512

# Held out from training (one per source family where the licence allows reuse in samples/).
HELDOUT = ("lomiri-picosdeeuropa", "lomiri-seeding", "skimage-coffee", "sklearn-china")
# samples/: the held-out photos first, then two public-domain ones (these two are in the training set).
SAMPLES = ("lomiri-picosdeeuropa", "lomiri-seeding", "skimage-coffee", "sklearn-china", "skimage-rocket",
           "skimage-astronaut")
SAMPLE_LICENSES = {"CC0-1.0", "CC-BY-4.0", "CC-BY-2.0", "public-domain"}
LICENSE_URLS = {
    "CC0-1.0": "https://creativecommons.org/publicdomain/zero/1.0/",
    "CC-BY-4.0": "https://creativecommons.org/licenses/by/4.0/",
    "CC-BY-SA-4.0": "https://creativecommons.org/licenses/by-sa/4.0/",
    "CC-BY-2.0": "https://creativecommons.org/licenses/by/2.0/",
    "GPL-2+": "https://www.gnu.org/licenses/old-licenses/gpl-2.0.html",
    "public-domain": "https://creativecommons.org/publicdomain/mark/1.0/",
}


@dataclass
class Photo:
    id: str  # file stem in the output, e.g. "lomiri-Bridge"
    source: str
    original: str
    license: str
    attribution: str
    load: Callable[[], np.ndarray]  # -> uint8 [H, W, 3]


# ------------------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------------------
def parse_dep5(path: Path) -> dict[str, tuple[str, str]]:
    """Debian machine-readable copyright file -> {file path as listed: (licence short name, copyright text)}."""
    out: dict[str, tuple[str, str]] = {}
    for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip()
                fields[key] = value.strip()
        if "Files" in fields and "License" in fields:
            lic = fields["License"].splitlines()[0].strip()
            holder = "; ".join(" ".join(ln.split()).rstrip("\u00b4") for ln in fields.get("Copyright", "").splitlines()
                               if ln.strip())
            for f in fields["Files"].split():
                out[f] = (lic, holder)
    return out


def _file_loader(path: Path) -> Callable[[], np.ndarray]:
    def load():
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    return load


def _slug(stem: str) -> str:
    return stem.split("_by_")[0]


def debian_photos() -> list[Photo]:
    photos = []
    lic = parse_dep5(LOMIRI_COPYRIGHT)
    for listed, (license_, holder) in sorted(lic.items()):
        name = Path(listed).name
        path = LOMIRI_DIR / name
        if not listed.startswith("16.04/") or name in LOMIRI_SKIP or not path.is_file():
            continue
        photos.append(Photo(f"lomiri-{_slug(Path(name).stem)}", "lomiri-wallpapers-16.04 (Debian)", str(path),
                            license_, f"\"{_slug(Path(name).stem)}\", copyright {holder}", _file_loader(path)))
    lic = parse_dep5(MATE_COPYRIGHT)
    for path in sorted(MATE_DIR.glob("*.jpg")):
        license_, holder = lic.get(f"nature/{path.name}", ("GPL-2+", ""))
        holder = holder or "MATE contributors (see /usr/share/doc/mate-backgrounds/AUTHORS)"
        photos.append(Photo(f"mate-{path.stem}", "mate-backgrounds (Debian)", str(path), license_,
                            f"\"{path.stem}\", copyright {holder}", _file_loader(path)))
    return photos


def python_photos() -> list[Photo]:
    import skimage
    import skimage.data as sk
    import sklearn
    from sklearn.datasets import load_sample_image

    skv, slv = f"scikit-image {skimage.__version__}", f"scikit-learn {sklearn.__version__}"
    table = [
        ("astronaut", "public-domain", "Eileen Collins, NASA (NASA Great Images database)"),
        ("chelsea", "CC0-1.0", "Chelsea the cat, photo by Stefan van der Walt"),
        ("coffee", "CC0-1.0", "Coffee cup, photo by Rachel Michetti, courtesy of Pikolo Espresso Bar"),
        ("rocket", "public-domain", "DSCOVR launch on Falcon 9, SpaceX (released into the public domain)"),
        ("hubble_deep_field", "public-domain", "Hubble eXtreme Deep Field, NASA"),
        ("retina", "CC0-1.0", "Fundus photograph of a normal left eye, Mikael Haggstrom (Wikimedia Commons)"),
        ("immunohistochemistry", "no-known-copyright-restrictions",
         "IHC staining, Center for Microscopy And Molecular Imaging (CMMI), via scikit-image"),
        ("stereo_motorcycle", "unspecified (Middlebury 2014 stereo data set, redistributed by scikit-image)",
         "Middlebury 2014 stereo benchmark (Scharstein et al., GCPR 2014), left view, downsampled by scikit-image"),
    ]
    photos = []
    for name, license_, attribution in table:
        fn = getattr(sk, name)
        load = (lambda fn=fn: fn()[0]) if name == "stereo_motorcycle" else (lambda fn=fn: fn())
        photos.append(Photo(f"skimage-{name}", skv, f"skimage.data.{name}()", license_, attribution, load))
    photos.append(Photo("sklearn-china", slv, "sklearn.datasets.load_sample_image('china.jpg')", "CC-BY-2.0",
                        "\"china\" by danielbuechele (Flickr), some rights reserved",
                        lambda: load_sample_image("china.jpg")))
    photos.append(Photo("sklearn-flower", slv, "sklearn.datasets.load_sample_image('flower.jpg')", "CC-BY-2.0",
                        "\"flower\" by vultilion (Flickr), some rights reserved",
                        lambda: load_sample_image("flower.jpg")))
    return photos


# ------------------------------------------------------------------------------------------------------------
# image processing
# ------------------------------------------------------------------------------------------------------------
def downscale(img: np.ndarray, short_max: int) -> Image.Image:
    im = Image.fromarray(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
    w, h = im.size
    if min(w, h) > short_max:
        f = short_max / min(w, h)
        im = im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS, reducing_gap=3.0)
    return im


def sample_image(img: np.ndarray, short: int = 256, long_max: int = 384) -> Image.Image:
    """Short side -> 256, long side centre-cropped to at most 384."""
    im = downscale(img, short)
    w, h = im.size
    if w > long_max:
        left = (w - long_max) // 2
        im = im.crop((left, 0, left + long_max, h))
    if h > long_max:
        top = (h - long_max) // 2
        im = im.crop((0, top, w, top + long_max))
    return im


def save_small_jpeg(im: Image.Image, dest: Path, limit: int = 100_000) -> int:
    for q in (90, 85, 80, 75):
        im.save(dest, format="JPEG", quality=q, optimize=True)
        if dest.stat().st_size < limit:
            return q
    return q


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------
def debian_missing() -> list[str]:
    missing = []
    if not LOMIRI_COPYRIGHT.is_file() or not any(LOMIRI_DIR.glob("*_by_*.jpg")):
        missing.append("lomiri-wallpapers-16.04")
    if not MATE_DIR.is_dir():
        missing.append("mate-backgrounds")
    return missing


def package_version(pkg: str) -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def python_missing() -> list[str]:
    """The pip names of the [data] extra's packages that cannot be imported."""
    missing = []
    for module, name in PYTHON_PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(name)
    return missing


def check_requirements(skip_debian: bool, install: bool) -> bool:
    """Say what is missing, one line per kind with the command that installs it; with ``install``, apt-get the
    Debian packages. True when everything is there."""
    py = python_missing()
    deb = [] if skip_debian else debian_missing()
    if py:
        print(f"error: missing Python packages: {', '.join(py)}; install them with: {PIP_COMMAND} "
              f"(from the repository root)", file=sys.stderr)
    if deb and (py or not install):
        print(f"error: missing Debian packages: {', '.join(deb)}; install them with: {SUDO_APT_COMMAND} (or rerun "
              f"with --install as root, or with --skip-debian for 8 photos from the Python packages only)",
              file=sys.stderr)
    if py or (deb and not install):
        return False
    return apt_install() if deb else True


def apt_install() -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *DEBIAN_PACKAGES]):
        print("+", " ".join(cmd), file=sys.stderr)
        if subprocess.run(cmd, env=env).returncode != 0:
            print(f"error: `{' '.join(cmd)}` failed (are you root? otherwise: {SUDO_APT_COMMAND})", file=sys.stderr)
            return False
    if debian_missing():
        print(f"error: still missing after install: {', '.join(debian_missing())}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data", help="output folder (default: data)")
    ap.add_argument("--samples", action="store_true", help="also write samples/ and samples/ATTRIBUTION.md")
    ap.add_argument("--samples-dir", default="samples")
    ap.add_argument("--install", action="store_true", help=f"run `{APT_COMMAND}` if the packages are missing")
    ap.add_argument("--skip-debian", action="store_true", help="build from the Python packages only")
    ap.add_argument("--max-short-side", type=int, default=MAX_SHORT_SIDE)
    args = ap.parse_args(argv)

    if not check_requirements(args.skip_debian, args.install):
        return 1
    photos = ([] if args.skip_debian else debian_photos()) + python_photos()
    versions = {p: package_version(p) for p in DEBIAN_PACKAGES} if not args.skip_debian else {}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    entries, loaded = [], {}
    try:
        for split in ("train", "heldout"):
            (tmp / split).mkdir()
        for p in photos:
            img = p.load()
            loaded[p.id] = img
            split = "heldout" if p.id in HELDOUT else "train"
            im = downscale(img, args.max_short_side)
            rel = f"{split}/{p.id}.png"
            im.save(tmp / rel, format="PNG", optimize=False)
            entries.append({"file": rel, "split": split, "source": p.source.split(" (")[0].split(" ")[0],
                            "source_detail": p.source, "original": p.original,
                            "original_size": [int(img.shape[1]), int(img.shape[0])], "size": list(im.size),
                            "license": p.license, "license_url": LICENSE_URLS.get(p.license, ""),
                            "attribution": p.attribution})
        sources = {"built_by": "scripts/build_dataset.py", "max_short_side": args.max_short_side,
                   "debian_packages": versions, "heldout": list(HELDOUT), "images": entries}
        (tmp / "SOURCES.json").write_text(json.dumps(sources, indent=2) + "\n", encoding="utf-8")
        for name in ("train", "heldout", "SOURCES.json"):
            dest = out / name
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            os.replace(tmp / name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    counts: dict[tuple[str, str], int] = {}
    for e in entries:
        counts[(e["source"], e["split"])] = counts.get((e["source"], e["split"]), 0) + 1
    total = sum((out / e["file"]).stat().st_size for e in entries)
    print(f"wrote {len(entries)} images to {out}/ ({total / 1e6:.1f} MB, short side <= {args.max_short_side}px)")
    for (src, split), n in sorted(counts.items()):
        print(f"  {src:28s} {split:8s} {n:3d}")
    print(f"  held out: {', '.join(e['file'] for e in entries if e['split'] == 'heldout')}")

    if args.samples:
        write_samples(Path(args.samples_dir), photos, loaded)
    return 0


def write_samples(dest: Path, photos: list[Photo], loaded: dict[str, np.ndarray]) -> None:
    by_id = {p.id: p for p in photos}
    chosen = [by_id[i] for i in SAMPLES if i in by_id]
    dest.mkdir(parents=True, exist_ok=True)
    rows, total = [], 0
    for p in chosen:
        if p.license not in SAMPLE_LICENSES:
            raise SystemExit(f"error: {p.id} is {p.license}, not allowed in samples/")
        name = p.id.split("-", 1)[1].lower() + ".jpg"
        im = sample_image(loaded[p.id])
        q = save_small_jpeg(im, dest / name)
        size = (dest / name).stat().st_size
        total += size
        held = "held out of the training set" if p.id in HELDOUT else "also in the training set"
        rows.append(f"| `{name}` | {im.size[0]}x{im.size[1]} | {p.attribution} | {p.source} (`{p.original}`) | "
                    f"[{p.license}]({LICENSE_URLS[p.license]}) | {held} |")
        print(f"  samples/{name}: {im.size[0]}x{im.size[1]}, JPEG q{q}, {size / 1000:.1f} KB")
    text = ("# Sample images: attribution\n\n"
            "Written by `python scripts/build_dataset.py --samples`. Each photo was downscaled (short side 256 px, "
            "Lanczos) and centre-cropped to at most 384 px on the long side, then saved as JPEG. "
            "Only CC0, CC-BY and public-domain photos are used here.\n\n"
            "| file | size | work / author | from | licence | training |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\n"
            "CC-BY works: modified (resized, cropped, re-encoded) from the originals named above; the licence links "
            "give the terms. Public-domain and CC0 works carry no conditions; the credit is given as a courtesy.\n")
    (dest / "ATTRIBUTION.md").write_text(text, encoding="utf-8")
    print(f"wrote {len(rows)} samples to {dest}/ ({total / 1000:.1f} KB in all)")


if __name__ == "__main__":
    sys.exit(main())
