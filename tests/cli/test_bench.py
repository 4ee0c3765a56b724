"""tok bench: values against independent computations, the protocol record, missing weights, reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_tok

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    """A $TORCH_HOME whose hub cache holds FID Inception weights: random ones, which exercise the real loading
    path and the statistics (values are checked against an independent computation, not against paper numbers).
    He-scaled convolutions and random BatchNorm affine and running statistics keep the 2048 features of different
    images apart (std ~ 0.2 around means ~ 5); torchvision's default init collapses them to a spread of 1e-7,
    where the covariance is rounding noise."""
    import torch

    from tokcli.metrics.fid import FIDInception

    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    net = FIDInception()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
    torch.save(net.state_dict(), ckpt / INCEPTION_FILE)
    return home


def _crops(images: Path, size: int) -> dict[str, np.ndarray]:
    from tokcli.core.images import collect_inputs, load_cropped

    return {it.key: load_cropped(it, size) for it in collect_inputs([str(images)])}


def test_psnr_ssim_equal_independent_scoring_of_saved_reconstructions(tiny_model, images, tmp_path):
    from tokcli.bench import evaluate
    from tokcli.core.images import collect_inputs
    from tokcli.metrics.image import psnr, ssim

    items = collect_inputs([str(images)])
    res, errors, grid = evaluate(items, model=f"local-dir:{tiny_model}", metrics=["psnr", "ssim", "usage", "bpp"],
                                 device="cpu", batch_size=2, save_recon=str(tmp_path / "rec"), quiet=True)
    assert errors == []
    orig = _crops(images, 32)
    keys = res["per_image"]["key"]
    assert sorted(keys) == sorted(orig)
    a = np.stack([orig[k] for k in keys])
    b = np.stack([np.asarray(Image.open(tmp_path / "rec" / (Path(k).with_suffix(".png")))) for k in keys])
    assert res["metrics"]["psnr"] == pytest.approx(float(np.mean(psnr(a, b))), abs=1e-9)
    assert res["metrics"]["ssim"] == pytest.approx(float(np.mean(ssim(a, b))), abs=1e-12)
    assert res["per_image"]["psnr"] == pytest.approx(list(psnr(a, b)))
    # the grid holds the first pairs, original pixels unchanged
    g_orig, g_recon, g_keys = grid
    assert g_keys == keys[:len(g_keys)] and np.array_equal(g_orig[0], orig[g_keys[0]])
    u = res["metrics"]["usage"]
    assert u["tokens"] == 5 * 16 * 16 * 2 and len(u["groups"]) == 2
    # joint codes (2 groups of 2^8 -> 2^16): recount from the token file of the same images
    from tokcli.core.images import collect_inputs as ci
    from tokcli import load, pipeline

    tok = load(f"local-dir:{tiny_model}", device="cpu")
    enc = pipeline.encode(tok, ci([str(images)]), ref="x", output=str(tmp_path / "c.npz"), quiet=True)
    t = enc.tokens.astype(np.int64)
    joint = np.unique(t[..., 0] + 256 * t[..., 1])
    assert u["joint"]["codebook_size"] == 65536 and u["joint"]["used"] == len(joint)
    assert u["joint"]["tokens"] == 5 * 16 * 16
    assert res["metrics"]["bpp"]["compression_ratio"] == pytest.approx(24 / (16 * 16 * 2 * 8 / (32 * 32)))
    p = res["protocol"]
    for field in ("n_images", "image_size", "crop", "uint8", "psnr", "ssim", "tok_version", "device", "seed"):
        assert p[field] is not None, field
    assert res["model"]["sha256"] and p["n_images"] == 5


def test_n_and_legacy_mode_change_the_number(tiny_model, images):
    from tokcli.bench import evaluate
    from tokcli.core.images import collect_inputs

    items = collect_inputs([str(images)])
    kw = dict(model=f"local-dir:{tiny_model}", metrics=["psnr"], device="cpu", quiet=True)
    full, _, _ = evaluate(items, **kw)
    two, _, _ = evaluate(items, n=2, **kw)
    assert two["protocol"]["n_images"] == 2 and two["per_image"]["psnr"] == full["per_image"]["psnr"][:2]
    legacy, _, _ = evaluate(items, psnr_mode="wetok", **kw)
    assert "legacy" in legacy["protocol"]["psnr"]
    assert legacy["metrics"]["psnr"] != pytest.approx(full["metrics"]["psnr"], abs=1e-6)
    # the wetok value by hand: the decoder output truncated to uint8, originals as loaded
    import torch

    from tokcli import load
    from tokcli.core.images import to_tensor
    from tokcli.metrics.image import psnr

    tok = load(f"local-dir:{tiny_model}", device="cpu")
    orig = _crops(images, 32)
    a = np.stack([orig[k] for k in legacy["per_image"]["key"]])
    with torch.inference_mode():
        r = tok.decode(tok.encode(to_tensor(a))).permute(0, 2, 3, 1).numpy().astype(np.float64)
    trunc = ((np.clip(r, -1, 1) + 1) / 2 * 255).astype(np.uint8)
    assert legacy["per_image"]["psnr"] == pytest.approx(list(psnr(a, trunc)), abs=1e-9)
    for res in (full, two, legacy):
        assert len(res["per_image"]["psnr"]) == len(res["per_image"]["key"])
    assert full["protocol"]["data"]["n_inputs"] == 5 and two["protocol"]["data"]["n_inputs"] == 2


@pytest.fixture
def one_blas_thread():
    """One BLAS thread for the 2048x2048 sqrtm, as conftest gives torch one: on a busy 2-core machine two
    OpenBLAS threads make it about twice as slow (measured 47 s vs 24 s), not faster."""
    try:
        import scipy.linalg  # noqa: F401  (load the BLAS before limiting it)
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


class DistanceSpy:
    """Stands in for rfid.frechet_distance: records the statistics it is given and computes the real distance
    (a 2048x2048 sqrtm, ~20 s on one core) for the first call only. Later calls must receive the same statistics
    as the first (to ``rtol``), so their distance is the same number; they get the first value back."""

    def __init__(self, real, rtol: float = 1e-9):
        self.real, self.rtol, self.calls, self.value = real, rtol, [], None

    def __call__(self, mu1, sigma1, mu2, sigma2):
        args = [np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2)]
        if self.calls:
            for a, b in zip(args, self.calls[0]):
                scale = np.abs(b).max()
                assert np.abs(a - b).max() <= self.rtol * scale, "other statistics than the first call's"
        else:
            self.value = self.real(*args)
        self.calls.append(args)
        return self.value


@pytest.mark.slow  # one 2048x2048 sqrtm (Frechet distance), ~20 s on one core
def test_rfid_equals_distance_of_independent_features(tiny_model, images, torch_home, monkeypatch, tmp_path,
                                                      one_blas_thread):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    import torch

    from tokcli.bench import evaluate
    from tokcli.core.images import collect_inputs
    from tokcli.metrics import fid, rfid

    spy = DistanceSpy(rfid.frechet_distance)
    monkeypatch.setattr(rfid, "frechet_distance", spy)
    items = collect_inputs([str(images)])
    res, _, _ = evaluate(items, model=f"local-dir:{tiny_model}", metrics=["rfid"], device="cpu",
                         save_recon=str(tmp_path / "rec"), quiet=True)
    keys = res["per_image"]["key"]
    orig = _crops(images, 32)
    a = np.stack([orig[k] for k in keys])
    b = np.stack([np.asarray(Image.open(tmp_path / "rec" / Path(k).with_suffix(".png"))) for k in keys])
    net, sha = fid.load_fid_inception(None, device=torch.device("cpu"))
    fa = fid.features_from_uint8(net, a, batch_size=5, device=torch.device("cpu"))
    fb = fid.features_from_uint8(net, b, batch_size=5, device=torch.device("cpu"))
    # the distance is the real one of the metric's statistics, and those are the independent features' (so the
    # value equals frechet_distance of the independent statistics without a second 20 s sqrtm)
    assert len(spy.calls) == 1 and res["metrics"]["rfid"] == spy.value
    spy(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert res["metrics"]["rfid"] > 0
    rp = res["protocol"]["rfid"]
    assert rp["weights_sha256"] == sha and "originals" in rp["reference"]

    # the same reference as a statistics file (tok bench stats, into a folder that does not exist yet) gives the
    # same statistics, hence the same number
    stats = tmp_path / "new" / "ref.npz"
    p = run_tok("bench", "stats", images, "-o", stats, "--size", "32", "--device", "cpu", "-q",
                env={"TORCH_HOME": str(torch_home)})
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["n_images"] == 5
    with np.load(stats, allow_pickle=False) as z:
        assert np.allclose(z["mu"], fa.mean(0)) and np.allclose(z["sigma"], np.cov(fa, rowvar=False))
    res2, _, _ = evaluate(items, model=f"local-dir:{tiny_model}", metrics=["rfid"], device="cpu",
                          ref_stats=str(stats), quiet=True)
    assert len(spy.calls) == 3 and res2["metrics"]["rfid"] == pytest.approx(res["metrics"]["rfid"], rel=1e-6)
    assert "ref.npz" in res2["protocol"]["rfid"]["reference"]
    # an ADM / pytorch-fid file (mu and sigma only) works the same; a file made at another size is refused
    adm = tmp_path / "adm.npz"
    np.savez(adm, mu=fa.mean(0), sigma=np.cov(fa, rowvar=False))
    res3, _, _ = evaluate(items, model=f"local-dir:{tiny_model}", metrics=["rfid"], device="cpu",
                          ref_stats=str(adm), quiet=True)
    assert len(spy.calls) == 4 and res3["metrics"]["rfid"] == pytest.approx(res["metrics"]["rfid"], rel=1e-6)
    from tokcli.errors import TokError

    with pytest.raises(TokError, match="computed at 32 px"):
        evaluate(items, model=f"local-dir:{tiny_model}", metrics=["rfid"], device="cpu", image_size=40,
                 ref_stats=str(stats), quiet=True)


def test_missing_weights_fail_cleanly(tiny_model, images, tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    for metric, fname in (("rfid", INCEPTION_FILE), ("lpips", "alexnet-owt-7be5be79.pth")):
        p = run_tok("bench", metric, images, "-m", tiny_model, env=env)
        err = p.stderr.decode()
        assert p.returncode == 1, err
        assert fname in err and "Traceback" not in err
        assert p.stdout == b""


def test_all_skips_missing_weights_with_reasons_and_writes_report(tiny_model, images, tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    report = tmp_path / "rep" / "report.md"
    report.parent.mkdir()
    p = run_tok("bench", "all", images, "-m", tiny_model, "--json", "--report", report, env=env)
    assert p.returncode == 0, p.stderr.decode()
    lines = p.stdout.decode().strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert set(res["skipped"]) == {"lpips", "rfid"}
    assert INCEPTION_FILE in res["skipped"]["rfid"]
    assert {"psnr", "ssim", "usage", "bpp"} <= set(res["metrics"])
    assert b"rfid skipped" in p.stderr
    text = report.read_text()
    assert "wetok" in text or "tiny" in text
    pngs = sorted(report.parent.glob("*.png"))
    assert pngs, "the report has a plot"
    for png in pngs:
        assert np.asarray(Image.open(png)).std() > 0
    p = run_tok("bench", "all", images, "-m", tiny_model, "--strict", env=env)
    assert p.returncode == 1 and b"alexnet-owt-7be5be79.pth" in p.stderr  # LPIPS is loaded first
    # a weights file the user names must work: no silent skip
    p = run_tok("bench", "all", images, "-m", tiny_model, "--inception-weights", tmp_path / "nope.pth", env=env)
    assert p.returncode == 1 and b"nope.pth" in p.stderr and p.stdout == b""


def test_report_combines_saved_results(tiny_model, tiny_model_other, images, tmp_path):
    outs = []
    for i, m in enumerate((tiny_model, tiny_model_other)):
        out = tmp_path / f"r{i}.json"
        p = run_tok("bench", "psnr", images, "-m", m, "-o", out, "-q")
        assert p.returncode == 0, p.stderr.decode()
        outs.append(out)
    p = run_tok("bench", "report", *outs, "-o", tmp_path / "cmp.md")
    assert p.returncode == 0, p.stderr.decode()
    text = (tmp_path / "cmp.md").read_text()
    assert "tiny" in text and "tiny-other" in text
    p = run_tok("bench", "report", images / "img0.png", "-o", tmp_path / "bad.md")
    assert p.returncode == 1 and b"not a readable JSON result" in p.stderr


def test_outputs_create_missing_parent_folders(tiny_model, images, tmp_path):
    """-o, --report (and its PNGs), --save-recon and `bench report -o` create missing folders, as `encode -o`
    does; a file standing where a folder should be is refused before any work (exit 2, one line)."""
    out, rep, rec = tmp_path / "a" / "b" / "r.json", tmp_path / "c" / "d" / "r.md", tmp_path / "e" / "f"
    p = run_tok("bench", "psnr", images, "-m", tiny_model, "-q", "-o", out, "--report", rep, "--save-recon", rec)
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(out.read_text())["protocol"]["n_images"] == 5
    assert rep.is_file() and (rep.parent / "r_rd.png").is_file() and (rep.parent / "r_grid.png").is_file()
    assert len(list(rec.rglob("*.png"))) == 5
    p = run_tok("bench", "report", out, "-o", tmp_path / "g" / "h" / "cmp.md")
    assert p.returncode == 0 and (tmp_path / "g" / "h" / "cmp.md").is_file(), p.stderr.decode()
    p = run_tok("bench", "throughput", "-m", tiny_model, "-b", "1", "--iters", "1", "--warmup", "0", "--device",
                "cpu", "-q", "-o", tmp_path / "i" / "t.json")
    assert p.returncode == 0 and (tmp_path / "i" / "t.json").is_file(), p.stderr.decode()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for flags in (["-o", blocker / "r.json"], ["--report", blocker / "x" / "r.md"], ["--save-recon", blocker]):
        p = run_tok("bench", "psnr", images, "-m", tiny_model, "-q", *flags)
        lines = p.stderr.decode().strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr.decode()
        assert str(blocker) in lines[0] and p.stdout == b""
    p = run_tok("bench", "stats", images, "-o", blocker / "s.npz", "-q")
    assert p.returncode == 2 and b"is a file" in p.stderr


def test_throughput_json(tiny_model):
    p = run_tok("bench", "throughput", "-m", tiny_model, "-b", "1,2", "--iters", "2", "--warmup", "1",
                "--device", "cpu", "--json", "-q")
    assert p.returncode == 0, p.stderr.decode()
    res = json.loads(p.stdout)
    rows = res["results"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["encode_img_s"] == pytest.approx(r["batch"] / r["encode_s"])
        assert r["encode_img_s"] > 0 and r["decode_img_s"] > 0 and r["reconstruct_img_s"] > 0
        assert r["peak_rss_gib"] > 0
    assert res["protocol"]["image_size"] == 32 and res["protocol"]["statistic"] == "median"
    p = run_tok("bench", "throughput", "-m", tiny_model, "-b", "1,x")
    assert p.returncode == 2 and b"comma list" in p.stderr


FID_SPY = """
import os
import sys

import numpy as np

import tokcli.metrics.rfid as rfid


def spy(mu1, sigma1, mu2, sigma2):  # records what the distance is computed from; no sqrtm
    np.savez(os.path.join(os.environ["FID_SPY_DIR"], f"{os.getpid()}.npz"), mu1=mu1, sigma1=sigma1, mu2=mu2,
             sigma2=sigma2)
    d = np.asarray(mu1) - np.asarray(mu2)
    return float(d @ d + np.trace(sigma1) + np.trace(sigma2))


rfid.frechet_distance = spy
from tokcli.cli.app import main  # noqa: E402

main(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tiny_gd_model, images, torch_home, tmp_path):
    """Sharded over 2 gloo ranks: the same per-image values in input order, the same usage counts and the same
    rFID (float64 sums all-reduced), with a stochastic decoder seeded by global position."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    args = ["bench", "all", str(images), "-m", str(tiny_gd_model), "--device", "cpu", "--json", "-q", "-b", "2",
            "--seed", "5"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TORCH_HOME": str(torch_home),
           "HF_HUB_OFFLINE": "1"}
    spy = tmp_path / "tok_fid_spy.py"
    spy.write_text(FID_SPY)
    spied = {}
    for name, launcher in (("one", [sys.executable]), ("two", [sys.executable, "-m", "torch.distributed.run",
                                                                "--standalone", "--nproc_per_node=2"])):
        (tmp_path / f"fid-{name}").mkdir()
        spied[name] = subprocess.run([*launcher, str(spy), *args, "--report", str(tmp_path / f"{name}.md")],
                                     capture_output=True, text=True, timeout=600,
                                     env={**env, "FID_SPY_DIR": str(tmp_path / f"fid-{name}")})
    one, two = spied["one"], spied["two"]
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    lines = [ln for ln in two.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, "only rank 0 prints"
    r1, r2 = json.loads(one.stdout), json.loads(lines[0])
    assert r2["protocol"]["world_size"] == 2 and r1["protocol"]["world_size"] == 1
    assert r2["per_image"]["key"] == r1["per_image"]["key"]
    assert r2["per_image"]["psnr"] == pytest.approx(r1["per_image"]["psnr"], abs=1e-12)
    assert r2["per_image"]["ssim"] == pytest.approx(r1["per_image"]["ssim"], abs=1e-12)
    assert r2["metrics"]["usage"] == r1["metrics"]["usage"]
    # rFID: rank 0 alone computes the distance, from the same statistics as one process (float64 sums
    # all-reduced), so the number is the same; the spy skips the 20 s sqrtm that would only repeat that
    calls = {name: sorted((tmp_path / f"fid-{name}").glob("*.npz")) for name in ("one", "two")}
    assert len(calls["one"]) == 1 and len(calls["two"]) == 1, calls
    with np.load(calls["one"][0]) as z1, np.load(calls["two"][0]) as z2:
        for k in ("mu1", "mu2"):
            assert np.allclose(z1[k], z2[k], rtol=0, atol=1e-12), k
        for k in ("sigma1", "sigma2"):
            assert np.allclose(z1[k], z2[k], rtol=1e-10, atol=1e-12), k
    assert r2["metrics"]["rfid"] == pytest.approx(r1["metrics"]["rfid"], rel=1e-12)
    # the report's image grid shows the first images of the input list, whichever rank decoded them
    assert (tmp_path / "two_grid.png").read_bytes() == (tmp_path / "one_grid.png").read_bytes()
    # the FlowMo per-batch PSNR does not depend on how images are batched or sharded
    args_fl = ["bench", "psnr", str(images), "-m", str(tiny_gd_model), "--device", "cpu", "--json", "-q",
               "--psnr-mode", "flowmo", "-b", "3"]
    a = subprocess.run([sys.executable, "-m", "tokcli", *args_fl], capture_output=True, text=True, env=env)
    b = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "tokcli", *args_fl[:-1], "2"], capture_output=True, text=True, env=env)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr + b.stderr)[-2000:]
    fa = json.loads(a.stdout)
    fb = json.loads([ln for ln in b.stdout.splitlines() if ln.startswith("{")][0])
    assert fa["metrics"]["psnr"] == pytest.approx(fb["metrics"]["psnr"], abs=1e-9)
    assert len(fa["per_image"]["psnr"]) == len(fa["per_image"]["key"]) == 5
    # reference statistics sharded over 2 ranks equal one process's (float64 sums all-reduced)
    outs = []
    for launcher, name in (([sys.executable, "-m", "tokcli"], "s1.npz"),
                           ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "tokcli"], "s2.npz")):
        p = subprocess.run([*launcher, "bench", "stats", str(images), "-o", str(tmp_path / name), "--size", "32",
                            "--device", "cpu", "-q"], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][0]))
    assert outs[1]["world_size"] == 2 and outs[0]["n_images"] == outs[1]["n_images"] == 5
    with np.load(tmp_path / "s1.npz", allow_pickle=False) as z1, np.load(tmp_path / "s2.npz", allow_pickle=False) as z2:
        assert np.allclose(z1["mu"], z2["mu"], rtol=0, atol=1e-12)
        assert np.allclose(z1["sigma"], z2["sigma"], rtol=1e-10, atol=1e-12)
