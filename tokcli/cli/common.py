"""Shared CLI plumbing: one-line errors with the right exit code, common options, stdout/stderr helpers."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from typing import Annotated, Any, Iterator, Optional

import typer

from tokcli.errors import TokError, TokUsageError

# Common options (Annotated aliases keep every command's signature short and consistent).
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="registry name, local-dir:PATH, hf-hub:org/repo or a "
                                                               "model folder [default: the shipped wetok-tiny]")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="images per forward pass")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=0, help="image-decoding threads (0 = main thread)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed for stochastic decoders and sampling")]
SizeOpt = Annotated[int, typer.Option("--image-size", min=8,
                                      help="ADM centre-crop size [default: the model's]")]
SkipOpt = Annotated[bool, typer.Option("--skip-errors", help="process the good inputs, list failures at the end "
                                                              "(the exit code is still 1)")]
PrecisionOpt = Annotated[str, typer.Option("--precision", "--dtype", help="fp32 (exact, reproducible tokens) or tf32 (CUDA "
                                                                "tensor cores: much faster, ~0.5% of tokens differ)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", min=1, help="sampling steps of a generative decoder "
                                                                         "[default: the model's]")]
CfgOpt = Annotated[Optional[float], typer.Option("--cfg", help="classifier-free guidance scale of a generative "
                                                               "decoder [default: the model's]")]
SamplerOpt = Annotated[Optional[list[str]], typer.Option("--sampler", metavar="KEY=VALUE",
                                                         help="another decoder sampler option (repeatable); VALUE "
                                                              "is read as JSON when it parses, else as text")]


def sampler_options(steps: int | None, cfg: float | None, pairs: list[str] | None) -> dict[str, Any]:
    """``--steps``, ``--cfg`` and ``--sampler KEY=VALUE`` -> the keywords for ``model.decode``. Whether the model's
    family takes them is checked by the model (a usage error, exit code 2)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise TokUsageError(f"--sampler takes KEY=VALUE (e.g. --sampler steps=8), got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    for key, value in (("steps", steps), ("cfg", cfg)):
        if value is not None:
            if key in out and out[key] != value:
                raise TokUsageError(f"--{key} {value} contradicts --sampler {key}={out[key]}")
            out[key] = value
    return out


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn library errors into `error: ...` on stderr and the error's exit code; no traceback for users.

    Unexpected exceptions (bugs) also print one line; set TOK_DEBUG=1 to see the traceback.
    """
    try:
        yield
    except typer.Exit:
        raise
    except TokError as e:
        err(f"error: {e}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err("interrupted")
        raise typer.Exit(130) from None
    except MemoryError:
        err("error: out of memory (try a smaller --batch-size)")
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if os.environ.get("TOK_DEBUG"):
            traceback.print_exc()
        else:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            err(f"error: internal {type(e).__name__}: {msg} (set TOK_DEBUG=1 for the traceback)")
        raise typer.Exit(1) from None


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def report_failures(errors: list[tuple[str, str]]) -> None:
    """List every input that failed (with --skip-errors) and exit 1: nothing is dropped silently."""
    if not errors:
        return
    err(f"{len(errors)} input(s) failed:")
    for key, msg in errors:
        err(f"  {key}: {msg}")
    raise typer.Exit(1)
