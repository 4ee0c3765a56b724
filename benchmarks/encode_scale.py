"""`tok encode` into a token set, 1 and 2 ranks, folder and tar inputs: images/s, decode vs model, bytes on disk.

    python benchmarks/encode_scale.py                                   # all parts, ~12 min on 2 cores
    python benchmarks/encode_scale.py --quick                           # smoke run (1 round, few images)
    python benchmarks/encode_scale.py --parts registry                  # only the storage / FLOP table

Parts (``--parts``, comma list):

- ``scale``: whole ``tok encode DATA -m MODEL -o OUT/ --shard-size S --labels folder`` commands, wall clock, the
  output folder removed before each run. Configurations: ``1r1t`` (one process, ``OMP_NUM_THREADS=1``), ``1r2t``
  (one process, 2 threads) and ``2r`` (``torchrun --standalone --nproc_per_node=2 -m tokcli encode ...``, gloo,
  ``OMP_NUM_THREADS=1`` per rank). Inputs: a folder of N JPEGs of uneven sizes in ImageNet layout
  (``CLASS/CLASS_ID.JPEG``, made from the photos in ``data/``, else ``samples/``) and the same images as an
  ImageNet-style train tar (an outer tar of one uncompressed tar per class). Every (model, input, configuration)
  cell runs once per round, ``--rounds`` rounds, the order rotated each round; medians and min-max are reported.
  The same command on a folder of 1 image gives the fixed cost (interpreter, imports, model load, process group,
  manifest); ``steady img/s = (N - 1) / (t_N - t_1)``. The shard size is N / 8, so that both ranks get work
  (rank r encodes shards r, r + W, ...). Every run's tokens are compared with the first 1r1t folder run.
- ``breakdown``: in-process, with the library: ``iter_batches`` alone (decode + ADM crop; workers 0 and 2; folder
  and tar) against ``model.encode`` on pre-decoded batches (``to_tensor`` done beforehand, ``torch.inference_mode``,
  1 and 2 torch threads), interleaved rounds, medians.
- ``bytes``: ``tok info``'s byte report of the encoded sets, and of sets written with the same writer
  (``write_token_file``, the header of an encoded shard, ImageNet-style keys and int64 labels, random payload) at
  shard sizes 100 / 1,000 / 10,000, to find the shard size at which bytes on disk are within 1 % of the payload.
- ``registry``: every tokenizer of the registry: per-image token shape and storage dtype, payload bytes, storage
  for ImageNet train (1,281,167 images), shards at the default shard size, and encode GFLOP per image at the
  model's size (``torch.utils.flop_counter`` on the meta device: no weights, no memory) for the FLOP-labelled GPU
  estimate of ``docs/tokenizing-imagenet.md``.

Prints tables and writes ``benchmarks/results/encode_scale_<machine>-<date>.json`` (``--json`` to change it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
try:  # the installed tokcli, or a snapshot on PYTHONPATH (a tree others are editing makes runs fail mid-way)
    import tokcli  # noqa: F401
except ImportError:
    sys.path.insert(1, str(REPO))

from run import machine_name  # noqa: E402

IMAGENET_TRAIN = 1_281_167
DEFAULT_SHARD = 10_000
CONFIGS = ("1r1t", "1r2t", "2r")


# --------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------
def source_photos() -> list[Path]:
    photos = sorted((REPO / "data" / "train").glob("*.png")) + sorted((REPO / "data" / "heldout").glob("*.png"))
    return photos or sorted((REPO / "samples").glob("*.jpg"))


def make_images(n: int, classes: int, dest: Path, seed: int = 0) -> list[str]:
    """n JPEGs (quality 90) under dest/CLASS/CLASS_ID.JPEG: random crops of the photos resized to a short side of
    256..500 px and an aspect ratio of 3:4..4:3 (ImageNet's typical range). Returns the keys in order."""
    from PIL import Image

    photos = source_photos()
    if not photos:
        raise SystemExit("no photos: run scripts/build_dataset.py --install or keep samples/*.jpg")
    rng = random.Random(seed)
    srcs = [Image.open(p).convert("RGB") for p in photos]
    keys = []
    per = math.ceil(n / classes)
    for i in range(n):
        cls = f"n{1440764 + 1000 * (i // per):08d}"
        key = f"{cls}/{cls}_{10000 + 37 * i}.JPEG"
        im = srcs[i % len(srcs)]
        W, H = im.size
        cw, ch = rng.randint(W // 2, W), rng.randint(H // 2, H)
        x0, y0 = rng.randint(0, W - cw), rng.randint(0, H - ch)
        short, ar = rng.randint(256, 500), rng.uniform(0.75, 4 / 3)
        w, h = (round(short * ar), short) if ar >= 1 else (short, round(short / ar))
        out = dest / key
        out.parent.mkdir(parents=True, exist_ok=True)
        im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC).save(out, quality=90)
        keys.append(key)
    return keys


def imagenet_tar(folder: Path, dest: Path) -> None:
    """The ImageNet train layout: one uncompressed tar holding CLASS.tar per class, each holding CLASS_ID.JPEG."""
    with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as outer:
        for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                for f in sorted(cls.iterdir()):
                    inner.add(f, arcname=f.name)
            info = tarfile.TarInfo(cls.name + ".tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)


def datasets(work: Path, counts: list[int], classes: int) -> dict[int, dict[str, Path]]:
    """For each image count: {"folder": ..., "tar": ..., "one": a folder of the first image}."""
    top = max(counts)
    pool = work / f"pool{top}"
    if not (pool / ".done").exists():
        shutil.rmtree(pool, ignore_errors=True)
        make_images(top, classes, pool)
        (pool / ".done").write_text("ok")
    files = sorted(p for p in pool.rglob("*.JPEG"))
    out = {}
    for n in sorted(set(counts)):
        d = work / f"n{n}"
        if not (d / ".done").exists():
            shutil.rmtree(d, ignore_errors=True)
            for f in files[:n]:
                t = d / "train" / f.relative_to(pool)
                t.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, t)
            imagenet_tar(d / "train", d / "train.tar")
            one = d / "one" / files[0].relative_to(pool)
            one.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[0], one)
            (d / ".done").write_text("ok")
        out[n] = {"folder": d / "train", "tar": d / "train.tar", "one": d / "one"}
    return out


# --------------------------------------------------------------------------------------------------------
# scale: whole commands
# --------------------------------------------------------------------------------------------------------
def bin_path(name: str) -> str:
    p = Path(sys.executable).with_name(name)
    return str(p) if p.exists() else name


def command(config: str, inp: Path, model: str, out: Path, shard: int, batch: int, workers: int
            ) -> tuple[list[str], dict[str, str]]:
    tail = ["encode", str(inp), "-m", model, "-o", f"{out}/", "--shard-size", str(shard), "-b", str(batch),
            "-j", str(workers), "--labels", "folder", "-q", "--device", "cpu"]
    threads = "2" if config == "1r2t" else "1"
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if config == "2r":
        return [bin_path("torchrun"), "--standalone", "--nproc_per_node=2", "-m", "tokcli", *tail], env
    return [bin_path("tok"), *tail], env


def set_digest(out: Path):
    from tokcli.core.tokens import read_token_file

    tf = read_token_file(out)
    return tf.keys, np.asarray(tf.array)


def run_scale(a, data, models) -> dict:
    cells = [(m, inp, cfg) for m, _ in models for inp in ("folder", "tar", "one") for cfg in CONFIGS]
    if a.quick:
        cells = [c for c in cells if c[1] != "tar" or c[2] == "2r"]
    times: dict[tuple, list[float]] = {c: [] for c in cells}
    equal: dict[tuple, list[float]] = {c: [] for c in cells}
    ref: dict[str, tuple] = {}
    n_of = dict(models)
    out = Path(a.work) / "out"
    cmds = {}
    for r in range(a.rounds):
        k = r % len(cells)
        order = cells[k:] + cells[:k]
        for c in order:
            m, inp, cfg = c
            n = n_of[m]
            src = data[n][inp]
            shard = max(1, n // 8)
            cmd, env = command(cfg, src, m, out, shard, a.batch_size, a.workers)
            cmds[c] = " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd)
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            p = subprocess.run(cmd, env={**os.environ, **env}, cwd=a.work, capture_output=True, text=True)
            t = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"failed ({p.returncode}): {cmds[c]}\n{p.stderr[-2000:]}")
            times[c].append(t)
            if inp != "one":
                keys, arr = set_digest(out)
                if m not in ref:
                    ref[m] = (keys, arr)
                rk, ra = ref[m]
                equal[c].append(float(np.mean(ra == arr)) if keys == rk and ra.shape == arr.shape else 0.0)
            if inp == "folder" and cfg == "2r":  # kept for the bytes part (the set of a torchrun job)
                keep = Path(a.work) / "sets" / m
                shutil.rmtree(keep, ignore_errors=True)
                keep.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(out), str(keep))
            print(f"  round {r + 1} {m:12s} {inp:6s} {cfg}: {t:6.2f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for m, n in models:
        for inp in ("folder", "tar"):
            for cfg in CONFIGS:
                c = (m, inp, cfg)
                if c not in times:
                    continue
                ts, t1 = times[c], times[(m, "one", cfg)]
                med, med1 = statistics.median(ts), statistics.median(t1)
                rows.append({"model": m, "input": inp, "config": cfg, "images": n, "shard_size": max(1, n // 8),
                             "seconds": ts, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                             "img_s": n / med, "one_image_s": t1, "one_image_median_s": med1,
                             "steady_img_s": (n - 1) / (med - med1) if med > med1 else None,
                             "tokens_equal_to_1r1t_folder": min(equal[c]) if equal[c] else None,
                             "command": cmds[c]})
    for row in rows:  # speed-ups against the 1r1t row of the same model and input
        base = next(x for x in rows if x["model"] == row["model"] and x["input"] == row["input"]
                    and x["config"] == "1r1t") if any(x["model"] == row["model"] and x["input"] == row["input"]
                                                      and x["config"] == "1r1t" for x in rows) else None
        if base:
            row["speedup_whole"] = row["img_s"] / base["img_s"]
            if row["steady_img_s"] and base["steady_img_s"]:
                row["speedup_steady"] = row["steady_img_s"] / base["steady_img_s"]
                row["pct_of_linear_steady"] = 100 * row["speedup_steady"] / (1 if row["config"] == "1r1t" else 2)
    return {"rows": rows}


# --------------------------------------------------------------------------------------------------------
# breakdown: decode vs model, in-process
# --------------------------------------------------------------------------------------------------------
def run_breakdown(a, data, models) -> dict:
    import torch

    import tokcli
    from tokcli.core.images import collect_inputs, iter_batches, to_tensor

    rows = []
    for name, n in models:
        model = tokcli.load(name, device="cpu")
        size = model.image_size
        fns, counts = {}, {}
        for inp in ("folder", "tar"):
            items = collect_inputs([str(data[n][inp])])
            for w in (0, 2):
                fns[f"decode {inp} workers={w}"] = (lambda items=items, w=w:
                                                   sum(len(k) for k, _ in iter_batches(items, size, a.batch_size,
                                                                                       workers=w)))
                counts[f"decode {inp} workers={w}"] = len(items)
        items = collect_inputs([str(data[n]["folder"])])[:a.model_images]
        batches = [to_tensor(b) for _, b in iter_batches(items, size, a.batch_size)]

        def enc(threads, batches=batches):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                for x in batches:
                    model.encode(x)
            torch.set_num_threads(1)

        for t in (1, 2):
            fns[f"model threads={t}"] = lambda t=t: enc(t)
            counts[f"model threads={t}"] = len(items)
        enc(1)  # warm-up
        times = {k: [] for k in fns}
        for _ in range(a.rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        res = {k: {"images": counts[k], "seconds": v, "ms_per_image": 1e3 * statistics.median(v) / counts[k],
                   "img_s": counts[k] / statistics.median(v), "spread_ms": [1e3 * min(v) / counts[k],
                                                                          1e3 * max(v) / counts[k]]}
               for k, v in times.items()}
        dec, mod = res["decode folder workers=0"]["ms_per_image"], res["model threads=1"]["ms_per_image"]
        rows.append({"model": name, "image_size": size, "batch_size": a.batch_size, "parts": res,
                     "decode_share_1_core": dec / (dec + mod)})
        print(f"  {name}: decode {dec:.1f} ms/img, model {mod:.1f} ms/img (1 thread), "
              f"decode share {dec / (dec + mod):.0%}", flush=True)
        del model
    return {"rows": rows}


# --------------------------------------------------------------------------------------------------------
# bytes: tok info on the encoded sets, and the writer at larger shard sizes
# --------------------------------------------------------------------------------------------------------
def imagenet_keys(n: int, per_class: int = 1300) -> tuple[list[str], np.ndarray]:
    rng = random.Random(1)
    keys, labels = [], []
    for i in range(n):
        c = i // per_class
        cls = f"n{1440764 + 7919 * c:08d}"
        keys.append(f"{cls}/{cls}_{rng.randint(1, 99999)}_{i}.JPEG")
        labels.append(c)
    return keys, np.asarray(labels, dtype=np.int64)


def run_bytes(a, data, models) -> dict:
    from tokcli.core.token_set import bytes_report
    from tokcli.core.tokens import read_token_file, write_manifest, write_token_file

    rows, synth = [], []
    out = Path(a.work) / "bytes"
    for name, n in models:
        shard = max(1, n // 8)
        d = Path(a.work) / "sets" / name
        if not (d / "manifest.json").exists():  # not left by the scale part: encode it now
            shutil.rmtree(d, ignore_errors=True)
            cmd, env = command("1r2t", data[n]["folder"], name, d, shard, a.batch_size, a.workers)
            subprocess.run(cmd, env={**os.environ, **env}, cwd=a.work, check=True, capture_output=True)
        p = subprocess.run([bin_path("tok"), "info", f"{d}/"], cwd=a.work, check=True, capture_output=True,
                           text=True)
        info = json.loads(p.stdout[p.stdout.index("{"):p.stdout.rindex("}") + 1])
        b = info["bytes"]
        rows.append({"model": name, "images": n, "shard_size": shard, "source": "tok encode", **b,
                     "overhead_pct": 100 * (b["bytes_per_image"] / b["payload_bytes_per_image"] - 1)})
        first = read_token_file(d / "part-00000.npz")
        header, kind, shape, dtype = first.header, first.kind, first.array.shape[1:], first.array.dtype
        if header.get("labels"):  # every shard's header names the classes: ImageNet has 1,000 of them
            header = {**header, "labels": {**header["labels"],
                                           "classes": [f"n{1440764 + 7919 * c:08d}" for c in range(1000)]}}
        rng = np.random.default_rng(0)
        sizes = [100, 1000, 10_000] if not a.quick else [100, 1000]
        for s in sizes:
            total = max(s, 1000)
            keys, labels = imagenet_keys(total)
            sd = out / f"{name}-synthetic-{s}"
            shutil.rmtree(sd, ignore_errors=True)
            sd.mkdir(parents=True)
            names = []
            for i, lo in enumerate(range(0, total, s)):
                hi = min(lo + s, total)
                if kind == "indices":
                    arr = rng.integers(0, int(header["tokens"]["codebook_size"]), (hi - lo, *shape)).astype(dtype)
                else:
                    arr = rng.standard_normal((hi - lo, *shape)).astype(dtype)
                h = {**header, "shard": {"index": i, "inputs": [lo, hi], "failed": []}}
                write_token_file(sd / f"part-{i:05d}.npz", header=h, keys=keys[lo:hi], labels=labels[lo:hi],
                                 **{kind: arr})
                names.append(f"part-{i:05d}.npz")
            write_manifest(sd, names, header)
            b = bytes_report(f"{sd}/")
            synth.append({"model": name, "images": total, "shard_size": s, "source": "write_token_file, synthetic "
                          "ImageNet-style keys + int64 labels", **b,
                          "overhead_pct": 100 * (b["bytes_per_image"] / b["payload_bytes_per_image"] - 1),
                          "overhead_bytes_per_image": b["bytes_per_image"] - b["payload_bytes_per_image"]})
            shutil.rmtree(sd, ignore_errors=True)
    return {"encoded": rows, "synthetic": synth}


# --------------------------------------------------------------------------------------------------------
# registry: shapes, bytes, FLOPs
# --------------------------------------------------------------------------------------------------------
SOFTVQ_ENCODER = {"softvq-l-64": "vit_large_patch14_dinov2.lvd142m"}  # the others: ViT-B (registry descriptions)


def cpu_flops(fam, args) -> float:
    """Encode FLOPs of one image, counted on a CPU model with random weights (for layers the meta device lacks).
    A SoftVQ decoder is not used by encode: it is swapped for one tiny block to save the memory."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if fam.name == "softvq":
        args = {**args, "decoder_model": "tok_vit_tiny", "decoder_depth": 1}
    m = fam.build(args).eval()
    x = torch.zeros(1, 3, m.image_size, m.image_size)
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():  # (inference_mode trips FlopCounterMode's module tracker on CODA)
        m.encode(x)
    return fc.get_total_flops()


def registry_table(with_flops: bool = True) -> list[dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tokcli.core import registry
    from tokcli.core.tokens import index_dtype

    fams = registry.families()
    rows = []
    for name, e in sorted(registry._ENTRIES.items()):
        fam = fams[e.family]
        if fam.kind != "tokenizer":
            continue
        args = dict(e.model_args)
        shipped = registry.SHIPPED_DIR / name / "config.json"
        if shipped.exists():
            args = json.loads(shipped.read_text())["model_args"]
        if e.family == "softvq" and "encoder_model" not in args:
            enc = SOFTVQ_ENCODER.get(name, "vit_base_patch14_dinov2.lvd142m")
            args = {"encoder_model": enc, "decoder_model": enc, "enc_patch_size": 16, "dec_patch_size": 16,
                    "codebook_size": 8192, "num_codebooks": 1, **args}
        row = {"model": name, "family": e.family, "shipped": shipped.exists()}
        try:
            with torch.device("meta"):
                m = fam.build(args).eval()
            spec = m.spec
            row.update(image_size=m.image_size, kind=spec.kind, shape=list(spec.shape),
                       codebook_size=spec.codebook_size,
                       params_m=round(sum(p.numel() for p in m.parameters()) / 1e6, 1))
        except Exception as ex:  # noqa: BLE001
            row["error"] = f"{type(ex).__name__}: {ex}"[:200]
            rows.append(row)
            continue
        count = int(np.prod(spec.shape))
        if spec.kind == "indices":
            dt_ = index_dtype(int(spec.codebook_size) - 1)
            row.update(dtype=str(dt_), bits_per_token=math.ceil(math.log2(spec.codebook_size)),
                       payload_bytes=count * dt_.itemsize,
                       packed_bytes=math.ceil(count * math.ceil(math.log2(spec.codebook_size)) / 8))
        else:
            row.update(dtype="float32 (float16 with --latent-dtype float16)", payload_bytes=count * 4,
                       payload_bytes_fp16=count * 2)
        row["imagenet_train_gb"] = row["payload_bytes"] * IMAGENET_TRAIN / 1e9
        row["shards_at_10000"] = math.ceil(IMAGENET_TRAIN / DEFAULT_SHARD)
        if with_flops:
            try:
                with torch.device("meta"):
                    x = torch.zeros(1, 3, m.image_size, m.image_size)
                fc = FlopCounterMode(display=False)
                with fc, torch.inference_mode():
                    m.encode(x)
                row["encode_gflop"] = fc.get_total_flops() / 1e9
            except Exception:  # noqa: BLE001 - some layers need real tensors: random weights on the CPU
                try:
                    row["encode_gflop"] = cpu_flops(fam, args) / 1e9
                    row["flops_on"] = "cpu, random weights" + (", decoder replaced (encode only)"
                                                               if e.family == "softvq" else "")
                except Exception as ex:  # noqa: BLE001
                    row["encode_gflop"] = None
                    row["flop_error"] = f"{type(ex).__name__}: {ex}"[:160]
        rows.append(row)
        del m
    return rows


def gpu_measured() -> list[dict]:
    """Measured GPU encode img/s of earlier sessions (benchmarks/results), mapped to registry models by
    architecture (the WeTok encoder arguments)."""
    from tokcli.core import registry

    registry.families()
    res = HERE / "results"
    sys.path.insert(0, str(HERE))
    out = []
    try:
        from wetok_speed import CONFIGS as WCFG
    except Exception:  # noqa: BLE001
        WCFG = {}
    keys = ("ch", "ch_mult", "num_res_blocks", "z_channels", "groups")
    for fname in ("wetok_speed_h100_fp32_autotune.json", "wetok_speed_h100_tf32_autotune.json"):
        p = res / fname
        if not p.exists():
            continue
        d = json.loads(p.read_text())
        env = d["env"]
        for r in d["results"]:
            cfg = WCFG.get(r["config"])
            if cfg is None:
                continue
            same = [n for n, e in sorted(registry._ENTRIES.items()) if e.family == "wetok" and e.model_args
                    and all(e.model_args.get(k) == cfg.get(k) for k in keys)
                    and bool(e.model_args.get("generative_decoder")) == bool(cfg.get("generative_decoder"))]
            out.append({"file": f"benchmarks/results/{fname}", "config": r["config"], "models": same,
                        "device": env["device"], "precision": "tf32" if env.get("tf32") else "fp32",
                        "batch": r["batch"], "encode_img_s": r.get("encode_img_s"),
                        "input": "random tensors (model only)"})
    p = res / "nvidia-h100-80gb-hbm3-2026-11-22.json"
    if p.exists():
        d = json.loads(p.read_text())
        th = d["sections"]["throughput"]
        for r in th["results"]:
            out.append({"file": f"benchmarks/results/{p.name}", "config": th["model"]["name"],
                        "models": [th["model"]["name"]], "device": th["protocol"]["device"],
                        "precision": th["protocol"]["precision"], "batch": r["batch"],
                        "encode_img_s": r["encode_img_s"], "input": th["protocol"]["input"]})
    return out


# --------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="wetok-tiny=128,softvq-tiny=256",
                    help="comma list of MODEL[=N images] (default N: --images)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--classes", type=int, default=8, help="class folders / class tars of the test data")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-b", "--batch-size", type=int, default=8)
    ap.add_argument("-j", "--workers", type=int, default=0, help="tok encode -j (decode threads)")
    ap.add_argument("--model-images", type=int, default=32, help="images for the in-process model timing")
    ap.add_argument("--parts", default="scale,breakdown,bytes,registry")
    ap.add_argument("--work", default="/tmp/encode_scale")
    ap.add_argument("--quick", action="store_true", help="1 round, 32 images, fewer cells")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.images, a.model_images = 1, 32, 16
        a.models = ",".join(m.split("=")[0] for m in a.models.split(","))
    return a


def fmt(x, d=1):
    return "—" if x is None else f"{x:.{d}f}"


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    parts = set(a.parts.split(","))
    models = []
    for m in a.models.split(","):
        name, _, n = m.partition("=")
        models.append((name, int(n) if n else a.images))
    machine = machine_name("cpu")
    env = {"machine": machine, "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "load_avg_start": os.getloadavg(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/encode_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "tokcli": str(Path(sys.modules["tokcli"].__file__).parent), "git_head": git_head(),
           "models": models, "rounds": a.rounds, "batch_size": a.batch_size, "workers": a.workers}
    print(f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, load {env['load_avg_start']}", flush=True)
    doc = {"env": env}
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = datasets(work, [n for _, n in models], a.classes) if parts & {"scale", "breakdown", "bytes"} else {}
    t_all = time.perf_counter()
    if "scale" in parts:
        print("scale: whole tok encode commands", flush=True)
        doc["scale"] = run_scale(a, data, models)
    if "breakdown" in parts:
        print("breakdown: decode vs model, in-process", flush=True)
        doc["breakdown"] = run_breakdown(a, data, models)
    if "bytes" in parts:
        print("bytes: tok info", flush=True)
        doc["bytes"] = run_bytes(a, data, models)
    if "registry" in parts:
        doc["registry"] = registry_table()
        doc["gpu_measured"] = gpu_measured()
    env["load_avg_end"] = os.getloadavg()
    env["seconds"] = time.perf_counter() - t_all

    # ---- tables
    if "scale" in doc:
        print("\n| model | input | config | N | whole command s (min-max) | img/s | 1-image s | steady img/s | "
              "speed-up whole / steady vs 1r1t | steady % of linear | tokens equal |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in doc["scale"]["rows"]:
            print(f"| {r['model']} | {r['input']} | {r['config']} | {r['images']} | {r['median_s']:.2f} "
                  f"({r['min_s']:.2f}-{r['max_s']:.2f}) | {r['img_s']:.2f} | {r['one_image_median_s']:.2f} | "
                  f"{fmt(r['steady_img_s'], 2)} | {fmt(r.get('speedup_whole'), 2)} / "
                  f"{fmt(r.get('speedup_steady'), 2)} | {fmt(r.get('pct_of_linear_steady'), 0)} % | "
                  f"{fmt(100 * r['tokens_equal_to_1r1t_folder'], 2)} % |")
    if "breakdown" in doc:
        print("\n| model | px | decode folder w0 / w2 ms/img | decode tar w0 / w2 ms/img | model 1t / 2t ms/img | "
              "decode share (1 core) |")
        print("|---|---|---|---|---|---|")
        for r in doc["breakdown"]["rows"]:
            p = {k: v["ms_per_image"] for k, v in r["parts"].items()}
            print(f"| {r['model']} | {r['image_size']} | {p['decode folder workers=0']:.1f} / "
                  f"{p['decode folder workers=2']:.1f} | {p['decode tar workers=0']:.1f} / "
                  f"{p['decode tar workers=2']:.1f} | {p['model threads=1']:.1f} / {p['model threads=2']:.1f} | "
                  f"{100 * r['decode_share_1_core']:.0f} % |")
    if "bytes" in doc:
        print("\n| model | source | images | shard size | payload B/img | on disk B/img | overhead |")
        print("|---|---|---|---|---|---|---|")
        for r in doc["bytes"]["encoded"] + doc["bytes"]["synthetic"]:
            print(f"| {r['model']} | {r['source'][:16]} | {r['n']} | {r['shard_size']} | "
                  f"{r['payload_bytes_per_image']:.0f} | {r['bytes_per_image']:.1f} | {r['overhead_pct']:.2f} % |")
    if "registry" in doc:
        print("\n| model | px | kind | shape | dtype | payload B/img | ImageNet train GB | shards | encode GFLOP |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in doc["registry"]:
            if "error" in r:
                print(f"| {r['model']} | error: {r['error']} |")
                continue
            print(f"| {r['model']} | {r['image_size']} | {r['kind']} | {'x'.join(map(str, r['shape']))} | "
                  f"{r['dtype'].split(' ')[0]} | {r['payload_bytes']} | {r['imagenet_train_gb']:.2f} | "
                  f"{r['shards_at_10000']} | {fmt(r.get('encode_gflop'))} |")

    path = Path(a.json) if a.json else HERE / "results" / f"encode_scale_{machine}-{dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
