"""Run the `tok` CLI the way a user does, but in the test process (no ~2-4 s torch import per call).

:func:`run_inprocess` calls ``tokcli.cli.app.main(argv)`` with stdin, stdout and stderr swapped for in-memory
byte streams and returns a :class:`subprocess.CompletedProcess`, the same object (bytes ``stdout``/``stderr``,
int ``returncode``) that :func:`run_subprocess` (the real ``python -m tokcli`` process) returns. Process state that
a real process would start fresh with is set up and put back around each call: the environment, the working
folder, ``sys.argv``, the registry's entries read from ``$TOK_REGISTRY``, Python's warning filters, and torch's
global switches (threads, TF32/cuDNN flags, grad mode, default dtype, RNG state).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def _argv(args: Sequence[object]) -> list[str]:
    return [str(a) for a in args]


def run_subprocess(args: Sequence[object], *, input: bytes | None = None, env: Mapping[str, str] | None = None,
                   cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh ``python -m tokcli`` process."""
    e = dict(os.environ)
    e.update({k: str(v) for k, v in (env or {}).items()})
    return subprocess.run([sys.executable, "-m", "tokcli", *_argv(args)], input=input, capture_output=True,
                          env=e, cwd=cwd or REPO, timeout=TIMEOUT_S)


# --- process state that a fresh process would not inherit ------------------------------------------------------

@contextlib.contextmanager
def _environ(env: Mapping[str, str] | None) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    try:
        yield
    finally:
        for k in [k for k in os.environ if k not in saved]:
            del os.environ[k]
        for k, v in saved.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


@contextlib.contextmanager
def _chdir(cwd: Path | str) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _argv_as(argv: list[str]) -> Iterator[None]:
    old = sys.argv
    sys.argv = ["tok", *argv]
    try:
        yield
    finally:
        sys.argv = old


@contextlib.contextmanager
def _registry_reloaded() -> Iterator[None]:
    """The registry caches the entries it read from $TOK_REGISTRY: re-read the (new) environment on entry and
    forget it again on exit."""
    from tokcli.core import registry

    registry.reload()
    try:
        yield
    finally:
        registry.reload()


@contextlib.contextmanager
def _fresh_warnings() -> Iterator[None]:
    """Python's default warning filters, printed to (the captured) stderr, as in a new interpreter; pytest's own
    filters and recording are back afterwards."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", cat, append=True)

        def show(message, category, filename, lineno, file=None, line=None):
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _torch_state() -> Iterator[None]:
    """Put back torch's process-wide switches the CLI may flip (set_precision, seeding, threads)."""
    torch = sys.modules.get("torch")
    if torch is None:  # not imported yet: nothing to save (the tests' session fixtures import it anyway)
        import torch
    b = torch.backends
    saved = dict(threads=torch.get_num_threads(), grad=torch.is_grad_enabled(), dtype=torch.get_default_dtype(),
                 det=torch.are_deterministic_algorithms_enabled(),
                 det_warn=torch.is_deterministic_algorithms_warn_only_enabled(),
                 mm_prec=torch.get_float32_matmul_precision(), mm_tf32=b.cuda.matmul.allow_tf32,
                 cudnn=(b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic, b.cudnn.enabled),
                 rng=torch.random.get_rng_state(), py_rng=random.getstate())
    np = sys.modules.get("numpy")
    np_rng = np.random.get_state() if np is not None else None
    from tokcli.core import device as tok_device  # --precision bf16: tok's own autocast switch

    bf16 = dict(tok_device._BF16)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved["threads"]:
            torch.set_num_threads(saved["threads"])
        torch.set_grad_enabled(saved["grad"])
        torch.set_default_dtype(saved["dtype"])
        torch.use_deterministic_algorithms(saved["det"], warn_only=saved["det_warn"])
        torch.set_float32_matmul_precision(saved["mm_prec"])
        b.cuda.matmul.allow_tf32 = saved["mm_tf32"]
        b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic, b.cudnn.enabled = saved["cudnn"]
        torch.random.set_rng_state(saved["rng"])
        random.setstate(saved["py_rng"])
        if np_rng is not None:
            np.random.set_state(np_rng)
        tok_device._BF16.update(bf16)


class _BinaryCapture(io.BufferedIOBase):
    """``sys.stdout.buffer`` of a :class:`_TextCapture` (binary writes such as ``tok encode -o -``)."""

    def __init__(self, owner: "_TextCapture"):
        super().__init__()
        self._owner = owner

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self._owner._write_bytes(bytes(b))


class _TextCapture(io.TextIOBase):
    """A text stream whose text and binary (``.buffer``) writes land, in order, in one byte buffer while the call
    runs. Afterwards it forwards to whatever ``sys.<name>`` is then: a logging handler or other object that kept
    a reference (diffusers / huggingface_hub create their StreamHandler on first import) never writes into a
    dead stream, and its later lines show up where a real process would print them."""

    def __init__(self, name: str, errors: str):
        super().__init__()
        self._name, self._errors = name, errors
        self._bytes = io.BytesIO()
        self._live = True
        self.buffer = _BinaryCapture(self)

    encoding = property(lambda self: "utf-8")
    errors = property(lambda self: self._errors)
    name = property(lambda self: f"<captured {self._name}>")

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def _target(self):
        cur = getattr(sys, self._name)
        return cur if cur is not self else getattr(sys, f"__{self._name}__")

    def _write_bytes(self, b: bytes) -> int:
        if self._live:
            self._bytes.write(b)
        else:
            t = self._target()
            t.buffer.write(b) if hasattr(t, "buffer") else t.write(b.decode("utf-8", "backslashreplace"))
        return len(b)

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if self._live:
            self._bytes.write(s.encode("utf-8", self._errors))
        else:
            self._target().write(s)
        return len(s)

    def flush(self) -> None:
        if not self._live:
            with contextlib.suppress(Exception):
                self._target().flush()

    def finish(self) -> bytes:
        self._live = False
        return self._bytes.getvalue()


class _Streams:
    """stdin/stdout/stderr of one call: stdin reads ``input`` (``sys.stdin`` text and ``sys.stdin.buffer``),
    stdout/stderr are captured as bytes."""

    def __init__(self, input: bytes | None):
        self.stdin = io.TextIOWrapper(io.BytesIO(input or b""), encoding="utf-8")
        self.stdout = _TextCapture("stdout", "strict")
        self.stderr = _TextCapture("stderr", "backslashreplace")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        old = sys.stdin, sys.stdout, sys.stderr
        sys.stdin, sys.stdout, sys.stderr = self.stdin, self.stdout, self.stderr
        try:
            yield
        finally:
            sys.stdin, sys.stdout, sys.stderr = old

    def values(self) -> tuple[bytes, bytes]:
        """(stdout, stderr) bytes; from now on the capture streams forward to the real ones."""
        return self.stdout.finish(), self.stderr.finish()


def _exit_code(e: SystemExit) -> int:
    """What the interpreter would make of ``sys.exit(code)``; a non-int code is printed to stderr, status 1."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run_inprocess(args: Sequence[object], *, input: bytes | None = None, env: Mapping[str, str] | None = None,
                  cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """``tokcli.cli.app.main(argv)`` in this process, with what a real process would see and return."""
    argv = _argv(args)
    streams = _Streams(input)
    code = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(_environ(env))
        stack.enter_context(_chdir(cwd or REPO))
        stack.enter_context(_argv_as(argv))
        stack.enter_context(_torch_state())
        stack.enter_context(streams.installed())
        stack.enter_context(_fresh_warnings())
        try:
            stack.enter_context(_registry_reloaded())
            from tokcli.cli.app import main

            main(argv)
        except SystemExit as e:
            code = _exit_code(e)
        except KeyboardInterrupt:
            code = 130
            traceback.print_exc()
        except BaseException:  # noqa: BLE001 - an uncaught error: a real process prints the traceback, exits 1
            code = 1
            traceback.print_exc()
    stdout, stderr = streams.values()
    return subprocess.CompletedProcess(["tok", *argv], code, stdout, stderr)
