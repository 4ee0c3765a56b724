"""Class labels of a token file from ImageFolder-style folder names (``tok encode --labels folder``).

The class of an image is the first folder of its key (the path relative to the folder given to ``tok encode``,
as torchvision's ``ImageFolder`` takes the sub-folders of its root: ``n01440764/a.JPEG`` -> ``n01440764``). The
sorted class names are numbered 0..C-1; the token file stores the ids as ``labels`` (int64) and the names in its
header (:func:`labels_header`: ``{"from": "folder", "classes": [...]}``), so ``labels[i]`` names
``header["labels"]["classes"][labels[i]]``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tokcli.errors import TokUsageError

LABEL_SOURCES = ("folder",)


def check_label_source(source: str | None) -> str | None:
    if source is not None and source not in LABEL_SOURCES:
        raise TokUsageError(f"--labels must be one of {', '.join(LABEL_SOURCES)}, got {source!r}")
    return source


def class_of(key: str) -> str | None:
    """The class folder of a key (None: the image is not inside a folder)."""
    parts = str(key).replace("\\", "/").split("/")
    return parts[0] if len(parts) > 1 and parts[0] not in ("", ".", "..") else None


def folder_classes(keys: Sequence[str]) -> list[str]:
    """The sorted class names of ``keys``; one line for a key outside any class folder."""
    names = set()
    for k in keys:
        c = class_of(k)
        if c is None:
            raise TokUsageError(f"--labels folder: {k} is not inside a class folder (encode a folder of class "
                                "folders, ImageFolder style: ROOT/CLASS/IMAGE)")
        names.add(c)
    return sorted(names)


def folder_labels(keys: Sequence[str], classes: Sequence[str] | None = None) -> np.ndarray:
    """int64 [N]: the index in ``classes`` (default :func:`folder_classes` of ``keys``) of each key's class."""
    classes = list(classes if classes is not None else folder_classes(keys))
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for k in keys:
        c = class_of(k)
        if c not in index:
            raise TokUsageError(f"--labels folder: the class of {k} ({c}) is not one of {len(classes)} classes")
        out.append(index[c])
    return np.asarray(out, dtype=np.int64)


def labels_header(classes: Sequence[str]) -> dict[str, Any]:
    return {"from": "folder", "classes": list(classes)}


def header_classes(header: dict[str, Any]) -> list[str] | None:
    """The class names a token file's header records (None when it records none)."""
    rec = header.get("labels")
    if isinstance(rec, dict) and isinstance(rec.get("classes"), list):
        return [str(c) for c in rec["classes"]]
    return None
