"""`tok bench`: measure tokenizers under one protocol (reconstruction metrics for now)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from tokcli.cli.common import (BatchOpt, DeviceOpt, ModelOpt, QuietOpt, SeedOpt, SizeOpt, SkipOpt, WorkersOpt,
                               cli_errors, print_json, report_failures)

app = typer.Typer(help="Measure tokenizers (JSON on stdout).", no_args_is_help=True)

METRICS = ("psnr", "ssim", "lpips", "usage", "bpp")


@app.command("recon")
def recon_cmd(
    inputs: Annotated[list[str], typer.Argument(help="image files and/or folders; - reads a list from stdin")],
    model: ModelOpt = None,
    metrics: Annotated[str, typer.Option("--metrics", help=f"comma-separated subset of {','.join(METRICS)}")] =
    "psnr,ssim,usage,bpp",
    lpips_net: Annotated[str, typer.Option("--lpips-net", help="alex (the protocol's) or vgg")] = "alex",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="also write the JSON result here")] = None,
    save_images: Annotated[Optional[str], typer.Option("--save-images", help="write reconstructions here")] = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 8,
    workers: WorkersOpt = 0,
    image_size: SizeOpt = None,
    seed: SeedOpt = 0,
    skip_errors: SkipOpt = False,
    quiet: QuietOpt = False,
):
    """Reconstruction quality: PSNR / SSIM (uint8, rounded), LPIPS, codebook usage, bits per pixel."""
    with cli_errors():
        from tokcli.errors import TokUsageError

        wanted = [m.strip() for m in metrics.split(",") if m.strip()]
        bad = [m for m in wanted if m not in METRICS]
        if bad or not wanted:
            raise TokUsageError(f"unknown metric(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METRICS)}")
        from tokcli.bench import recon_bench
        from tokcli.core.images import collect_inputs

        items = collect_inputs(inputs, stdin=sys.stdin if "-" in inputs else None)
        result, errors = recon_bench(items, model=model, metrics=wanted, lpips_net=lpips_net, device=device,
                                     batch_size=batch_size, workers=workers, image_size=image_size, seed=seed,
                                     skip_errors=skip_errors, quiet=quiet, save_images=save_images)
        if output:
            from tokcli.core.atomic import atomic_write_text
            import json

            atomic_write_text(output, json.dumps(result, indent=2, default=str) + "\n")
        print_json(result)
        report_failures(errors)
