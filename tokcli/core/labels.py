"""Class labels of a token file: from ImageFolder-style folder names (``tok encode --labels folder``), or from a
labels file (``tok encode --labels FILE``).

Folders: the class of an image is the first folder of its key (the path relative to the folder given to ``tok encode``,
as torchvision's ``ImageFolder`` takes the sub-folders of its root: ``n01440764/a.JPEG`` -> ``n01440764``). The
sorted class names are numbered 0..C-1; the token file stores the ids as ``labels`` (int64) and the names in its
header (:func:`labels_header`: ``{"from": "folder", "classes": [...]}``), so ``labels[i]`` names
``header["labels"]["classes"][labels[i]]``.

A labels file has one ``KEY LABEL`` line per image (a tab, a comma or spaces between; blank lines and lines
starting with '#' ignored; a tab or comma lets a label hold spaces). KEY is the token-file key (the path relative
to the input root) or, when no two inputs share it, the bare file name: ImageNet's validation list
``ILSVRC2012_val_00000001.JPEG n01751748`` works as it is. When every label is a whole number >= 0 the ids are
kept (header ``{"from": "file", "file": NAME, "classes": null}``); otherwise the file's sorted distinct names are
numbered 0..C-1 and recorded as ``classes``. Ids and names come from the whole file, not from the images encoded,
so a part of a dataset gets the same ids as the whole. Every input must find a label: none is left unlabelled.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tokcli.errors import TokUsageError

LABEL_SOURCES = ("folder",)
MAX_LABELS_FILE_BYTES = 256 << 20
_MAX_ID = np.iinfo(np.int64).max


def check_label_source(source: str | None) -> str | None:
    """``folder``, the path of an existing labels file, or None; anything else is a usage error (checked before
    a model is loaded). A labels file named ``folder`` is passed as ``./folder``."""
    if source is None or source in LABEL_SOURCES:
        return source
    p = Path(source)
    if p.is_dir():
        raise TokUsageError(f"--labels {source}: is a folder, not a labels file (use --labels folder for class "
                            "folders)")
    if not p.is_file():
        raise TokUsageError(f"--labels must be 'folder' or a labels file (KEY LABEL per line); no such file: "
                            f"{source}")
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


def resolve_labels(source: str | None, keys: Sequence[str]) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """(int64 labels [len(keys)] in the order of ``keys``, the header's ``labels`` record) for ``--labels
    source``; (None, None) without one. TokUsageError (one line) for any key left without a label."""
    if check_label_source(source) is None:
        return None, None
    if source == "folder":
        classes = folder_classes(keys)
        return folder_labels(keys, classes), labels_header(classes)
    table = read_labels_file(source)
    names = [lab for lab, _ in table.values()]
    if all(_is_id(lab) for lab in names):
        ids = {k: int(lab) for k, (lab, _) in table.items()}
        classes = None
    else:
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        ids = {k: index[lab] for k, (lab, _) in table.items()}
    header = {"from": "file", "file": Path(source).name, "classes": classes}
    return _match_keys(source, keys, table, ids), header


def _is_id(label: str) -> bool:
    return label.isascii() and label.isdigit() and int(label) <= _MAX_ID


def _split_line(line: str) -> list[str]:
    """KEY LABEL separated by a tab, else a comma, else spaces (a tab or comma lets a label hold spaces)."""
    for sep in ("\t", ","):
        if sep in line:
            return [f.strip() for f in line.split(sep)]
    return line.split()


def read_labels_file(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """{key as written: (label, line number)} of a labels file; one-line TokUsageError for a file over 256 MiB,
    one that is not UTF-8 text, a line that is not two fields, or one key given two labels."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_LABELS_FILE_BYTES:
            raise TokUsageError(f"--labels {path}: over {MAX_LABELS_FILE_BYTES >> 20} MiB, too large for a labels "
                                "file")
        raw = path.read_bytes()
    except OSError as e:
        raise TokUsageError(f"--labels {path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise TokUsageError(f"--labels {path}: not UTF-8 text (line {line})") from None
    table: dict[str, tuple[str, int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = _split_line(line)
        if len(fields) != 2 or not all(fields):
            raise TokUsageError(f"--labels {path}: line {n} has {len([f for f in fields if f])} field(s), expected "
                                "KEY LABEL (a tab or comma between them when a label holds spaces)")
        key, label = re.sub(r"^(\./)+", "", fields[0]), fields[1]
        if key in table and table[key][0] != label:
            raise TokUsageError(f"--labels {path}: {key} has two labels, {table[key][0]!r} (line {table[key][1]}) "
                                f"and {label!r} (line {n})")
        table[key] = (label, n)
    if not table:
        raise TokUsageError(f"--labels {path}: no KEY LABEL lines")
    return table


def _match_keys(path: str, keys: Sequence[str], table: dict[str, tuple[str, int]], ids: dict[str, int]
                ) -> np.ndarray:
    """Each key's id: by its own line, else by a line for its bare file name when no other input has that name."""
    by_name: dict[str, list[str]] = {}
    for k in keys:
        by_name.setdefault(k.rsplit("/", 1)[-1], []).append(k)
    out, missing = [], []
    for k in keys:
        name = k.rsplit("/", 1)[-1]
        own, bare = ids.get(k), ids.get(name) if name != k else None
        if own is not None and bare is not None and own != bare and len(by_name[name]) == 1:
            raise TokUsageError(f"--labels {path}: {k} has two labels, {table[k][0]!r} (line {table[k][1]}) and "
                                f"{table[name][0]!r} (line {table[name][1]}, by its file name)")
        if own is None and bare is not None and len(by_name[name]) > 1:
            share = by_name[name]
            others = ", ".join(share[:3]) + (", ..." if len(share) > 3 else "")
            raise TokUsageError(f"--labels {path}: line {table[name][1]} names {name}, which {len(share)} inputs "
                                f"share ({others}); give their paths relative to the input root instead")
        label = own if own is not None else bare
        if label is None:
            missing.append(k)
        out.append(-1 if label is None else label)
    if missing:
        raise TokUsageError(f"--labels {path}: no label for {len(missing)} of {len(keys)} input(s), the first "
                            f"{missing[0]} (every input needs one)")
    return np.asarray(out, dtype=np.int64)


def header_classes(header: dict[str, Any]) -> list[str] | None:
    """The class names a token file's header records (None when it records none)."""
    rec = header.get("labels")
    if isinstance(rec, dict) and isinstance(rec.get("classes"), list):
        return [str(c) for c in rec["classes"]]
    return None
