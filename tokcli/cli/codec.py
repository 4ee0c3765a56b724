"""`tok encode`, `tok decode`, `tok reconstruct`."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from tokcli.cli.common import (BatchOpt, CfgOpt, CompileOpt, DeviceOpt, LatentDtypeOpt, MemoryFormatOpt, ModelOpt,
                               PosteriorOpt, PrecisionOpt, QuietOpt, SamplerOpt, SeedOpt, SizeOpt, SkipOpt, StepsOpt,
                               WorkersOpt, cli_errors, err, report_failures, sampler_options)

InputsArg = Annotated[list[str], typer.Argument(help="image files and/or folders (searched recursively); "
                                                     "- reads a list of paths from stdin")]


def _load(model: Optional[str], device: str, precision: str, speed: dict | None = None):
    """The model, loaded under the run's precision (loading may compute, e.g. CODA fuses its LoRA); ``speed``:
    ``memory_format`` / ``compile`` for :func:`tokcli.load`."""
    import tokcli
    from tokcli.core.device import set_precision

    set_precision(precision)
    return tokcli.load(model, device=device, **(speed or {}))


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
    memory_format: MemoryFormatOpt = None,
    compile: CompileOpt = False,
    latent_dtype: LatentDtypeOpt = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="class labels: 'folder' (ImageFolder-style "
                                                                   "ROOT/CLASS/IMAGE; sorted names -> ids 0..C-1, "
                                                                   "names in the header) or a file of 'KEY LABEL' "
                                                                   "lines")] = None,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", min=1, help="write a token set folder of "
                                                      "shards of this many inputs (default 10000 when -o is a "
                                                      "folder or under torchrun); re-running resumes it")] = None,
    quiet: QuietOpt = False,
):
    """Encode images (ADM centre crop to the model size) into one self-describing token file, or into a sharded,
    resumable token set (-o DIR/; torchrun --nproc_per_node=N -m tokcli encode ... shards the work by rank)."""
    with cli_errors():
        from tokcli.core.distributed import dist_env
        from tokcli.core.labels import check_label_source, resolve_labels
        from tokcli.encode_set import is_set_output

        items = _items(inputs, image_size)
        check_label_source(labels)
        resolve_labels(labels, [it.key for it in items])  # an unlabelled input: refused before the model loads
        if is_set_output(output, shard_size, dist_env()[1]):
            from tokcli.core.set_writer import check_set_folder

            check_set_folder(output)
            return _encode_set(items, output, model, device, precision, quiet,
                               dict(memory_format=memory_format, compile=compile), shard_size=shard_size,
                               image_size=image_size, batch_size=batch_size, workers=workers,
                               skip_errors=skip_errors, sample_posterior=sample_posterior, seed=seed,
                               latent_dtype=latent_dtype, labels=labels)
        from tokcli import pipeline

        pipeline.check_output_file(output)
        tok = _load(model, device, precision, dict(memory_format=memory_format, compile=compile))
        res = pipeline.encode(tok, items, ref=pipeline.model_ref(model, tok), output=output, image_size=image_size,
                              batch_size=batch_size, workers=workers, skip_errors=skip_errors, quiet=quiet,
                              precision=precision, sample_posterior=sample_posterior, seed=seed,
                              latent_dtype=latent_dtype, labels=labels)
        _warn_upscaled(res)
        if output != "-":
            err(f"encoded {len(res.keys)} image(s) with {tok.name} -> {output}")
        report_failures(res.errors)


def _encode_set(items, output: str, model, device: str, precision: str, quiet: bool, speed: dict, **opts):
    """`tok encode ... -o DIR/`, on this rank of a torchrun job (or alone)."""
    from tokcli import pipeline
    from tokcli.core.device import resolve_device
    from tokcli.core.distributed import process_group
    from tokcli.encode_set import encode_set

    with process_group(resolve_device(device)) as (rank, world, dev):
        tok = _load(model, str(dev), precision, speed)
        res = encode_set(tok, items, ref=pipeline.model_ref(model, tok), output=output, precision=precision,
                         quiet=quiet, rank=rank, world=world, **opts)
    if rank == 0:
        _warn_upscaled(res)
        kept = f", {len(res.kept)} verified shard(s) kept" if res.kept else ""
        err(f"encoded {res.count} image(s) with {tok.name} -> {output} ({res.shards} shard(s){kept})")
        report_failures(res.errors)
    elif res.errors:
        raise typer.Exit(1)  # rank 0 lists the failures of every rank


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
    memory_format: MemoryFormatOpt = None,
    compile: CompileOpt = False,
    quiet: QuietOpt = False,
):
    """Decode a token file back to PNG images."""
    with cli_errors():
        from tokcli import pipeline
        from tokcli.core.token_set import open_tokens

        options = sampler_options(steps, cfg, sampler)
        src = open_tokens(tokens)  # a set is read one shard at a time
        pipeline.check_output_folder(output)
        tok = _load(model or src.header.get("model"), device, precision,
                    dict(memory_format=memory_format, compile=compile))
        res = pipeline.decode(tok, src, output, batch_size=batch_size, seed=seed, force=force, quiet=quiet,
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
    memory_format: MemoryFormatOpt = None,
    compile: CompileOpt = False,
    latent_dtype: LatentDtypeOpt = None,
    quiet: QuietOpt = False,
):
    """Encode then decode images (same code path as encode + decode), writing PNGs that mirror the input tree."""
    with cli_errors():
        from tokcli import pipeline

        options = sampler_options(steps, cfg, sampler)
        items = _items(inputs, image_size)
        pipeline.check_output_folder(output)
        tok = _load(model, device, precision, dict(memory_format=memory_format, compile=compile))
        res = pipeline.reconstruct(tok, items, output, image_size=image_size, batch_size=batch_size,
                                   workers=workers, seed=seed, skip_errors=skip_errors, quiet=quiet,
                                   precision=precision, sampler=options, sample_posterior=sample_posterior,
                                   latent_dtype=latent_dtype)
        _warn_upscaled(res)
        err(f"reconstructed {len(res.written)} image(s) with {tok.name} -> {output}")
        report_failures(res.errors)
