"""The `tok` command line (Typer). Commands parse options and call the library; no model maths here."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from tokcli.cli import bench, codec, convert, generate, train
from tokcli.cli.common import PIPE_CLOSED, cli_errors, is_broken_pipe, print_json, silence_stdout
from tokcli.version import __version__

app = typer.Typer(
    name="tok",
    help="One interface to the image tokenizers of 2025: encode images to tokens, decode, reconstruct, "
         "convert official checkpoints, train and measure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        print(f"tok {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                          help="print the version and exit")] = None):
    pass


@app.command("models")
def models_cmd(
    pattern: Annotated[str, typer.Argument(help="glob filter, e.g. 'wetok-*'")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout")] = False,
):
    """List registry models, whether their weights are on this machine, and how to get them."""
    with cli_errors():
        from tokcli.core.registry import describe, list_models

        rows = [describe(n) for n in list_models(pattern)]
        if as_json:
            print_json(rows)
            return
        w = max([len(r["name"]) for r in rows] + [4])
        print(f"{'name':<{w}}  {'family':<7} {'available':<9} description")
        for r in rows:
            mark = "yes" if r["available"] else ("convert" if r["hub_repo"] else "no")
            star = " (default)" if r["default"] else ""
            print(f"{r['name']:<{w}}  {r['family']:<7} {mark:<9} {r['description']}{star}")


@app.command("info")
def info_cmd(
    path: Annotated[str, typer.Argument(help="token file (.npz, sharded set folder, or - for stdin) or model "
                                             "folder / name")],
    verify: Annotated[bool, typer.Option("--verify", help="recompute the model folder's sha256")] = False,
):
    """Describe a token file (header, shapes, bytes per image) or a model folder, as JSON on stdout."""
    with cli_errors():
        from tokcli.info import describe_path

        print_json(describe_path(path, verify=verify))


app.command("encode")(codec.encode_cmd)
app.command("decode")(codec.decode_cmd)
app.command("reconstruct")(codec.reconstruct_cmd)
app.command("convert")(convert.convert_cmd)
app.command("generate")(generate.generate_cmd)
app.command("train")(train.train_cmd)
app.add_typer(bench.app, name="bench")


def _stdout_closed() -> bool:
    """Flush stdout now (not at interpreter exit, where a closed pipe would print a traceback); True when the reader
    went away. click's own handler of a closed pipe wraps stdout in a PacifyFlushWrapper: that counts too."""
    if type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):
        return True
    try:
        sys.stdout.flush()
    except (OSError, ValueError) as e:
        return isinstance(e, OSError) and is_broken_pipe(e)
    return False


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. A closed stdout pipe (``tok models | head -1``) ends the command silently with
    status 141 (128 + SIGPIPE), the Unix convention."""
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="tok")
        code = None
    except SystemExit as e:
        code = e.code
    except OSError as e:
        if not is_broken_pipe(e):
            raise
        code = PIPE_CLOSED
    if code == PIPE_CLOSED or _stdout_closed():
        silence_stdout()
        code = PIPE_CLOSED
    raise SystemExit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
