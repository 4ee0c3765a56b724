"""`tok encode`, `tok decode`, `tok reconstruct`."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from tokcli.cli.common import (BatchOpt, CfgOpt, DeviceOpt, LatentDtypeOpt, ModelOpt, PosteriorOpt, PrecisionOpt, QuietOpt,
                               SamplerOpt, SeedOpt, SizeOpt, SkipOpt, StepsOpt, WorkersOpt, cli_errors, err,
                               report_failures, sampler_options)

InputsArg = Annotated[list[str], typer.Argument(help="image files and/or folders (searched recursively); "
                                                     "- reads a list of paths from stdin")]


def _load(model: Optional[str], device: str, precision: str):
    """The model, loaded under the run's precision (loading may compute, e.g. CODA fuses its LoRA)."""
    import tokcli
    from tokcli.core.device import set_precision

    set_precision(precision)
    return tokcli.load(model, device=device)


def _items(inputs: list[str], image_size: int | None):
    """The inputs, after the checks that need no model (the crop size's bound)."""
    from tokcli.core.images import check_image_size, collect_inputs

    check_image_size(image_size)
    return collect_inputs(inputs, stdin=sys.stdin if "-" in inputs else None)


def _warn_upscaled(res) -> None:
    if res.upscaled:
        err(f"warning: {res.upscaled} image(s) smaller than half of {res.image_size} px were upscaled more than 2x "
            "to the crop size")


def encode_cmd(
    inputs: InputsArg,
    output: Annotated[str, typer.Option("--output", "-o", help="token file to write (.npz), - for stdout")],
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 8,
    workers: WorkersOpt = 0,
    image_size: SizeOpt = None,
    skip_errors: SkipOpt = False,
    sample_posterior: PosteriorOpt = False,
    seed: SeedOpt = 0,
    precision: PrecisionOpt = "fp32",
    latent_dtype: LatentDtypeOpt = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="folder: class labels from ImageFolder-style "
                                                                   "class folders (ROOT/CLASS/IMAGE; sorted names "
                                                                   "-> ids 0..C-1, names in the header)")] = None,
    quiet: QuietOpt = False,
):
    """Encode images (ADM centre crop to the model size) into one self-describing token file."""
    with cli_errors():
        from tokcli import pipeline
        from tokcli.core.labels import check_label_source, folder_classes

        items = _items(inputs, image_size)
        if check_label_source(labels):
            folder_classes([it.key for it in items])  # a key outside any class folder: refused before the model
        pipeline.check_output_file(output)
        tok = _load(model, device, precision)
        res = pipeline.encode(tok, items, ref=pipeline.model_ref(model, tok), output=output, image_size=image_size,
                              batch_size=batch_size, workers=workers, skip_errors=skip_errors, quiet=quiet,
                              precision=precision, sample_posterior=sample_posterior, seed=seed,
                              latent_dtype=latent_dtype, labels=labels)
        _warn_upscaled(res)
        if output != "-":
            err(f"encoded {len(res.keys)} image(s) with {tok.name} -> {output}")
        report_failures(res.errors)


def decode_cmd(
    tokens: Annotated[str, typer.Argument(help="token file (.npz), sharded set folder, or - for stdin")],
    output: Annotated[str, typer.Option("--output", "-o", help="folder for the PNGs (mirrors the keys)")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model to decode with [default: the one "
                                                                       "named in the token file]")] = None,
    force: Annotated[bool, typer.Option("--force", help="decode even if the weights' sha256 differs")] = False,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    sampler: SamplerOpt = None,
    precision: PrecisionOpt = "fp32",
    quiet: QuietOpt = False,
):
    """Decode a token file back to PNG images."""
    with cli_errors():
        from tokcli import pipeline
        from tokcli.core.tokens import read_token_file

        options = sampler_options(steps, cfg, sampler)
        tf = read_token_file(tokens)
        pipeline.check_output_folder(output)
        tok = _load(model or tf.header.get("model"), device, precision)
        res = pipeline.decode(tok, tf, output, batch_size=batch_size, seed=seed, force=force, quiet=quiet,
                              precision=precision, sampler=options)
        err(f"decoded {len(res.written)} image(s) with {tok.name} -> {output}")


def reconstruct_cmd(
    inputs: InputsArg,
    output: Annotated[str, typer.Option("--output", "-o", help="folder for the PNGs (mirrors the input tree)")],
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 8,
    workers: WorkersOpt = 0,
    image_size: SizeOpt = None,
    seed: SeedOpt = 0,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    sampler: SamplerOpt = None,
    skip_errors: SkipOpt = False,
    sample_posterior: PosteriorOpt = False,
    precision: PrecisionOpt = "fp32",
    latent_dtype: LatentDtypeOpt = None,
    quiet: QuietOpt = False,
):
    """Encode then decode images (same code path as encode + decode), writing PNGs that mirror the input tree."""
    with cli_errors():
        from tokcli import pipeline

        options = sampler_options(steps, cfg, sampler)
        items = _items(inputs, image_size)
        pipeline.check_output_folder(output)
        tok = _load(model, device, precision)
        res = pipeline.reconstruct(tok, items, output, image_size=image_size, batch_size=batch_size,
                                   workers=workers, seed=seed, skip_errors=skip_errors, quiet=quiet,
                                   precision=precision, sampler=options, sample_posterior=sample_posterior,
                                   latent_dtype=latent_dtype)
        _warn_upscaled(res)
        err(f"reconstructed {len(res.written)} image(s) with {tok.name} -> {output}")
        report_failures(res.errors)
