"""One command for the whole benchmark suite: speed, memory and quality, written to
benchmarks/results/<machine>-<date>.json and printed as a table.

    python benchmarks/run.py                                   # CPU, the shipped model, samples/
    python benchmarks/run.py --device cuda --official-src PATH  # + side by side with the official WeTok code
    python benchmarks/run.py --quick                           # a smoke run (seconds)

Sections (each one of this folder's scripts or a `tok bench` command, run as a child process so that one
failing section is reported and the others still run):
- throughput: `tok bench throughput` of the model (encode / decode / reconstruct images/s, peak memory);
- wetok_speed: WeTok configs with random weights, and the official implementation in the same process when
  --official-src is given (ratios measured side by side);
- entropy_memory: peak memory of the group-wise vs plain-LFQ vs BSQ entropy loss (WeTok Table 1);
- quality: `tok bench all` on the images (metrics whose weights are missing are listed as skipped) and the classic
  JPEG / bicubic baselines on the same crops.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu{os.cpu_count()}-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_section(name: str, cmd: list[str], json_path: Path | None, timeout: int) -> dict:
    """Run one section; return its JSON (from json_path, or stdout) or the error it ended with."""
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {p.returncode}: {tail[0]}"}
    if json_path is not None:
        return json.loads(json_path.read_text())
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("-m", "--model", default="wetok-tiny")
    ap.add_argument("--data", default="samples", help="images for the quality section")
    ap.add_argument("--official-src", default=None, help="checkout of github.com/zhuangshaobin/WeTok")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="result file [benchmarks/results/<machine>-<date>.json]")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per section")
    a = ap.parse_args(argv)

    py = sys.executable
    cuda = a.device.startswith("cuda")
    tmp = Path(tempfile.mkdtemp(prefix="tok-bench-"))
    sections: dict[str, dict] = {}

    iters = ["--warmup", "1", "--iters", "2"] if a.quick else ["--warmup", "2", "--iters", "5"]
    sections["throughput"] = run_section(
        "throughput", [py, "-m", "tokcli", "bench", "throughput", "-m", a.model, "-b", "1,8", "--device", a.device,
                       "--json", "-q", *iters], None, a.timeout)

    configs = "parity" if a.quick else ("parity,ds16,ds8" if cuda else "parity,ds16-ch128")
    cmd = [py, str(HERE / "wetok_speed.py"), "--configs", configs, "--device", "cuda" if cuda else "cpu",
           "--batch-sizes", "1,8" if cuda else "1,4", "--json", str(tmp / "speed.json"),
           *(["--warmup", "1", "--iters", "2"] if a.quick else ["--warmup", "2", "--iters", "5"])]
    if a.official_src:
        cmd += ["--official-src", a.official_src]
    sections["wetok_speed"] = run_section("wetok_speed", cmd, tmp / "speed.json", a.timeout)

    dims = "8,16" if a.quick else ("8,16,24,32,40" if cuda else "8,16,24")
    sections["entropy_memory"] = run_section(
        "entropy_memory", [py, str(HERE / "entropy_memory.py"), "--device", a.device, "--dims", dims,
                           "--json", str(tmp / "memory.json")], tmp / "memory.json", a.timeout)

    quality = run_section("quality", [py, "-m", "tokcli", "bench", "all", a.data, "-m", a.model, "--device",
                                      a.device, "--json", "-q"], None, a.timeout)
    if "per_image" in quality:
        del quality["per_image"]
    sections["quality"] = quality
    sections["classic_baselines"] = run_section(
        "classic_baselines", [py, str(HERE / "classic_baselines.py"), a.data, "--json", str(tmp / "classic.json")],
        tmp / "classic.json", a.timeout)

    import torch

    machine = machine_name(a.device)
    out = a.out or HERE / "results" / f"{machine}-{dt.date.today().isoformat()}.json"
    doc = {"machine": machine, "device": a.device, "torch": torch.__version__, "python": platform.python_version(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": a.quick,
           "sections": sections}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp_out, out)

    print_table(sections)
    print(f"\nwritten: {out}")
    return 1 if any("error" in s for s in sections.values()) else 0


def print_table(sections: dict) -> None:
    rows = []
    t = sections.get("throughput", {})
    for r in t.get("results", []):
        rows.append(("throughput", f"{t['model']['name']} batch {r['batch']}",
                     f"encode {r['encode_img_s']:.2f} / decode {r['decode_img_s']:.2f} / "
                     f"reconstruct {r['reconstruct_img_s']:.2f} img/s"))
    for r in sections.get("wetok_speed", {}).get("results", []):
        txt = f"encode {r['encode_img_s']:.2f} / decode {r['decode_img_s']:.2f} img/s"
        if "encode_speedup" in r:
            txt += (f"; vs official {r['encode_speedup']:.2f}x / {r['decode_speedup']:.2f}x, equal indices "
                    f"{100 * r['official_index_match']:.3f} %")
        rows.append(("wetok_speed", f"{r['config']} batch {r['batch']}", txt))
    for r in sections.get("entropy_memory", {}).get("results", []):
        rows.append(("entropy_memory", f"{r['method']} d={r['d']} (g={r['g']})",
                     f"{r['measured_GiB']:.3f} GiB ({r['measured']})" if "measured_GiB" in r else r["status"]))
    q = sections.get("quality", {})
    if "metrics" in q:
        m = q["metrics"]
        vals = [f"{k} {m[k]:.4g}" for k in ("psnr", "ssim", "lpips", "rfid") if k in m]
        if "bpp" in m:
            vals.append(f"{m['bpp']['tokens']:.4g} bpp")
        rows.append(("quality", f"{q['model']['name']} N={q['protocol']['n_images']}", ", ".join(vals)))
        for k in q.get("skipped", {}):
            rows.append(("quality", k, "skipped (weights missing)"))
    for r in sections.get("classic_baselines", {}).get("results", []):
        rows.append(("classic", r["method"], f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f} at {r['bpp']:.3f} bpp"))
    for name, s in sections.items():
        if "error" in s:
            rows.append((name, "ERROR", s["error"]))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}")


if __name__ == "__main__":
    sys.exit(main())
