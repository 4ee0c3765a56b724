"""Training on first use and after accidents: a cut-off metrics log, a missing recipe or data folder, torchrun's
output, the progress bar after a resume, and scripts/build_dataset.py's missing requirements."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_tok
from tokcli.errors import TokError
from tokcli.train import checkpoints as ck
from tokcli.train.recipe import recipe_from_dict

REPO = Path(__file__).resolve().parents[2]
TINY_ARGS = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8, "groups": 2, "codebook_size": 16,
             "image_size": 32}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    """6 small PNGs of smooth noise."""
    folder = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(0)
    for i in range(6):
        img = rng.random((6, 6, 3))
        Image.fromarray((255 * img).astype(np.uint8)).resize((40, 40), Image.BICUBIC).save(folder / f"b{i}.png")
    return folder


def tiny_raw(root, **sections) -> dict:
    raw = {
        "model": {"family": "wetok", "name": "wetok-first-use", "model_args": dict(TINY_ARGS)},
        "data": {"roots": [str(root)], "crop_size": 32, "batch_size": 2},
        "loss": {"perceptual": "none", "gan_weight": 0.0},
        "optim": {"lr": 1e-3, "max_steps": 4, "ema_decay": 0.9},
        "run": {"seed": 0, "log_every": 1, "ckpt_every": 2, "device": "cpu"},
    }
    for sec, vals in sections.items():
        raw[sec].update(vals)
    return raw


def toml_of(raw: dict) -> str:
    """The tiny recipes as TOML (flat tables of scalars, lists and one inline table)."""
    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)
    return "".join(f"[{sec}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items()) for sec, table in raw.items())


def strip_rate(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


# --------------------------------------------------------------------------------------------------------------
# item 4: a partial last line in metrics.jsonl
# --------------------------------------------------------------------------------------------------------------
def test_resume_drops_a_partial_last_metrics_line(blobs, tmp_path, capsys):
    from tokcli.train.trainer import train

    r = recipe_from_dict(tiny_raw(blobs), source="first-use.toml")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(r, output_dir=straight, progress=False)
    train(r, output_dir=split, max_steps=2, progress=False)
    log = split / "metrics.jsonl"
    with open(log, "a", encoding="utf-8") as f:  # step 3 was logged, then the power went while logging step 4
        f.write(json.dumps({"step": 3, "loss": 0.5}) + "\n" + '{"step": 4, "loss": 0.1')
    capsys.readouterr()
    res = train(r, resume=split, progress=False)
    assert res["start_step"] == 2 and res["steps"] == 4
    warning = capsys.readouterr().err
    assert f"{log}: dropped line 4" in warning
    rows = [json.loads(ln) for ln in log.read_text().splitlines()]  # every line parses again
    expected = [json.loads(ln) for ln in (straight / "metrics.jsonl").read_text().splitlines()]
    assert strip_rate(rows) == strip_rate(expected)


def test_metrics_readers_tolerate_only_a_trailing_bad_line(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 0.3, "lr": 1e-3}\n{"step": 2, "loss": 0.2, "lr": 1e-3}\n{"step": 3, "lo')
    assert ck.last_logged_losses(log, 2) == {"loss": 0.2}
    assert "dropped line 3" in capsys.readouterr().err
    ck.truncate_metrics(log, 5)
    assert log.read_text().endswith("}\n") and len(log.read_text().splitlines()) == 2
    log.write_text('{"step": 1, "loss": 0.3}\n{"step": 2, "lo\n{"step": 3, "loss": 0.1}\n')
    with pytest.raises(TokError, match="line 2 is not a JSON record") as e:
        ck.truncate_metrics(log, 5)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------------------
# item 13: a missing recipe, torchrun's output, the progress bar after --resume
# --------------------------------------------------------------------------------------------------------------
def test_missing_recipe_is_a_runtime_error(tmp_path):
    p = run_tok("train", "missing.toml", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.decode() == "error: no such file or folder: missing.toml\n"
    (tmp_path / "bad.toml").write_text("[model\n")
    p = run_tok("train", "bad.toml", cwd=tmp_path)
    assert p.returncode == 2 and "is not valid TOML" in p.stderr.decode() and p.stdout == b""


def test_only_rank_0_reports(capsys):
    from tokcli.cli.train import report

    res = {"model_dir": "run/model", "steps": 3}
    report(res, rank=1)
    assert capsys.readouterr() == ("", "")
    report(res, rank=0)
    out, err = capsys.readouterr()
    assert json.loads(out) == res and err == "exported run/model\n"


@pytest.mark.slow
def test_torchrun_train_prints_one_summary(blobs, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(toml_of(tiny_raw(blobs, optim={"max_steps": 2}, run={"ckpt_every": 2})))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "tokcli", "train", str(recipe), "-o", str(tmp_path / "run"), "-q"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)  # exactly one JSON document
    assert res["world_size"] == 2 and res["steps"] == 2
    assert p.stderr.count("exported ") == 1


class _FakeBar:
    postfixes: list[dict] = []

    def __init__(self, *a, **k):
        pass

    def set_postfix(self, postfix, refresh=True):
        _FakeBar.postfixes.append(dict(postfix))

    def update(self, n=1):
        pass

    def close(self):
        pass


def test_progress_shows_no_stale_rate_after_resume(blobs, tmp_path, monkeypatch):
    import tqdm

    from tokcli.train.trainer import train

    r = recipe_from_dict(tiny_raw(blobs, run={"log_every": 2}), source="first-use.toml")
    train(r, output_dir=tmp_path / "run", max_steps=2, progress=False)
    monkeypatch.setattr(tqdm, "tqdm", _FakeBar)
    _FakeBar.postfixes = []
    train(r, resume=tmp_path / "run", progress=True)
    step3, step4 = _FakeBar.postfixes  # before the first log window of the resumed run: no rate; then the measured one
    assert "img/s" not in step3 and float(step4["img/s"]) > 0


# --------------------------------------------------------------------------------------------------------------
# item 14: the shipped recipes' data on a fresh clone
# --------------------------------------------------------------------------------------------------------------
def test_missing_demo_data_says_how_to_build_it(tmp_path):
    p = run_tok("train", str(REPO / "recipes" / "wetok-tiny-cpu.toml"), "--max-steps", "1", "-o", str(tmp_path / "r"),
                cwd=tmp_path)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and p.stdout == b"", err
    assert err.startswith("error: no such file or folder: data/train (data.roots")
    assert "pip install -e '.[data]' && python scripts/build_dataset.py --install" in err and "--skip-debian" in err


def test_missing_other_root_names_it(blobs, tmp_path):
    from tokcli.train.trainer import train

    missing = tmp_path / "nowhere"
    r = recipe_from_dict(tiny_raw(blobs, data={"roots": [str(blobs), str(missing)]}), source="first-use.toml")
    with pytest.raises(TokError) as e:
        train(r, output_dir=tmp_path / "run", progress=False)
    assert str(e.value) == f"no such file or folder: {missing} (data.roots)"


def _build_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("build_dataset", REPO / "scripts" / "build_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "build_dataset", mod)  # its dataclass looks itself up there
    spec.loader.exec_module(mod)
    return mod


def test_build_dataset_names_each_missing_requirement_in_one_line(tmp_path, monkeypatch, capsys):
    mod = _build_script(monkeypatch)
    monkeypatch.setattr(mod, "debian_missing", lambda: ["lomiri-wallpapers-16.04", "mate-backgrounds"])
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    assert mod.main(["--out", str(tmp_path / "data")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(ln.startswith("error: missing ") for ln in lines), lines
    assert "scikit-learn" in lines[0] and "pip install -e '.[data]'" in lines[0]
    assert "apt-get install -y lomiri-wallpapers-16.04 mate-backgrounds" in lines[1] and "--skip-debian" in lines[1]
    assert mod.main(["--out", str(tmp_path / "data"), "--skip-debian", "--install"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "data").exists()
