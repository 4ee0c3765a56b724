"""`tok train`: one training loop for every family, driven by a TOML recipe (what it optimises is the family's
objective, ``tokcli/train/objective.py``)."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from tokcli.cli.common import cli_errors, err, print_json


def train_cmd(
    recipe: Annotated[str, typer.Argument(help="recipe file (TOML), e.g. recipes/wetok-tiny-cpu.toml")],
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="override optim.max_steps")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="run folder [default: runs/<name>]")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="continue from the newest checkpoint in this "
                                                                   "run folder (or this checkpoint folder)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
):
    """Train a model with its family's objective; checkpoints resume exactly; the final EMA weights are exported as a
    model folder."""
    with cli_errors():
        from tokcli.core.distributed import dist_env
        from tokcli.train.recipe import load_recipe
        from tokcli.train.trainer import train

        r = load_recipe(recipe)
        res = train(r, output_dir=output, max_steps=max_steps, resume=resume, progress=not quiet)
        report(res, rank=dist_env()[0])


def report(res: dict[str, Any], *, rank: int) -> None:
    """The run's summary: on rank 0 only (under torchrun every rank returns one; the others print nothing)."""
    if rank != 0:
        return
    err(f"exported {res.get('model_dir')}")
    print_json(res)
