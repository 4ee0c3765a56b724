"""`tok bench`: one evaluation protocol for every tokenizer (docs/evaluation.md).

    tok bench {psnr,ssim,lpips,rfid,usage,all} DATA -m MODEL [--n N] [--size S] [--json] [--report report.md]
    tok bench {psnr,ssim,lpips,rfid,usage,all} IMAGES --tokens codes/    (score stored tokens, no encode)
    tok bench usage codes/                                               (usage / bpp from the tokens alone)
    tok bench throughput -m MODEL [--batch-size 1,8] [--size S] [--precision fp32|tf32|bf16]
    tok bench stats DATA -o ref.npz
    tok bench gfid -m GEN --ref-stats ref.npz [--class all] [-n N | --num-samples N] [--steps S] [--cfg C]
    tok bench report RESULT.json... -o report.md

Many GPUs or processes: torchrun --nproc_per_node=N -m tokcli bench rfid DATA -m MODEL (rank 0 writes).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from tokcli.cli import generate as gen_cli
from tokcli.cli.common import (CfgOpt, CompileOpt, DeviceOpt, LatentDtypeOpt, MemoryFormatOpt, ModelOpt, PrecisionOpt,
                               QuietOpt, SamplerOpt, SeedOpt, SkipOpt, StepsOpt, WorkersOpt, cli_errors, err,
                               report_failures, sampler_options)

app = typer.Typer(help="Measure tokenizers under one protocol (JSON with --json; every choice recorded).",
                  no_args_is_help=True)

DataArg = Annotated[list[str], typer.Argument(help="image files and/or folders (recursive); - reads a list of "
                                                   "paths from stdin")]
SizeOpt = Annotated[Optional[int], typer.Option("--size", "--image-size", min=8,
                                                help="ADM centre-crop size [default: the model's]")]
BenchBatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="images per forward pass")]
DownloadOpt = Annotated[bool, typer.Option("--download", help="fetch a missing pretrained file (Inception, LPIPS "
                                                              "backbone) into $TORCH_HOME/hub/checkpoints; also "
                                                              "TOK_DOWNLOAD=1; never under HF_HUB_OFFLINE / "
                                                              "TOK_OFFLINE")]

METRIC_HELP = {
    "psnr": "PSNR (uint8 rounded, per image, range 255, mean over images)",
    "ssim": "SSIM (Wang et al.: Gaussian 11x11, sigma 1.5, uint8)",
    "lpips": "LPIPS v0.1 (lpips package, AlexNet by default; pretrained backbone from $TORCH_HOME or "
             "--lpips-weights)",
    "rfid": "rFID: FID Inception statistics of the originals (or --ref-stats) vs the reconstructions",
    "usage": "Codebook usage and perplexity per group, bits per pixel (DATA may be one token set folder or .npz: "
             "then from the stored tokens alone)",
    "all": "Every metric in one pass over the reconstructions (metrics whose weights are missing are skipped and "
           "listed, unless --strict)",
}
SETS = {"psnr": ["psnr", "bpp"], "ssim": ["ssim", "bpp"], "lpips": ["lpips", "bpp"], "rfid": ["rfid", "bpp"],
        "usage": ["usage", "bpp"], "all": ["psnr", "ssim", "lpips", "rfid", "usage", "bpp"]}


def _summary(result: dict) -> str:
    m = result["metrics"]
    p = result["protocol"]
    parts = [f"{result['model']['name']}  N={p['n_images']}  {p['image_size']}px"]
    for k, fmt in (("psnr", "PSNR {:.2f} dB"), ("ssim", "SSIM {:.4f}"), ("lpips", "LPIPS {:.4f}"),
                   ("rfid", "rFID {:.3f}")):
        if k in m:
            parts.append(fmt.format(m[k]))
    if "usage" in m:
        parts.append(f"usage {100 * m['usage']['usage']:.1f}%  perplexity {m['usage']['perplexity']:.1f}")
    if "bpp" in m:
        parts.append(f"{m['bpp']['tokens']:.4g} bpp")
    for k, why in result.get("skipped", {}).items():
        parts.append(f"{k}: skipped")
    return "  ".join(parts)


def _emit(result: dict, *, as_json: bool, output: Optional[str]) -> None:
    if output:
        from tokcli.core.atomic import atomic_write_text

        atomic_write_text(output, json.dumps(result, indent=2, default=str) + "\n")
    if as_json:
        print(json.dumps(result, default=str), flush=True)
    else:
        print(_summary(result), flush=True)


def _check_output_paths(*paths: Optional[str], folders: tuple = ()) -> None:
    """Refuse an output that cannot be written before the (long) evaluation, not after it. Missing parent folders
    are fine (the writers create them, as `tok encode -o` does); a file in their place is not. ``folders``: outputs
    that are folders (``--save-recon``)."""
    from pathlib import Path

    from tokcli.errors import TokUsageError

    for p, is_folder in [(p, False) for p in paths] + [(p, True) for p in folders]:
        if not p or p == "-":
            continue
        q = Path(p)
        if q.is_dir() != is_folder and q.exists():
            raise TokUsageError(f"{p} is a folder; give a file name" if not is_folder else
                                f"{p} is a file; --save-recon takes a folder")
        parent = q.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise TokUsageError(f"cannot write {p}: {parent} is a file, not a folder")


TokensOpt = Annotated[Optional[str], typer.Option("--tokens", help="score these stored tokens (a token set folder "
                                                                   "or .npz from tok encode) instead of encoding "
                                                                   "DATA again; DATA are their original images")]


def _evaluate(which: str, data: list[str], tokens: Optional[str], kw: dict):
    """The image bench, the bench of stored tokens against DATA (``--tokens``), or, for ``usage`` of a single
    token set / file, the token-only figures (tokcli/bench/stored.py)."""
    from tokcli.bench import stored
    from tokcli.core.images import collect_inputs
    from tokcli.errors import TokUsageError

    if tokens is None and len(data) == 1 and stored.looks_like_tokens(data[0]):
        if which != "usage":
            raise TokUsageError(f"{data[0]} holds tokens; tok bench {which} needs their images too: "
                                f"tok bench {which} IMAGES --tokens {data[0]}")
        if kw["save_recon"]:
            raise TokUsageError("--save-recon: tok bench usage of stored tokens decodes nothing")
        return stored.evaluate_tokens(data[0], **kw)
    if tokens == "-" and "-" in data:
        raise TokUsageError("--tokens - and DATA - cannot both read stdin")
    items = collect_inputs(data, stdin=sys.stdin if "-" in data else None)
    if tokens is not None:
        return stored.evaluate_stored(items, tokens, **kw)
    from tokcli.bench import evaluate

    return evaluate(items, **kw)


def _metric_command(which: str):
    def command(
        data: DataArg,
        model: ModelOpt = None,
        n: Annotated[Optional[int], typer.Option("--n", min=1, help="only the first N images (sorted order)")] = None,
        size: SizeOpt = None,
        tokens: TokensOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the full result as one JSON line")] = False,
        output: Annotated[Optional[str], typer.Option("--output", "-o", help="also write the JSON here")] = None,
        report: Annotated[Optional[str], typer.Option("--report", help="write a markdown report with a "
                                                                       "rate-distortion plot and an image grid")] = None,
        save_recon: Annotated[Optional[str], typer.Option("--save-recon", help="keep the reconstructions as PNGs "
                                                                               "(for other evaluators)")] = None,
        ref_stats: Annotated[Optional[str], typer.Option("--ref-stats", help="rFID reference statistics (ADM mu/sigma "
                                                                             "npz) instead of the originals")] = None,
        psnr_mode: Annotated[str, typer.Option("--psnr-mode", help="tok | wetok | flowmo | llamagen (legacy modes "
                                                                   "reproduce official scripts)")] = "tok",
        ssim_mode: Annotated[str, typer.Option("--ssim-mode", help="tok | wetok | flowmo | llamagen")] = "tok",
        lpips_net: Annotated[str, typer.Option("--lpips-net", help="alex (the protocol's) or vgg")] = "alex",
        lpips_weights: Annotated[Optional[str], typer.Option("--lpips-weights", help="torchvision backbone file "
                                                                                     "for LPIPS")] = None,
        inception_weights: Annotated[Optional[str], typer.Option("--inception-weights", help="FID Inception "
                                                                 "weights (pt_inception-2015-12-05-6726825d.pth)")] = None,
        strict: Annotated[bool, typer.Option("--strict", help="all: fail instead of skipping a metric whose "
                                                              "weights are missing")] = False,
        download: DownloadOpt = False,
        device: DeviceOpt = "auto",
        batch_size: BenchBatchOpt = 8,
        workers: WorkersOpt = 0,
        seed: SeedOpt = 0,
        steps: StepsOpt = None,
        cfg: CfgOpt = None,
        sampler: SamplerOpt = None,
        precision: PrecisionOpt = "fp32",
        latent_dtype: LatentDtypeOpt = None,
        skip_errors: SkipOpt = False,
        quiet: QuietOpt = False,
    ):
        with cli_errors():
            _check_output_paths(output, report, folders=(save_recon,))
            result, errors, grid = _evaluate(which, data, tokens, dict(
                model=model, metrics=SETS[which], n=n, image_size=size, device=device, batch_size=batch_size,
                workers=workers, seed=seed, precision=precision, skip_errors=skip_errors, quiet=quiet,
                save_recon=save_recon, psnr_mode=psnr_mode, ssim_mode=ssim_mode, lpips_net=lpips_net,
                lpips_weights=lpips_weights, inception_weights=inception_weights, ref_stats=ref_stats,
                strict=strict or which != "all", inputs=data, download=download, latent_dtype=latent_dtype,
                sampler=sampler_options(steps, cfg, sampler)))
            from tokcli.core.distributed import dist_env

            if dist_env()[0] != 0:  # torchrun: rank 0 prints and writes; the others share its exit code
                if errors:
                    raise typer.Exit(1)
                return
            _emit(result, as_json=as_json, output=output)
            if report:
                from tokcli.report import write_report

                paths = write_report([result], report, grid=grid)
                if not quiet:
                    err("report: " + ", ".join(str(p) for p in paths))
            report_failures(errors)

    command.__doc__ = METRIC_HELP[which] + "."
    return command


for _name in ("psnr", "ssim", "lpips", "rfid", "usage", "all"):
    app.command(_name)(_metric_command(_name))


@app.command("throughput")
def throughput_cmd(
    model: ModelOpt = None,
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="comma list of batch sizes")] = "1,8",
    size: SizeOpt = None,
    precision: PrecisionOpt = "fp32",
    warmup: Annotated[int, typer.Option("--warmup", min=0)] = 2,
    iters: Annotated[int, typer.Option("--iters", min=1, help="timed repeats (the median is reported)")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as one JSON line")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="also write the JSON here")] = None,
    device: DeviceOpt = "auto",
    memory_format: MemoryFormatOpt = None,
    compile: CompileOpt = False,
    peaks: Annotated[bool, typer.Option("--peaks/--no-peaks", help="measure the device's fp32 matmul / conv peak "
                                                                   "FLOP/s and report the share reached")] = True,
    quiet: QuietOpt = False,
):
    """Encode / decode / reconstruct images per second, peak memory, model GFLOP per image, achieved GFLOP/s and
    its share of the device's measured fp32 conv peak (warm-up excluded, median of repeats)."""
    with cli_errors():
        from tokcli.bench import throughput
        from tokcli.errors import TokUsageError

        try:
            sizes = [int(b) for b in batch_size.split(",") if b.strip()]
        except ValueError:
            sizes = []
        if not sizes:
            raise TokUsageError(f"--batch-size takes a comma list of integers, got {batch_size!r}")
        _check_output_paths(output)
        result = throughput(model, batch_sizes=sizes, size=size, device=device, precision=precision, warmup=warmup,
                            iters=iters, quiet=quiet, memory_format=memory_format, compile=compile, peaks=peaks)
        if output:
            from tokcli.core.atomic import atomic_write_text

            atomic_write_text(output, json.dumps(result, indent=2) + "\n")
        if as_json:
            print(json.dumps(result), flush=True)
        else:
            for r in result["results"]:
                share = lambda d: f" ({100 * r[d + '_of_conv_peak']:.0f}% of conv peak)" if result["limits"] else ""
                print(f"{result['model']['name']}  batch {r['batch']}  " + "  ".join(
                    f"{d} {r[d + '_img_s']:.2f} img/s {r[d + '_gflop_s']:.1f} GFLOP/s{share(d)}"
                    for d in ("encode", "decode")), flush=True)
            if result["limits"]:
                lim = result["limits"]
                print(f"{lim['device']}: fp32 peaks measured: conv {lim['conv_flop_s'] / 1e9:.1f} GFLOP/s, "
                      f"matmul {lim['matmul_flop_s'] / 1e9:.1f} GFLOP/s", flush=True)


@app.command("stats")
def stats_cmd(
    data: DataArg,
    output: Annotated[str, typer.Option("--output", "-o", help="statistics file to write (ADM mu/sigma .npz)")],
    size: Annotated[int, typer.Option("--size", "--image-size", min=8, help="ADM centre-crop size")] = 256,
    inception_weights: Annotated[Optional[str], typer.Option("--inception-weights", help="FID Inception weights")] = None,
    download: DownloadOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BenchBatchOpt = 50,
    workers: WorkersOpt = 0,
    skip_errors: SkipOpt = False,
    quiet: QuietOpt = False,
):
    """FID reference statistics of a folder for --ref-stats: ADM mu/sigma npz, ImageNet-val say."""
    with cli_errors():
        from tokcli.bench import folder_stats
        from tokcli.core.images import collect_inputs

        _check_output_paths(output)
        items = collect_inputs(data, stdin=sys.stdin if "-" in data else None)
        summary, errors = folder_stats(items, output, size=size, inception_weights=inception_weights, device=device,
                                       batch_size=batch_size, workers=workers, skip_errors=skip_errors, quiet=quiet,
                                       download=download)
        from tokcli.core.distributed import dist_env

        if dist_env()[0] != 0:  # torchrun: rank 0 reports
            if errors:
                raise typer.Exit(1)
            return
        print(json.dumps(summary), flush=True)
        report_failures(errors)


@app.command("gfid")
def gfid_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="generator: registry name, local-dir:PATH or a "
                                                             "generator folder")],
    ref_stats: Annotated[Optional[str], typer.Option("--ref-stats", help="FID reference statistics: an ADM "
                                                                         "reference batch (VIRTUAL_imagenet256_"
                                                                         "labeled.npz) or tok bench stats "
                                                                         "output")] = None,
    classes: gen_cli.ClassOpt = "all",
    n: Annotated[Optional[int], typer.Option("-n", help="samples per class [default: 1]")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", help="samples in all, split evenly over "
                                                                             "the classes")] = None,
    steps: gen_cli.StepsOpt = None,
    cfg: gen_cli.CfgOpt = None,
    guidance_interval: gen_cli.IntervalOpt = None,
    sampler: gen_cli.SamplerOpt = None,
    path_type: gen_cli.PathTypeOpt = None,
    temperature: gen_cli.TemperatureOpt = None,
    top_k: gen_cli.TopKOpt = None,
    top_p: gen_cli.TopPOpt = None,
    seed: gen_cli.GenSeedOpt = 0,
    splits: Annotated[int, typer.Option("--splits", help="Inception Score splits (sample j in split j % splits)")] = 10,
    tokenizer: gen_cli.TokenizerOpt = None,
    inception_weights: Annotated[Optional[str], typer.Option("--inception-weights", help="FID Inception weights "
                                                             "(pt_inception-2015-12-05-6726825d.pth)")] = None,
    download: DownloadOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the full result as one JSON line")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="also write the JSON here")] = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="samples per batch")] = 8,
    quiet: QuietOpt = False,
):
    """Generation FID and Inception Score of a generator's samples (those of tok generate), images/s and network
    calls per image."""
    with cli_errors():
        from tokcli.bench.gfid import gfid
        from tokcli.core.distributed import dist_env

        _check_output_paths(output)
        options = gen_cli.sampler_options(steps, cfg, guidance_interval, sampler, path_type, temperature, top_k,
                                          top_p)
        result = gfid(model, ref_stats=ref_stats, classes=classes, n=n, num_samples=num_samples, sampler=options,
                      seed=seed, batch_size=batch_size, splits=splits, inception_weights=inception_weights,
                      download=download, tokenizer=tokenizer, device=device, quiet=quiet)
        if dist_env()[0] != 0:  # torchrun: rank 0 prints and writes
            return
        if output:
            from tokcli.core.atomic import atomic_write_text

            atomic_write_text(output, json.dumps(result, indent=2, default=str) + "\n")
        if as_json:
            print(json.dumps(result, default=str), flush=True)
        else:
            m, p = result["metrics"], result["protocol"]
            speed = f"{m['images_per_s']:.3g} img/s" if m["images_per_s"] else "img/s n/a"
            print(f"{result['model']['name']}  N={p['n_samples']}  {p['image_size']}px  gFID {m['gfid']:.3f}  "
                  f"IS {m['is']:.2f} +- {m['is_std']:.2f}  {speed}  {m['nfe_per_image']} calls/img", flush=True)


@app.command("report")
def report_cmd(
    results: Annotated[list[str], typer.Argument(help="JSON results written by tok bench ... -o")],
    output: Annotated[str, typer.Option("--output", "-o", help="markdown report to write (PNGs beside it)")],
):
    """Combine saved results of several models into one report with a rate-distortion plot."""
    with cli_errors():
        from tokcli.errors import TokError
        from tokcli.report import write_report

        loaded = []
        for path in results:
            try:
                with open(path, encoding="utf-8") as f:
                    r = json.load(f)
            except (OSError, ValueError) as e:
                raise TokError(f"{path}: not a readable JSON result ({e})") from None
            if (not isinstance(r, dict) or not isinstance(r.get("metrics"), dict) or not isinstance(r.get("model"), dict)
                    or not isinstance(r.get("protocol", {}), dict)):
                raise TokError(f"{path}: not a tok bench result (no 'model' / 'metrics')")
            loaded.append(r)
        for p in write_report(loaded, output):
            print(p, flush=True)
