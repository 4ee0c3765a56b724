"""`tok convert`: official checkpoint -> tok model folder."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tokcli.cli.common import cli_errors, err, print_json


def convert_cmd(
    source: Annotated[str, typer.Argument(help="a registry name (wetok-16x: fetched from the Hub or the HF "
                                               "cache) or an official checkpoint file")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="model folder to write [default for a "
                                                                         "registry name: the tok cache]")] = None,
    family: Annotated[Optional[str], typer.Option("--family", help="family of a checkpoint file (wetok)")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="the official config (YAML) that goes "
                                                                   "with the checkpoint file")] = None,
    as_model: Annotated[Optional[str], typer.Option("--as", help="take the architecture from this registry entry "
                                                                "(instead of --config) and, without -o, install "
                                                                "the result as that model")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="model name recorded in config.json")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output folder")] = False,
    tokenizer_out: Annotated[Optional[str], typer.Option("--tokenizer-out", help="a generator checkpoint that "
                                                         "carries its tokenizer (wetok_ar): write the tokenizer "
                                                         "folder here instead of inside the generator's")] = None,
):
    """Convert an official checkpoint (read with weights_only=True) into a safetensors model folder."""
    with cli_errors():
        from tokcli.convert import convert

        folder = convert(source, output=output, family=family, config=config, as_model=as_model, name=name,
                         overwrite=overwrite, tokenizer_out=tokenizer_out)
        err(f"wrote {folder.path}")
        print_json({"path": str(folder.path), "name": folder.name, "family": folder.family,
                    "weights_sha256": folder.sha256, "provenance": folder.config.get("provenance", {})})
