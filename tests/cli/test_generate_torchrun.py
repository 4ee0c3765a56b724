"""`torchrun --nproc_per_node=2 -m tokcli generate`: the batches of one process dealt to 2 gloo ranks give the very
same PNGs (byte for byte) and one token file equal to the single process's, for a count that does not split evenly
(5 samples, batches of 2: rank 0 takes samples 0-1 and 4, rank 1 samples 2-3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from test_generate import TOK_ARGS, make_sit_folder


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    import torch

    from tokcli.families.softvq.model import SoftVQ

    root = tmp_path_factory.mktemp("gen-torchrun")
    torch.manual_seed(0)
    folder = SoftVQ(**TOK_ARGS).save_folder(root / "tok", name="tiny-softvq",
                                            provenance={"source": "random init (test fixture)"})
    return make_sit_folder(root / "gen", f"local-dir:{folder.path}", folder.sha256)


def _tokens(path):
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        header.pop("created", None)
        return header, list(z["keys"]), z["labels"].copy(), z["latents"].copy()


@pytest.mark.slow  # two torchrun launches of a fresh torch process each: ~20 s idle, ~70 s on a busy 2-core machine
def test_two_ranks_write_the_single_process_files(gen, tmp_path):
    from tokcli.gen.generate import batch_spans

    spans = [batch_spans(5, 2, r, 2) for r in (0, 1)]
    assert spans == [[(0, 2), (4, 5)], [(2, 4)]]
    assert sorted(j for s in spans for a, b in s for j in range(a, b)) == list(range(5))  # no gap, no overlap
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["generate", "-m", str(gen), "--class", "0,1,2,3,4", "-n", "1", "--seed", "3", "-b", "2", "--device",
            "cpu", "-q"]
    runs = {}
    for name, launcher in (("one", [sys.executable, "-m", "tokcli"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "-m", "tokcli"])):
        runs[name] = subprocess.run([*launcher, *args, "-o", str(tmp_path / name), "--tokens-out",
                                     str(tmp_path / f"{name}.npz")], capture_output=True, text=True, env=env,
                                    timeout=300)
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert runs["two"].stderr.count("generated 5 image(s)") == 1  # only rank 0 reports
    files = {name: sorted(p.relative_to(tmp_path / name).as_posix() for p in (tmp_path / name).rglob("*")
                          if p.is_file()) for name in ("one", "two")}
    assert files["one"] == files["two"] == [f"class{c:04d}/00000.png" for c in range(5)]  # no stage litter
    for f in files["one"]:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    h1, k1, l1, t1 = _tokens(tmp_path / "one.npz")
    h2, k2, l2, t2 = _tokens(tmp_path / "two.npz")
    assert h1 == h2 and k1 == k2 and list(l1) == list(l2) == [0, 1, 2, 3, 4]
    assert t1.shape == (5, 4, 4) and np.array_equal(t1, t2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "one.npz", "two", "two.npz"]  # one file each
