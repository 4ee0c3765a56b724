"""Training images: random resize + random crop (+ optional flip) from folders, image files or file lists.

Every batch is a pure function of (seed, micro-batch number, rank):

- which images: global sample position p = (m * world_size + rank) * batch_size + j walks through a fresh
  permutation of the data set every epoch (the permutation of epoch e is drawn from (seed, e));
- how each is cut: scale, crop offsets and flip come from a generator seeded with (seed, m, rank).

So a run resumed at step k rebuilds exactly the batches an uninterrupted run would have seen (the sampler state
is just the micro-batch counter), and ranks never share a sample within an epoch.

Caching (``data.cache = true``, the default): every image is decoded once, at start-up, and kept in memory as a
PIL image. That suits the small data sets this project trains on (tens to thousands of photos); for ImageNet-
sized sets set ``cache = false`` and ``workers`` > 0 so files are decoded on demand in DataLoader workers.

The training loop builds its data with :func:`make_data` from the objective's ``data`` kind. A data module has
``seed``, ``len()``, ``batches(start)`` (micro-batches start, start+1, ...; each a pure function of (seed, micro-batch,
rank)), ``summary()`` (JSON for the exported ``training`` record) and ``card_text()`` (the card's data section).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from tokcli.core.images import InputItem, collect_inputs, load_item, to_tensor
from tokcli.errors import TokError, TokUsageError
from tokcli.train.recipe import DataSection, Recipe

_PERM_TAG = 0x5EED_0001
_AUG_TAG = 0x5EED_0002


def collect_training_files(roots: list[str], recursive: bool = True) -> list[InputItem]:
    """Folders (every image under them), single image files, and ``.txt`` file lists (one path per line,
    relative to the list's folder, ``#`` comments). Order: roots as given; a folder sorted by key, a list as listed."""
    items: list[InputItem] = []
    for i, root in enumerate(roots):
        p = Path(root)
        if not p.exists():
            raise TokError(missing_root_message(root))
        if p.is_file() and p.suffix.lower() == ".txt":
            lines = [ln.split("#", 1)[0].strip() for ln in p.read_text(encoding="utf-8").splitlines()]
            if not any(lines):
                raise TokError(f"file list {p} names no images")
            found = []
            for ln in filter(None, lines):
                q = p.parent / ln
                if q.is_dir():
                    sub = collect_inputs([str(q)], recursive=recursive)
                    found.extend(dataclasses.replace(it, key=f"{ln}/{it.key}") for it in sub)
                elif q.is_file():
                    found.append(InputItem(q, ln))
                else:
                    raise TokError(f"{p}: listed file {ln} does not exist ({q})")
        else:
            found = collect_inputs([root], recursive=recursive)
        items.extend(dataclasses.replace(it, key=f"{i}/{it.key}") for it in found)  # tar members keep their byte range
    return items


#: the data.roots of the shipped CPU recipes, built by scripts/build_dataset.py
DEMO_ROOTS = ("data/train", "data/heldout")
BUILD_HINT = ("pip install -e '.[data]' && python scripts/build_dataset.py --install (~20 s; --install apt-gets "
              "lomiri-wallpapers-16.04 and mate-backgrounds, as root; --skip-debian instead: 8 photos from "
              "scikit-image and scikit-learn only)")


def missing_root_message(root: str) -> str:
    """One line for a ``data.roots`` entry that does not exist; for the shipped recipes' demo photos, how to build
    them."""
    where = "" if Path(root).is_absolute() else f", read from the working folder {Path.cwd()}"
    msg = f"no such file or folder: {root} (data.roots{where})"
    if Path(root).as_posix().rstrip("/") in DEMO_ROOTS:
        msg += f"; the shipped recipes' demo photos are built, in the repository root, by: {BUILD_HINT}"
    return msg


class TrainData(torch.utils.data.Dataset):
    """Deterministic random crops; see the module docstring. ``batches(start)`` yields float [B, 3, S, S]
    tensors in [-1, 1] for micro-batches start, start+1, ..."""

    def __init__(self, cfg: DataSection, *, seed: int, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.items = collect_training_files(cfg.roots, cfg.recursive)
        self.images: list[Image.Image] | None = None
        if cfg.cache:
            self.images = [Image.fromarray(load_item(it)) for it in self.items]
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    # --- the plan: indices and crop parameters of one micro-batch ------------------------------------------
    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, _PERM_TAG, epoch]).permutation(len(self.items))
        return self._perms[epoch]

    def plan(self, micro: int) -> list[tuple[int, float, float, float, bool]]:
        """[(image index, scale, uy, ux, flip)] for this rank's share of micro-batch ``micro``."""
        b, n = self.cfg.batch_size, len(self.items)
        first = (micro * self.world_size + self.rank) * b
        rng = np.random.default_rng([self.seed, _AUG_TAG, micro, self.rank])
        u = rng.random((b, 4))
        lo, hi = self.cfg.random_resize
        out = []
        for j in range(b):
            p = first + j
            idx = int(self._perm(p // n)[p % n])
            scale = lo + (hi - lo) * float(u[j, 0])
            flip = bool(self.cfg.hflip and u[j, 3] < 0.5)
            out.append((idx, scale, float(u[j, 1]), float(u[j, 2]), flip))
        return out

    # --- cutting one sample --------------------------------------------------------------------------------
    def __getitem__(self, entry: tuple[int, float, float, float, bool]) -> np.ndarray:
        idx, scale, uy, ux, flip = entry
        im = self.images[idx] if self.images is not None else Image.fromarray(load_item(self.items[idx]))
        return random_resized_crop(im, self.cfg.crop_size, scale, uy, ux, flip)

    def batch(self, micro: int) -> torch.Tensor:
        return to_tensor(np.stack([self[e] for e in self.plan(micro)]))

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        if self.cfg.workers <= 0:
            return (self.batch(m) for m in itertools.count(start))
        loader = torch.utils.data.DataLoader(
            self, batch_sampler=_PlanSampler(self, start), num_workers=self.cfg.workers,
            collate_fn=_collate, persistent_workers=True, pin_memory=False)
        return iter(loader)

    # --- description ---------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Roots, image count and, when a SOURCES.json sits in a root or its parent, sources and licences."""
        used = {it.path.resolve() for it in self.items}
        licences, sources, files = Counter(), Counter(), []
        for root in self.cfg.roots:
            rp = Path(root).resolve()
            for cand in (rp / "SOURCES.json", rp.parent / "SOURCES.json"):
                if cand.is_file() and cand not in files:
                    files.append(cand)
        for f in files:
            try:
                entries = json.loads(f.read_text(encoding="utf-8")).get("images", [])
            except (OSError, ValueError, AttributeError):
                continue
            for e in entries:
                if isinstance(e, dict) and (f.parent / e.get("file", "")).resolve() in used:
                    licences[e.get("license", "unknown")] += 1
                    sources[e.get("source", "unknown")] += 1
        out: dict[str, Any] = {"roots": list(self.cfg.roots), "num_images": len(self)}
        if files:
            out.update(sources_file=[_display_path(f) for f in files], sources=dict(sources),
                       licenses=dict(licences))
        return out

    def card_text(self, info: dict[str, Any] | None = None) -> str:
        """The model card's data paragraph (``info``: ``summary()``, when already computed)."""
        info, d = info or self.summary(), self.cfg
        line = f"{info['num_images']} images from {', '.join(d.roots)}"
        if info.get("licenses"):
            lic = ", ".join(f"{k} ({v})" for k, v in sorted(info["licenses"].items()))
            src = ", ".join(f"{k} ({v})" for k, v in sorted(info["sources"].items()))
            line += f"; sources: {src}; licences: {lic}"
        return (f"{line}.\nRandom crops of {d.crop_size} px (short side resized to {d.random_resize[0]}-"
                f"{d.random_resize[1]} x the crop size{', horizontal flips' if d.hflip else ''}).")


#: data kind (``Objective.data``) -> the class built from the [data] section
DATA_KINDS: dict[str, type] = {"images": TrainData}


def make_data(kind: str, recipe: Recipe, *, rank: int = 0, world_size: int = 1):
    """The data module an objective asks for (``Objective.data``), from the recipe's [data] section."""
    if kind == "tokens" and kind not in DATA_KINDS:  # token files (generators); imported on first use
        from tokcli.train.token_data import TokenData

        DATA_KINDS[kind] = TokenData
    try:
        cls = DATA_KINDS[kind]
    except KeyError:
        raise TokUsageError(f"no training data of kind {kind!r} (known: {', '.join(DATA_KINDS)})") from None
    return cls(recipe.data, seed=recipe.run.seed, rank=rank, world_size=world_size)


def _display_path(p: Path) -> str:
    """p relative to the working folder when it is inside it (no machine-specific prefixes in model folders)."""
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(p)


def _collate(crops: list[np.ndarray]) -> torch.Tensor:
    return to_tensor(np.stack(crops))


class _PlanSampler(torch.utils.data.Sampler):
    """Endless batch sampler: the plans of micro-batches start, start+1, ..."""

    def __init__(self, data: TrainData, start: int):
        self.data, self.start = data, start

    def __iter__(self):
        for m in itertools.count(self.start):
            yield self.data.plan(m)


def random_resized_crop(im: Image.Image, size: int, scale: float, uy: float, ux: float, flip: bool) -> np.ndarray:
    """Resize so the short side is round(size * scale) (at least ``size``), cut the size x size window at the
    relative offsets (uy, ux) in [0, 1), optionally mirror. Only the window is resampled (PIL ``box``), bicubic
    with antialiasing, so the result equals cropping the fully resized image. Returns uint8 [size, size, 3]."""
    w, h = im.size
    short = max(size, round(size * scale))
    f = short / min(w, h)
    nw, nh = max(size, round(w * f)), max(size, round(h * f))
    oy = min(nh - size, math.floor(uy * (nh - size + 1)))
    ox = min(nw - size, math.floor(ux * (nw - size + 1)))
    fx, fy = nw / w, nh / h
    box = (ox / fx, oy / fy, (ox + size) / fx, (oy + size) / fy)
    out = np.asarray(im.resize((size, size), Image.BICUBIC, box=box))
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)
