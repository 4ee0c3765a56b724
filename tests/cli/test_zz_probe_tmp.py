import numpy as np, time, warnings
from test_bench import torch_home, _crops  # noqa
def test_probe(tiny_model, images, torch_home, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    from tokcli.bench import evaluate
    from tokcli.core.images import collect_inputs
    from tokcli.metrics import rfid
    from scipy import linalg
    got = []
    real = rfid.frechet_distance
    monkeypatch.setattr(rfid, "frechet_distance", lambda *a: got.append(a) or 1.0)
    items = collect_inputs([str(images)])
    evaluate(items, model=f"local-dir:{tiny_model}", metrics=["rfid"], device="cpu", quiet=True)
    mu1, s1, mu2, s2 = [np.asarray(x) for x in got[0]]
    t = time.time(); c = linalg.sqrtm(s1 @ s2); print("sqrtm", time.time() - t, np.isfinite(c).all(), np.iscomplexobj(c))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = time.time(); print(real(mu1, s1, mu2, s2), time.time() - t, [str(x.message)[:60] for x in w])
