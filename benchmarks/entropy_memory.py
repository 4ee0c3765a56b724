"""Peak memory of the LFQ entropy regulariser (forward + backward): group-wise (GQ, d' = 8) vs plain LFQ (g = 1)
vs BSQ-style (g = d, d' = 1), for d = 8 ... 40 at a fixed token count (WeTok paper, Table 1).

    python benchmarks/entropy_memory.py --device cpu
    python benchmarks/entropy_memory.py --device cuda --json mem.json

The largest tensor of the loss is the logits / probabilities over every code of every group:
B * n * g * 2**d' float32 values. On CUDA the peak is measured with torch.cuda.max_memory_allocated (an OOM is
reported as OOM). On CPU every configuration runs in its own subprocess and reports the growth of its peak RSS
(ru_maxrss) over the call; configurations whose largest tensor alone would exceed --cpu-limit-gib (plain LFQ at
d >= 24 always) are reported as skipped instead of allocated.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024 ** 3
METHODS = ("GQ", "LFQ", "BSQ")


def groups_for(method: str, d: int, bits: int = 8) -> int:
    if method == "GQ":
        return max(1, d // bits)
    if method == "LFQ":
        return 1
    return d  # BSQ-like


def largest_tensor_bytes(batch: int, tokens: int, d: int, g: int) -> int:
    return batch * tokens * g * 2 ** (d // g) * 4


def run_once(d: int, g: int, batch: int, side: int, device: str, mode: str) -> dict:
    """One forward + backward of the entropy terms; returns seconds and (CUDA) peak bytes."""
    import torch

    from tokcli.quant.lfq import GroupLFQ

    q = GroupLFQ(d, g, entropy_mode=mode).to(device)
    z = torch.randn(batch, d, side, side, device=device, requires_grad=True)
    out = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    aux = q.entropy_loss(z)
    (aux["entropy_aux"] + aux["commitment"]).backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    out["seconds"] = time.perf_counter() - t0
    out["entropy_aux"] = float(aux["entropy_aux"])
    return out


def child(a) -> None:
    import torch  # noqa: F401  (import before the baseline)

    from tokcli.quant.lfq import GroupLFQ

    # warm up the code path on a tiny input so that lazy initialisation is outside the measurement
    tiny = torch.randn(1, a.d, 1, 1, requires_grad=True)
    GroupLFQ(a.d, a.g).entropy_loss(tiny)["entropy_aux"].backward() if a.d // a.g <= 16 else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = run_once(a.d, a.g, a.batch, a.side, "cpu", a.mode)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r["rss_delta_bytes"] = (after - before) * 1024  # Linux reports KiB
    print(json.dumps(r))


def measure(method, d, a) -> dict:
    g = groups_for(method, d)
    tokens = a.side * a.side
    big = largest_tensor_bytes(a.batch, tokens, d, g)
    row = {"method": method, "d": d, "g": g, "bits_per_group": d // g, "tokens": a.batch * tokens,
           "largest_tensor_GiB": big / GIB}
    if a.device == "cpu":
        if big > a.cpu_limit_gib * GIB or (method == "LFQ" and d >= 24):
            row["status"] = f"skipped: would need {big / GIB:,.1f} GiB for one tensor"
            return row
        cmd = [sys.executable, __file__, "--child", "--d", str(d), "--g", str(g), "--batch", str(a.batch),
               "--side", str(a.side), "--mode", a.mode]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            row["status"] = f"failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:200]}"
            return row
        r = json.loads(p.stdout.strip().splitlines()[-1])
        row.update(status="ok", measured_GiB=r["rss_delta_bytes"] / GIB, measured="peak RSS growth",
                   seconds=r["seconds"])
        return row
    import torch

    try:
        r = run_once(d, g, a.batch, a.side, a.device, a.mode)
        row.update(status="ok", measured_GiB=r["peak_bytes"] / GIB, measured="cuda max_memory_allocated",
                   seconds=r["seconds"])
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except RuntimeError as e:  # e.g. tensor sizes beyond what an allocation can describe
        if "memory" in str(e).lower() or "overflow" in str(e).lower() or "too large" in str(e).lower():
            row["status"] = "OOM"
        else:
            raise
    finally:
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dims", default="8,16,24,32,40")
    ap.add_argument("--methods", default="GQ,LFQ,BSQ")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--side", type=int, default=16, help="latent side: tokens per image = side**2 (16: 256)")
    ap.add_argument("--mode", default="official", choices=["official", "paper"])
    ap.add_argument("--cpu-limit-gib", type=float, default=1.0,
                    help="on CPU, skip configurations whose largest tensor exceeds this")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--d", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--g", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda but torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = False
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if any(m not in METHODS for m in methods):
        ap.error(f"methods must come from {METHODS}")
    rows = []
    for d in [int(s) for s in a.dims.split(",")]:
        for m in methods:
            r = measure(m, d, a)
            rows.append(r)
            print(json.dumps(r), flush=True)

    print()
    print(f"# entropy loss fwd+bwd, {a.batch} x {a.side * a.side} tokens, mode {a.mode}, device {a.device}")
    hdr = f"{'method':6} {'d':>3} {'g':>3} {'d_':>3} {'largest tensor':>15} {'measured':>12} {'time':>9}  status"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        meas = f"{r['measured_GiB']:.3f} GiB" if "measured_GiB" in r else "-"
        secs = f"{r['seconds'] * 1e3:.1f} ms" if "seconds" in r else "-"
        print(f"{r['method']:6} {r['d']:>3} {r['g']:>3} {r['bits_per_group']:>3} "
              f"{r['largest_tensor_GiB']:>11.4g} GiB {meas:>12} {secs:>9}  {r['status']}")
    if a.json:
        a.json.write_text(json.dumps({"device": a.device, "batch": a.batch, "tokens_per_image": a.side ** 2,
                                      "mode": a.mode, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
