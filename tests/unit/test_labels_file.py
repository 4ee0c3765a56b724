"""core/labels.py: ``--labels FILE`` (KEY LABEL lines) and ``resolve_labels``, the one call the encoder makes."""

from __future__ import annotations

import numpy as np
import pytest

from tokcli.core.labels import (check_label_source, folder_classes, folder_labels, header_classes, labels_header,
                                read_labels_file, resolve_labels)
from tokcli.errors import TokUsageError


def _file(tmp_path, text: str | bytes, name: str = "labels.txt"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(p)


def test_no_source_gives_nothing():
    assert resolve_labels(None, ["a.png"]) == (None, None)
    assert check_label_source(None) is None


def test_folder_source_is_todays_folder_labels():
    keys = ["n02/b.png", "n01/a.png", "n02/c.png"]
    labels, header = resolve_labels("folder", keys)
    classes = folder_classes(keys)
    assert labels.dtype == np.int64 and labels.tolist() == folder_labels(keys, classes).tolist() == [1, 0, 1]
    assert header == labels_header(classes) == {"from": "folder", "classes": ["n01", "n02"]}


def test_check_label_source(tmp_path):
    f = _file(tmp_path, "a.png 1\n")
    assert check_label_source("folder") == "folder" and check_label_source(f) == f
    with pytest.raises(TokUsageError, match="no such file"):
        check_label_source(str(tmp_path / "missing.txt"))
    with pytest.raises(TokUsageError, match="is a folder"):
        check_label_source(str(tmp_path))


def test_names_are_numbered_in_sorted_order_over_the_whole_file(tmp_path):
    f = _file(tmp_path, "a.png n02\nb.png n01\nc.png n03\nd.png n02\n", name="val.txt")
    labels, header = resolve_labels(f, ["d.png", "a.png", "b.png"])  # c.png (n03) is not encoded: still a class
    assert labels.dtype == np.int64 and labels.tolist() == [1, 1, 0]
    assert header == {"from": "file", "file": "val.txt", "classes": ["n01", "n02", "n03"]}
    assert header_classes({"labels": header}) == ["n01", "n02", "n03"]


def test_integer_ids_are_kept_as_given(tmp_path):
    f = _file(tmp_path, "a.png 7\nb.png 0\nc.png 999\n")
    labels, header = resolve_labels(f, ["c.png", "a.png", "b.png"])
    assert labels.tolist() == [999, 7, 0]
    assert header == {"from": "file", "file": "labels.txt", "classes": None}
    assert header_classes({"labels": header}) is None


def test_mixed_ids_and_names_are_all_names(tmp_path):
    f = _file(tmp_path, "a.png 3\nb.png cat\n")
    labels, header = resolve_labels(f, ["a.png", "b.png"])
    assert header["classes"] == ["3", "cat"] and labels.tolist() == [0, 1]


def test_keys_by_relative_path_or_unique_bare_name(tmp_path):
    f = _file(tmp_path, "n01/x_1.JPEG dog\n./n02/x_2.JPEG cat\ny.JPEG bird\nILSVRC2012_val_00000001.JPEG dog\n")
    keys = ["n01/x_1.JPEG", "n02/x_2.JPEG", "deep/er/y.JPEG", "ILSVRC2012_val_00000001.JPEG"]
    labels, header = resolve_labels(f, keys)
    assert header["classes"] == ["bird", "cat", "dog"]
    assert labels.tolist() == [2, 1, 0, 2]


def test_ambiguous_bare_name_is_refused(tmp_path):
    f = _file(tmp_path, "1.png cat\n")
    with pytest.raises(TokUsageError, match=r"1\.png, which 2 inputs share \(a/1\.png, b/1\.png\)"):
        resolve_labels(f, ["a/1.png", "b/1.png"])


def test_a_bare_name_shared_is_fine_when_every_input_has_its_own_line(tmp_path):
    f = _file(tmp_path, "1.png cat\na/1.png dog\nb/1.png cat\n")
    assert resolve_labels(f, ["a/1.png", "b/1.png"])[0].tolist() == [1, 0]


def test_missing_key_is_refused_with_the_count(tmp_path):
    f = _file(tmp_path, "a.png 1\n")
    with pytest.raises(TokUsageError, match=r"no label for 2 of 3 input\(s\), the first b\.png") as e:
        resolve_labels(f, ["a.png", "b.png", "c/d.png"])
    assert "\n" not in str(e.value)


def test_a_key_given_two_labels_is_refused(tmp_path):
    f = _file(tmp_path, "a.png 1\nb.png 2\na.png 3\n")
    with pytest.raises(TokUsageError, match=r"a\.png has two labels, '1' \(line 1\) and '3' \(line 3\)"):
        resolve_labels(f, ["a.png"])
    same = _file(tmp_path, "a.png 1\na.png 1\n", name="same.txt")
    assert resolve_labels(same, ["a.png"])[0].tolist() == [1]
    path_and_name = _file(tmp_path, "c/a.png 1\na.png 2\n", name="both.txt")
    with pytest.raises(TokUsageError, match="by its file name"):
        resolve_labels(path_and_name, ["c/a.png"])


def test_comments_blank_lines_and_separators(tmp_path):
    text = ("# ImageNet-ish\n\n   \na.png\tgreat white shark\r\nb.png, tench \n  c.png   tench  \n"
            "#d.png nothing\nd e.png,goldfish\n")
    f = _file(tmp_path, text)
    assert read_labels_file(f) == {"a.png": ("great white shark", 4), "b.png": ("tench", 5),
                                   "c.png": ("tench", 6), "d e.png": ("goldfish", 8)}
    labels, header = resolve_labels(f, ["a.png", "b.png", "c.png", "d e.png"])
    assert header["classes"] == ["goldfish", "great white shark", "tench"] and labels.tolist() == [1, 2, 2, 0]


def test_utf8_bom_and_names_are_read(tmp_path):
    f = _file(tmp_path, "\ufeffä.png chat\n".encode("utf-8"))
    assert read_labels_file(f) == {"ä.png": ("chat", 1)}


@pytest.mark.parametrize("text, match", [("a.png\n", r"line 1 has 1 field"), ("a.png 1 2\n", "line 1 has 3 field"),
                                         ("a.png,\n", "line 1 has 1 field"), ("# only comments\n\n", "no KEY LABEL"),
                                         (b"a.png 1\nb\xff.png 2\n", r"not UTF-8 text \(line 2\)")])
def test_malformed_files_are_one_line_usage_errors(tmp_path, text, match):
    f = _file(tmp_path, text)
    with pytest.raises(TokUsageError, match=match) as e:
        resolve_labels(f, ["a.png"])
    assert "\n" not in str(e.value)


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    import tokcli.core.labels as labels_mod

    f = _file(tmp_path, "a.png 1\n" * 10)
    monkeypatch.setattr(labels_mod, "MAX_LABELS_FILE_BYTES", 20)
    with pytest.raises(TokUsageError, match="too large"):
        resolve_labels(f, ["a.png"])
