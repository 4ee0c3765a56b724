"""Shared CLI plumbing: one-line errors with the right exit code, common options, stdout/stderr helpers."""

from __future__ import annotations

import contextlib
import errno
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
                                      help="ADM centre-crop size, at most 4096 (TOK_MAX_IMAGE_SIZE) "
                                           "[default: the model's]")]
PosteriorOpt = Annotated[bool, typer.Option("--sample-posterior",
                                            help="encode with a posterior sample (the official CODA encode) "
                                                 "instead of the mean; image i is seeded with --seed + i")]
SkipOpt = Annotated[bool, typer.Option("--skip-errors", help="process the good inputs, list failures at the end "
                                                              "(the exit code is still 1)")]
PrecisionOpt = Annotated[str, typer.Option("--precision", "--dtype", help="fp32 (exact, reproducible tokens), tf32 (CUDA "
                                                                "tensor cores: much faster, ~0.5% of tokens differ) "
                                                                "or bf16 (bfloat16 autocast, CUDA and CPU: most "
                                                                "tokens equal, not all); recorded in the token header")]
LatentDtypeOpt = Annotated[Optional[str], typer.Option("--latent-dtype", help="storage of latent tokens: float32 "
                                                       "(default, exact) or float16 (half the bytes, rounded)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the encoder / decoder (the first batch "
                                                            "of each shape compiles; recorded in the token header)")]
MemoryFormatOpt = Annotated[Optional[str], typer.Option("--memory-format", help="layout of a convolutional "
                                                         "tokenizer: auto (the measured faster: contiguous on CPU), channels_last, "
                                                         "contiguous [default: $TOK_MEMORY_FORMAT or auto]")]
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


PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_broken_pipe(e: BaseException) -> bool:
    return isinstance(e, BrokenPipeError) or (isinstance(e, OSError) and e.errno == errno.EPIPE)


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's last flush into a closed pipe says nothing."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests capture stdout in memory)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _os_error_line(e: OSError) -> str:
    from tokcli.core.atomic import os_error_message

    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG):
        return os_error_message(e, e.filename)
    reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
    return f"{reason}: {e.filename}" if e.filename else reason


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
    except OSError as e:
        if is_broken_pipe(e):  # the reader of our stdout went away (`tok ... | head`): no message, 141
            silence_stdout()
            raise typer.Exit(PIPE_CLOSED) from None
        if os.environ.get("TOK_DEBUG"):
            traceback.print_exc()
        err(f"error: {_os_error_line(e)}")
        raise typer.Exit(1) from None
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
